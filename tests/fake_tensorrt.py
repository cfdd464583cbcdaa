"""Fakes of the tensorrt and cuda-python APIs nsdedge calls, to test the engine builder and runner without a GPU.

`install(monkeypatch, version)` puts a fake `tensorrt` and a fake `cuda.bindings.runtime` into sys.modules and
returns the FakeGPU behind both. Two flavours, as the real ones differ: 10.x has the precision builder flags
(BuilderFlag.FP16 / INT8) and an opt-in strongly typed network; 11.x removed those flags, and every network it
builds is strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED stays, deprecated and ignored).

The fakes record every call in order (FakeGPU.calls) and raise FakeAPIError where the real APIs refuse or leave
the result undefined: a precision flag on a strongly typed network, shapes outside the active profile or set
before a profile is, an output shape asked before every input shape is set, tensor addresses unset, freed or too
small, copies beyond an allocation, streams that were never created. And they compute: the plan is JSON naming
the ONNX graph and its profiles, and execute_async_v3 runs that graph with onnxruntime on the CPU, reading its
inputs from and writing its outputs to the fake device memory, so an engine's images can be compared with the
CPU's.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from pathlib import Path

import numpy as np

TENSORRT_10 = "10.13.3"
TENSORRT_11 = "11.4.1"
GPU_NAME, GPU_CC = "NVIDIA Fake GPU", (9, 0)


class FakeAPIError(AssertionError):
    """A call the real API would refuse, or whose result it leaves undefined."""


def expect(condition, why: str) -> None:
    if not condition:
        raise FakeAPIError(why)


class FakeGPU:
    """The device both fakes share: live allocations (pointer -> bytes), created streams, and every call made."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.memory: dict[int, bytearray] = {}
        self.streams: set[int] = set()
        self._next = 0x7F00_0000_0000

    def record(self, *call) -> None:
        self.calls.append(call)

    def names(self, *only: str) -> list[str]:
        return [c[0] for c in self.calls if not only or c[0] in only]

    def malloc(self, nbytes: int) -> int:
        ptr = self._next
        self._next += (nbytes // 256 + 2) * 256            # aligned, with a gap: an overrun never lands elsewhere
        self.memory[ptr] = bytearray(nbytes)
        return ptr

    def view(self, ptr: int, nbytes: int) -> memoryview:
        """Device bytes [ptr, ptr + nbytes), which must lie in one live allocation."""
        for base, buf in self.memory.items():
            if base <= ptr < base + len(buf):
                expect(ptr + nbytes <= base + len(buf),
                       f"{nbytes} bytes at {ptr:#x} run past the allocation of {len(buf)} bytes at {base:#x}")
                return memoryview(buf)[ptr - base:ptr - base + nbytes]
        raise FakeAPIError(f"{ptr:#x} is not in a live device allocation")

    def stream(self, stream) -> int:
        expect(int(stream) in self.streams, f"stream {stream!r} was never created")
        return int(stream)


# -- cuda.bindings.runtime ------------------------------------------------------------------------------------
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStream_t:
    """cuda-python's stream handle: int() gives the address that TensorRT takes."""

    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


def make_cudart(gpu: FakeGPU) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    ok = cudaError_t.cudaSuccess

    def cudaMalloc(size):
        gpu.record("cudaMalloc", size)
        return ok, gpu.malloc(size)

    def cudaFree(ptr):
        gpu.record("cudaFree", ptr)
        expect(ptr in gpu.memory, f"cudaFree({ptr:#x}): not a live allocation")
        del gpu.memory[ptr]
        return (ok,)

    def cudaMemcpyAsync(dst, src, count, kind, stream):
        gpu.record("cudaMemcpyAsync", cudaMemcpyKind(kind).name.removeprefix("cudaMemcpy"), count)
        gpu.stream(stream)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            gpu.view(dst, count)[:] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(gpu.view(src, count)), count)
        return (ok,)

    def cudaStreamCreate():
        gpu.record("cudaStreamCreate")
        handle = 0x5000 + len(gpu.streams) + 1
        gpu.streams.add(handle)
        return ok, cudaStream_t(handle)

    def cudaStreamSynchronize(stream):
        gpu.record("cudaStreamSynchronize")
        gpu.stream(stream)
        return (ok,)

    def cudaGetDeviceProperties(device):
        gpu.record("cudaGetDeviceProperties", device)
        expect(device == 0, f"no device {device}")
        return ok, types.SimpleNamespace(name=GPU_NAME.encode() + b"\0" * 8, major=GPU_CC[0], minor=GPU_CC[1])

    for f in (cudaMalloc, cudaFree, cudaMemcpyAsync, cudaStreamCreate, cudaStreamSynchronize,
              cudaGetDeviceProperties, cudaError_t, cudaMemcpyKind, cudaStream_t):
        setattr(rt, f.__name__, f)
    return rt


# -- tensorrt -------------------------------------------------------------------------------------------------
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
         "BOOL": np.bool_}
ONNX_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int8)": "INT8", "tensor(int32)": "INT32",
              "tensor(int64)": "INT64", "tensor(bool)": "BOOL"}


class Logger:
    ERROR, WARNING, INFO = 1, 2, 3

    def __init__(self, severity=WARNING):
        self.severity = severity


class Network:
    def __init__(self, strongly_typed: bool):
        self.strongly_typed = strongly_typed
        self.onnx: str | None = None
        self.inputs: dict[str, tuple] = {}                  # name -> dims (None where symbolic)


class OnnxParser:
    trt: types.ModuleType
    num_errors = 0

    def __init__(self, network: Network, logger: Logger):
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        import onnx

        self.trt._gpu.record("parse_from_file", Path(path).name)
        expect(Path(path).exists(), f"{path}: no such file")
        graph = onnx.load(path, load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        self.network.onnx = path
        self.network.inputs = {i.name: tuple(d.dim_value if d.HasField("dim_value") else None
                                             for d in i.type.tensor_type.shape.dim)
                               for i in graph.input if i.name not in weights}
        return True


class OptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min, opt, max) -> None:
        mn, op, mx = (tuple(map(int, s)) for s in (min, opt, max))
        expect(len(mn) == len(op) == len(mx) and all(a <= b <= c for a, b, c in zip(mn, op, mx)),
               f"profile shapes of {name} are not min <= opt <= max: {mn}, {op}, {mx}")
        self.shapes[name] = (mn, op, mx)


class TimingCache:
    def __init__(self, version: str, blob: bytes):
        saved = json.loads(blob) if blob else {"fake_timing_cache": version, "graphs": []}
        expect(saved.get("fake_timing_cache") == version,
               f"a timing cache of TensorRT {saved.get('fake_timing_cache')} given to {version}")
        self.version, self.graphs = version, set(saved["graphs"])

    def serialize(self) -> bytes:
        return json.dumps({"fake_timing_cache": self.version, "graphs": sorted(self.graphs)}).encode()


class BuilderConfig:
    def __init__(self, trt):
        self.trt, self.gpu = trt, trt._gpu
        self.flags: list = []
        self.profiles: list[OptimizationProfile] = []
        self.timing: TimingCache | None = None

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.gpu.record("set_memory_pool_limit", self.trt.MemoryPoolType(pool).name, size)

    def set_flag(self, flag) -> None:
        self.gpu.record("set_flag", flag.name)
        expect(isinstance(flag, self.trt.BuilderFlag), f"{flag!r} is not a BuilderFlag")
        self.flags.append(flag)

    def create_timing_cache(self, blob: bytes) -> TimingCache:
        self.gpu.record("create_timing_cache", len(blob))
        return TimingCache(self.trt.__version__, bytes(blob))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.gpu.record("set_timing_cache")
        self.timing = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        expect(self.timing is not None, "no timing cache set")
        return self.timing

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.gpu.record("add_optimization_profile")
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    trt: types.ModuleType

    def __init__(self, logger: Logger):
        self.gpu = self.trt._gpu

    def create_network(self, flags: int = 0) -> Network:
        self.gpu.record("create_network", flags)
        creation = self.trt.NetworkDefinitionCreationFlag
        expect(flags & ~sum(1 << int(f) for f in creation) == 0, f"unknown network creation flags {flags:#x}")
        chosen = bool(flags >> int(creation.STRONGLY_TYPED) & 1)
        return Network(strongly_typed=chosen or not hasattr(self.trt.BuilderFlag, "FP16"))

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig(self.trt)

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes:
        self.gpu.record("build_serialized_network", Path(network.onnx or "").name)
        expect(network.onnx, "no graph parsed into the network")
        precision = [f.name for f in config.flags if f.name in ("FP16", "INT8")]
        expect(not (network.strongly_typed and precision), f"builder flags {precision} on a strongly typed network")
        expect(config.profiles, "dynamic inputs and no optimization profile")
        for p in config.profiles:
            expect(p.shapes.keys() == network.inputs.keys(),
                   f"a profile for {sorted(p.shapes)}; the network's inputs are {sorted(network.inputs)}")
            for name, (mn, _, mx) in p.shapes.items():
                dims = network.inputs[name]
                expect(len(mn) == len(dims) and all(d in (None, a, b) and (d is None or a == b)
                                                    for d, a, b in zip(dims, mn, mx)),
                       f"profile shapes {mn}..{mx} do not fit {name} {dims}")
        config.get_timing_cache().graphs.add(Path(network.onnx).name)
        return json.dumps({"tensorrt": self.trt.__version__, "onnx": network.onnx,
                           "strongly_typed": network.strongly_typed, "flags": [f.name for f in config.flags],
                           "profiles": [{n: s for n, s in p.shapes.items()} for p in config.profiles]}).encode()


class Runtime:
    trt: types.ModuleType

    def __init__(self, logger: Logger):
        self.gpu = self.trt._gpu

    def deserialize_cuda_engine(self, plan: bytes):
        self.gpu.record("deserialize_cuda_engine")
        plan = json.loads(plan)
        if plan["tensorrt"] != self.trt.__version__:          # TensorRT refuses another version's plans
            return None
        return Engine(self.trt, plan)


class Engine:
    def __init__(self, trt, plan: dict):
        from nsdedge.runtime.session import open_graph

        self.trt, self.gpu = trt, trt._gpu
        self.graph = open_graph(plan["onnx"], "cpu")
        self.profiles = [{n: tuple(map(tuple, s)) for n, s in p.items()} for p in plan["profiles"]]
        io = [*self.graph.sess.get_inputs(), *self.graph.sess.get_outputs()]
        self.names = [t.name for t in io]
        self.inputs = set(self.graph.inputs)
        self.dtypes = {t.name: trt.DataType[ONNX_TYPES[t.type]] for t in io}
        self.num_io_tensors = len(self.names)
        self._output_shapes: dict[tuple, dict[str, tuple]] = {}

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str):
        return self.trt.TensorIOMode.INPUT if name in self.inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return self.dtypes[name]

    def create_execution_context(self) -> ExecutionContext:
        return ExecutionContext(self)

    def output_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        """What the graph makes of inputs of these shapes (found once per set of shapes, from zeros)."""
        key = tuple(sorted(shapes.items()))
        if key not in self._output_shapes:
            zeros = {n: np.zeros(s, NUMPY[self.dtypes[n].name]) for n, s in shapes.items()}
            self._output_shapes[key] = {n: v.shape for n, v in self.graph.run(zeros).items()}
        return self._output_shapes[key]


class ExecutionContext:
    def __init__(self, engine: Engine):
        self.engine, self.gpu = engine, engine.gpu
        self.profile: int | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, index: int, stream) -> bool:
        self.gpu.record("set_optimization_profile_async", index)
        self.gpu.stream(stream)
        expect(0 <= index < len(self.engine.profiles), f"no profile {index}")
        self.profile, self.shapes = index, {}               # a new profile's input shapes must be set again
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(map(int, shape))
        self.gpu.record("set_input_shape", name, shape)
        expect(self.profile is not None, f"set_input_shape({name}) before an optimization profile is set")
        expect(name in self.engine.inputs, f"{name} is not an input")
        mn, _, mx = self.engine.profiles[self.profile][name]
        expect(len(shape) == len(mn) and all(a <= s <= b for s, a, b in zip(shape, mn, mx)),
               f"{name} {shape} is outside profile {self.profile} ({mn}..{mx})")
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        self.gpu.record("get_tensor_shape", name)
        if name in self.engine.inputs:
            return self.shapes[name]
        missing = self.engine.inputs - self.shapes.keys()
        expect(not missing, f"shape of {name} asked before the shapes of {sorted(missing)} are set")
        return self.engine.output_shapes(self.shapes)[name]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.gpu.record("set_tensor_address", name)
        expect(name in self.engine.names, f"{name} is not an io tensor")
        self.addresses[name] = int(ptr)
        return True

    def _bytes(self, name: str, shape: tuple) -> memoryview:
        expect(name in self.addresses, f"{name} has no address")
        return self.gpu.view(self.addresses[name], int(np.prod(shape)) * np.dtype(self._np(name)).itemsize)

    def _np(self, name: str):
        return NUMPY[self.engine.dtypes[name].name]

    def execute_async_v3(self, stream_handle) -> bool:
        self.gpu.record("execute_async_v3")
        self.gpu.stream(stream_handle)
        missing = self.engine.inputs - self.shapes.keys()
        expect(not missing, f"execute with no shapes set for {sorted(missing)}")
        feeds = {n: np.frombuffer(self._bytes(n, s), self._np(n)).reshape(s) for n, s in self.shapes.items()}
        outputs = self.engine.output_shapes(self.shapes)
        views = {n: self._bytes(n, s) for n, s in outputs.items()}   # every address checked before anything runs
        for name, value in self.engine.graph.run(feeds).items():
            views[name][:] = np.ascontiguousarray(value, self._np(name)).tobytes()
        return True


def make_tensorrt(version: str, gpu: FakeGPU) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt._gpu = version, gpu
    eleven = int(version.split(".")[0]) >= 11
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", ["TF32", "REFIT"] if eleven else ["FP16", "INT8", "TF32", "REFIT"])
    creation = {"STRONGLY_TYPED": 0} if eleven else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.DataType = enum.IntEnum("DataType", list(NUMPY))
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.nptype = lambda dtype: NUMPY[dtype.name]
    trt.Logger = Logger
    for cls in (Builder, OnnxParser, Runtime):
        setattr(trt, cls.__name__, type(cls.__name__, (cls,), {"trt": trt}))
    return trt


def install(monkeypatch, version: str) -> FakeGPU:
    """Fake tensorrt `version` and cuda-python in sys.modules for the test; returns the device they share."""
    gpu = FakeGPU()
    runtime = make_cudart(gpu)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in (("tensorrt", make_tensorrt(version, gpu)), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", runtime)):
        monkeypatch.setitem(sys.modules, name, module)
    return gpu
