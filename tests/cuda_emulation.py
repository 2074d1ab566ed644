"""An emulated GPU at the level of ``cuda.core``: the Device, Stream, Event, Buffer and
memory resources the package uses, on host memory, and a StridedMemoryView that reads
DLPack through the real ``cuda.core`` one.

Streams are queues: work runs only when something waits for it (a stream or event
synchronized by the host, or another stream waiting on an event). An event covers the
work queued on its stream before it was recorded, and nothing after. Each stream carries
a vector clock of what it is ordered after, so :meth:`EmulatedCuda.ordered_before` tells
whether one piece of work is ordered before the next enqueue on another stream; an
execution context uses it to detect two enqueues with nothing ordering them (they would
share its workspace). Time is the emulation's clock: each piece of work advances it by
its cost, and events read it when the stream reaches them.
"""

from __future__ import annotations

import ctypes
import itertools
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from cuda.core.utils import StridedMemoryView as RealStridedMemoryView

LEGACY, PER_THREAD = 1, 2


class CUDAError(RuntimeError):
    """What cuda.core raises for a failed driver call."""


def numpy_at(ptr: int, shape, dtype=np.float32) -> np.ndarray:
    """A numpy array over emulated memory (device memory is host memory here)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def _merge(a: Dict[int, int], b: Dict[int, int]) -> Dict[int, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = max(out.get(k, 0), v)
    return out


class _Queue:
    def __init__(self, handle: int):
        self.handle, self.ops, self.seq, self.done, self.vc = handle, [], 0, 0, {}


class EmulatedCuda:
    """The emulated GPU: memory, stream queues, the clock, and the cuda.core surface
    (:attr:`core`) that replaces ``arrays._CORE``."""

    def __init__(self):
        self.device_memory: Dict[int, ctypes.Array] = {}
        self.pinned_memory: Dict[int, ctypes.Array] = {}
        self.freed: List[ctypes.Array] = []  # kept alive: queued work may still name it
        self.queues: Dict[int, _Queue] = {}
        self.host_vc: Dict[int, int] = {}
        self.clock = 0.0
        self.ids = itertools.count(100)
        self.calls: List[tuple] = []
        self.allocations = 0
        self.initialized = set()  # devices made current (cuda.core: "Device must be initialized")
        self.core = _make_core(self)

    # memory
    def allocate(self, table: Dict[int, ctypes.Array], nbytes: int) -> int:
        buffer = (ctypes.c_byte * nbytes)()
        table[ctypes.addressof(buffer)] = buffer
        return ctypes.addressof(buffer)

    def free(self, table: Dict[int, ctypes.Array], ptr: int) -> None:
        self.freed.append(table.pop(ptr))

    def is_device(self, ptr: int) -> bool:
        return any(base <= ptr < base + len(buf) for base, buf in self.device_memory.items())

    # streams
    def queue(self, handle: int) -> _Queue:
        handle = int(handle)
        if handle == 0:
            raise CUDAError("stream 0 reached the emulated driver: the package must pass the legacy stream as 1")
        if handle not in self.queues:
            self.queues[handle] = _Queue(handle)
        return self.queues[handle]

    def new_stream(self) -> int:
        handle = next(self.ids)
        self.queue(handle)
        return handle

    def position(self, handle: int) -> Dict[int, int]:
        """What the next enqueue on ``handle`` is ordered after (a vector clock)."""
        q = self.queue(handle)
        return _merge(_merge(q.vc, self.host_vc), {q.handle: q.seq})

    def ordered_before(self, work: Tuple[int, int], handle: int) -> bool:
        """Whether ``work`` (stream, sequence number) is ordered before the next enqueue on ``handle``."""
        return self.position(handle).get(work[0], 0) >= work[1]

    def enqueue(self, handle: int, op: Callable[[], None], cost: float = 0.0) -> Tuple[int, int]:
        q = self.queue(handle)
        q.vc = _merge(q.vc, self.host_vc)
        q.seq += 1
        q.ops.append((q.seq, op, cost))
        return q.handle, q.seq

    def run_until(self, handle: int, seq: int) -> None:
        q = self.queue(handle)
        while q.ops and q.ops[0][0] <= seq:
            done, op, cost = q.ops.pop(0)
            op()
            self.clock += cost
            q.done = done

    def synchronize(self, handle: int) -> None:
        q = self.queue(handle)
        self.calls.append(("synchronize", q.handle))
        self.run_until(q.handle, q.seq)
        self.host_vc = _merge(self.host_vc, self.position(q.handle))

    def record(self, handle: int, event: Optional["Event"] = None) -> "Event":
        """Record ``event`` (re-recorded: waits already made keep what they covered) or a new one."""
        event = event if event is not None else Event(self)
        event.time = None
        event.vc = self.position(handle)
        event.stream, event.seq = self.enqueue(handle, event._reached)
        return event

    def wait(self, handle: int, event: "Event") -> None:
        self.calls.append(("wait", event.stream, int(handle)))
        q = self.queue(handle)
        q.vc = _merge(q.vc, event.vc)
        producer, seq = event.stream, event.seq  # what the event covers now, not once re-recorded
        self.enqueue(handle, lambda: self.run_until(producer, seq))

    def copy(self, dst: int, src: int, nbytes: int, handle: int) -> None:
        kind = ("D" if self.is_device(src) else "H") + "2" + ("D" if self.is_device(dst) else "H")
        self.calls.append(("copy", kind, nbytes, int(handle)))
        self.enqueue(handle, lambda: ctypes.memmove(dst, src, nbytes), cost=nbytes * 1e-9)


class Event:
    def __init__(self, cuda: EmulatedCuda):
        self.cuda, self.time, self.stream, self.seq, self.vc = cuda, None, None, 0, {}

    def _reached(self) -> None:
        self.time = self.cuda.clock

    @property
    def is_done(self) -> bool:
        return self.time is not None

    def sync(self) -> None:
        self.cuda.run_until(self.stream, self.seq)
        self.cuda.host_vc = _merge(self.cuda.host_vc, _merge(self.vc, {self.stream: self.seq}))

    def __sub__(self, other: "Event") -> float:
        if self.time is None or other.time is None:
            raise CUDAError("CUDA_ERROR_NOT_READY: elapsed time of an event not reached")
        return self.time - other.time


def _make_core(cuda: EmulatedCuda) -> SimpleNamespace:
    class Stream:
        def __init__(self, handle: int):
            self.handle = int(handle)
            cuda.queue(self.handle)

        @staticmethod
        def from_handle(handle: int) -> "Stream":
            return Stream(int(handle))

        def __cuda_stream__(self) -> Tuple[int, int]:
            return (0, self.handle)

        def record(self, event: Any = None, options: Any = None) -> Event:
            return cuda.record(self.handle, event)

        def wait(self, event_or_stream: Any) -> None:
            event = event_or_stream if isinstance(event_or_stream, Event) else cuda.record(event_or_stream.handle)
            cuda.wait(self.handle, event)

        def sync(self) -> None:
            cuda.synchronize(self.handle)

        def close(self) -> None:
            cuda.synchronize(self.handle)

    class Buffer:
        def __init__(self, ptr: int, size: int, table: Optional[dict] = None, owner: Any = None):
            self.handle, self.size, self._table, self._owner = ptr, size, table, owner

        @staticmethod
        def from_handle(ptr: int, size: int, mr: Any = None, owner: Any = None, stream: Any = None) -> "Buffer":
            return Buffer(int(ptr), int(size), owner=owner)

        def copy_from(self, src: "Buffer", *, stream: Any) -> None:
            assert src.size == self.size
            cuda.copy(self.handle, src.handle, self.size, stream.handle)

        def close(self, stream: Any = None) -> None:
            if self._table is not None:
                table, ptr = self._table, self.handle
                if stream is None:
                    cuda.free(table, ptr)
                else:
                    cuda.enqueue(stream.handle, lambda: cuda.free(table, ptr))
                self._table = None

    class DeviceMemoryResource:
        def allocate(self, size: int, *, stream: Any) -> Buffer:
            cuda.allocations += 1
            cuda.calls.append(("allocate", size, stream.handle))
            return Buffer(cuda.allocate(cuda.device_memory, size), size, cuda.device_memory)

    def initialized(device_id: int = 0) -> None:
        if device_id not in cuda.initialized:
            raise CUDAError(f"Device {device_id} is not yet initialized, perhaps you forgot to call .set_current() "
                            f"first?")

    class LegacyPinnedMemoryResource:
        def allocate(self, size: int, *, stream: Any = None) -> Buffer:
            initialized()
            return Buffer(cuda.allocate(cuda.pinned_memory, size), size, cuda.pinned_memory)

    class Device:
        memory_resource = DeviceMemoryResource()

        def __init__(self, device_id: Optional[int] = None):
            if device_id not in (None, 0):
                raise CUDAError(f"CUDA_ERROR_INVALID_DEVICE: device {device_id}")
            self.device_id, self.name = 0, "Emulated GPU"

        @classmethod
        def get_all_devices(cls):
            return (cls(0),)

        def set_current(self) -> None:
            cuda.initialized.add(self.device_id)

        def create_stream(self, obj: Any = None, options: Any = None) -> Stream:
            initialized(self.device_id)
            return Stream(cuda.new_stream())

        def allocate(self, size: int, *, stream: Any) -> Buffer:
            initialized(self.device_id)
            return self.memory_resource.allocate(size, stream=stream)

    class View(SimpleNamespace):
        """What StridedMemoryView exposes."""

    class StridedMemoryView:
        """The CUDA array interface as cuda.core reads it (its driver calls emulated), and
        DLPack read by the real StridedMemoryView."""

        @classmethod
        def from_any_interface(cls, obj: Any, stream_ptr: Optional[int] = None) -> View:
            if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
                return cls.from_dlpack(obj, stream_ptr)
            return cls.from_cuda_array_interface(obj, stream_ptr)

        @staticmethod
        def from_dlpack(obj: Any, stream_ptr: Optional[int] = None) -> View:
            cuda.calls.append(("dlpack view", stream_ptr))
            device_type = int(obj.__dlpack_device__()[0])
            if device_type == 1:
                return RealStridedMemoryView.from_dlpack(obj, stream_ptr)

            class AsHostMemory:  # the capsule's memory is host memory under the emulation
                def __dlpack__(self, stream=None, max_version=None):
                    return obj.__dlpack__(stream=stream_ptr, max_version=max_version)

                def __dlpack_device__(self):
                    return (1, 0)

            real = RealStridedMemoryView.from_dlpack(AsHostMemory(), -1)
            if not cuda.is_device(real.ptr):
                raise CUDAError("CUDA_ERROR_INVALID_VALUE: not device memory")
            return View(ptr=real.ptr, shape=real.shape, strides=real.strides, dtype=real.dtype, device_id=0,
                        is_device_accessible=True, readonly=real.readonly, exporting_obj=obj, real=real)

        @staticmethod
        def from_cuda_array_interface(obj: Any, stream_ptr: Optional[int] = None) -> View:
            cai = obj.__cuda_array_interface__
            if cai["version"] < 3:
                raise BufferError("only CUDA Array Interface v3 or above is supported")
            if cai.get("mask") is not None:
                raise BufferError("mask is not supported")
            if stream_ptr is None:
                raise BufferError("stream=None is ambiguous with view()")
            ptr, readonly = cai["data"]
            if not cuda.is_device(ptr):
                raise CUDAError("CUDA_ERROR_INVALID_VALUE: cuPointerGetAttribute of a host pointer")
            dtype = np.dtype(cai["typestr"])
            strides = cai.get("strides")
            producer = cai.get("stream")
            cuda.calls.append(("cai view", producer, stream_ptr))
            if stream_ptr != -1 and producer is not None:
                assert producer > 0
                if producer != stream_ptr:
                    cuda.wait(stream_ptr, cuda.record(producer))
            return View(ptr=ptr, shape=tuple(cai["shape"]), dtype=dtype, device_id=0, is_device_accessible=True,
                        readonly=bool(readonly), exporting_obj=obj,
                        strides=None if strides is None else tuple(s // dtype.itemsize for s in strides))

    return SimpleNamespace(Device=Device, Stream=Stream, Event=Event, Buffer=Buffer,
                           DeviceMemoryResource=DeviceMemoryResource,
                           LegacyPinnedMemoryResource=LegacyPinnedMemoryResource,
                           EventOptions=lambda **kw: SimpleNamespace(**kw),
                           LEGACY_DEFAULT_STREAM=Stream(LEGACY), PER_THREAD_DEFAULT_STREAM=Stream(PER_THREAD),
                           utils=SimpleNamespace(StridedMemoryView=StridedMemoryView))


class Produced:
    """Device memory exported through the CUDA array interface by a producer whose writes
    are queued on ``stream``."""

    def __init__(self, ptr: int, shape, dtype=np.float32, stream: Optional[int] = None, readonly: bool = False):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": np.dtype(dtype).str,
                                         "data": (ptr, readonly), "version": 3, "strides": None, "stream": stream}


class ProducedDLPack:
    """Device memory exported through DLPack by a producer whose writes are queued on
    ``stream``: ``__dlpack__(stream=s)`` orders them before ``s``, as the protocol asks."""

    def __init__(self, cuda: EmulatedCuda, ptr: int, shape, dtype=np.float32, stream: Optional[int] = None,
                 readonly: bool = False):
        self.cuda, self.stream, self.requests = cuda, stream, []
        self.array = numpy_at(ptr, shape, dtype)
        if readonly:
            self.array.flags.writeable = False

    def __dlpack__(self, stream: Optional[int] = None, max_version: Optional[tuple] = None):
        self.requests.append({"stream": stream, "max_version": max_version})
        if stream not in (None, -1) and self.stream is not None and stream != self.stream:
            self.cuda.wait(stream, self.cuda.record(self.stream))
        return self.array.__dlpack__(max_version=max_version) if max_version else self.array.__dlpack__()

    def __dlpack_device__(self):
        return (2, 0)
