"""onnxruntime behind the Backend protocol (session.py): CPU, CUDA and TensorRT execution providers.

Every onnxruntime InferenceSession nsdedge creates is made here, with one set of session options.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ProviderError, first_line

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


def cuda_options(low_memory: bool = False, gpu_mem_limit: int | None = None, *, cuda_graph: bool = False) -> dict:
    """onnxruntime CUDA provider options, lean by default: the arena grows by what is asked (not to the next power
    of two), the UNet can replay one captured CUDA graph per batch size, and cuDNN's convolution workspace is
    capped where onnxruntime honours the cap: its cuDNN 8 path (32 MB). Its cuDNN 9 path takes each convolution
    plan's own workspace from the arena whatever cudnn_conv_use_max_workspace says (source read at 1.25; on an
    H200 with onnxruntime-gpu 1.31.1 the fp16 peak was 4642 MB with 0 and with 1). Low memory (edge boards) also
    searches convolution algorithms heuristically (on an H100 the exhaustive search bought nothing there: 0.85 s
    per image against 0.70 over a 10-trial fp16 batch, same peak)."""
    opts: dict = {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_use_max_workspace": "0",
                  "cudnn_conv_algo_search": "HEURISTIC" if low_memory else "EXHAUSTIVE"}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    if gpu_mem_limit:
        opts["gpu_mem_limit"] = int(gpu_mem_limit)
    return opts


# -- whether a provider starts --------------------------------------------------------------------------------
def _field(number: int, payload: bytes | int | str) -> bytes:
    """One protobuf field: a varint, or length-delimited bytes / text."""
    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def _value_info(name: str, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_field(1, _field(1, d)) for d in shape)                    # TensorShapeProto.dim.dim_value
    tensor = _field(1, 1) + _field(2, dims)                                     # elem_type FLOAT, shape
    return _field(1, name) + _field(2, _field(1, tensor))                       # name, type.tensor_type


# ModelProto{ir_version 8, opset 17, graph{node Relu(x) -> y, input x, output y}}, written without the onnx package
# (the runtime does not need it): the smallest graph every execution provider claims.
PROBE_MODEL = (_field(1, 8) + _field(2, "nsdedge-probe") + _field(8, _field(1, "") + _field(2, 17)) +
               _field(7, _field(1, _field(1, "x") + _field(2, "y") + _field(3, "relu") + _field(4, "Relu")) +
                      _field(2, "probe") + _field(11, _value_info("x", (1, 8))) + _field(12, _value_info("y", (1, 8)))))

_PROBED: dict[str, str | None] = {}


def probe(provider: str) -> str | None:
    """None if onnxruntime's `provider` starts on this machine, else why not, in one line. Cached per process.

    get_available_providers() lists every provider compiled in, whether or not its libraries (CUDA, cuDNN,
    TensorRT) load; so a one-node graph is opened with that provider alone and CPU fallback disabled, and run."""
    if provider == "cpu":
        return None
    if provider not in _PROBED:
        _PROBED[provider] = _probe(onnxruntime(), provider)
        if _PROBED[provider]:
            log.debug("provider %s cannot start: %s", provider, _PROBED[provider])
    return _PROBED[provider]


INSTALL = {"cuda": "gpu", "tensorrt": "gpu,trt"}       # the extras that bring each provider (CUDA 13; -cu12 too)


def _probe(ort, provider: str) -> str | None:
    ep = ORT_PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        return (f"this onnxruntime {ort.__version__} has no {ep} (it offers "
                f"{', '.join(ort.get_available_providers())}); pip install 'nsdedge[{INSTALL[provider]}]'")
    _preload(ort, provider)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        sess = ort.InferenceSession(PROBE_MODEL, opts, providers=[ep])
        sess.run(None, {"x": np.ones((1, 8), np.float32)})
        if sess.get_providers()[0] == ep:
            return None
        error = f"it fell back to {sess.get_providers()[0]}"
    except Exception as e:  # noqa: BLE001  onnxruntime raises its own exception types
        error = first_line(e, 10 ** 6)
    missing = _missing_library(ort, provider)
    hint = f" (pip install 'nsdedge[{INSTALL[provider]}]')" if "libnvinfer" in (missing or error) else ""
    return f"{ep} does not start: {missing or error}{hint}"


def _preload(ort, provider: str) -> None:
    """Load the CUDA / cuDNN (and TensorRT) libraries that pip installed, as onnxruntime's own docs ask."""
    if provider == "tensorrt":
        with contextlib.suppress(Exception):
            import tensorrt_libs  # noqa: F401  (tensorrt-cu12 / -cu13 wheels: loads libnvinfer)
    if hasattr(ort, "preload_dlls"):                                    # onnxruntime >= 1.21
        with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
            ort.preload_dlls()


def _missing_library(ort, provider: str) -> str | None:
    """The library the provider's shared object cannot find (the dynamic loader names it), if that is the cause."""
    lib = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{provider}.so"
    if not lib.exists():
        return None
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        return str(e).split(": ", 1)[-1] if str(lib) in str(e) else str(e)
    return None


# -- one CUDA arena for all the graphs of a process -------------------------------------------------------------
_SHARED_ARENA: dict[int, bool] = {}
_WARNED: set[str] = set()
# OrtArenaCfg keys beside the first region (shared_cuda_arena): growth by doubling, chunks split to the byte (a chunk
# serving a smaller request is split, not handed out whole), so that freed UNet activations serve the VAE's requests
SHARED_ARENA_CONFIG = {"arena_extend_strategy": 0, "max_dead_bytes_per_chunk": 1 << 20}
# The first region for SD 1.5 at 512^2 (session.arena_bytes scales it to a bundle's latent): fp16 activations, and
# fp32 ones. Measured on an H100 (2026-11-27, weights in blocks, benchmarks/results/cuda-h100-lean.json): fp16 peaked
# at 2424 MB with 384, 2458 with 416 and 2488 with 448 (the UNet's and the VAE's activations fit in each); fp32 (the
# portable bundle) needs more than 896 MB and peaked 1 GB below an arena growing by request with 896.
ARENA_REGION = 384 << 20
ARENA_REGION_FP32 = 896 << 20
# low memory with the shared arena (session.LOW_MEMORY_SHARED_ARENA, off by default): a batch-1 UNet (the guidance
# halves one after the other), then the VAE. Measured on an H100 (fp16 512^2, weights in blocks): the UNet stage
# peaked at 2004 MB with a first region of 256 MB (its activations fit), 2132 with 128 (+256) and 2196 with 64
ARENA_REGION_LOW = 256 << 20
ARENA_REGION_MAX = 1 << 30
# On CUDA, a graph's weights of at least this many bytes in one allocation (device_weights.py) instead of one
# cudaMalloc each (None: one cudaMalloc each; benchmarks/compare.py's +weights=device). Measured on an H100
# (2026-11-27, SD 1.5 fp16 512^2, the same run): peak 2488 MB instead of 2684 at 0.221 against 0.215 s per image,
# batch images within one level; the portable fp32 bundle 5736 MB instead of 6002; the @gpu tests (blocks freed as
# sessions close, low memory closing them between stages) passed there.
WEIGHT_BLOCK_BYTES: int | None = 1 << 20


def shared_cuda_arena(ort, device: int = 0, region_bytes: int | None = None) -> bool:
    """Register one CUDA arena in onnxruntime's environment (once per process and device: the first bundle's
    region size holds) for sessions opened with `session.use_env_allocators`: the VAE reuses the UNet's activation
    memory instead of growing its own. The arena's first region is `region_bytes` (at most ARENA_REGION_MAX) and
    each later one twice the last, up to 1 GB: onnxruntime's CUDA allocator takes initial_chunk_size_bytes from
    OrtArenaCfg but not max_power_of_two_extend_bytes (its log on an H100: 128, 256, 512, 1024 MB whatever was set).
    A freed chunk coalesces with its neighbours only inside a region, so the UNet's and VAE's activations of one
    image should fit in the first. Measured on an H100 (SD 1.5 fp16, 512^2, guidance): a first region of 384 or 448
    MB held both; 256 and 320 MB did not (the overflow costs a region twice as large), and growing by each
    request's size (kSameAsRequested) left the VAE no chunk large enough, 380 MB more at the peak than one region;
    the portable fp32 bundle still peaked 1 GB lower than growing by request. Weights bypass the arena
    (session.use_device_allocator_for_initializers, or a WeightBlock), so what a captured CUDA graph leaves in it
    is only activations, never another graph's weights (with weights drawn from it, the tiny test bundle's images
    came out garbled on an H100). The arena lives as long as the process (the environment owns it): closing a
    Reconstructor frees its weights, not the arena's regions. False if this onnxruntime cannot."""
    if device not in _SHARED_ARENA:
        region = int(min(max(ARENA_REGION if region_bytes is None else region_bytes, 1 << 20), ARENA_REGION_MAX))
        cfg = {"initial_chunk_size_bytes": region, **SHARED_ARENA_CONFIG}
        try:
            mem = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator_v2(ORT_PROVIDERS["cuda"], mem, {"device_id": str(device)},
                                                 ort.OrtArenaCfg(cfg))
            _SHARED_ARENA[device] = True
        except Exception as e:  # noqa: BLE001  onnxruntime raises its own exception types
            log.warning("onnxruntime could not share one CUDA arena between graphs (%s); each keeps its own", e)
            _SHARED_ARENA[device] = False
    return _SHARED_ARENA[device]


def _weight_block(path: Path, opts) -> object | None:
    """The graph's weights over WEIGHT_BLOCK_BYTES in one device block, supplied to `opts`; None where it has
    none, or where the block cannot be made: then onnxruntime loads every weight itself, as without blocks, and a
    damaged file is its error to report (said once per process)."""
    from .device_weights import WeightBlock

    def fallback(e: Exception) -> None:
        if "weight block" not in _WARNED:
            _WARNED.add("weight block")
            log.warning("%s: weights one cudaMalloc each (%s: %s)", path.name, type(e).__name__, first_line(e, 200))

    try:
        block = WeightBlock(path, "cuda", WEIGHT_BLOCK_BYTES)        # frees what it allocated if it fails
    except Exception as e:  # noqa: BLE001  the CUDA runtime, onnxruntime and a damaged file raise their own types
        return fallback(e)
    if not block.values:                                             # a small graph: no weight over the threshold
        block.free()
        return None
    try:
        block.supply(opts)
    except Exception as e:  # noqa: BLE001  the weights supplied so far view the block: it stays with the session
        fallback(e)
    return block


@dataclass(frozen=True)
class Port:
    """A graph input's name, shape (ints, and names of symbolic dimensions) and onnxruntime type string."""

    name: str
    shape: list
    type: str


class OrtSession:
    """One ONNX graph on one onnxruntime provider (cpu | cuda | tensorrt)."""

    def __init__(self, path: Path | bytes, provider: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None, *, profile: str | None = None, shared_arena: bool = False,
                 arena_bytes: int | None = None, config: dict | None = None):
        """`path`: an ONNX file (external data beside it), or a serialised model. `shared_arena` (cuda): draw
        activations from the process's one CUDA arena (shared_cuda_arena), first region `arena_bytes` (the
        bundle's estimate, session.arena_bytes) if it is the first to open it. `config`: more session config
        entries."""
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
        else:
            # No memory pattern: measured on an H200 (fp16 SD 1.5 UNet, batch 2, 512^2, CUDA graph), the UNet's
            # activations took 1020 MB with it and 600 MB without, at the same speed.
            opts.enable_mem_pattern = False
            # weights straight from the device allocator (the large ones in one block, below): the arena holds
            # activations only, and what a captured CUDA graph leaves in it is never another graph's weights
            opts.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
            if provider == "cuda" and shared_arena and shared_cuda_arena(ort, 0, arena_bytes):
                opts.add_session_config_entry("session.use_env_allocators", "1")
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, value)
        self._weights = None
        if provider == "cuda" and WEIGHT_BLOCK_BYTES is not None and not isinstance(path, bytes):
            self._weights = _weight_block(Path(path), opts)
        if threads:
            opts.intra_op_num_threads = threads
        elif provider == "cpu":
            opts.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile)
        options = self._options = dict(provider_options or {})
        self.cuda_graph = provider == "cuda" and options.get("enable_cuda_graph") == "1"
        eps = [(ORT_PROVIDERS[provider], options)]
        if provider != "cpu":
            eps.append(("CPUExecutionProvider", {}))
        name = "<model bytes>" if isinstance(path, bytes) else Path(path).name
        self.name = name
        self._create = lambda opts_: ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts,
                                                          providers=[(eps[0][0], opts_), *eps[1:]])
        try:
            self.sess = self._create(options)
        except Exception as e:                  # onnxruntime raises its own exception types
            if not self.cuda_graph or "graph" not in str(e).lower():   # e.g. a file damaged under --no-verify
                raise ProviderError(f"{name}: onnxruntime could not open it on {provider} "
                                    f"({type(e).__name__}: {first_line(e, 300)})") from None
            self._without_graph(e)
        used = self.sess.get_providers()
        if ORT_PROVIDERS[provider] not in used:
            raise ProviderError(f"{name}: onnxruntime could not start {ORT_PROVIDERS[provider]} "
                                f"(runs on {', '.join(used)}); check the CUDA / TensorRT libraries")
        # copies: onnxruntime's NodeArg objects keep the native session alive (close() must see it go)
        self.inputs = {i.name: Port(i.name, list(i.shape), i.type) for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self._output_shapes = {o.name: o.shape for o in self.sess.get_outputs()}
        log.debug("%s on %s%s", name, used[0], " (CUDA graph)" if self.cuda_graph else "")
        self._bound: dict[str, np.ndarray] = {}
        self._epoch = 0                          # bumped by bound(): device copies of the constants are stale
        self._slots: dict[tuple, _Slot] = {}
        self.device_io = provider != "cpu"       # inputs and outputs in device buffers (slots); the CPU needs none

    def close(self) -> None:
        """Free the graph's device memory now: its buffers, its session, then its weight block (never before the
        session: where something else still holds the session, the block stays until the process ends)."""
        self._slots, self._bound = {}, {}
        sess, self.sess = getattr(self, "sess", None), None
        block, self._weights = getattr(self, "_weights", None), None
        if block is not None and (sess is None or sys.getrefcount(sess) <= 2):   # this frame's and getrefcount's
            del sess
            gc.collect()                                         # a session held in a reference cycle, too
            block.free()

    def __del__(self):
        if getattr(self, "_weights", None) is not None:      # only a weight block needs freeing in order
            try:
                self.close()
            except Exception:  # noqa: BLE001  at interpreter exit, modules may be half gone
                pass

    def _without_graph(self, error: Exception) -> None:
        """CUDA graphs need every node on the CUDA provider and nothing that syncs with the host during capture; a
        graph that cannot be captured runs node by node (said once, in the log)."""
        log.warning("%s: no CUDA graph (%s); running it node by node", self.name,
                    first_line(error, 10 ** 6))
        self.cuda_graph = False
        self._options = {k: v for k, v in self._options.items() if k != "enable_cuda_graph"}
        self._slots = {}
        self.sess = None                         # the graph's weights leave the GPU before they come back
        gc.collect()
        self.sess = self._create(self._options)

    @contextlib.contextmanager
    def bound(self, constants: dict[str, np.ndarray]):
        """Within the block, `constants` live on the provider's device (uploaded once per block, through
        onnxruntime's I/O binding) and run() takes only the other inputs: across denoising steps the text
        embeddings and ip tokens stay on the GPU and only the latent travels."""
        self._bound = {k: np.ascontiguousarray(v) for k, v in constants.items()}
        self._epoch += 1
        try:
            yield self
        finally:
            self._bound = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.device_io:
            return dict(zip(self.outputs, self.sess.run(self.outputs, {**self._bound, **feeds})))
        return self._run_on_device(feeds)

    def _run_on_device(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every input and output in a device buffer kept per set of shapes (a slot): constants are copied in
        once per bound() block, the rest in place every call, and a CUDA graph, where enabled, is captured once
        per slot and replayed (it reads and writes the same addresses every time)."""
        ort = onnxruntime()
        arrays = {**self._bound, **{k: np.ascontiguousarray(v) for k, v in feeds.items()}}
        key = tuple(sorted((k, v.shape, v.dtype.str) for k, v in arrays.items()))
        slot = self._slots.get(key)
        if slot is None:
            try:
                slot = self._slots[key] = _Slot(ort, self, arrays, len(self._slots))
            except ProviderError as e:           # an output without a static shape: no graph, node by node
                if not self.cuda_graph:
                    raise
                self._without_graph(e)
                return self._run_on_device(feeds)
        for k, v in arrays.items():
            if k not in self._bound or slot.epoch != self._epoch:
                slot.values[k].update_inplace(v)
        slot.epoch = self._epoch
        try:
            self.sess.run_with_iobinding(slot.binding, slot.run_options)
        except Exception as e:                  # onnxruntime raises its own exception types
            if not self.cuda_graph:
                raise
            self._without_graph(e)              # the capture failed: the same run, node by node
            return self._run_on_device(feeds)
        if slot.outputs_bound:
            return {k: slot.values[k].numpy() for k in self.outputs}
        return dict(zip(self.outputs, slot.binding.copy_outputs_to_cpu()))


    def input_dtype(self, name: str) -> np.dtype:
        t = self.inputs[name].type
        return np.dtype(np.float16) if "float16" in t else np.dtype(np.float32)

    def end_profiling(self) -> Path:
        """The profile written so far (a session opened with `profile`)."""
        return Path(self.sess.end_profiling())


class _Slot:
    """Device buffers for one set of input shapes: the I/O binding and, with CUDA graphs, the graph's id."""

    def __init__(self, ort, sess: OrtSession, arrays: dict[str, np.ndarray], index: int):
        device = "cpu" if sess.provider == "cpu" else "cuda"
        self.values = {k: ort.OrtValue.ortvalue_from_shape_and_type(v.shape, v.dtype, device, 0)
                       for k, v in arrays.items()}
        dims = {}                                                   # symbolic dimension -> its size in these inputs
        for k, v in arrays.items():
            for d, n in zip(sess.inputs[k].shape, v.shape):
                if isinstance(d, str):
                    dims[d] = n
        self.binding = sess.sess.io_binding()
        for k, v in self.values.items():
            self.binding.bind_ortvalue_input(k, v)
        for k in sess.outputs:
            shape = [dims.get(d) if isinstance(d, str) else d for d in sess._output_shapes[k]]
            if all(isinstance(d, int) for d in shape):
                dtype = np.float16 if "float16" in sess.sess.get_outputs()[sess.outputs.index(k)].type else np.float32
                self.values[k] = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
                self.binding.bind_ortvalue_output(k, self.values[k])
            elif sess.cuda_graph:
                raise ProviderError(f"{sess.name}: output {k} has no static shape for a CUDA graph")
            else:
                self.binding.bind_output(k, device)
        self.run_options = ort.RunOptions()
        if sess.cuda_graph:
            self.run_options.add_run_config_entry("gpu_graph_id", str(index))
        self.epoch = -1
        self.outputs_bound = all(k in self.values for k in sess.outputs)     # else onnxruntime allocates them
