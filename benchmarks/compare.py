"""Side by side: diffusers' StableDiffusionPipeline + IP-Adapter-Plus (PyTorch) against nsdedge bundles.

Both sides get the same random-weight SD 1.5 + IP-Adapter-Plus model (the sd15-random preset saved in the
real formats), the same decoded tokens, initial latents, scheduler, steps and guidance. Each measurement runs
in its own process (so peak RSS is that side's alone), and the sides alternate: diffusers, bundle 1,
bundle 2, ..., then again for --rounds. Warm-up (one step and one VAE decode) is kept apart from the
timed end-to-end run.

    python benchmarks/compare.py --workdir /tmp/nsdedge-compare --precisions fp32,int8 --rounds 1

writes benchmarks/results/<machine>.json and .png. A side ending in "~low" runs its bundle in low-memory mode; one
ending in "~batch" (`--batch N`) runs N trials through the library's `reconstruct`, timed whole, loads included:

    python benchmarks/compare.py --batch 4 --precisions "ov-int8-full+bf16~batch,ov-int8-full+bf16~low~batch"

On a GPU, `--device cuda` runs diffusers fp16 (eager), diffusers fp16 with torch.compile, diffusers fp32 (the
pixel reference) and each bundle on onnxruntime's CUDA provider (and TensorRT's where it starts), each side in
its own process: seconds per image (median of --images warm images, sessions loaded), NVML peak memory above
what the device used before the process, and above that engine's idle context (a CUDA context with cuBLAS /
cuDNN handles and nothing else); `--batch N` adds each bundle's N-trial batch through the library, normal and
low-memory, timed whole (loads included).

    python benchmarks/compare.py --device cuda --workdir /tmp/cmp --precisions fp32,fp16 --images 3 --batch 10
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")     # before onnxruntime starts, in every side (README: Privacy)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from nsdedge.bench import peak_rss_mb


def machine_name() -> str:
    from nsdedge.bench import cpu_name
    cores = len(os.sched_getaffinity(0))
    return f"{cpu_name().split()[0].lower()}-{cores}core-{platform.machine()}"


class AnonPeak:
    """Peak of the process's anonymous resident memory (RssAnon: what it allocated, not the file pages it mapped),
    sampled every 5 ms by a daemon thread; peak RSS (VmHWM) counts both."""

    def __init__(self):
        import threading

        self.mb = 0.0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        status = Path("/proc/self/status")
        while status.exists():                                  # Linux; elsewhere the peak stays 0
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.mb = max(self.mb, int(line.split()[1]) / 1024)
            time.sleep(0.005)


def side_diffusers(a) -> dict:
    anon = AnonPeak()
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
        kw = {"prompt_embeds": torch.cat([text, tokens], 1), "negative_prompt_embeds": torch.cat([neg, uncond], 1),
                  "guidance_scale": a.guidance, "height": a.resolution, "width": a.resolution, "output_type": "np"}
        pipe(num_inference_steps=1, latents=latents.clone(), **kw)          # warm-up
        t = time.perf_counter()
        img = pipe(num_inference_steps=a.steps, latents=latents.clone(), **kw).images
        e2e = time.perf_counter() - t
    np.save(Path(a.workdir) / "diffusers.npy", (img * 255).round().astype(np.uint8))
    return {"side": "diffusers-fp32", "load_s": load, "e2e_s": e2e, "peak_rss_mb": peak_rss_mb(),
            "peak_anon_mb": anon.mb, "torch": torch.__version__, "threads": torch.get_num_threads()}


def side_bundle(a, precision: str) -> dict:
    """`precision`: a bundle's name; with "~low" (ov-int8-full+bf16~low) the bundle in low-memory mode (one graph
    open at a time, so each image compiles its graphs again: that time counts); with "~batch" (after "~low" if
    both) an --batch-trial batch through the library's `reconstruct`, timed whole from opening the bundle (loads,
    compiles and PNG writing included, no warm-up), e2e_s its time per image."""
    anon = AnonPeak()
    from nsdedge.runtime import Reconstructor

    name, batch = precision.removesuffix("~batch"), precision.endswith("~batch")
    bundle = Path(a.workdir) / f"bundle-{name.removesuffix('~low')}"
    t0 = time.perf_counter()
    rec = Reconstructor(bundle, provider="auto" if precision.startswith("ov-") else "cpu", verify=False,
                        low_memory=name.endswith("~low"))
    if batch:
        import tempfile

        from PIL import Image

        from nsdedge.runtime.batch import reconstruct

        with tempfile.TemporaryDirectory(dir=a.workdir) as out:
            reconstruct(rec, Path(a.workdir) / "voxels-batch.npy", out, steps=a.steps, guidance=a.guidance)
            img = np.stack([np.asarray(Image.open(f)) for f in sorted(Path(out).glob("*.png"))])
        load_warm, e2e = 0.0, (time.perf_counter() - t0) / len(img)
    else:
        inputs = np.load(Path(a.workdir) / "inputs.npz")
        rec.generate(inputs["tokens"], steps=1, guidance=a.guidance, latents=inputs["latents"])   # loads + warm-up
        load_warm = time.perf_counter() - t0
        t = time.perf_counter()
        img = rec.generate(inputs["tokens"], steps=a.steps, guidance=a.guidance, latents=inputs["latents"])
        e2e = time.perf_counter() - t
    np.save(Path(a.workdir) / f"{precision}.npy", img)
    if rec.provider == "openvino":
        import openvino
        engine = {"openvino": openvino.__version__}
    else:
        import onnxruntime
        engine = {"onnxruntime": onnxruntime.__version__}
    return {"side": f"nsdedge-{precision}", "load_and_warmup_s": load_warm, "e2e_s": e2e, "images": len(img),
            "peak_rss_mb": peak_rss_mb(), "peak_anon_mb": anon.mb, **engine}


# -- on a GPU --------------------------------------------------------------------------------------------------
def _gpu_watch():
    from nsdedge.bench import GpuMemoryPeak

    return GpuMemoryPeak(interval=0.002)


def _memory(gpu, context_mb: float | None) -> dict:
    if gpu.peak_mb is None:                                  # no NVML (a dry run on the CPU provider)
        return {"peak_gpu_mb": float("nan"), "context_mb": float("nan"), "peak_above_context_mb": float("nan")}
    return {"peak_gpu_mb": gpu.peak_mb - gpu.start_mb, "context_mb": context_mb - gpu.start_mb,
            "peak_above_context_mb": gpu.peak_mb - context_mb, "gpu_processes_max": gpu.processes}


def side_diffusers_cuda(a, variant: str) -> dict:
    """variant: fp16 | fp16-compile | fp32."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    w = Path(a.workdir) / "weights"
    dev = "cpu" if a.provider == "cpu" else "cuda"                    # cpu: a dry run of this script
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with _gpu_watch() as gpu:
        torch.ones(64, 64, device=dev) @ torch.ones(64, 64, device=dev)     # the context, cuBLAS loaded
        sync()
        context = gpu.used_mb()
        dtype = torch.float32 if variant == "fp32" else torch.float16
        pipe = StableDiffusionPipeline.from_pretrained(w / "sd15", safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, torch_dtype=dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.load_ip_adapter(str(w), subfolder="", weight_name="ip-adapter-plus_sd15.bin", image_encoder_folder=None)
        pipe.unet.encoder_hid_proj = None
        pipe.unet.config.encoder_hid_dim_type = None
        pipe.set_progress_bar_config(disable=True)
        pipe.to(dev)
        if variant == "fp16-compile":
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead")
        inputs = np.load(Path(a.workdir) / "inputs.npz")
        tokens = torch.from_numpy(inputs["tokens"]).to(dev, dtype)
        uncond = torch.from_numpy(inputs["uncond"]).to(dev, dtype)
        latents = torch.from_numpy(inputs["latents"]).to(dev, dtype)
        times = []
        with torch.inference_mode():
            text, neg = pipe.encode_prompt(str(inputs["prompt"]), dev, 1, True, str(inputs["negative_prompt"]))
            kw = {"prompt_embeds": torch.cat([text, tokens], 1), "negative_prompt_embeds": torch.cat([neg, uncond], 1),
                      "guidance_scale": a.guidance, "height": a.resolution, "width": a.resolution, "output_type": "np",
                      "num_inference_steps": a.steps}
            t = time.perf_counter()
            for _ in range(2 if variant == "fp16-compile" else 1):                   # warm-up (and compile)
                pipe(latents=latents.clone(), **kw)
            warm = time.perf_counter() - t
            for _ in range(a.images):
                sync()
                t = time.perf_counter()
                img = pipe(latents=latents.clone(), **kw).images
                sync()
                times.append(time.perf_counter() - t)
    np.save(Path(a.workdir) / f"diffusers-{variant}.npy", (img * 255).round().astype(np.uint8))
    return {"side": f"diffusers-{variant}", "s_per_image": float(np.median(times)), "times": times,
            "warmup_s": warm, **_memory(gpu, context), "torch_allocator_peak_mb":
            torch.cuda.max_memory_allocated() / 2 ** 20 if dev == "cuda" else None, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"}


def _ort_context(provider: str) -> object:
    """An onnxruntime CUDA session of the one-node probe graph: the context, cuBLAS and cuDNN handles."""
    from nsdedge.runtime.ort_session import PROBE_MODEL, OrtSession

    s = OrtSession(PROBE_MODEL, "cpu" if provider == "cpu" else "cuda")
    s.run({"x": np.ones((1, 8), np.float32)})
    return s


def _override_cuda_options(changes: list[str]) -> None:
    """`key=value` CUDA provider options over nsdedge's defaults, to measure what each default buys; and some
    that are not provider options: shared_arena=0 (each graph its own arena), mem_pattern=1 (onnxruntime's memory
    pattern for activations), arena.KEY=N (an OrtArenaCfg key of the shared arena), region=MB (the shared arena's
    first region), weights=block|device (each graph's weights over 1 MB in one allocation, the default, or one
    cudaMalloc each: ort_session.WEIGHT_BLOCK_BYTES), split=0 (low memory: the guided UNet batch whole, not in
    halves), graph=0|1 and lowshared=0|1 (low memory: the UNet's CUDA graph, the shared arena; session.py's
    LOW_MEMORY_CUDA_GRAPH / LOW_MEMORY_SHARED_ARENA), chunk=N (low memory: trials per stage, batch.LOW_MEMORY_CHUNK;
    fewer than the batch shows what one chunk leaves the next), probe=1 (first the memory of one more session of
    the engine, opened, run and closed), arena_log=1 (onnxruntime's verbose log: each arena extension with the
    request that caused it, kept in the side's result), env.NAME=VALUE (an environment variable of the side's
    process, e.g. env.CUBLAS_WORKSPACE_CONFIG=:0:0)."""
    import onnxruntime as ort

    from nsdedge.runtime import ort_session, session

    pairs = dict(c.split("=", 1) for c in changes)
    pairs.pop("probe", None)                                 # side_bundle_cuda's
    for k in [k for k in pairs if k.startswith("env.")]:     # before onnxruntime starts CUDA
        os.environ[k.removeprefix("env.")] = pairs.pop(k)
    weights = pairs.pop("weights", "")
    if weights in ("block", "device"):
        ort_session.WEIGHT_BLOCK_BYTES = 1 << 20 if weights == "block" else None
    if "region" in pairs:
        region = int(pairs.pop("region")) << 20
        ort_session.SHARED_ARENA_CONFIG["initial_chunk_size_bytes"] = region
    pairs.pop("split", None)                                 # side_bundle_cuda's
    from nsdedge.runtime import batch
    if "graph" in pairs:
        session.LOW_MEMORY_CUDA_GRAPH = pairs.pop("graph") == "1"
    if "lowshared" in pairs:
        session.LOW_MEMORY_SHARED_ARENA = pairs.pop("lowshared") == "1"
    if "chunk" in pairs:
        batch.LOW_MEMORY_CHUNK = int(pairs.pop("chunk"))
    if pairs.pop("arena_log", "0") == "1":
        ort.set_default_logger_severity(0)
    if pairs.pop("shared_arena", "1") == "0":
        ort_session.shared_cuda_arena = lambda ort, device=0, region_bytes=None: False
    for k in [k for k in pairs if k.startswith("arena.")]:
        ort_session.SHARED_ARENA_CONFIG[k.removeprefix("arena.")] = int(pairs.pop(k))
    if pairs.pop("mem_pattern", "0") == "1":
        class Options(ort.SessionOptions):
            enable_mem_pattern = property(lambda self: True, lambda self, value: None)

            def __init__(self):
                super().__init__()
                ort.SessionOptions.enable_mem_pattern.__set__(self, True)
        ort.SessionOptions = Options
    base = session.cuda_options
    session.cuda_options = lambda *args, **kw: {**base(*args, **kw), **pairs}


def side_bundle_cuda(a, name: str) -> dict:
    """name: a bundle (fp16 | fp32 | cu-fp16 | cu-fp32, the last two exported with --target cuda), then @tensorrt
    for that provider, -batch / -batch-lowmem for an N-trial batch, +key=value for CUDA provider options."""
    from nsdedge.runtime import Reconstructor

    name, *changes = name.split("+")
    _override_cuda_options(changes)
    precision, _, provider = name.partition("@")
    mode = ""
    for suffix in ("-batch-lowmem", "-batch"):
        if precision.endswith(suffix):
            precision, mode = precision.removesuffix(suffix), suffix[1:]
            break
    provider = provider or a.provider
    bundle = Path(a.workdir) / f"bundle-{precision}"
    inputs = np.load(Path(a.workdir) / "inputs.npz")
    with _gpu_watch() as gpu:
        keep = _ort_context(provider)
        context = gpu.used_mb()
        if mode.startswith("batch"):
            import shutil
            import tempfile

            from nsdedge.runtime.batch import reconstruct

            voxels = Path(a.workdir) / "voxels-batch.npy"
            rec = Reconstructor(bundle, provider, verify=False, low_memory=mode.endswith("lowmem"))
            rec.split_guidance = rec.split_guidance and "split=0" not in changes
            stages = {}
            denoise = rec.denoise

            def watched(*args, **kw):                   # the peak up to the end of each trial's UNet loop
                r = denoise(*args, **kw)
                stages["peak_through_unet"] = gpu.peak_so_far_mb()
                return r
            rec.denoise = watched
            out = Path(tempfile.mkdtemp(dir=a.workdir))
            t = time.perf_counter()
            reconstruct(rec, voxels, out, steps=a.steps, guidance=a.guidance)
            total = time.perf_counter() - t
            stages["peak_all"] = gpu.peak_so_far_mb()
            images = np.stack([np.asarray(__import__("PIL.Image").Image.open(f)) for f in sorted(out.glob("*.png"))])
            np.save(Path(a.workdir) / f"{'+'.join([name, *changes])}.npy", images)
            shutil.rmtree(out)
            r = {"s_per_image": total / a.batch, "batch": a.batch, "batch_s": total, "above_context_mb_at": {
                k: (v - context if v is not None and context is not None else None) for k, v in stages.items()}}
        else:
            stages = {}
            if "probe=1" in changes:                     # what one more session of the engine costs, run and closed
                extra = _ort_context(provider)
                stages["one_more_session"] = gpu.used_mb()
                del extra
                gc.collect()
                stages["one_more_session_closed"] = gpu.used_mb()
            rec = Reconstructor(bundle, provider, verify=False)
            t = time.perf_counter()
            # where the memory goes: each graph as it opens (weights), then each stage's peak
            graphs = [*rec.manifest.subjects.values(), "vae_decoder", "unet"]
            for c in [c for c in graphs if c in rec.manifest.components]:
                rec.session(c)
                stages[f"opened_{c}"] = gpu.used_mb()
            stages["sessions_open"] = gpu.used_mb()
            final = rec.denoise(inputs["tokens"], steps=a.steps, guidance=a.guidance, latents=inputs["latents"])
            stages.update(after_unet=gpu.used_mb(), peak_unet=gpu.peak_so_far_mb())
            rec.decode_latents(final)                                                                  # warm-up
            stages.update(after_vae=gpu.used_mb(), peak_vae=gpu.peak_so_far_mb())
            stages = {k: (v - context if v is not None and context is not None else None) for k, v in stages.items()}
            warm = time.perf_counter() - t
            times = []
            for _ in range(a.images):
                t = time.perf_counter()
                img = rec.generate(inputs["tokens"], steps=a.steps, guidance=a.guidance, latents=inputs["latents"])
                times.append(time.perf_counter() - t)
            np.save(Path(a.workdir) / f"{'+'.join([name, *changes])}.npy", img)
            r = {"s_per_image": float(np.median(times)), "times": times, "warmup_s": warm,
                 "above_context_mb_at": stages}
        del rec, keep
        gc.collect()
    import onnxruntime as ort
    return {"side": "nsdedge-" + "+".join([name, *changes]), **r, **_memory(gpu, context),
            "onnxruntime": ort.__version__}


LOW_MEMORY_KNOBS = ("graph", "lowshared", "chunk", "split")


def _normal_batch(low: str, ran: list[str]) -> str | None:
    """The normal-mode batch side to compare low-memory side `low` with: the same bundle and provider with the
    same knobs (less those only low memory reads), else the same bundle and provider without knobs."""
    name, *knobs = low.split("+")
    base = name.replace("-batch-lowmem", "-batch", 1)
    same = "+".join([base, *[k for k in knobs if k.split("=")[0] not in LOW_MEMORY_KNOBS]])
    return next((s for s in (same, base) if s in ran), None)


def main_cuda(a) -> None:
    """Each side in its own process, in the order given (the most wanted first: a lease can end mid-run);
    results are rewritten after every side."""
    work = Path(a.workdir)
    precisions = a.precisions.split(",")
    prepare(a, precisions)
    if a.batch:                   # (from the manifest: this process opens nothing on the GPU the sides measure)
        save_batch_voxels(work, a.batch)
    # TensorRT where installed (not probed here: this process opens nothing on the GPU the sides measure; a side
    # whose provider cannot start is recorded under "failed")
    trt = importlib.util.find_spec("tensorrt") is not None
    sides = a.sides.split(",") if a.sides else (      # TensorRT last: its engines build for minutes
        ["diffusers-fp16", *[p for p in precisions], "diffusers-fp32", "diffusers-fp16-compile"] +
        ([f"{p}-batch{m}" for p in precisions if p.endswith("fp16") for m in ("", "-lowmem")] if a.batch else []) +
        ([f"{p}@tensorrt" for p in precisions if not p.startswith("cu-")] if trt else []))
    result = {"machine": None, "device": "cuda", "resolution": a.resolution, "steps": a.steps,
              "guidance": a.guidance, "scheduler": "ddim", "images": a.images, "batch": a.batch,
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "sides": {}, "failed": {}}
    out = Path(a.results or HERE / "results") / "cuda-compare.json"
    if a.merge and out.exists():                          # an earlier run's sides stay, those run now replace theirs
        before = json.loads(out.read_text())
        result["sides"] = {k: v for k, v in before["sides"].items() if k.removeprefix("nsdedge-") not in sides}
        result["failed"] = {k: v for k, v in before.get("failed", {}).items() if k not in sides}
        result["command"] = f"{before['command']} ; {result['command']}"
        result["machine"] = before.get("machine")
    for side in sides:
        print(f"{side}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--side", side, "--device", "cuda", "--workdir", a.workdir, "--resolution",
               str(a.resolution), "--steps", str(a.steps), "--guidance", str(a.guidance), "--images", str(a.images),
               "--batch", str(a.batch), "--provider", a.provider, "--preset", a.preset]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            result["failed"][side] = p.stderr.strip().splitlines()[-3:]
            print(f"  failed: {p.stderr.strip()[-800:]}", file=sys.stderr, flush=True)
        else:
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["process_s"] = time.perf_counter() - t
            if "arena_log=1" in side:                      # onnxruntime's arena extensions, each with its request
                r["arena_log"] = [ln[ln.find("]") + 1:].strip() for ln in p.stderr.splitlines()
                                  if "BFCArena" in ln or "Extended allocation" in ln or "Total allocated" in ln]
                r["verbose_lines"] = len(p.stderr.splitlines())
            result["sides"][r["side"]] = r
            result["machine"] = result["machine"] or r.get("gpu")
            print(f"  {r['s_per_image']:.3f} s/image, peak {r['peak_gpu_mb']:.0f} MB "
                  f"({r['peak_above_context_mb']:.0f} above a {r['context_mb']:.0f} MB context)",
                  file=sys.stderr, flush=True)
        ref = work / "diffusers-fp32.npy"
        for s_name, r in result["sides"].items():
            img = work / f"{s_name.removeprefix('nsdedge-')}.npy"
            if ref.exists() and img.exists() and "batch" not in s_name:
                r["max_abs_pixel_diff_vs_diffusers_fp32"] = int(np.abs(np.load(img).astype(int) -
                                                                       np.load(ref).astype(int)).max())
        ran = [s.removeprefix("nsdedge-") for s in result["sides"]]
        for low in [s for s in ran if "-batch-lowmem" in s.split("+")[0]]:
            normal = _normal_batch(low, ran)                     # the same bundle and knobs, this run's
            if normal and (work / f"{normal}.npy").exists() and (work / f"{low}.npy").exists():
                a_, b_ = (np.load(work / f"{n}.npy").astype(int) for n in (normal, low))
                result.setdefault("batch_lowmem_max_abs_pixel_diff", {})[f"{low} vs {normal}"] = int(
                    np.abs(a_ - b_).max())
        base = result["sides"].get("diffusers-fp16")
        if base:
            for r in result["sides"].values():
                r["speedup_vs_diffusers_fp16"] = base["s_per_image"] / r["s_per_image"]
                r["memory_vs_diffusers_fp16"] = r["peak_above_context_mb"] / base["peak_above_context_mb"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'side':<30}{'s/image':>9}{'peak MB':>9}{'above ctx':>10}{'x fp16':>8}{'px diff':>8}")
    for s_name, r in result["sides"].items():
        print(f"{s_name:<30}{r['s_per_image']:>9.3f}{r['peak_gpu_mb']:>9.0f}{r['peak_above_context_mb']:>10.0f}"
              f"{r.get('speedup_vs_diffusers_fp16', 0):>8.2f}{r.get('max_abs_pixel_diff_vs_diffusers_fp32', -1):>8}")
    print(f"written {out}")


def save_batch_voxels(work: Path, n: int) -> None:
    """voxels-batch.npy: `n` standard-normal trials of the synthetic subject (the batch sides' input)."""
    from nsdedge.bundle import read_manifest
    v = int(read_manifest(work / "bundle-fp32").components["decoder-synth01"].extra["voxels"])
    np.save(work / "voxels-batch.npy", np.random.default_rng(1).standard_normal((n, v)).astype(np.float32))


def preset_sources(w: Path):
    """The saved preset's weights loaded back through nsdedge's loaders, as `nsdedge export --sd ...` does."""
    from nsdedge.decoders.linear import read_decoder
    from nsdedge.export.sources import load_sources

    dec = read_decoder(w / "decoder-synth01.safetensors")
    return load_sources(w / "sd15", w / "ip-adapter-plus_sd15.bin", w / "image_encoder", [dec],
                        {"synth01": w / "decoder-synth01.safetensors"})


def derive(fp32: Path, out: Path, precision: str, target: str = "onnx", int8_recipe: str = "weights",
           calibration_voxels: Path | None = None, compute: str | None = None) -> None:
    """An fp16 / int8 / OpenVINO bundle converted from the exported fp32 one (`export --from-bundle`): the same
    graphs export would convert, without tracing the models again."""
    from nsdedge.export.build import derive_bundle

    print(f"converting {fp32.name} to {precision}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    derive_bundle(fp32, out, precision=precision, target=target, force=True, int8_recipe=int8_recipe,
                  calibration_voxels=calibration_voxels, compute=compute,
                  progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    print(f"  {precision} from fp32 {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


def prepare(a, precisions: list[str]) -> None:
    """Weights in the real formats, one bundle per precision (exported from them), shared inputs."""
    from nsdedge.export.build import export_bundle
    from nsdedge.export.presets import build_preset, save_weights

    work = Path(a.workdir)
    w = work / "weights"
    if not (w / "sd15" / "model_index.json").exists():
        print("saving sd15-random weights", file=sys.stderr, flush=True)
        save_weights(build_preset(a.preset, seed=0), w)
    derived_from_fp32 = [p for p in precisions if p in ("fp16", "int8") or p.startswith(("ov-", "cu-"))]
    if derived_from_fp32 and "fp32" not in precisions:
        precisions = ["fp32", *precisions]                # the one traced export the others are converted from
    precisions = sorted({p.split("~")[0] for p in precisions}, key=lambda p: p != "fp32")
    for p in precisions:
        # ov-fp32 | ov-bf16 | ov-int8 | ov-int8-full | ov-int8-hybrid: OpenVINO IR (full / hybrid: NNCF's recipes,
        # calibrated on 4 standard-normal trials of the synthetic subject, the last 2 held out for the fidelity report);
        # a "+bf16" suffix (ov-int8-full+bf16): exported with --compute bf16
        derived = p in ("fp16", "int8") or p.startswith(("ov-", "cu-"))     # cu-fp16: --target cuda
        base, _, compute = p.partition("+") if p.startswith("ov-") else (p, "", "")
        recipe = base.rsplit("-", 1)[1] if base.endswith(("-full", "-hybrid")) else "weights"
        if derived and (work / "bundle-fp32" / "manifest.json").exists() and \
                not (work / f"bundle-{p}" / "manifest.json").exists():
            calib = None
            if recipe != "weights":
                from nsdedge.bundle import read_manifest
                v = int(read_manifest(work / "bundle-fp32").components["decoder-synth01"].extra["voxels"])
                calib = work / "calibration-voxels.npy"
                np.save(calib, np.random.default_rng(7).standard_normal((4, v)).astype(np.float32))
            target = {"ov-": "openvino", "cu-": "cuda"}.get(p[:3], "onnx")
            derive(work / "bundle-fp32", work / f"bundle-{p}", base.split("-")[1] if target != "onnx" else base,
                   target, recipe, calib, compute or None)
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
        rec = Reconstructor(work / f"bundle-{precisions[0]}", "auto", verify=False)
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
    ap.add_argument("--precisions", default="fp32,int8",
                    help="bundles to compare: fp32, fp16, int8, int8+conv; ov-fp32, ov-bf16, ov-int8, ov-int8-full, "
                         "ov-int8-hybrid (OpenVINO; +bf16, e.g. ov-int8-full+bf16: exported with --compute bf16); "
                         "cu-fp16, cu-fp32 (--target cuda, converted on the GPU)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--images", type=int, default=3, help="cuda: timed images per side (median)")
    ap.add_argument("--batch", type=int, default=0, help="cuda: also an N-trial batch, normal and low-memory; cpu: "
                    "the trials of the ~batch sides (e.g. ov-int8-full+bf16~low~batch)")
    ap.add_argument("--sides", help="cuda: sides to run, in order (default: all)")
    ap.add_argument("--results", help="cuda: folder for cuda-compare.json (default benchmarks/results)")
    ap.add_argument("--merge", action="store_true", help="cuda: keep the sides of an earlier cuda-compare.json")
    ap.add_argument("--tag", default="", help="cpu: results/<machine>-TAG.json")
    ap.add_argument("--prepare-only", action="store_true", help="save the weights, export the bundles, stop")
    ap.add_argument("--preset", default="sd15-random", help=argparse.SUPPRESS)      # tiny: a dry run of the script
    ap.add_argument("--provider", default="cuda", help=argparse.SUPPRESS)          # cpu: a dry run without a GPU
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        if a.device == "cuda":
            r = side_diffusers_cuda(a, a.side.removeprefix("diffusers-")) if a.side.startswith("diffusers") \
                else side_bundle_cuda(a, a.side)
        else:
            r = side_diffusers(a) if a.side == "diffusers" else side_bundle(a, a.side)
        print(json.dumps(r))
        return
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    if a.prepare_only:
        prepare(a, a.precisions.split(","))
        return
    if a.device == "cuda":
        main_cuda(a)
        return
    precisions = a.precisions.split(",")
    if any(p.endswith("~batch") for p in precisions) and a.batch < 1:
        ap.error("a ~batch side needs --batch N (N >= 1)")
    prepare(a, precisions)
    if a.batch:
        save_batch_voxels(Path(a.workdir), a.batch)
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
    median = {s: {k: float(np.median([x[k] for x in v])) for k in ("e2e_s", "peak_rss_mb", "peak_anon_mb")}
              for s, v in runs.items()}
    base = median["diffusers-fp32"]
    work = Path(a.workdir)
    ref = np.load(work / "diffusers.npy").astype(int)
    sizes = {}
    for p in precisions:
        m = json.loads((work / f"bundle-{p.split('~')[0]}" / "manifest.json").read_text())
        sizes[f"nsdedge-{p}"] = sum(f["size"] for f in m["files"].values()) / 2 ** 20
    sizes["diffusers-fp32"] = sum(f.stat().st_size for f in (work / "weights" / "sd15").rglob("*")
                                  if f.is_file() and f.parent.name in ("unet", "vae")) / 2 ** 20
    ratios = {s: {"speedup_vs_diffusers": base["e2e_s"] / v["e2e_s"],
                  "peak_rss_ratio": v["peak_rss_mb"] / base["peak_rss_mb"],
                  "peak_anon_ratio": v["peak_anon_mb"] / base["peak_anon_mb"],
                  "disk_ratio": sizes[s] / sizes["diffusers-fp32"]} for s, v in median.items()}
    for p in precisions:
        img = np.load(work / f"{p}.npy").astype(int)
        if p.endswith("~batch"):                          # other trials than diffusers': normal against low memory
            other = (f"{p.removesuffix('~low~batch')}~batch" if p.endswith("~low~batch") else
                     f"{p.removesuffix('~batch')}~low~batch")
            if other in precisions:                       # (this run's images: not a file left by another run)
                ratios[f"nsdedge-{p}"]["batch_max_abs_pixel_diff_normal_vs_low_memory"] = int(
                    np.abs(img - np.load(work / f"{other}.npy").astype(int)).max())
        else:
            ratios[f"nsdedge-{p}"]["max_abs_pixel_diff_vs_diffusers"] = int(np.abs(img - ref).max())
    from nsdedge.bench import cpu_flags, cpu_name
    result = {"machine": machine_name(), "cpu": cpu_name(), "cpu_flags": cpu_flags(), "resolution": a.resolution,
              "steps": a.steps, "guidance": a.guidance, "batch": a.batch,
              "scheduler": "ddim", "rounds": a.rounds, "command": " ".join(sys.argv), "median": median,
              "sizes_mb": sizes, "ratios": ratios, "runs": runs,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(a.results or HERE / "results") / f"{result['machine']}{'-' + a.tag if a.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"{'side':<40}{'s/image':>9}{'speed-up':>10}{'peak RSS MB':>13}{'RSS ratio':>11}{'anon MB':>9}"
          f"{'anon ratio':>12}{'disk ratio':>11}")
    for s, v in median.items():
        r = ratios[s]
        print(f"{s:<40}{v['e2e_s']:>9.1f}{r['speedup_vs_diffusers']:>10.2f}{v['peak_rss_mb']:>13.0f}"
              f"{r['peak_rss_ratio']:>11.2f}{v['peak_anon_mb']:>9.0f}{r['peak_anon_ratio']:>12.2f}"
              f"{r['disk_ratio']:>11.2f}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
