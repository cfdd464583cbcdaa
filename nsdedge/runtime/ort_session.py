"""onnxruntime behind the Backend protocol (session.py): CPU, CUDA and TensorRT execution providers.

Every onnxruntime InferenceSession nsdedge creates is made here, with one set of session options.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import ProviderError

log = logging.getLogger(__name__)

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}


def onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ProviderError("onnxruntime is not installed: pip install 'nsdedge[cpu]' (or [gpu] for CUDA)") from None
    return ort


def _shape_list(profile_entries, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[which]))}" for name, *shapes in profile_entries)


def tensorrt_options(manifest, component: str, cache: Path, batches=(1, 2),
                     workspace: int | None = None) -> dict:
    """onnxruntime TensorRT provider options for one bundle graph: engine and timing caches under `cache` (the
    provider keys its engines by graph, GPU and TensorRT version itself), fp16 / int8 (explicit Q/DQ) as the
    bundle's precision says, and explicit static profiles at the bundle's resolution for batch 1 and 2, so the
    provider builds once instead of on every new shape."""
    from .trt_engine import WORKSPACE_BYTES, builder_flags, profile_shapes

    precision = manifest.components[component].precision
    flags = builder_flags(precision)
    prof = profile_shapes(manifest, component, batches, dynamic=False)
    entries = [e for p in prof for e in p]            # one entry per input per profile, in profile order
    return {
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": "fp16" in flags, "trt_int8_enable": "int8" in flags,
        "trt_int8_use_native_calibration_table": False,      # scales come from the graph's Q/DQ nodes
        "trt_max_workspace_size": int(workspace or WORKSPACE_BYTES),
        "trt_profile_min_shapes": _shape_list(entries, 0), "trt_profile_opt_shapes": _shape_list(entries, 1),
        "trt_profile_max_shapes": _shape_list(entries, 2),
    }


def cuda_options(low_memory: bool = False, gpu_mem_limit: int | None = None) -> dict:
    """onnxruntime CUDA provider options; low memory (edge boards) grows the arena only as asked and caps it."""
    opts: dict = {"cudnn_conv_algo_search": "HEURISTIC" if low_memory else "EXHAUSTIVE"}
    if low_memory:
        opts["arena_extend_strategy"] = "kSameAsRequested"
    if gpu_mem_limit:
        opts["gpu_mem_limit"] = int(gpu_mem_limit)
    return opts


class OrtSession:
    """One ONNX graph on one onnxruntime provider (cpu | cuda | tensorrt)."""

    def __init__(self, path: Path | bytes, provider: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None, *, profile: str | None = None):
        """`path`: an ONNX file (external data beside it), or a serialised model."""
        if provider not in ORT_PROVIDERS:
            raise ProviderError(f"onnxruntime has no provider {provider!r} (choose from {', '.join(ORT_PROVIDERS)})")
        ort = onnxruntime()
        self.provider = provider
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if provider == "cpu":
            # Measured on the full SD 1.5 UNet, 512^2, batch 2, 2 cores (onnxruntime 1.31): with the CPU arena
            # a step took 9.1 s and peak RSS was 9.7 GB; without it 5.2 s and 6.6 GB. Prepacking the weights
            # costs 0.9 GB of resident memory after load and bought no measurable speed.
            opts.enable_cpu_mem_arena = False
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if threads:
            opts.intra_op_num_threads = threads
        elif provider == "cpu":
            opts.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile)
        eps = [(ORT_PROVIDERS[provider], provider_options or {})]
        if provider != "cpu":
            eps.append(("CPUExecutionProvider", {}))
        self.sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=eps)
        name = "<model bytes>" if isinstance(path, bytes) else Path(path).name
        used = self.sess.get_providers()
        if ORT_PROVIDERS[provider] not in used:
            raise ProviderError(f"{name}: onnxruntime could not start {ORT_PROVIDERS[provider]} "
                                f"(runs on {', '.join(used)}); check the CUDA / TensorRT libraries")
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        log.debug("%s on %s", name, used[0])
        self._bound: dict = {}

    @contextlib.contextmanager
    def bound(self, constants: dict[str, np.ndarray]):
        """Within the block, `constants` live on the provider's device (uploaded once, through onnxruntime's I/O
        binding) and run() takes only the other inputs: across denoising steps the text embeddings and ip
        tokens stay on the GPU and only the latent travels."""
        ort = onnxruntime()
        device = "cpu" if self.provider == "cpu" else "cuda"
        self._bound = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0)
                       for k, v in constants.items()}
        try:
            yield self
        finally:
            self._bound = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._bound:
            return dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
        binding = self.sess.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        for k, v in self._bound.items():
            binding.bind_ortvalue_input(k, v)
        for k in self.outputs:
            binding.bind_output(k, "cpu")
        self.sess.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))

    def input_dtype(self, name: str) -> np.dtype:
        t = self.inputs[name].type
        return np.dtype(np.float16) if "float16" in t else np.dtype(np.float32)

    def end_profiling(self) -> Path:
        """The profile written so far (a session opened with `profile`)."""
        return Path(self.sess.end_profiling())
