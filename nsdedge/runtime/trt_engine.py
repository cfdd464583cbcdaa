"""Native TensorRT engines behind the Backend protocol: profiles, the keyed engine cache, and the runner.

An engine is tied to the GPU model, its compute capability and the TensorRT version that built it
(REFERENCE.md), and of course to the graph and the build settings. All of that is the engine's key: its
digest names the file, and a JSON sidecar beside it holds the key itself and the plan's sha256. Before a plan
is deserialised the sidecar is compared field by field with this machine's key, so a stale or foreign engine
is rebuilt (or refused, with what differs) and never loaded blindly.

    <cache>/<gpu>_sm<major><minor>_trt<version>/<component>.<digest>.plan   (+ .json; timing.cache per folder)

The builder is nsdedge/export/trt_build.py. Everything here but EngineSession and this_device() is plain
Python and tested without a GPU; those use the tensorrt Python API and cuda-python (pip install 'nsdedge[trt]')
and carry @gpu tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Manifest
from ..errors import BundleError, ProviderError

log = logging.getLogger(__name__)

ENGINE_COMPONENTS = ("unet", "vae_decoder", "taesd_decoder")   # decoders are one GEMM: onnxruntime runs them
WORKSPACE_BYTES = 4 << 30                         # builder workspace cap (edge boards: pass less)


@dataclass(frozen=True)
class Device:
    """What an engine is tied to, besides the graph and the settings."""

    gpu: str
    compute_capability: str                       # "8.7" (Jetson Orin), "9.0" (H100), ...
    tensorrt: str

    def folder(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        return f"{slug}_sm{self.compute_capability.replace('.', '')}_trt{self.tensorrt}"

    @property
    def strongly_typed(self) -> bool:
        """Whether its TensorRT builds only strongly typed networks: 11 removed BuilderFlag.FP16 / INT8 (and weak
        typing with them), so precision comes from the graph's own tensor types and int8 from its Q/DQ nodes."""
        return int(self.tensorrt.split(".")[0]) >= 11


@dataclass(frozen=True)
class EngineKey:
    component: str
    graph_sha256: str                             # from the bundle's files table: the graph and its weights
    precision: str                                # the bundle component's: fp32 | fp16 | int8 (QDQ)
    profiles: tuple                               # ((input, min, opt, max), ...) per optimization profile
    workspace: int
    device: Device
    flags: tuple = field(default=())              # builder flags: "fp16", "int8"; or "strongly-typed" alone

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:16]

    def as_json(self) -> dict:
        d = asdict(self)
        d["profiles"] = [[list(map(list_or_str, p)) for p in prof] for prof in self.profiles]
        d["flags"] = list(self.flags)
        return d


def list_or_str(x):
    return x if isinstance(x, str) else list(x)


def builder_flags(precision: str, strongly_typed: bool = False) -> tuple[str, ...]:
    """Weakly typed: fp16 bundles build fp16; int8 (explicit Q/DQ) bundles allow int8 where the graph says, fp16
    elsewhere. Strongly typed: no precision flag (TensorRT refuses them there), the graph's own types decide; the
    key says so, since the same graph builds another engine either way."""
    flags = {"fp32": (), "fp16": ("fp16",), "int8": ("fp16", "int8")}[precision]
    return ("strongly-typed",) if strongly_typed else flags


# -- shapes -------------------------------------------------------------------------------------------------
# A dimension as the exporters write it: an integer, or [k*]name with name "height" or "height_over_m" (the
# dynamo exporter's name for a dimension that is a multiple of m), e.g. "batch", "2*height_over_2", "8*width_over_8".
_DIM = re.compile(r"(?:([0-9]{1,4})\*)?([A-Za-z_][A-Za-z0-9_]{0,63}?)(?:_over_([0-9]{1,4}))?")


def _dim_value(expr: str, env: dict[str, int]) -> int:
    """The value of a symbolic input dimension for an engine profile; any other form is refused (never evaluated)."""
    m = _DIM.fullmatch(expr) if isinstance(expr, str) else None
    if not m or m.group(2) not in env or (m.group(3) and int(m.group(3)) == 0):
        raise BundleError(f"input dimension {expr!r} has no value for an engine profile")
    k, name, over = int(m.group(1) or 1), m.group(2), int(m.group(3) or 1)
    return k * (env[name] // over)


def _concrete(shape: list, batch: int, spatial: dict[str, int]) -> tuple[int, ...]:
    env = {"batch": batch, **spatial}
    return tuple(d if isinstance(d, int) else _dim_value(d, env) for d in shape)


def profile_shapes(manifest: Manifest, component: str, batches: tuple[int, ...] = (1, 2),
                   dynamic: bool = False) -> tuple:
    """Optimization profiles for `component` at the bundle's resolution.

    Static (default): one profile per batch size, min = opt = max, which TensorRT builds fastest kernels for
    (dynamic shapes cost about 13 %, REFERENCE.md). Dynamic: one profile, batch 1..max(batches) (opt the
    largest) and spatial sizes from half to 1.5x the bundle's, in steps the UNet accepts.
    """
    comp = manifest.components[component]
    lh, lw = manifest.latent_size
    spatial = {"height": lh, "width": lw}
    if not dynamic:
        return tuple(tuple((i["name"], *(_concrete(i["shape"], b, spatial),) * 3) for i in comp.inputs)
                     for b in sorted(set(batches)))
    m = int(manifest.extra.get("unet_multiple", 1))
    lo = {k: max(m, (v // 2) // m * m) for k, v in spatial.items()}
    hi = {k: (v * 3 // 2) // m * m for k, v in spatial.items()}
    b = max(batches)
    return ((tuple((i["name"], _concrete(i["shape"], 1, lo), _concrete(i["shape"], b, spatial),
                    _concrete(i["shape"], b, hi)) for i in comp.inputs)),)


def pick_profile(key: EngineKey, shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose ranges hold `shapes`; an engine never runs outside them."""
    for idx, prof in enumerate(key.profiles):
        if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[name], mn, mx)) for name, mn, _, mx in prof):
            return idx
    raise ProviderError(f"{key.component}: no engine profile holds shapes {shapes}; rebuild with nsdedge "
                        f"build-engines --batch ... or --dynamic")


# -- the cache ----------------------------------------------------------------------------------------------
def engine_key(manifest: Manifest, component: str, device: Device, batches=(1, 2), dynamic: bool = False,
               workspace: int = WORKSPACE_BYTES, strongly_typed: bool | None = None) -> EngineKey:
    """`strongly_typed`: True asks for a strongly typed network where TensorRT still offers both (10); None or
    False: precision flags there. The device's TensorRT decides where it has no choice (11 and later)."""
    comp = manifest.components[component]
    digest = hashlib.sha256("".join(manifest.files[f]["sha256"] for f in [comp.file, *comp.data_files])
                            .encode()).hexdigest()
    return EngineKey(component=component, graph_sha256=digest, precision=comp.precision,
                     profiles=profile_shapes(manifest, component, batches, dynamic), workspace=workspace,
                     device=device, flags=builder_flags(comp.precision, bool(strongly_typed) or device.strongly_typed))


def engine_paths(cache: Path, key: EngineKey) -> tuple[Path, Path]:
    folder = Path(cache) / key.device.folder()
    stem = f"{key.component}.{key.digest()}"
    return folder / f"{stem}.plan", folder / f"{stem}.json"


def check_engine(cache: Path, key: EngineKey) -> str | None:
    """None if a usable engine for `key` is in `cache`, else why not (missing, stale, foreign, corrupted)."""
    plan, meta = engine_paths(cache, key)
    if not plan.exists() or not meta.exists():
        others = sorted(p.parent.name for p in Path(cache).glob(f"*/{key.component}.*.json"))
        if others:
            return (f"no {key.component} engine for {key.device.gpu} (sm {key.device.compute_capability}, TensorRT "
                    f"{key.device.tensorrt}) with these settings; the cache holds engines for: "
                    f"{', '.join(sorted(set(others)))}")
        return f"no {key.component} engine built yet"
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError, RecursionError) as e:
        return f"{meta}: unreadable engine record ({e})"
    if not isinstance(saved, dict) or not isinstance(saved.get("key"), dict):
        return f"{meta}: unreadable engine record (not an nsdedge engine record)"
    want = key.as_json()
    diffs = [k for k in want if saved["key"].get(k) != want[k]]
    if diffs:
        return f"{plan.name}: built for other {', '.join(diffs)}"
    if hashlib.sha256(plan.read_bytes()).hexdigest() != saved.get("plan_sha256"):
        return f"{plan.name}: plan does not match its recorded sha256 (corrupted or replaced)"
    return None


# -- this machine ---------------------------------------------------------------------------------------------
def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ProviderError("TensorRT engines need the tensorrt Python package and an NVIDIA GPU: "
                            "pip install 'nsdedge[trt]' on the target machine") from None
    return trt


def require_cudart():
    """cuda-python's runtime API: cuda.bindings.runtime since cuda-python 12.6.1 (13 removed `from cuda import
    cudart`); the old path only where cuda.bindings is missing, so a broken new install says what broke."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        if not isinstance(e, ModuleNotFoundError) or e.name not in ("cuda", "cuda.bindings"):
            raise ProviderError(f"cuda-python is installed but its runtime API does not load: {e}") from None
        try:
            from cuda import cudart  # cuda-python < 12.6.1
        except ImportError:
            raise ProviderError("TensorRT engines need cuda-python for device buffers: "
                                "pip install 'nsdedge[trt]'") from None
    return cudart


def _check(result):
    """cuda-python returns (err, *values): raise on err, return the values."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ProviderError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def this_device() -> Device:
    """GPU 0's name and compute capability (cuda-python, else nvidia-smi) and the TensorRT version."""
    trt = require_tensorrt()
    try:
        cudart = require_cudart()
        props = _check(cudart.cudaGetDeviceProperties(0))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        cc = f"{props.major}.{props.minor}"
    except ProviderError:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            raise ProviderError("no NVIDIA GPU found (neither cuda-python nor nvidia-smi could read one)") from None
        name, cc = (s.strip() for s in out.strip().split(",", 1))
    return Device(gpu=name.strip("\x00 "), compute_capability=cc, tensorrt=trt.__version__)


# -- running --------------------------------------------------------------------------------------------------
class EngineSession:
    """A TensorRT engine behind the Backend protocol: run(feeds) -> {name: array}. Device buffers are allocated
    once per shape through cuda-python and reused; constant inputs can be uploaded once (bind_constant)."""

    def __init__(self, cache: Path, key: EngineKey):
        why = check_engine(cache, key)
        if why is not None:
            raise ProviderError(f"{why}; run `nsdedge build-engines BUNDLE` on this machine")
        trt = require_tensorrt()
        self.cudart = require_cudart()
        self.key = key
        plan = engine_paths(cache, key)[0].read_bytes()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ProviderError(f"{key.component}: TensorRT {trt.__version__} refused the engine")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers: dict[str, tuple[int, int]] = {}      # name -> (device pointer, bytes)
        self.constants: set[str] = set()
        self._constant_shapes: dict[str, tuple[int, ...]] = {}
        self.profile = -1
        self.provider = "engine"

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            ptr = _check(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def _upload(self, name: str, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array, self.dtypes[name])
        ptr = self._buffer(name, a.nbytes)
        _check(self.cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))

    def bind_constant(self, name: str, array: np.ndarray) -> None:
        """Upload an input that does not change between calls (text embeddings, ip tokens) once."""
        self._upload(name, array)
        self.constants.add(name)
        self._constant_shapes[name] = tuple(np.shape(array))

    @contextlib.contextmanager
    def bound(self, constants: dict[str, np.ndarray]):
        """As OrtSession.bound: `constants` are uploaded once and stay on the device within the block."""
        for k, v in constants.items():
            self.bind_constant(k, v)
        try:
            yield self
        finally:
            self.constants.clear()
            self._constant_shapes = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds and n not in self.constants]
        if missing:                                         # before the profile is picked by their shapes
            raise ProviderError(f"{self.key.component}: inputs not fed: {', '.join(missing)}")
        shapes = {n: tuple(np.shape(feeds[n])) for n in feeds}
        shapes.update({n: s for n, s in self._constant_shapes.items() if n not in shapes})
        idx = pick_profile(self.key, shapes)
        if idx != self.profile:
            self.context.set_optimization_profile_async(idx, self.stream)
            self.profile = idx
        for name in self.inputs:
            if name in feeds:
                self._upload(name, feeds[name])
            self.context.set_input_shape(name, shapes[name])
            self.context.set_tensor_address(name, self.buffers[name][0])
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, self.dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, results[name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise ProviderError(f"{self.key.component}: TensorRT execution failed")
        for name, host in results.items():
            _check(self.cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return {k: v.astype(np.float32) for k, v in results.items()}

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)                         # run() casts to the engine's own types

    def __del__(self):
        for ptr, _ in getattr(self, "buffers", {}).values():
            self.cudart.cudaFree(ptr)
