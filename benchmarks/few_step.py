"""The few-step path side by side: diffusers (PyTorch) with the LoRA fused, LCMScheduler and AutoencoderTiny,
against nsdedge few-step bundles, and against nsdedge's own 20-step guided full-VAE image of the same bundle.

Both sides get the sd15-random-lcm preset saved in the real formats (SD 1.5 folder, IP-Adapter-Plus, a random
LoRA of LCM-LoRA's shape as pytorch_lora_weights.safetensors, a random TAESD folder), the same tokens and
latents. Each side runs in its own process (peak RSS is its own) and reconstructs --images trials one at a time
with its models loaded and warm (one untimed image first), as a stream of fMRI volumes would arrive.

    python benchmarks/few_step.py --workdir /tmp/nsdedge-fewstep --resolution 256 --precisions fp32,int8

writes benchmarks/results/few-step-<machine>-<resolution>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from compare import machine_name, preset_sources  # noqa: E402

from nsdedge.bench import cpu_flags, cpu_name, peak_rss_mb  # noqa: E402

STEPS, GUIDANCE = 4, 1.0                      # LCM-LoRA's few-step setting


def timed_images(make, n: int) -> tuple[list[float], object]:
    make(0)                                   # warm-up: sessions / kernels ready, as in a running stream
    times, last = [], None
    for i in range(n):
        t = time.perf_counter()
        last = make(i)
        times.append(time.perf_counter() - t)
    return times, last


def side_diffusers(a) -> dict:
    import torch
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    w = Path(a.workdir) / "weights"
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(w / "sd15", vae=AutoencoderTiny.from_pretrained(w / "taesd"),
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(w / "lcm-lora"), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.load_ip_adapter(str(w), subfolder="", weight_name="ip-adapter-plus_sd15.bin", image_encoder_folder=None)
    pipe.unet.encoder_hid_proj = None                  # feed decoded tokens: the Resampler is bypassed
    pipe.unet.config.encoder_hid_dim_type = None
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    inputs = np.load(Path(a.workdir) / f"inputs-{a.resolution}.npz")
    with torch.inference_mode():
        text, _ = pipe.encode_prompt(str(inputs["prompt"]), "cpu", 1, False)

        def make(i):
            return pipe(prompt_embeds=torch.cat([text, torch.from_numpy(inputs["tokens"][i:i + 1])], 1),
                        latents=torch.from_numpy(inputs["latents"][i:i + 1]), num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, height=a.resolution, width=a.resolution, output_type="np").images
        times, _ = timed_images(make, a.images)
    return {"side": "diffusers-fp32-lcm", "load_s": load, "image_s": times, "peak_rss_mb": peak_rss_mb(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def side_bundle(a, side: str) -> dict:
    import onnxruntime as ort

    from nsdedge.runtime import Reconstructor

    precision, _, mode = side.partition("-")
    t0 = time.perf_counter()
    rec = Reconstructor(Path(a.workdir) / f"bundle-{precision}-{a.resolution}", provider="cpu", verify=False)
    load = time.perf_counter() - t0
    inputs = np.load(Path(a.workdir) / f"inputs-{a.resolution}.npz")
    kw = {} if mode == "lcm" else {"steps": 20, "guidance": 7.5, "scheduler": "ddim", "vae": "full"}

    def make(i):
        return rec.generate(inputs["tokens"][i:i + 1], latents=inputs["latents"][i:i + 1], seed=i, **kw)
    times, _ = timed_images(make, a.images if mode == "lcm" else 1)
    return {"side": f"nsdedge-{side}", "load_s": load, "image_s": times, "peak_rss_mb": peak_rss_mb(),
            "onnxruntime": ort.__version__, "settings": rec.settings(**kw)}


def prepare(a, precisions: list[str]) -> None:
    """The preset's weights in the real formats, one few-step bundle per precision (exported from those files
    through the same loaders as `nsdedge export --lora --tiny-vae`), shared inputs."""
    from nsdedge.export.build import export_bundle
    from nsdedge.export.few_step import LCM_RUN_DEFAULTS, load_tiny_vae, read_lora
    from nsdedge.export.presets import build_preset, save_weights
    from nsdedge.export.sources import quiet_libraries

    quiet_libraries()
    work = Path(a.workdir)
    w = work / "weights"
    if not (w / "taesd" / "config.json").exists():
        print("saving sd15-random-lcm weights", file=sys.stderr, flush=True)
        save_weights(build_preset("sd15-random-lcm", seed=0), w)
    for p in precisions:
        out = work / f"bundle-{p}-{a.resolution}"
        if (out / "manifest.json").exists():
            continue
        print(f"exporting {p} few-step bundle at {a.resolution}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        src = preset_sources(w)
        src.lora, src.lora_name = read_lora(w / "lcm-lora" / "pytorch_lora_weights.safetensors"), "lcm-lora"
        src.tiny_vae = load_tiny_vae(w / "taesd")
        src.run_defaults = {**LCM_RUN_DEFAULTS, "vae": "tiny"}
        export_bundle(src, out, precision=p, resolution=a.resolution, force=True,
                      progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
        print(f"  {p} export {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    inputs = work / f"inputs-{a.resolution}.npz"
    if not inputs.exists():
        from nsdedge.runtime import Reconstructor

        rec = Reconstructor(work / f"bundle-{precisions[0]}-{a.resolution}", "cpu", verify=False)
        voxels = np.random.default_rng(0).standard_normal((a.images, rec.subjects["synth01"])).astype(np.float32)
        np.savez(inputs, tokens=rec.decode(voxels, "synth01"), latents=rec.initial_latents(a.images, seed=0),
                 prompt=rec.manifest.prompt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/nsdedge-fewstep")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--images", type=int, default=5, help="timed few-step images per side (after one warm-up)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        print(json.dumps(side_diffusers(a) if a.side == "diffusers" else side_bundle(a, a.side)))
        return
    precisions = a.precisions.split(",")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    prepare(a, precisions)
    sides = ["diffusers", *(f"{p}-lcm" for p in precisions), *(f"{p}-20step" for p in precisions)]
    runs = {}
    for side in sides:
        print(f"{side}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--side", side, "--workdir", a.workdir, "--resolution", str(a.resolution),
               "--images", str(a.images)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        r["median_s"] = float(np.median(r["image_s"]))
        r["p90_s"] = float(np.percentile(r["image_s"], 90))
        runs[r["side"]] = r
        print(f"  {r['median_s']:.2f} s per image, peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    base = runs["diffusers-fp32-lcm"]
    for s, r in runs.items():
        r["speedup_vs_diffusers_lcm"] = base["median_s"] / r["median_s"]
        r["rss_ratio_vs_diffusers_lcm"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    for p in precisions:
        runs[f"nsdedge-{p}-lcm"]["speedup_vs_own_20step"] = (runs[f"nsdedge-{p}-20step"]["median_s"]
                                                            / runs[f"nsdedge-{p}-lcm"]["median_s"])
    result = {"machine": machine_name(), "cpu": cpu_name(), "cpu_flags": cpu_flags(), "resolution": a.resolution,
              "few_step": {"scheduler": "lcm", "steps": STEPS, "guidance": GUIDANCE, "vae": "tiny (TAESD)"},
              "images": a.images, "command": " ".join(sys.argv), "runs": runs,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = HERE / "results" / f"few-step-{result['machine']}-{a.resolution}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'side':<24}{'s/image':>9}{'p90':>8}{'vs diffusers':>14}{'peak RSS MB':>13}{'RSS ratio':>11}")
    for s, r in runs.items():
        print(f"{s:<24}{r['median_s']:>9.2f}{r['p90_s']:>8.2f}{r['speedup_vs_diffusers_lcm']:>14.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['rss_ratio_vs_diffusers_lcm']:>11.2f}")
    for p in precisions:
        print(f"nsdedge {p}: few-step is {runs[f'nsdedge-{p}-lcm']['speedup_vs_own_20step']:.1f}x its 20-step image")
    print(f"written {out}")


if __name__ == "__main__":
    main()
