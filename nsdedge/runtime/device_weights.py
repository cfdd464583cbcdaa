"""A graph's large weights in one device allocation, handed to onnxruntime as views.

onnxruntime gives every weight of a CUDA session its own cudaMalloc (session.use_device_allocator_for_initializers,
which keeps the weights out of the activation arena), and the driver takes whole 2 MB pages for every allocation
over 1 MB: measured on an H100, the SD 1.5 UNet's fp16 weights took 1848 MB that way against 1676 MB as one block.
Here the weights over 1 MB are copied into one cudaMalloc (through the CUDA runtime that onnxruntime-gpu loads),
each handed to onnxruntime as an OrtValue viewing its slice (a DLPack capsule) through
SessionOptions.add_initializer: onnxruntime then uses it in place instead of loading that weight itself. The
smaller ones still come from the device allocator, where they share pages. Used where ort_session.WEIGHT_BLOCK_BYTES
is set (1 MB by default: see there for what it saved on an H100).

The graph is read without the onnx package (the runtime does not depend on it): the few protobuf fields of
ModelProto.graph.initializer that locate a weight (name, type, dims, raw_data or external data).
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BIG = 1 << 20                # allocations up to 1 MB share the driver's pages already
ALIGN = 256                  # as cudaMalloc aligns
# ONNX TensorProto.DataType -> numpy dtype and DLPack (type code, bits): the types bundles store weights in
DTYPES = {1: (np.dtype(np.float32), 2), 10: (np.dtype(np.float16), 2), 3: (np.dtype(np.int8), 0),
          2: (np.dtype(np.uint8), 1)}
_CPU, _CUDA = 1, 2           # DLPack device types


@dataclass(frozen=True)
class Initializer:
    """One weight of an ONNX file, located: in `file` at `offset` (raw_data inline or external data)."""

    name: str
    onnx_type: int               # a key of DTYPES
    dims: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.onnx_type][0]


# -- reading ModelProto.graph.initializer ---------------------------------------------------------------------------
def _varint(buf, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited payload) over buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            v, i = (i, i + n), i + n
        elif wire == 1:
            v, i = None, i + 8
        elif wire == 5:
            v, i = None, i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}: not an ONNX model")
        yield number, wire, v


def _tensor(buf, start: int, end: int, path: Path) -> Initializer | None:
    dims, dtype, name, raw, external, location = [], 0, "", None, {}, 0
    for number, wire, v in _fields(buf, start, end):
        if number == 1:                                         # dims: varints, or packed
            if wire == 0:
                dims.append(v)
            else:
                j = v[0]
                while j < v[1]:
                    d, j = _varint(buf, j)
                    dims.append(d)
        elif number == 2:
            dtype = v
        elif number == 8:
            name = bytes(buf[v[0]:v[1]]).decode()
        elif number == 9:
            raw = v
        elif number == 13:                                      # external_data: StringStringEntryProto
            entry = {k: bytes(buf[s:e]).decode() for k, _, (s, e) in _fields(buf, *v)}
            external[entry.get(1, "")] = entry.get(2, "")
        elif number == 14:
            location = v
    if dtype not in DTYPES:
        return None
    nbytes = int(np.prod(dims, dtype=np.int64)) * DTYPES[dtype][0].itemsize
    if location == 1:                                           # EXTERNAL
        size = int(external.get("length", nbytes))
        if size != nbytes:
            return None
        return Initializer(name, dtype, tuple(dims), path.parent / external["location"],
                           int(external.get("offset", 0)), nbytes)
    if raw is None or raw[1] - raw[0] != nbytes:                # typed fields (float_data): left to onnxruntime
        return None
    return Initializer(name, dtype, tuple(dims), path, raw[0], nbytes)


def initializers(path: str | Path, min_bytes: int = 0) -> list[Initializer]:
    """The weights of the ONNX file at `path` of at least `min_bytes`, in graph order, of the types in DTYPES."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            out = []
            for number, wire, v in _fields(buf, 0, len(buf)):
                if number == 7 and wire == 2:                   # ModelProto.graph
                    for n, w, t in _fields(buf, *v):
                        if n == 5 and w == 2:                   # GraphProto.initializer
                            init = _tensor(buf, *t, path)
                            if init is not None and init.nbytes >= min_bytes:
                                out.append(init)
            return out
        finally:
            buf.release()


# -- the block ------------------------------------------------------------------------------------------------------
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]


_KEEP = _DELETER(lambda _: None)     # the block owns the memory: onnxruntime's release of a view frees nothing
_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype = ctypes.py_object
_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def cudart():
    """The CUDA runtime onnxruntime-gpu loaded (its [cuda] extra), or None."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class WeightBlock:
    """The weights over `min_bytes` of one ONNX file in one allocation on `device` (cuda, or cpu: host memory,
    the same mechanism where no GPU is), and the OrtValues viewing it. The block must outlive every session it
    supplied: free() after the session is gone."""

    def __init__(self, path: str | Path, device: str = "cuda", min_bytes: int = BIG):
        import onnxruntime as ort

        self.weights = initializers(path, min_bytes)
        offsets, total = [], 0
        for w in self.weights:
            offsets.append(total)
            total += -(-w.nbytes // ALIGN) * ALIGN
        self.device, self.nbytes, self._views, self.values, self._base = device, total, [], {}, 0
        if device == "cuda":
            self._rt = cudart()
            if self._rt is None:
                raise OSError("no CUDA runtime library (libcudart) found")
            ptr = ctypes.c_void_p()
            if total and self._rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(total)) != 0:
                raise MemoryError(f"cudaMalloc of {total} bytes failed")
            self._base = ptr.value or 0
        else:
            self._host = np.empty(max(total, 1), np.uint8)
            self._base = self._host.ctypes.data
        try:
            files = {}
            for w, off in zip(self.weights, offsets):
                if w.file not in files:
                    files[w.file] = np.memmap(w.file, np.uint8, "r")
                src = files[w.file][w.offset:w.offset + w.nbytes]
                if src.nbytes != w.nbytes:                       # a truncated external data file
                    raise ValueError(f"{w.file.name} ends before weight {w.name}")
                if device == "cuda":
                    if self._rt.cudaMemcpy(ctypes.c_void_p(self._base + off), ctypes.c_void_p(src.ctypes.data),
                                           ctypes.c_size_t(w.nbytes), 1) != 0:          # cudaMemcpyHostToDevice
                        raise RuntimeError(f"cudaMemcpy of weight {w.name} failed")
                else:
                    self._host[off:off + w.nbytes] = src
                self.values[w.name] = ort.OrtValue.from_dlpack(self._view(self._base + off, w))
        except BaseException:
            self.free()
            raise
        finally:
            files.clear()

    def _view(self, ptr: int, w: Initializer):
        shape = (ctypes.c_int64 * max(len(w.dims), 1))(*w.dims)
        m = _DLManagedTensor()
        code = DTYPES[w.onnx_type][1]
        m.dl_tensor = _DLTensor(ctypes.c_void_p(ptr), _DLDevice(_CUDA if self.device == "cuda" else _CPU, 0),
                                len(w.dims), _DLDataType(code, w.dtype.itemsize * 8, 1), shape, None, 0)
        m.deleter = _KEEP
        self._views += [shape, m]
        return _capsule(ctypes.addressof(m), b"dltensor", None)

    def supply(self, opts) -> None:
        """Hand every weight of the block to a session about to be created with `opts`."""
        for name, value in self.values.items():
            opts.add_initializer(name, value)

    def free(self) -> None:
        self.values.clear()
        self._views.clear()
        if self.device == "cuda" and self._base:
            self._rt.cudaFree(ctypes.c_void_p(self._base))
        self._base = 0
