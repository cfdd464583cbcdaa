"""OpenVINO behind the Backend protocol (session.py): a bundle graph (OpenVINO IR, or ONNX that OpenVINO reads)
on the CPU, compiled once per set of input shapes (static shapes: the CPU plugin's kernels are chosen for them).

The inference precision is always set, never left to the plugin: on a CPU with AVX512_BF16 or AMX the CPU
plugin otherwise computes in bf16 silently. fp32 and int8 components run f32 (int8 components hold int8
weights, decompressed in the kernels); bf16 components run bf16, and so do int8 components of a bundle exported
with `--compute bf16` (their manifest entry says `"compute": "bf16"`); a CPU without bf16 refuses them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
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


def hint_for(precision: str, compute: str | None = None) -> str | None:
    """The INFERENCE_PRECISION_HINT of a component of `precision` (`compute`: bf16 for int8 components exported with
    --compute bf16); None for a precision OpenVINO does not run."""
    if precision not in HINTS:
        return None
    return compute if compute in ("f32", "bf16") else HINTS[precision]


def check_precision(precision: str, compute: str | None = None) -> str:
    """The inference precision hint for a component of `precision` / `compute`; bf16 on a CPU without it is refused."""
    hint = hint_for(precision, compute)
    if hint is None:
        raise ProviderError(f"OpenVINO runs fp32, bf16 and int8 graphs, not {precision}")
    if hint == "bf16" and not bf16_supported():
        raise ProviderError("this bundle computes in bf16 and this CPU has no bf16 (AVX512_BF16 or AMX): "
                            "use an fp32 or int8 OpenVINO bundle")
    return hint


def _loaded(make, path: Path, what: str):
    """`make()`, with OpenVINO's errors (an op it cannot read, memory at compile or run) as one ProviderError line.
    The ov.Model read inside `make` is dropped when it returns: the compiled model holds what it needs."""
    try:
        return make()
    except RuntimeError as e:                   # OpenVINO raises RuntimeError with a multi-line report
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ProviderError(f"{path.name}: OpenVINO could not {what} ({first})") from None


MADV_DONTNEED = 4


def release_pages(path: Path) -> int:
    """Take the graph's weight files (`unet.bin` for `unet.xml`, `unet.onnx.data` for `unet.onnx`), which OpenVINO
    memory-mapped to read them, out of the process's resident memory; returns how many mappings were advised.

    Once compiled, the CPU plugin computes from its own repacked copy of the weights, but the compiled model keeps
    the source constants, so the mapping stays and every page compile touched stays resident: a bf16 UNet at 512^2
    holds 1.7 GB of them on top of its 1.8 GB of working weights. MADV_DONTNEED on a read-only file mapping drops
    its pages from the process's page tables and nothing else: what is mapped does not change, the pages stay in
    the kernel's page cache (clean, reclaimable, nobody's RSS), and a later read maps them again from there without
    touching the disk. Only shared read-only mappings (how OpenVINO maps IR and ONNX weights) are advised: their
    pages are the file's, so nothing can be lost. MADV_PAGEOUT, used before, also evicted them from the page cache,
    so a compile that reads a weight twice read it from the disk again (the int8 UNet's compile took 12-25 s
    instead of 6 with the pages released as it went). Where this is not Linux, nothing happens."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    folder, prefix, n = str(Path(path).resolve().parent), Path(path).stem + ".", 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[1].startswith("r--s"):          # shared and read-only, as OpenVINO maps
            continue
        mapped = fields[5].strip()
        if os.path.dirname(mapped) != folder or not os.path.basename(mapped).startswith(prefix):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        n += libc.madvise(start, end - start, MADV_DONTNEED) == 0
    return n


RELEASE_EVERY = 0.1                                       # seconds between release_pages calls while compiling


@contextlib.contextmanager
def releasing_pages(path: Path, every: float | None):
    """Within the block, `release_pages(path)` every `every` seconds from a helper thread, and once at its end.

    Compiling reads every weight of the IR once to repack it: without this the whole mapped IR (0.9 GB for an int8
    UNet) is resident at the moment its repacked copy (1.0 GB) is complete, and that sum is the process's peak
    RSS. Releasing them as compile goes keeps only the pages read in the last interval mapped (about 0.1 GB):
    measured on 2 AMD cores, the int8 UNet's compile peaks at 1.14 GB instead of 1.98 and takes the same 6 s.
    `every=None`: only the final release."""
    stop = threading.Event()

    def loop():
        while not stop.wait(every):
            release_pages(path)

    helper = threading.Thread(target=loop, name="nsdedge-release-pages", daemon=True) \
        if every and sys.platform.startswith("linux") else None
    if helper:
        helper.start()
    try:
        yield
    finally:
        stop.set()
        if helper:
            helper.join()
        release_pages(path)


class OvSession:
    """One graph on OpenVINO's CPU plugin: run(feeds) -> {name: float32 array}."""

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None, profile: bool = False,
                 compute: str | None = None):
        """`compute`: bf16 for an int8 graph exported to compute in bf16. `profile`: per-node timings of the last
        call (profile_by_type)."""
        self.provider = "openvino"
        self.profile = profile
        self.path = Path(path)
        self.hint = check_precision(precision, compute)
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

            with releasing_pages(self.path, RELEASE_EVERY):
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
        given = {**self._bound, **feeds}
        if set(given) != set(self._types):           # (an input left out would silently reuse the last call's)
            raise ProviderError(f"{self.path.name} takes {', '.join(self._types)}; given {', '.join(given) or 'none'}")
        arrays = {k: np.ascontiguousarray(v, self._types[k]) for k, v in given.items()}
        request = self._last = self._request({k: v.shape for k, v in arrays.items()})
        out = _loaded(lambda: request.infer(arrays), self.path, "run it")
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
