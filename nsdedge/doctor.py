"""`nsdedge doctor`: what this machine can run. Reads only: nothing is written, nothing is downloaded.

Providers are probed, not listed: onnxruntime's get_available_providers() names every provider compiled in,
whether or not its CUDA / cuDNN / TensorRT libraries load; `probe` opens a one-node graph with each alone.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

from . import __version__
from .errors import NsdedgeError

# distributions whose versions decide what runs (first found of each group is shown)
PACKAGES = (("numpy",), ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"), ("openvino",),
            ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"), ("cuda-python",), ("nvidia-ml-py",), ("torch",),
            ("diffusers",), ("transformers",), ("huggingface_hub",), ("nncf",), ("peft",), ("ray",), ("flwr",))


def _version(names: tuple[str, ...]) -> tuple[str, str | None]:
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return names[0], None


ORT_WHEELS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")


def _conflicts() -> list[str]:
    """Installs that break a provider whatever the probe says next time: onnxruntime's wheels all write the one
    `onnxruntime` package, so with two of them whichever was installed last runs (e.g. the export extra's CPU
    onnxruntime over onnxruntime-gpu), and removing one deletes files the other needs."""
    installed = []
    for name in ORT_WHEELS:
        try:
            installed.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    if len(installed) < 2:
        return []
    return [f"{', '.join(installed)} are all installed; they share one package folder and the last installed "
            f"wins: keep one (GPU: pip uninstall -y {' '.join(ORT_WHEELS)} && pip install "
            f"'onnxruntime-gpu[cuda,cudnn]>=1.27', or '>=1.21,<1.27' for CUDA 12)"]


def _providers() -> list[dict]:
    """Each nsdedge provider: does it start here, and if not, why (one line)."""
    from .runtime.ort_session import ORT_PROVIDERS, onnxruntime, probe

    out = []
    try:
        onnxruntime()
        for name in ORT_PROVIDERS:
            why = probe(name)
            out.append({"provider": name, "starts": why is None, "why": why})
    except NsdedgeError as e:                          # onnxruntime itself missing
        out += [{"provider": name, "starts": False, "why": str(e)} for name in ORT_PROVIDERS]
    try:
        from .runtime.trt_engine import require_cudart, require_tensorrt

        require_tensorrt(), require_cudart()
        gpu = any(p["starts"] for p in out if p["provider"] == "cuda")
        out.append({"provider": "engine", "starts": gpu, "why": None if gpu else "no CUDA device starts"})
    except NsdedgeError as e:
        out.append({"provider": "engine", "starts": False, "why": str(e)})
    try:
        from .runtime.ov_session import core

        devices = core().available_devices
        out.append({"provider": "openvino", "starts": "CPU" in devices, "why": None if "CPU" in devices else
                    f"no CPU device (OpenVINO sees {', '.join(devices) or 'none'})", "devices": devices})
    except NsdedgeError as e:
        out.append({"provider": "openvino", "starts": False, "why": str(e)})
    return out


def _gpus() -> list[dict] | str:
    """NVIDIA GPUs by NVML (nvidia-ml-py), else by nvidia-smi; a string says why none are listed."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
        except Exception as e:  # noqa: BLE001  NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            return f"no NVIDIA driver ({type(e).__name__})"
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                try:
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    name = pynvml.nvmlDeviceGetName(h)
                    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                except Exception as e:  # noqa: BLE001  NVMLError_NotSupported (MIG, vGPU), ...
                    gpus.append({"name": f"device {i}", "error": type(e).__name__})
                    continue
                gpus.append({"name": name.decode() if isinstance(name, bytes) else name,
                             "memory_gb": round(mem.total / 2 ** 30, 1), "free_gb": round(mem.free / 2 ** 30, 1),
                             "compute_capability": f"{major}.{minor}"})
            return gpus
        except Exception as e:  # noqa: BLE001
            return f"NVML failed ({type(e).__name__})"
        finally:
            pynvml.nvmlShutdown()
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver (no nvidia-smi; nvidia-ml-py not installed)"
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free,compute_cap",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    if r.returncode != 0:
        return f"nvidia-smi failed: {((r.stderr or r.stdout).strip().splitlines() or ['no output'])[0]}"

    def gb(text: str) -> float | None:
        try:
            return round(float(text) / 1024, 1)
        except ValueError:                                # [N/A] on MIG / vGPU
            return None
    gpus = []
    for line in r.stdout.strip().splitlines():
        fields = [f.strip() for f in line.split(",")] + ["?"] * 4
        gpus.append({"name": fields[0], "memory_gb": gb(fields[1]), "free_gb": gb(fields[2]),
                     "compute_capability": fields[3]})
    return gpus


def _disk(path: Path) -> dict:
    """Free space where `path` is, or would be (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"path": str(path), "exists": path.exists(), "free_gb": round(usage.free / 2 ** 30, 1)}


def report() -> dict:
    """What this machine can run, as a dict (the --json output)."""
    from platformdirs import user_cache_dir

    from .bench import cpu_flags, cpu_name
    from .hub import cache_root, find_known

    hf_cache = cache_root()
    nsd_cache = Path(user_cache_dir("nsdedge"))
    hub_error = None
    try:
        hub = find_known()
    except NsdedgeError as e:                          # huggingface_hub missing
        hub, hub_error = [], str(e)
    return {
        "nsdedge": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"name": cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count(), "flags": cpu_flags()},
        "packages": dict(_version(names) for names in PACKAGES),
        "providers": _providers(),
        "conflicts": _conflicts(),
        "gpus": _gpus(),
        "disk": {"huggingface_cache": _disk(hf_cache), "nsdedge_cache": _disk(nsd_cache)},
        "hub_weights": hub,
        **({"hub_error": hub_error} if hub_error else {}),
    }


def format_report(r: dict) -> str:
    lines = [f"nsdedge {r['nsdedge']}, Python {r['python']}, {r['platform']}",
             f"cpu: {r['cpu']['name']}, {r['cpu']['cores']} cores, flags: {' '.join(r['cpu']['flags']) or '-'}",
             "packages: " + ", ".join(f"{k} {v}" for k, v in r["packages"].items() if v)
             + "; not installed: " + (", ".join(k for k, v in r["packages"].items() if not v) or "-")]
    gpus = r["gpus"]
    lines.append("gpu: " + (gpus if isinstance(gpus, str) else ", ".join(
        f"{g['name']} ({g['error']})" if "error" in g else
        f"{g['name']} ({g['memory_gb']} GB, {g['free_gb']} free, sm {g['compute_capability']})" for g in gpus)
        or "none"))
    lines += [f"warning: {c}" for c in r.get("conflicts", [])]
    lines.append("providers (--provider):")
    for p in r["providers"]:
        extra = f" [{', '.join(p['devices'])}]" if p.get("devices") else ""
        lines.append(f"  {p['provider']:<9} {'starts' if p['starts'] else 'no'}{extra}"
                     + (f": {p['why']}" if p["why"] else ""))
    for name, d in r["disk"].items():
        lines.append(f"{name.replace('_', ' ')}: {d['path']} ({d['free_gb']} GB free"
                     + ("" if d["exists"] else ", not created yet") + ")")
    lines.append("hub weights in the Hugging Face cache (README: Real reconstructions):")
    if r.get("hub_error"):
        lines.append(f"  {r['hub_error']}")
    for w in r["hub_weights"]:
        lines.append(f"  {w['option']:<16}{w['id']}: " + (f"found ({w['commit'][:12]})" if w["found"]
                                                          else f"missing: {w['download']}"))
    return "\n".join(lines)
