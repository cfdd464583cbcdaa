"""Side by side: diffusers' StableDiffusionPipeline + IP-Adapter-Plus (PyTorch) against nsdedge bundles.

Both sides get the same random-weight SD 1.5 + IP-Adapter-Plus model (the sd15-random preset saved in the
real formats), the same decoded tokens, initial latents, scheduler, steps and guidance. Each measurement runs
in its own process (so peak RSS is that side's alone), and the sides alternate: diffusers, bundle 1,
bundle 2, ..., then again for --rounds. Warm-up (one step and one VAE decode) is kept apart from the
timed end-to-end run.

    python benchmarks/compare.py --workdir /tmp/nsdedge-compare --precisions fp32,int8 --rounds 1

writes benchmarks/results/<machine>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from nsdedge.bench import peak_rss_mb  # noqa: E402  (VmHWM: ru_maxrss would report the parent's size)


def machine_name() -> str:
    from nsdedge.bench import cpu_name
    cores = len(os.sched_getaffinity(0))
    return f"{cpu_name().split()[0].lower()}-{cores}core-{platform.machine()}"


def side_diffusers(a) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    w = Path(a.workdir) / "weights"
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(w / "sd15", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(w), subfolder="", weight_name="ip-adapter-plus_sd15.bin", image_encoder_folder=None)
    pipe.unet.encoder_hid_proj = None                  # feed decoded tokens: the Resampler is bypassed
    pipe.unet.config.encoder_hid_dim_type = None
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    inputs = np.load(Path(a.workdir) / "inputs.npz")
    tokens, uncond = torch.from_numpy(inputs["tokens"]), torch.from_numpy(inputs["uncond"])
    latents = torch.from_numpy(inputs["latents"])
    with torch.inference_mode():
        text, neg = pipe.encode_prompt(str(inputs["prompt"]), "cpu", 1, True, str(inputs["negative_prompt"]))
        kw = dict(prompt_embeds=torch.cat([text, tokens], 1), negative_prompt_embeds=torch.cat([neg, uncond], 1),
                  guidance_scale=a.guidance, height=a.resolution, width=a.resolution, output_type="np")
        pipe(num_inference_steps=1, latents=latents.clone(), **kw)          # warm-up
        t = time.perf_counter()
        img = pipe(num_inference_steps=a.steps, latents=latents.clone(), **kw).images
        e2e = time.perf_counter() - t
    np.save(Path(a.workdir) / "diffusers.npy", (img * 255).round().astype(np.uint8))
    return {"side": "diffusers-fp32", "load_s": load, "e2e_s": e2e, "peak_rss_mb": peak_rss_mb(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def side_bundle(a, precision: str) -> dict:
    from nsdedge.runtime import Reconstructor

    bundle = Path(a.workdir) / f"bundle-{precision}"
    t0 = time.perf_counter()
    rec = Reconstructor(bundle, provider="cpu", verify=False)
    inputs = np.load(Path(a.workdir) / "inputs.npz")
    rec.generate(inputs["tokens"], steps=1, guidance=a.guidance, latents=inputs["latents"])   # loads + warm-up
    load_warm = time.perf_counter() - t0
    t = time.perf_counter()
    img = rec.generate(inputs["tokens"], steps=a.steps, guidance=a.guidance, latents=inputs["latents"])
    e2e = time.perf_counter() - t
    np.save(Path(a.workdir) / f"{precision}.npy", img)
    import onnxruntime as ort
    return {"side": f"nsdedge-{precision}", "load_and_warmup_s": load_warm, "e2e_s": e2e,
            "peak_rss_mb": peak_rss_mb(), "onnxruntime": ort.__version__}


def preset_sources(w: Path):
    """The saved preset's weights loaded back through nsdedge's loaders, as `nsdedge export --sd ...` does."""
    from nsdedge.decoders.linear import read_decoder
    from nsdedge.export.sources import load_sources

    dec = read_decoder(w / "decoder-synth01.safetensors")
    return load_sources(w / "sd15", w / "ip-adapter-plus_sd15.bin", w / "image_encoder", [dec],
                        {"synth01": w / "decoder-synth01.safetensors"})


def prepare(a, precisions: list[str]) -> None:
    """Weights in the real formats, one bundle per precision (exported from them), shared inputs."""
    from nsdedge.export.build import export_bundle
    from nsdedge.export.presets import build_preset, save_weights

    work = Path(a.workdir)
    w = work / "weights"
    if not (w / "sd15" / "model_index.json").exists():
        print("saving sd15-random weights", file=sys.stderr, flush=True)
        save_weights(build_preset("sd15-random", seed=0), w)
    for p in precisions:
        if not (work / f"bundle-{p}" / "manifest.json").exists():
            print(f"exporting {p} bundle", file=sys.stderr, flush=True)
            t = time.perf_counter()
            src = preset_sources(w)
            precision, _, ops = p.partition("+")   # "int8+conv": dynamic int8 convs; "int8+matmul": fp32 conv weights
            export_bundle(src, work / f"bundle-{p}", precision=precision, resolution=a.resolution, force=True,
                          int8_ops={"conv": "matmul+conv", "matmul": "matmul"}.get(ops, "matmul+conv-weights"),
                          progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
            print(f"  {p} export {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    if not (work / "inputs.npz").exists():
        from nsdedge.runtime import Reconstructor
        rec = Reconstructor(work / f"bundle-{precisions[0]}", "cpu", verify=False)
        voxels = np.random.default_rng(0).standard_normal((1, rec.subjects["synth01"])).astype(np.float32)
        np.savez(work / "inputs.npz", tokens=rec.decode(voxels, "synth01"), uncond=rec.uncond_tokens,
                 latents=rec.initial_latents(1, seed=0), prompt=rec.manifest.prompt,
                 negative_prompt=rec.manifest.negative_prompt)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    sides = list(result["median"])
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].bar(sides, [result["median"][s]["e2e_s"] for s in sides], color="tab:blue")
    ax[0].set_ylabel("seconds per image")
    ax[1].bar(sides, [result["median"][s]["peak_rss_mb"] / 1024 for s in sides], color="tab:orange")
    ax[1].set_ylabel("peak RSS (GB)")
    for x in ax:
        x.tick_params(axis="x", rotation=20)
    fig.suptitle(f"SD 1.5 + IP-Adapter-Plus, {result['resolution']}^2, {result['steps']} DDIM steps, "
                 f"guidance {result['guidance']}, {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/nsdedge-compare")
    ap.add_argument("--precisions", default="fp32,int8", help="bundles to compare: fp32, fp16, int8, int8+conv")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        r = side_diffusers(a) if a.side == "diffusers" else side_bundle(a, a.side)
        print(json.dumps(r))
        return
    precisions = a.precisions.split(",")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    prepare(a, precisions)
    runs: dict[str, list[dict]] = {}
    for rnd in range(a.rounds):
        for side in ["diffusers", *precisions]:
            print(f"round {rnd + 1}: {side}", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--side", side, "--workdir", a.workdir, "--resolution",
                   str(a.resolution), "--steps", str(a.steps), "--guidance", str(a.guidance)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs.setdefault(r["side"], []).append(r)
            print(f"  {r['e2e_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    median = {s: {k: float(np.median([x[k] for x in v])) for k in ("e2e_s", "peak_rss_mb")} for s, v in runs.items()}
    base = median["diffusers-fp32"]
    work = Path(a.workdir)
    ref = np.load(work / "diffusers.npy").astype(int)
    sizes = {}
    for p in precisions:
        m = json.loads((work / f"bundle-{p}" / "manifest.json").read_text())
        sizes[f"nsdedge-{p}"] = sum(f["size"] for f in m["files"].values()) / 2 ** 20
    sizes["diffusers-fp32"] = sum(f.stat().st_size for f in (work / "weights" / "sd15").rglob("*")
                                  if f.is_file() and f.parent.name in ("unet", "vae")) / 2 ** 20
    ratios = {s: {"speedup_vs_diffusers": base["e2e_s"] / v["e2e_s"],
                  "peak_rss_ratio": v["peak_rss_mb"] / base["peak_rss_mb"],
                  "disk_ratio": sizes[s] / sizes["diffusers-fp32"]} for s, v in median.items()}
    for p in precisions:
        img = np.load(work / f"{p}.npy").astype(int)
        ratios[f"nsdedge-{p}"]["max_abs_pixel_diff_vs_diffusers"] = int(np.abs(img - ref).max())
    result = {"machine": machine_name(), "resolution": a.resolution, "steps": a.steps, "guidance": a.guidance,
              "scheduler": "ddim", "rounds": a.rounds, "command": " ".join(sys.argv), "median": median,
              "sizes_mb": sizes, "ratios": ratios, "runs": runs,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = HERE / "results" / f"{result['machine']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"{'side':<18}{'s/image':>10}{'speed-up':>10}{'peak RSS MB':>13}{'RSS ratio':>11}{'disk ratio':>11}")
    for s, v in median.items():
        r = ratios[s]
        print(f"{s:<18}{v['e2e_s']:>10.1f}{r['speedup_vs_diffusers']:>10.2f}{v['peak_rss_mb']:>13.0f}"
              f"{r['peak_rss_ratio']:>11.2f}{r['disk_ratio']:>11.2f}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
