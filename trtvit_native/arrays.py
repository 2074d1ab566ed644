"""The arrays the engine runner and the kernel launchers accept, and the CUDA memory and
streams behind them, on cuda-python and numpy: no torch.

Accepted array kinds, and what comes back for each:

==============================================  ==========================================
given                                           used as                        returned as
==============================================  ==========================================
``numpy.ndarray``                               host memory: copied to the GPU  numpy
``torch.Tensor`` on the CPU                     host memory (its numpy view)    torch, CPU
``torch.Tensor`` on a GPU                       device memory, in place         torch, same GPU
``cupy.ndarray``                                device memory, in place         CuPy, same GPU
``__cuda_array_interface__`` (numba, ...)       device memory, in place         :class:`DeviceArray`
``__dlpack__`` + ``__dlpack_device__``          CUDA: in place; CPU: as numpy   DeviceArray / numpy
==============================================  ==========================================

Device memory is never converted or copied: it must already have the dtype asked for and
be C-contiguous, and a wrong one is an :class:`ArrayError` naming the array, its dtype or
strides and what was expected. Work on device memory is ordered after the stream that
produced it: torch's current stream for a torch tensor, the ``stream`` entry of a version-3
``__cuda_array_interface__`` (CuPy exports its current stream there), and for DLPack the
producer synchronizes with the consumer's stream itself (``__dlpack__(stream=...)``).

Streams are given as ints (a ``cudaStream_t`` value; 0 is the legacy default stream), a
cuda-python ``CUstream``/``cudaStream_t``, a torch stream (``.cuda_stream``), a CuPy stream
(``.ptr``) or any object with ``__cuda_stream__``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ArrayError", "CudaError", "CudaUnavailable", "ArrayView", "DeviceArray", "PinnedBuffer", "cudart",
           "cuda_call", "no_device_reason", "device_name", "device_scope", "view_array", "stream_handle",
           "create_stream", "destroy_stream", "synchronize", "wait_for", "pointer_device", "empty_device",
           "parse_dlpack_capsule", "DLPACK_CPU", "DLPACK_CUDA", "DLPACK_CUDA_MANAGED"]

# DLPack device types (dlpack.h: DLDeviceType).
DLPACK_CPU, DLPACK_CUDA, DLPACK_CUDA_MANAGED = 1, 2, 13
_DLPACK_TYPE_CODES = {0: "i", 1: "u", 2: "f"}  # kDLInt, kDLUInt, kDLFloat (4: bfloat, not numpy)


class ArrayError(ValueError):
    """An array of a kind, dtype, shape, layout or place that the call cannot take."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed; carries the function and CUDA's error name and text."""

    def __init__(self, function: str, name: str, text: str):
        super().__init__(f"{function} failed: {name} ({text})")
        self.function, self.name, self.text = function, name, text


class CudaUnavailable(RuntimeError):
    """cuda-python is not installed."""


_RUNTIME: Any = None


def cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart``
    of cuda-python before 12.6)."""
    global _RUNTIME
    if _RUNTIME is None:
        try:
            from cuda.bindings import runtime
        except ImportError:
            try:
                from cuda import cudart as runtime  # type: ignore[no-redef]
            except ImportError:
                raise CudaUnavailable("this needs cuda-python for CUDA memory and streams, and it is not installed: "
                                      "pip install 'trtvit_native[runtime]' (cuda-python and numpy, no torch)") from None
        _RUNTIME = runtime
    return _RUNTIME


def _error_words(rt: Any, err: Any) -> Tuple[str, str]:
    name, text = rt.cudaGetErrorName(err)[1], rt.cudaGetErrorString(err)[1]
    return (name.decode() if isinstance(name, bytes) else str(name)), (text.decode() if isinstance(text, bytes)
                                                                        else str(text))


def cuda_call(function: str, *args: Any) -> Any:
    """``cudart().function(*args)``; raises :class:`CudaError` on an error code, returns the
    value (or tuple of values) after it, None when there is none."""
    rt = cudart()
    result = getattr(rt, function)(*args)
    err = result[0] if isinstance(result, tuple) else result
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(function, *_error_words(rt, err))
    if not isinstance(result, tuple) or len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def no_device_reason() -> Optional[str]:
    """None when CUDA sees a GPU, else why not, in CUDA's words (no driver, no device, ...)."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        name, text = _error_words(rt, err)
        return f"cudaGetDeviceCount reports {name}: {text}"
    if count == 0:
        return "cudaGetDeviceCount reports 0 devices"
    return None


def device_name(device: int) -> str:
    props = cuda_call("cudaGetDeviceProperties", int(device))
    name = props.name
    return (name.split(b"\0", 1)[0].decode() if isinstance(name, (bytes, bytearray)) else str(name)) + f" (cuda:{device})"


@contextlib.contextmanager
def device_scope(device: int) -> Iterator[None]:
    """Make ``device`` current on this thread, and restore the previous one afterwards."""
    previous = cuda_call("cudaGetDevice")
    if previous != device:
        cuda_call("cudaSetDevice", int(device))
    try:
        yield
    finally:
        if previous != device:
            cuda_call("cudaSetDevice", int(previous))


# --------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------


def stream_handle(stream: Any) -> int:
    """The ``cudaStream_t`` value of ``stream`` (see the module docstring for the kinds)."""
    if isinstance(stream, bool):
        raise ArrayError(f"stream must be a CUDA stream or a stream handle, got {stream!r}")
    if isinstance(stream, int):
        if stream < 0:
            raise ArrayError(f"stream handle must be a non-negative int, got {stream}")
        return stream
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return int(stream.cuda_stream)
    if type(stream).__module__.split(".")[0] == "cupy" and hasattr(stream, "ptr"):
        return int(stream.ptr)
    if hasattr(stream, "getPtr"):  # cuda-python CUstream / cudaStream_t
        return int(stream)
    raise ArrayError(f"stream must be an int handle, a cuda-python, CuPy or torch stream, or an object with "
                     f"__cuda_stream__; got {type(stream).__name__}")


def create_stream() -> int:
    """A new non-blocking stream (it does not wait for the legacy default stream)."""
    rt = cudart()
    return int(cuda_call("cudaStreamCreateWithFlags", rt.cudaStreamNonBlocking))


def destroy_stream(stream: int) -> None:
    cuda_call("cudaStreamDestroy", stream)


def synchronize(stream: int) -> None:
    cuda_call("cudaStreamSynchronize", stream)


def wait_for(producer: Optional[int], consumer: int) -> None:
    """Order ``consumer`` after the work queued so far on ``producer`` (an event between them);
    nothing when ``producer`` is None or the same stream."""
    if producer is None or producer == consumer:
        return
    rt = cudart()
    event = cuda_call("cudaEventCreateWithFlags", rt.cudaEventDisableTiming)
    try:
        cuda_call("cudaEventRecord", event, producer)
        cuda_call("cudaStreamWaitEvent", consumer, event, 0)
    finally:
        cuda_call("cudaEventDestroy", event)


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


class DeviceArray:
    """Device memory from ``cudaMalloc`` with a shape and dtype, freed with the object.

    It exposes ``__cuda_array_interface__`` (version 3), so CuPy, numba and torch take it
    without a copy (``cupy.asarray(a)``, ``torch.as_tensor(a, device="cuda")``).
    """

    def __init__(self, shape: Sequence[int], dtype: Any, device: Optional[int] = None):
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self.device = int(cuda_call("cudaGetDevice")) if device is None else int(device)
        self.ptr = 0
        with device_scope(self.device):
            self.ptr = int(cuda_call("cudaMalloc", max(self.nbytes, 1)))

    @classmethod
    def from_host(cls, array: np.ndarray, device: Optional[int] = None, stream: int = 0) -> "DeviceArray":
        """A device copy of ``array`` (complete when this returns)."""
        host = np.ascontiguousarray(array)
        out = cls(host.shape, host.dtype, device)
        rt = cudart()
        cuda_call("cudaMemcpyAsync", out.ptr, host.ctypes.data, host.nbytes,
                  rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
        synchronize(stream)
        return out

    def copy_to_host(self, stream: int = 0) -> np.ndarray:
        """A numpy copy (complete when this returns, after the work queued on ``stream``)."""
        host = np.empty(self.shape, self.dtype)
        rt = cudart()
        cuda_call("cudaMemcpyAsync", host.ctypes.data, self.ptr, self.nbytes,
                  rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)
        synchronize(stream)
        return host

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name}, device=cuda:{self.device})"

    def __del__(self) -> None:
        if self.ptr:
            try:
                cudart().cudaFree(self.ptr)
            except Exception:  # interpreter shutdown: the process's memory goes with it
                pass
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory (``cudaMallocHost``): host-device copies from it are
    asynchronous and run at full bus speed."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(cuda_call("cudaMallocHost", max(self.nbytes, 1)))

    def view(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A numpy array over the start of the buffer."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if count * dtype.itemsize > self.nbytes:
            raise ArrayError(f"{count * dtype.itemsize} bytes do not fit a pinned buffer of {self.nbytes}")
        raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(shape))

    def __del__(self) -> None:
        if self.ptr:
            try:
                cudart().cudaFreeHost(self.ptr)
            except Exception:
                pass
            self.ptr = 0


def pointer_device(ptr: int, name: str) -> int:
    """The device that owns ``ptr``; :class:`ArrayError` when it is host memory."""
    rt = cudart()
    attrs = cuda_call("cudaPointerGetAttributes", int(ptr))
    kind = attrs.type
    if kind not in (rt.cudaMemoryType.cudaMemoryTypeDevice, rt.cudaMemoryType.cudaMemoryTypeManaged):
        raise ArrayError(f"{name} points to host memory ({getattr(kind, 'name', kind)}) where device memory is "
                         f"needed: pass a numpy array to have it copied, or an array in GPU memory")
    return int(attrs.device)


def empty_device(kind: str, shape: Sequence[int], dtype: np.dtype, device: int) -> Tuple[Any, int]:
    """A new device array of the library ``kind`` ("torch", "cupy", else :class:`DeviceArray`)
    and its pointer."""
    shape = tuple(int(v) for v in shape)
    if kind == "torch":
        torch = sys.modules["torch"]
        t = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device=f"cuda:{device}")
        return t, int(t.data_ptr())
    if kind == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(device):
            a = cupy.empty(shape, dtype=dtype)
        return a, int(a.data.ptr)
    a = DeviceArray(shape, dtype, device)
    return a, a.ptr


def host_result(kind: str, array: np.ndarray) -> Any:
    """``array`` as the host kind it answers: numpy, or a CPU torch tensor sharing its memory."""
    return sys.modules["torch"].from_numpy(array) if kind == "torch" else array


# --------------------------------------------------------------------------------------
# Views of the accepted kinds
# --------------------------------------------------------------------------------------


@dataclass
class ArrayView:
    """What a call needs to know of one array argument.

    ``kind``: "numpy", "torch", "cupy" or "cuda" (any other device array), which decides
    the kind of the results. Host arrays carry ``host`` (a numpy array); device arrays
    ``ptr``, ``device`` (None until looked up, for a bare ``__cuda_array_interface__``) and
    ``stream``, the producer stream to wait for (None: nothing to wait for).
    """

    name: str
    kind: str
    on_device: bool
    shape: Tuple[int, ...]
    dtype: np.dtype
    contiguous: bool = True
    ptr: int = 0
    device: Optional[int] = None
    stream: Optional[int] = None
    host: Optional[np.ndarray] = None
    keep: Any = None  # what keeps the memory alive (the object, a DLPack capsule)

    def describe(self) -> str:
        where = "host memory" if not self.on_device else (
            "device memory" if self.device is None else f"device memory on cuda:{self.device}")
        return f"{self.dtype.name} {self.shape} in {where}"


def _c_contiguous(shape: Tuple[int, ...], strides: Optional[Sequence[int]], itemsize: int) -> bool:
    if strides is None:
        return True
    expected = itemsize
    for size, stride in zip(reversed(shape), reversed(tuple(strides))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _host_view(name: str, kind: str, array: np.ndarray, keep: Any) -> ArrayView:
    return ArrayView(name, kind, False, tuple(array.shape), array.dtype, host=array, keep=keep)


def _torch_dtype_to_numpy(name: str, dtype: Any) -> np.dtype:
    text = str(dtype).replace("torch.", "")
    try:
        return np.dtype(text)
    except TypeError:
        raise ArrayError(f"{name} has dtype {text}, which has no numpy equivalent (float32 and float16 are "
                         f"what this takes)") from None


def _cai_view(name: str, kind: str, obj: Any) -> ArrayView:
    cai = obj.__cuda_array_interface__
    try:
        shape = tuple(int(v) for v in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        ptr = int(cai["data"][0] or 0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ArrayError(f"{name}: its __cuda_array_interface__ is malformed ({type(e).__name__}: {e})") from None
    stream = cai.get("stream") if int(cai.get("version", 0)) >= 3 else None
    device = None
    if kind == "cupy":
        device = int(obj.device.id)
    return ArrayView(name, kind, True, shape, dtype, _c_contiguous(shape, cai.get("strides"), dtype.itemsize), ptr,
                     device, None if stream is None else int(stream), keep=obj)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype, _capsule_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]


def parse_dlpack_capsule(capsule: Any, name: str = "array") -> Dict[str, Any]:
    """Read a DLPack ``"dltensor"`` capsule (the unversioned ``DLManagedTensor``, whose
    ``DLTensor`` comes first): data pointer (with its byte offset), device type and id,
    shape, dtype and whether it is C-contiguous.

    The capsule keeps its name, so its own destructor frees the tensor when the capsule
    goes: keep the capsule alive while the pointer is in use.
    """
    if not _capsule_valid(capsule, b"dltensor"):
        raise ArrayError(f"{name}: __dlpack__() did not return an unused 'dltensor' capsule")
    t = _DLTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    code, bits, lanes = t.dtype.code, t.dtype.bits, t.dtype.lanes
    if code not in _DLPACK_TYPE_CODES or lanes != 1 or bits % 8:
        raise ArrayError(f"{name}: DLPack dtype (code {code}, {bits} bits, {lanes} lanes) is not supported "
                         f"(float32 and float16 are)")
    dtype = np.dtype(f"{_DLPACK_TYPE_CODES[code]}{bits // 8}")
    strides = None if not t.strides else tuple(int(t.strides[i]) * dtype.itemsize for i in range(t.ndim))
    return {"ptr": int(t.data or 0) + int(t.byte_offset), "device_type": int(t.device.device_type),
            "device_id": int(t.device.device_id), "shape": shape, "dtype": dtype,
            "contiguous": _c_contiguous(shape, strides, dtype.itemsize)}


def view_array(x: Any, name: str, consumer_stream: Optional[int] = None) -> ArrayView:
    """An :class:`ArrayView` of ``x``, of any accepted kind; :class:`ArrayError` naming
    ``name`` and the type for anything else. Makes no CUDA call, except that a DLPack
    producer is asked to order its work before ``consumer_stream``."""
    module = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return _host_view(name, "numpy", x, x)
    if module == "torch" and hasattr(x, "is_cuda"):
        if not x.is_cuda:
            if str(x.dtype) == "torch.bfloat16":
                _torch_dtype_to_numpy(name, x.dtype)
            return _host_view(name, "torch", x.detach().numpy(), x)
        dtype = _torch_dtype_to_numpy(name, x.dtype)
        stream = int(sys.modules["torch"].cuda.current_stream(x.device).cuda_stream)
        return ArrayView(name, "torch", True, tuple(x.shape), dtype, bool(x.is_contiguous()), int(x.data_ptr()),
                         int(x.device.index), stream, keep=x)
    if hasattr(x, "__cuda_array_interface__"):
        return _cai_view(name, "cupy" if module == "cupy" else "cuda", x)
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        device_type, device_id = (int(v) for v in x.__dlpack_device__())
        if device_type == DLPACK_CPU:
            return _host_view(name, "numpy", np.from_dlpack(x), x)
        if device_type not in (DLPACK_CUDA, DLPACK_CUDA_MANAGED):
            raise ArrayError(f"{name} is on DLPack device type {device_type}; CPU ({DLPACK_CPU}) and CUDA "
                             f"({DLPACK_CUDA}, {DLPACK_CUDA_MANAGED}) arrays are accepted")
        # DLPack's stream argument: 1 is the legacy default stream (0 is not allowed).
        capsule = x.__dlpack__(stream=1 if not consumer_stream else consumer_stream)
        info = parse_dlpack_capsule(capsule, name)
        return ArrayView(name, "cuda", True, info["shape"], info["dtype"], info["contiguous"], info["ptr"],
                         info["device_id"], None, keep=(x, capsule))
    raise ArrayError(f"{name} must be a numpy array, a CuPy array, a torch tensor, or an object with "
                     f"__cuda_array_interface__ or __dlpack__; got {type(x).__module__}.{type(x).__name__}")
