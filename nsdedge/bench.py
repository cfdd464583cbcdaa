"""Latency, memory and size of a bundle: what `nsdedge bench` runs. numpy + onnxruntime only.

Warm-up runs are kept apart from timed runs; every stage reports median, p90 and min over its runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .runtime import Reconstructor
from .runtime.pipeline import VAES

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    VmHWM (Linux) is the high-water mark of this process image; getrusage's ru_maxrss is the fallback, but
    it survives exec: a child forked from a large parent reports the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide CPU inference speed (AVX-512, VNNI, BF16, AMX), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                                      "amx_int8", "amx_tile"})
    except OSError:
        pass
    return []


def stats(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds)
    return {"median_s": float(np.median(a)), "p90_s": float(np.percentile(a, 90)), "min_s": float(a.min()),
            "runs": len(a)}


def timed(fn: Callable[[], object], runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return stats(out)


class GpuMemoryPeak:
    """Peak device memory in use on GPU 0 while the block runs, sampled every 20 ms through NVML (nvidia-ml-py);
    None where there is no NVML (no GPU, or the package is missing). Device-wide, so run nothing else on it."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb, self.gpu, self.start_mb, self.processes = interval, None, None, None, 0

    def __enter__(self):
        import threading

        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001  ImportError, or NVMLError without a driver: no GPU to watch
            self._nvml = None
            return self
        self._nvml = pynvml
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        self.gpu = name.decode() if isinstance(name, bytes) else name
        self._stop = threading.Event()
        self._handle = handle
        self._peak = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        self.start_mb = self._peak / 2 ** 20

        # self.processes: the most processes seen on the GPU at once (the peak is this process's alone only at 1;
        # in a container NVML may list it under the host's pid, so it is counted as listed)
        def watch():
            n = 0
            while not self._stop.is_set():
                self._peak = max(self._peak, pynvml.nvmlDeviceGetMemoryInfo(handle).used)
                if n % 50 == 0:
                    with contextlib.suppress(Exception):
                        self.processes = max(self.processes,
                                             len(pynvml.nvmlDeviceGetComputeRunningProcesses(handle)))
                n += 1
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def used_mb(self) -> float | None:
        """Device memory in use now (MB)."""
        return None if self._nvml is None else self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2 ** 20

    def peak_so_far_mb(self) -> float | None:
        """The peak seen since the block began (MB), while it runs."""
        if self._nvml is None:
            return None
        return max(self._peak, self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used) / 2 ** 20

    def __exit__(self, *exc):
        if self._nvml is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._peak / 2 ** 20
            self._nvml.nvmlShutdown()
        return False


def bench_bundle(bundle: str | Path, *, provider: str = "auto", **kw) -> dict:
    """Time every stage of `bundle` and one or more end-to-end reconstructions; on a GPU, its peak memory too."""
    import contextlib

    with (GpuMemoryPeak() if provider != "cpu" else contextlib.nullcontext()) as gpu:
        result = _bench(bundle, provider=provider, **kw)
    result["peak_gpu_mb"] = gpu.peak_mb if gpu else None
    result["machine"]["gpu"] = gpu.gpu if gpu else None
    try:
        import tensorrt

        result["versions"]["tensorrt"] = tensorrt.__version__
    except ImportError:
        result["versions"]["tensorrt"] = None
    return result


def _bench(bundle: str | Path, *, steps: int | None = None, guidance: float | None = None, runs: int = 5,
           warmup: int = 1, e2e_runs: int | None = None, provider: str = "auto", low_memory: bool = False,
           progress: Callable[[str], None] = lambda s: None) -> dict:
    """Settings left out are the bundle's run defaults. End to end is one trial at a time with the sessions warm,
    as a stream of fMRI volumes would arrive: `e2e_runs` of them (default 5 for a bundle with run defaults, a
    few-step one, else 1)."""
    t0 = time.perf_counter()
    rec = Reconstructor(bundle, provider=provider, low_memory=low_memory)
    m = rec.manifest
    cfg = rec.checked_settings(steps=steps, guidance=guidance)
    steps, guidance = cfg["steps"], cfg["guidance"]
    e2e_runs = e2e_runs or (5 if m.extra.get("run_defaults") else 1)
    subject = next(iter(rec.subjects))
    comp = m.subjects[subject]
    vaes = {k: c for k, c in VAES.items() if c in m.components}
    for name in (comp, "unet", *vaes.values()):
        if not low_memory:
            rec.session(name)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    voxels = rng.standard_normal((1, rec.subjects[subject])).astype(np.float32)
    tokens = rec.decode(voxels, subject)
    h, w = m.latent_size
    result = {"bundle": str(bundle), "precision": m.precision, "provider": rec.provider,
              "image_size": list(m.image_size), "steps": steps, "guidance": guidance, "scheduler": cfg["scheduler"],
              "vae": cfg["vae"], "subject": subject,
              "load_s": load_s, "stages": {},
              "sizes_mb": {n: sum(m.files[f]["size"] for f in [c.file, *c.data_files]) / 2 ** 20
                           for n, c in m.components.items()},
              "versions": {"numpy": np.__version__, "python": platform.python_version()},
              "machine": {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count(), "gpu": None}}
    result["sizes_mb"]["total"] = sum(f["size"] for f in m.files.values()) / 2 ** 20

    progress("decoder")
    result["stages"]["decoder"] = timed(lambda: rec.decode(voxels, subject), runs, warmup)
    for batch in (1, 2):
        progress(f"unet step, batch {batch}")
        unet = rec.session("unet")
        dt = unet.input_dtype("sample")
        feeds = {"sample": rng.standard_normal((batch, m.latent_channels, h, w)).astype(dt),
                 "timestep": np.array([500], dt), "encoder_hidden_states": np.repeat(rec.prompt_embeds, batch, 0).astype(dt),
                 "ip_tokens": np.repeat(tokens, batch, 0).astype(dt), "ip_scale": np.array([1.0], dt)}
        result["stages"][f"unet_step_b{batch}"] = timed(lambda: unet.run(feeds), runs, warmup)
    rec.release("unet")
    latent = rng.standard_normal((1, m.latent_channels, h, w)).astype(np.float32)
    for vae in vaes:
        progress(f"{vae} vae decode")
        result["stages"]["vae_decode" if vae == "full" else "taesd_decode"] = timed(
            lambda: rec.decode_latents(latent, vae=vae), runs, warmup)
    progress(f"end to end, one trial at a time: {cfg['scheduler']} {steps} steps, guidance {guidance}, {cfg['vae']} VAE")
    result["stages"]["end_to_end"] = timed(lambda: rec(voxels, subject, steps=steps, guidance=guidance),
                                           e2e_runs, 0)
    result["peak_rss_mb"] = peak_rss_mb()
    if rec.provider == "openvino":                   # what the CPU plugin was told to compute in, per graph
        import openvino

        result["inference_precision"] = {c: rec.session(c).hint for c in (comp, "unet", *vaes.values())}
        result["versions"]["openvino"] = openvino.__version__
    else:
        import onnxruntime

        result["versions"]["onnxruntime"] = onnxruntime.__version__
    return result


def format_table(r: dict) -> str:
    engine = "openvino" if r["provider"] == "openvino" else "onnxruntime"
    lines = [f"bundle {r['bundle']}  {r['precision']} on {r['provider']}  {r['image_size'][0]}x{r['image_size'][1]}"
             f"  ({r['machine']['cpu']}, {r['machine']['cores']} cores, {engine} {r['versions'][engine]})"]
    if r.get("inference_precision"):
        lines.append("  OpenVINO computes in: " + ", ".join(f"{k} {v}" for k, v in r["inference_precision"].items()))
    lines.append(f"  {'stage':<16}{'median s':>10}{'p90 s':>10}{'min s':>10}{'runs':>6}")
    for name, s in r["stages"].items():
        lines.append(f"  {name:<16}{s['median_s']:>10.3f}{s['p90_s']:>10.3f}{s['min_s']:>10.3f}{s['runs']:>6}")
    lines.append(f"  load {r['load_s']:.1f} s; peak RSS {r['peak_rss_mb']:.0f} MB; bundle {r['sizes_mb']['total']:.1f} MB "
                 f"(" + ", ".join(f"{k} {v:.1f}" for k, v in r["sizes_mb"].items() if k != "total") + ")")
    if r.get("peak_gpu_mb") is not None:
        lines.append(f"  peak GPU memory {r['peak_gpu_mb']:.0f} MB on {r['machine']['gpu']} (device-wide, NVML)")
    lines.append(f"  end to end = decoder + {r['steps']} {r.get('scheduler', 'ddim')} steps at guidance {r['guidance']} + "
                 f"{r.get('vae', 'full')} VAE, one trial at a time (sessions warm)")
    return "\n".join(lines)
