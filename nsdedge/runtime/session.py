"""The one seam to execution backends: every onnxruntime call lives here.

The pipeline sees `Session(path, provider).run(feeds) -> {name: array}` and nothing else.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import ProviderError

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
AUTO_ORDER = ("cuda", "cpu")   # tensorrt only when asked: it builds engines on first use (minutes)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ProviderError("onnxruntime is not installed: pip install 'nsdedge[cpu]' (or [gpu] for CUDA)") from None
    return ort


def available() -> list[str]:
    """nsdedge provider names onnxruntime offers here."""
    offered = set(_ort().get_available_providers())
    return [name for name, ep in PROVIDERS.items() if ep in offered]


def resolve(provider: str) -> str:
    """'auto' -> the best available; a named provider that is missing is an error, never a silent fallback."""
    if provider == "auto":
        have = available()
        return next(p for p in AUTO_ORDER if p in have or p == "cpu")
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r} (choose from auto, {', '.join(PROVIDERS)})")
    if provider not in available():
        ort = _ort()
        raise ProviderError(f"provider {provider!r} is not available in this onnxruntime {ort.__version__} "
                            f"(it offers {', '.join(ort.get_available_providers())}); install nsdedge[gpu] for "
                            f"cuda and tensorrt, or use --provider cpu")
    return provider


class Session:
    """One ONNX graph on one provider."""

    def __init__(self, path: Path, provider: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None):
        ort = _ort()
        self.provider = resolve(provider)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.provider == "cpu":
            # Measured on the full SD 1.5 UNet, 512^2, batch 2, 2 cores (onnxruntime 1.31): with the CPU arena
            # a step took 9.1 s and peak RSS was 9.7 GB; without it 5.2 s and 6.6 GB. Prepacking the weights
            # costs 0.9 GB of resident memory after load and bought no measurable speed.
            opts.enable_cpu_mem_arena = False
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if threads:
            opts.intra_op_num_threads = threads
        elif self.provider == "cpu":
            opts.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        eps = [(PROVIDERS[self.provider], provider_options or {})]
        if self.provider != "cpu":
            eps.append(("CPUExecutionProvider", {}))
        self.sess = ort.InferenceSession(str(path), opts, providers=eps)
        used = self.sess.get_providers()
        if PROVIDERS[self.provider] not in used:
            raise ProviderError(f"{Path(path).name}: onnxruntime could not start {PROVIDERS[self.provider]} "
                                f"(runs on {', '.join(used)}); check the CUDA / TensorRT libraries")
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        log.debug("%s on %s", Path(path).name, used[0])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))

    def input_dtype(self, name: str) -> np.dtype:
        t = self.inputs[name].type
        return np.dtype(np.float16) if "float16" in t else np.dtype(np.float32)
