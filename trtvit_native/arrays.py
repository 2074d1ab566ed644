"""The arrays the engine runner and the kernel launchers accept, and the CUDA devices,
streams, events and memory behind them, on ``cuda.core`` and numpy: no torch.

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

Arrays are read by ``cuda.core``'s :class:`~cuda.core.utils.StridedMemoryView`: DLPack
(versioned capsules, with their read-only flag, tried first; torch tensors go this way)
and the CUDA array interface version 3 (with its ``stream``, read-only flag and refused
``mask``). A view is made for the stream the work will run on, and that is what orders
the work after the array's producer: a DLPack producer is asked to order its work before
that stream, and the array interface's ``stream`` is waited on with an event.

Device memory is never converted or copied: it must already have the dtype asked for and
be C-contiguous, and a wrong one is an :class:`ArrayError` naming the array, its dtype or
strides and what was expected.

Streams are given as ints (a ``cudaStream_t`` value; 0 and 1 both mean the legacy default
stream, which is passed to CUDA as 1 so that per-thread default stream builds do not read
it otherwise), a ``cuda.core`` :class:`~cuda.core.Stream`, a cuda-python
``CUstream``/``cudaStream_t``, a torch stream (``.cuda_stream``), a CuPy stream (``.ptr``)
or any object with ``__cuda_stream__``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ArrayError", "CudaError", "CudaUnavailable", "cuda_errors", "ArrayView", "DeviceArray", "PinnedBuffer", "core",
           "no_device_reason", "driver_mismatch", "device_name", "device_count", "device_scope",
           "view_array", "stream_handle", "as_stream", "create_stream", "destroy_stream", "synchronize",
           "empty_device", "copy_async", "record_torch_stream", "consumer_stream", "LEGACY_STREAM"]

# cudaStreamLegacy: the legacy default stream, whatever the default-stream mode.
LEGACY_STREAM = 1
_DLPACK_CPU = 1  # kDLCPU
# The NVIDIA driver a cuda-bindings major needs at least (CUDA version, driver branch).
_DRIVER_NEEDED = {12: (12000, "525"), 13: (13000, "580")}


class ArrayError(ValueError):
    """An array of a kind, dtype, shape, layout or place that the call cannot take."""


class CudaError(RuntimeError):
    """A CUDA call made through ``cuda.core`` failed (its ``CUDAError``, with the driver's words)."""


def _is_cuda_error(e: BaseException) -> bool:
    """Whether ``e`` is cuda.core's ``CUDAError`` (an ``Exception``, not a ``RuntimeError``),
    or a RuntimeError cuda.core raised itself ("Failed to create CUDA event", ...)."""
    if any(cls.__name__ == "CUDAError" for cls in type(e).__mro__):
        return True
    if type(e) is not RuntimeError:
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename.replace("\\", "/") if tb is not None else ""
    return "cuda/core/" in where


@contextlib.contextmanager
def cuda_errors() -> Iterator[None]:
    """``cuda.core``'s CUDAError raised inside as :class:`CudaError`, which callers catch."""
    try:
        yield
    except CudaError:
        raise
    except Exception as e:
        if not _is_cuda_error(e):
            raise
        raise CudaError(str(e)) from None


def _translating(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cuda_errors():
            return fn(*args, **kwargs)
    return wrapper


class CudaUnavailable(RuntimeError):
    """cuda.core (cuda-python) is not installed, or does not fit the installed driver."""


_CORE: Any = None


def core() -> Any:
    """The ``cuda.core`` module (cuda-python >= 13 installs it)."""
    global _CORE
    if _CORE is None:
        try:
            import cuda.core
            import cuda.core.utils  # noqa: F401 - StridedMemoryView
        except ImportError as e:
            raise CudaUnavailable(f"this needs cuda.core for CUDA memory and streams, and it cannot be imported "
                                  f"({e}): pip install 'trtvit_native[runtime-cu13]' (CUDA 13 driver, >= 580) or "
                                  f"'trtvit_native[runtime-cu12]' (CUDA 12 driver), no torch needed") from None
        _CORE = cuda.core
    return _CORE


def driver_mismatch(driver_version: int, bindings_version: str) -> Optional[str]:
    """Why the installed cuda-bindings cannot run on a driver of ``driver_version``
    (``cuDriverGetVersion``: 1000 * major + 10 * minor), or None when it can."""
    major = int(str(bindings_version).split(".")[0])
    needed, branch = _DRIVER_NEEDED.get(major, (major * 1000, "a newer"))
    if driver_version >= needed:
        return None
    have = f"{driver_version // 1000}.{driver_version % 1000 // 10}"
    fit = f"runtime-cu{driver_version // 1000}"
    return (f"the NVIDIA driver supports CUDA {have}, and the installed cuda-bindings {bindings_version} needs a CUDA "
            f"{major} driver ({branch} or newer): update the driver, or pip install 'trtvit_native[{fit}]'")


def _driver_version() -> int:
    from cuda.bindings import driver

    err, version = driver.cuDriverGetVersion()
    if int(err) != 0:
        raise CudaError(f"cuDriverGetVersion failed: {err}")
    return int(version)


def no_device_reason() -> Optional[str]:
    """None when CUDA sees a GPU, else why not: no driver, a driver too old for the
    installed cuda-bindings (naming the extra that fits it), or no device visible."""
    cc = core()
    try:
        version = _driver_version()
    except CudaError as e:
        return str(e)
    except Exception as e:  # cuda.pathfinder: libcuda.so not found
        return f"no NVIDIA driver found ({type(e).__name__}: {e})"
    import cuda.bindings

    mismatch = driver_mismatch(version, getattr(cuda.bindings, "__version__", "13"))
    if mismatch is not None:
        return mismatch
    try:
        count = device_count(cc)
    except CudaError as e:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f"; CUDA_VISIBLE_DEVICES is {visible!r}" if visible is not None else ""
        return f"the driver gives no device ({e}{hint})"
    return None if count else "the driver reports 0 devices"


@_translating
def device_count(cc: Any = None) -> int:
    return len((cc or core()).Device.get_all_devices())


def device(ordinal: Optional[int] = None) -> Any:
    """The ``cuda.core`` Device ``ordinal`` (None: the current context's, else device 0); an
    ordinal CUDA does not have is a :class:`CudaError` naming the devices it has."""
    cc = core()
    if ordinal is None:
        return cc.Device()
    count = device_count(cc)
    if not isinstance(ordinal, int) or isinstance(ordinal, bool) or not 0 <= ordinal < count:
        raise CudaError(f"CUDA_ERROR_INVALID_DEVICE: device {ordinal!r} does not exist: CUDA sees {count} device(s)"
                        + (f", cuda:0..cuda:{count - 1}" if count else ""))
    return cc.Device(ordinal)


@_translating
def device_name(ordinal: int) -> str:
    return f"{device(ordinal).name} (cuda:{ordinal})"


def _current_context() -> Any:
    """The calling thread's current CUDA context (a CUcontext; 0 when it has none)."""
    from cuda.bindings import driver

    (err,) = driver.cuInit(0)  # once initialized, a no-op; the driver answers nothing before it
    if int(err) != 0:
        raise CudaError(f"cuInit failed: {err}")
    err, ctx = driver.cuCtxGetCurrent()
    if int(err) != 0:
        raise CudaError(f"cuCtxGetCurrent failed: {err}")
    return ctx


def _set_context(ctx: Any) -> None:
    from cuda.bindings import driver

    (err,) = driver.cuCtxSetCurrent(ctx)
    if int(err) != 0:
        raise CudaError(f"cuCtxSetCurrent failed: {err}")


def foreign_stream_context(handle: int, ordinal: int) -> Optional[str]:
    """Why a stream cannot carry work of device ``ordinal``'s primary context (where the
    runner's engine and memory live): it belongs to another device, or to a context made
    with ``cuCtxCreate`` (pycuda.autoinit's, for one); None when it can. The legacy stream
    is always the current context's."""
    if handle == LEGACY_STREAM:
        return None
    from cuda.bindings import driver

    stream = driver.CUstream(handle)
    err, ctx = driver.cuStreamGetCtx(stream)
    if int(err) != 0:
        raise CudaError(f"cuStreamGetCtx of stream {handle:#x} failed: {err}")
    err, dev = driver.cuStreamGetDevice(stream)
    if int(err) != 0:
        raise CudaError(f"cuStreamGetDevice of stream {handle:#x} failed: {err}")
    if int(dev) != ordinal:
        return f"stream {handle:#x} is a stream of cuda:{int(dev)}, and this work runs on cuda:{ordinal}"
    err, primary = driver.cuDevicePrimaryCtxRetain(driver.CUdevice(ordinal))
    if int(err) != 0:
        raise CudaError(f"cuDevicePrimaryCtxRetain({ordinal}) failed: {err}")
    driver.cuDevicePrimaryCtxRelease(driver.CUdevice(ordinal))
    if int(ctx) != int(primary):
        return (f"stream {handle:#x} belongs to a CUDA context other than cuda:{ordinal}'s primary context (one "
                f"made with cuCtxCreate, as pycuda.autoinit makes); the engine and its memory live in the primary "
                f"context, which torch, CuPy and the CUDA runtime use: make the stream there (with pycuda, "
                f"cuda.Device({ordinal}).retain_primary_context().push() instead of pycuda.autoinit)")
    return None


@contextlib.contextmanager
def device_scope(ordinal: Optional[int]) -> Iterator[Any]:
    """Make device ``ordinal`` (None: the current one) current on this thread, initialized as
    cuda.core needs it for streams, events and memory (yields its Device), and the thread's
    previous context current again afterwards: none, when it had none (a thread that never
    used device 0 is not given a context on it)."""
    with cuda_errors():
        previous = _current_context()
        dev = device(ordinal)
        dev.set_current()
    try:
        yield dev
    finally:
        with cuda_errors():
            if int(_current_context()) != int(previous):
                _set_context(previous)


# --------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------


def stream_handle(s: Any) -> int:
    """The ``cudaStream_t`` value of ``s`` (see the module docstring for the kinds); the
    legacy default stream is always :data:`LEGACY_STREAM`."""
    if isinstance(s, bool):
        raise ArrayError(f"stream must be a CUDA stream or a stream handle, got {s!r}")
    if isinstance(s, int):
        if s < 0:
            raise ArrayError(f"stream handle must be a non-negative int, got {s}")
        handle = s
    elif hasattr(s, "__cuda_stream__"):
        handle = int(s.__cuda_stream__()[1])
    elif hasattr(s, "cuda_stream"):  # torch.cuda.Stream
        handle = int(s.cuda_stream)
    elif type(s).__module__.split(".")[0] == "cupy" and hasattr(s, "ptr"):
        handle = int(s.ptr)
    elif hasattr(s, "getPtr"):  # cuda-python CUstream / cudaStream_t
        handle = int(s)
    else:
        raise ArrayError(f"stream must be an int handle, a cuda.core, cuda-python, CuPy or torch stream, or an "
                         f"object with __cuda_stream__; got {type(s).__name__}")
    return LEGACY_STREAM if handle == 0 else handle


def as_stream(s: Any) -> Any:
    """A ``cuda.core`` Stream for any accepted stream kind (the stream stays the caller's)."""
    cc = core()
    if isinstance(s, cc.Stream):
        return s
    handle = stream_handle(s)
    return cc.LEGACY_DEFAULT_STREAM if handle == LEGACY_STREAM else cc.Stream.from_handle(handle)


@_translating
def create_stream(ordinal: Optional[int] = None) -> Any:
    """A new non-blocking ``cuda.core`` Stream on device ``ordinal`` (None: the current one)."""
    with device_scope(ordinal) as dev:
        return dev.create_stream()


@_translating
def destroy_stream(s: Any) -> None:
    s.close()


@_translating
def synchronize(s: Any) -> None:
    as_stream(s).sync()


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


class DeviceArray:
    """Device memory from the device's stream-ordered pool (``cuda.core`` Buffer), with a
    shape and dtype.

    It exposes ``__cuda_array_interface__`` (version 3), so CuPy, numba and torch take it
    without a copy (``cupy.asarray(a)``, ``torch.as_tensor(a, device="cuda")``). Its
    ``stream`` is the stream its pending work is queued on (its allocation, or the writes of
    the call that returned it), exported as the interface's ``stream`` so that a consumer
    orders itself after that work; None once the work is complete.

    Lifetime: the memory goes back to the pool when the object is collected, in order after
    the work on ``stream`` and on every stream given to :meth:`record_stream`. A consumer
    that queues reads of the array on a stream of its own and may drop its last reference
    before they run must call ``a.record_stream(its_stream)`` first, as with torch's
    ``Tensor.record_stream``; the runner and the kernel launchers do it for the arrays they
    read.
    """

    @_translating
    def __init__(self, shape: Sequence[int], dtype: Any, device: Optional[int] = None, stream: Any = None):
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self._consumers: Dict[int, Any] = {}  # stream handle -> cuda.core Stream: reads queued there
        with device_scope(device) as dev:
            self.device = int(dev.device_id)
            self._stream = as_stream(LEGACY_STREAM if stream is None else stream)
            self.buffer = dev.allocate(max(self.nbytes, 1), stream=self._stream)
        self.ptr = int(self.buffer.handle)
        # The allocation is ordered on its stream only: a consumer elsewhere waits for it.
        self.stream: Optional[int] = stream_handle(self._stream)

    @classmethod
    @_translating
    def from_host(cls, array: np.ndarray, device: Optional[int] = None, stream: Any = None) -> "DeviceArray":
        """A device copy of ``array`` (complete when this returns)."""
        host = np.ascontiguousarray(array)
        with device_scope(device) as dev:
            out = cls(host.shape, host.dtype, int(dev.device_id), stream)
            copy_async(out.ptr, host.ctypes.data, host.nbytes, out._stream, keep=host)
            out._stream.sync()
        out.written_on(None)
        return out

    def written_on(self, s: Any) -> None:
        """Note that writes to the array are queued on ``s`` (None: they are complete)."""
        self.stream = None if s is None else stream_handle(s)
        # Freed in order after the last writes; once they are complete, on the legacy stream
        # (the writer's stream may be gone by then).
        self._stream = as_stream(LEGACY_STREAM if s is None else s)

    def record_stream(self, s: Any) -> None:
        """Note that work queued on ``s`` uses the array: its memory is not returned to the
        pool before that work is complete (torch's ``Tensor.record_stream``)."""
        handle = stream_handle(s)
        if handle != stream_handle(self._stream):
            self._consumers[handle] = as_stream(s)

    @_translating
    def copy_to_host(self, s: Any = None) -> np.ndarray:
        """A numpy copy, complete when this returns; queued on ``s`` (default: the stream of
        the pending work, else the legacy stream)."""
        with device_scope(self.device):
            run = as_stream(s if s is not None else (self.stream or LEGACY_STREAM))
            if s is not None and self.stream is not None and stream_handle(s) != self.stream:
                run.wait(as_stream(self.stream))
            host = np.empty(self.shape, self.dtype)
            copy_async(host.ctypes.data, self.ptr, self.nbytes, run, keep=host)
            run.sync()
        return host

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": self.stream}

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name}, device=cuda:{self.device})"

    def free(self) -> None:
        """Return the memory to the pool now, in order after the work that uses it (also done
        when the object is collected).

        With nothing but its own stream's work to wait for, the free is queued on that
        stream. Once the work is complete, or when other streams' reads must be waited for,
        it is queued on a stream of the device kept for frees, after events on each of
        those streams: the writer's stream (the runner's next calls) never waits for a
        consumer, and no free lands on the legacy stream, which would stall every blocking
        stream of the device."""
        buffer = getattr(self, "buffer", None)
        if buffer is None:
            return
        self.buffer = None
        waits = list(self._consumers.values())
        self._consumers = {}
        try:
            with device_scope(self.device):
                if not waits and self.stream is not None:
                    buffer.close(self._stream)
                    return
                free_on = _free_stream(self.device)
                for s in ([self._stream] if self.stream is not None else []) + waits:
                    free_on.wait(s)
                buffer.close(free_on)
        except Exception:  # a stream gone since, a consumer on another device, interpreter shutdown
            try:
                for s in [self._stream] + waits:
                    try:
                        s.sync()
                    except Exception:
                        pass
                with device_scope(self.device):
                    buffer.close(_free_stream(self.device))
            except Exception:
                pass

    __del__ = free


_FREE_STREAMS: Dict[int, Any] = {}


def _free_stream(ordinal: int) -> Any:
    """The non-blocking stream of device ``ordinal`` that DeviceArray frees are queued on
    (made once, in a device scope)."""
    if ordinal not in _FREE_STREAMS:
        _FREE_STREAMS[ordinal] = core().Device(ordinal).create_stream()
    return _FREE_STREAMS[ordinal]


def copy_async(dst: int, src: int, nbytes: int, s: Any, keep: Any = None) -> None:
    """Queue a copy of ``nbytes`` from ``src`` to ``dst`` (device or host pointers) on ``s``."""
    if nbytes:
        cc = core()
        cc.Buffer.from_handle(dst, nbytes, owner=keep).copy_from(cc.Buffer.from_handle(src, nbytes, owner=keep),
                                                                 stream=s)


class PinnedBuffer:
    """Page-locked host memory (``cuda.core`` pinned memory resource): host-device copies
    from it are asynchronous and run at full bus speed."""

    @_translating
    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.buffer = core().LegacyPinnedMemoryResource().allocate(max(self.nbytes, 1), stream=as_stream(LEGACY_STREAM))
        self.ptr = int(self.buffer.handle)

    def view(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A numpy array over the start of the buffer."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if count * dtype.itemsize > self.nbytes:
            raise ArrayError(f"{count * dtype.itemsize} bytes do not fit a pinned buffer of {self.nbytes}")
        raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(shape))

    def close(self, stream: Any = None) -> None:
        """Free the memory (``stream``: the stream whose work on it must be complete first;
        the caller's device must be current)."""
        if getattr(self, "buffer", None) is not None:
            try:
                self.buffer.close(None if stream is None else as_stream(stream))
            except Exception:  # interpreter shutdown
                pass
            self.buffer = None

    def __del__(self) -> None:
        self.close()


def empty_device(kind: str, shape: Sequence[int], dtype: np.dtype, ordinal: int, s: int) -> Tuple[Any, int]:
    """A new device array of the library ``kind`` ("torch", "cupy", else :class:`DeviceArray`)
    for writes queued on stream ``s``, and its pointer. torch's allocator is told of the
    stream (``record_stream``) where it is not torch's current stream."""
    shape = tuple(int(v) for v in shape)
    if kind == "torch":
        torch = sys.modules["torch"]
        t = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device=f"cuda:{ordinal}")
        record_torch_stream(t, s)
        return t, int(t.data_ptr())
    if kind == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(ordinal):
            a = cupy.empty(shape, dtype=dtype)
        return a, int(a.data.ptr)
    a = DeviceArray(shape, dtype, ordinal, s)
    return a, a.ptr


def record_torch_stream(tensor: Any, s: int) -> None:
    """Tell torch's caching allocator that ``tensor`` is used on stream ``s``, when that is
    not torch's current stream (else its memory could be reused while ``s`` still reads it)."""
    torch = sys.modules["torch"]
    current = torch.cuda.current_stream(tensor.device)
    if stream_handle(current.cuda_stream) != s:
        tensor.record_stream(torch.cuda.ExternalStream(s, device=tensor.device))


def consumer_stream(obj: Any) -> Optional[int]:
    """The stream a torch tensor's or CuPy array's library uses next (its current stream),
    None for other kinds (their consumer's stream is not known)."""
    module = type(obj).__module__.split(".")[0]
    if module == "torch" and getattr(obj, "is_cuda", False):
        return stream_handle(sys.modules["torch"].cuda.current_stream(obj.device).cuda_stream)
    if module == "cupy" and hasattr(obj, "device"):
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(obj.device.id):
            return stream_handle(cupy.cuda.get_current_stream())
    return None


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
    ``ptr`` and ``device``. ``keep`` is the object itself (and what keeps its memory
    alive); ``view`` the library's view of it.
    """

    name: str
    kind: str
    on_device: bool
    shape: Tuple[int, ...]
    dtype: np.dtype
    contiguous: bool = True
    ptr: int = 0
    device: Optional[int] = None
    readonly: bool = False
    host: Optional[np.ndarray] = None
    keep: Any = None
    view: Any = None

    def describe(self) -> str:
        where = "host memory" if not self.on_device else f"device memory on cuda:{self.device}"
        return f"{self.dtype.name} {self.shape} in {where}"


def _c_contiguous(shape: Tuple[int, ...], strides: Optional[Sequence[int]]) -> bool:
    """Whether ``strides`` (in elements, as the library gives them; None: C order) are C order."""
    if strides is None:
        return True
    expected = 1
    for size, stride in zip(reversed(shape), reversed(tuple(strides))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _torch_dtype_to_numpy(name: str, dtype: Any) -> np.dtype:
    text = str(dtype).replace("torch.", "")
    try:
        result = np.dtype(text)
        if result.kind not in "biufc":  # bfloat16 once ml_dtypes has registered it: no numpy arithmetic
            raise TypeError(text)
        return result
    except TypeError:
        raise ArrayError(f"{name} has dtype {text}, which has no numpy equivalent (float32 and float16 are "
                         f"what this takes)") from None


def array_device(x: Any) -> Optional[int]:
    """The CUDA device ordinal of an array in device memory, None for host memory or what
    is not an array, learned without viewing it (a view is made in its device's context)."""
    module = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray) or (module == "torch" and not getattr(x, "is_cuda", True)):
        return None
    if isinstance(x, DeviceArray):
        return x.device
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        try:
            kind, ordinal = x.__dlpack_device__()
        except Exception:
            return None
        return int(ordinal) if int(kind) == 2 else None  # kDLCUDA
    cai = getattr(x, "__cuda_array_interface__", None)
    if isinstance(cai, dict) and isinstance(cai.get("data"), (tuple, list)) and cai["data"] and cai["data"][0]:
        from cuda.bindings import driver

        err, ordinal = driver.cuPointerGetAttribute(driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                                    int(cai["data"][0]))
        return int(ordinal) if int(err) == 0 else None
    return None


def view_array(x: Any, name: str, consumer_stream: Optional[int] = None) -> ArrayView:
    """An :class:`ArrayView` of ``x``, of any accepted kind; :class:`ArrayError` naming
    ``name`` for anything else, or for what the library refuses (a ``mask``, an interface
    before version 3, a device it does not know).

    A device array's view is made for ``consumer_stream`` (a handle; None: no ordering),
    which orders that stream after the array's producer (see the module docstring)."""
    module = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return ArrayView(name, "numpy", False, tuple(x.shape), x.dtype, host=x, keep=x, readonly=not x.flags.writeable)
    if module == "torch" and hasattr(x, "is_cuda") and not x.is_cuda:
        dtype = _torch_dtype_to_numpy(name, x.dtype)
        host = x.detach().numpy()
        return ArrayView(name, "torch", False, tuple(host.shape), dtype, host=host, keep=x)
    dlpack = hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")
    if not dlpack and not hasattr(x, "__cuda_array_interface__"):
        raise ArrayError(f"{name} must be a numpy array, a CuPy array, a torch tensor, or an object with "
                         f"__cuda_array_interface__ or __dlpack__; got {type(x).__module__}.{type(x).__name__}")
    if module == "torch":
        _torch_dtype_to_numpy(name, x.dtype)
    if dlpack and int(x.__dlpack_device__()[0]) == _DLPACK_CPU:
        try:
            host = np.from_dlpack(x)
        except Exception as e:
            raise ArrayError(f"{name} cannot be used as an array ({type(e).__name__}: {e})") from None
        return ArrayView(name, "numpy", False, tuple(host.shape), host.dtype, host=host, keep=x,
                         readonly=not host.flags.writeable)
    cai = None if dlpack else x.__cuda_array_interface__
    if isinstance(cai, dict) and cai.get("stream") == 0:
        raise ArrayError(f"{name}: its __cuda_array_interface__ gives stream 0, which the interface forbids "
                         f"(1: the legacy default stream, 2: the per-thread one)")
    smv = core().utils.StridedMemoryView
    try:
        view = smv.from_any_interface(x, -1 if consumer_stream is None else int(consumer_stream))
        dtype = view.dtype
    except Exception as e:  # BufferError, CUDAError, TypeError, NotImplementedError of the producer or the library
        raise ArrayError(f"{name} cannot be used as an array ({type(e).__name__}: {e})") from None
    if isinstance(x, DeviceArray) and consumer_stream is not None:
        x.record_stream(consumer_stream)  # its memory outlives the reads queued there
    shape = tuple(int(v) for v in view.shape)
    kind = module if module in ("torch", "cupy") else "cuda"
    return ArrayView(name, kind, True, shape, np.dtype(dtype), _c_contiguous(shape, view.strides), int(view.ptr),
                     int(view.device_id), bool(view.readonly), keep=x, view=view)
