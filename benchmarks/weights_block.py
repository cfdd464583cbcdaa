"""An experiment for compare.py's `+weights=block` knob: a graph's large weights in one device allocation.

onnxruntime gives every weight its own cudaMalloc (session.use_device_allocator_for_initializers), and the driver
takes whole 2 MB pages for each allocation over 1 MB: measured on an H100, the SD 1.5 UNet's fp16 weights take
1848 MB that way against 1676 MB as one block (results/cuda-h100-compare.json, cudamalloc_rounding_mb). Here the
float weights over 1 MB are copied into one block (cudaMalloc through ctypes on the CUDA runtime onnxruntime-gpu
loads; a numpy array on the CPU provider, to check the mechanism anywhere), each handed to onnxruntime as an
OrtValue viewing its slice (a DLPack capsule, OrtValue.from_dlpack) through SessionOptions.add_initializer, which
onnxruntime uses in place of loading the weight itself when the value sits where its plan puts the weight.

Open question for a GPU (why this is a knob, not the default): onnxruntime never releases a shared weight, so a
kernel that pre-packs its weight into a copy (CUDA's NHWC convolutions may) would hold both.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

BIG = 1 << 20                      # allocations up to 1 MB share the driver's pages already
ALIGN = 256


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


_KEEP = _DELETER(lambda _: None)   # the block owns the memory: onnxruntime's release of a view frees nothing
_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype = ctypes.py_object
_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_FLOATS = {1: np.dtype(np.float32), 10: np.dtype(np.float16)}          # ONNX TensorProto data types
_DL_FLOAT = 2
_DL_CPU, _DL_CUDA = 1, 2


def _cudart():
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no CUDA runtime library (libcudart) found")


class Block:
    """The weights of one graph in one allocation, and the OrtValues viewing it. Keep it alive as long as the
    session; close() after the session is gone."""

    def __init__(self, path: Path, device: str):
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path), load_external_data=False)
        weights = []
        for t in model.graph.initializer:
            dtype = _FLOATS.get(t.data_type)
            n = int(np.prod(t.dims)) * dtype.itemsize if dtype is not None else 0
            if n > BIG:
                weights.append((t.name, dtype, list(t.dims), _data(t, Path(path).parent, dtype)))
        offsets, total = [], 0
        for *_, a in weights:
            offsets.append(total)
            total += -(-a.nbytes // ALIGN) * ALIGN
        self.device, self.nbytes, self._views, self.values = device, total, [], {}
        if device == "cuda":
            self._rt = _cudart()
            ptr = ctypes.c_void_p()
            if self._rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(total)) != 0:
                raise MemoryError(f"cudaMalloc of {total} bytes failed")
            self._base = ptr.value
        else:
            self._host = np.empty(total, np.uint8)
            self._base = self._host.ctypes.data
        for (name, dtype, dims, a), off in zip(weights, offsets):
            a = np.ascontiguousarray(a)
            if device == "cuda":
                if self._rt.cudaMemcpy(ctypes.c_void_p(self._base + off), ctypes.c_void_p(a.ctypes.data),
                                       ctypes.c_size_t(a.nbytes), 1) != 0:             # cudaMemcpyHostToDevice
                    raise RuntimeError(f"cudaMemcpy of {name} failed")
            else:
                self._host[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
            self.values[name] = ort.OrtValue.from_dlpack(self._view(self._base + off, dims, dtype))

    def _view(self, ptr: int, dims: list[int], dtype: np.dtype):
        shape = (ctypes.c_int64 * len(dims))(*dims)
        m = _DLManagedTensor()
        m.dl_tensor = _DLTensor(ctypes.c_void_p(ptr), _DLDevice(_DL_CUDA if self.device == "cuda" else _DL_CPU, 0),
                                len(dims), _DLDataType(_DL_FLOAT, dtype.itemsize * 8, 1), shape, None, 0)
        m.deleter = _KEEP
        self._views += [shape, m]
        return _capsule(ctypes.addressof(m), b"dltensor", None)

    def supply(self, opts) -> None:
        for name, value in self.values.items():
            opts.add_initializer(name, value)

    def close(self) -> None:
        self.values.clear()
        self._views.clear()
        if self.device == "cuda" and self._base:
            self._rt.cudaFree(ctypes.c_void_p(self._base))
        self._base = 0


def _data(t, folder: Path, dtype: np.dtype) -> np.ndarray:
    if t.data_location == 1:                                                           # EXTERNAL
        info = {e.key: e.value for e in t.external_data}
        n = int(np.prod(t.dims))
        return np.fromfile(folder / info["location"], dtype, n, offset=int(info.get("offset", 0))).reshape(t.dims)
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


OPEN: dict[int, Block] = {}        # id(SessionOptions) -> its block: a session opened again reuses it


def patch_onnxruntime() -> None:
    """Every session opened from a file gets its large float weights from one Block (compare.py's knob)."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def inference_session(path, sess_options=None, providers=None, **kw):
        if isinstance(path, str) and sess_options is not None and id(sess_options) not in OPEN:
            ep = providers[0] if isinstance(providers[0], str) else providers[0][0]
            block = OPEN[id(sess_options)] = Block(Path(path), "cuda" if ep == "CUDAExecutionProvider" else "cpu")
            block.supply(sess_options)
        return real(path, sess_options, providers=providers, **kw)
    ort.InferenceSession = inference_session


def close_all() -> None:
    """After the sessions are gone (gc.collect() first): free the blocks."""
    for block in OPEN.values():
        block.close()
    OPEN.clear()
