"""OpenVINO behind the Backend protocol (session.py): a bundle graph (OpenVINO IR, or ONNX that OpenVINO reads)
on the CPU, compiled once per set of input shapes (static shapes: the CPU plugin's kernels are chosen for them).

The inference precision is always set, never left to the plugin: on a CPU with AVX512_BF16 or AMX the CPU
plugin otherwise computes in bf16 silently. fp32 and int8 components run f32 (int8 components hold int8
weights, decompressed in the kernels); bf16 components run bf16, and a CPU without bf16 refuses them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import ProviderError

log = logging.getLogger(__name__)

HINTS = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}     # component precision -> INFERENCE_PRECISION_HINT


def openvino():
    try:
        import openvino as ov
    except ImportError:
        raise ProviderError("OpenVINO is not installed: pip install 'nsdedge[openvino]'") from None
    return ov


_CORE: list = []


def core():
    """One openvino.Core per process (it holds the plugins; weights are memory-mapped from the IR)."""
    if not _CORE:
        _CORE.append(openvino().Core())
    return _CORE[0]


def bf16_supported() -> bool:
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_precision(precision: str) -> str:
    """The inference precision hint for a component of `precision`; bf16 on a CPU without it is refused."""
    hint = HINTS.get(precision)
    if hint is None:
        raise ProviderError(f"OpenVINO runs fp32, bf16 and int8 graphs, not {precision}")
    if hint == "bf16" and not bf16_supported():
        raise ProviderError("this bundle computes in bf16 and this CPU has no bf16 (AVX512_BF16 or AMX): "
                            "use an fp32 or int8 OpenVINO bundle")
    return hint


def _loaded(make, path: Path, what: str):
    """`make()`, with OpenVINO's errors (an op it cannot read, memory at compile) as one ProviderError line. The
    ov.Model read inside `make` is dropped when it returns: the compiled model holds what it needs."""
    try:
        return make()
    except RuntimeError as e:                   # OpenVINO raises RuntimeError with a multi-line report
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ProviderError(f"{path.name}: OpenVINO could not {what} ({first})") from None


class OvSession:
    """One graph on OpenVINO's CPU plugin: run(feeds) -> {name: float32 array}."""

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None, profile: bool = False):
        """`profile`: per-node timings of the last call (profile_by_type)."""
        self.provider = "openvino"
        self.profile = profile
        self.path = Path(path)
        self.hint = check_precision(precision)
        self.threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
        model = _loaded(lambda: core().read_model(str(self.path)), self.path, "read")
        self.inputs = {i.get_any_name(): i for i in model.inputs}
        self.outputs = [o.get_any_name() for o in model.outputs]
        self._types = {k: i.get_element_type().to_dtype() for k, i in self.inputs.items()}
        del model                                 # read again per set of shapes, and dropped once compiled
        self._compiled: dict[tuple, object] = {}
        self._bound: dict[str, np.ndarray] = {}
        log.debug("%s on OpenVINO %s (%s)", self.path.name, openvino().__version__, self.hint)

    def _request(self, shapes: dict[str, tuple[int, ...]]):
        key = tuple(sorted(shapes.items()))
        if key not in self._compiled:
            def compile_():
                model = core().read_model(str(self.path))
                model.reshape({k: list(v) for k, v in shapes.items()})
                return core().compile_model(model, "CPU", {
                    "INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                    "INFERENCE_NUM_THREADS": str(self.threads), **({"PERF_COUNT": "YES"} if self.profile else {})})

            compiled = _loaded(compile_, self.path, f"compile for shapes {dict(shapes)}")
            self._compiled[key] = (compiled, compiled.create_infer_request())
        return self._compiled[key][1]

    @contextlib.contextmanager
    def bound(self, constants: dict[str, np.ndarray]):
        """Within the block run() takes only the other inputs (on the CPU there is nothing to upload)."""
        self._bound = dict(constants)
        try:
            yield self
        finally:
            self._bound = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {k: np.ascontiguousarray(v, self._types[k]) for k, v in {**self._bound, **feeds}.items()}
        request = self._last = self._request({k: v.shape for k, v in arrays.items()})
        out = request.infer(arrays)
        return {k.get_any_name(): np.array(v, np.float32) for k, v in out.items()}   # a copy: the request reuses them

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._types[name])

    def profile_by_type(self) -> dict[str, float]:
        """Seconds per executed node type (with its kernel, e.g. 'Convolution brgconv_avx512_amx_bf16') in the
        last call of a session opened with `profile`."""
        out: dict[str, float] = {}
        for info in self._last.profiling_info:
            if info.status == info.Status.EXECUTED:
                key = f"{info.node_type} {info.exec_type}"
                out[key] = out.get(key, 0.0) + info.real_time.total_seconds()
        return out
