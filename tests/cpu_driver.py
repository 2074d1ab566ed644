"""The CPU-backed CUDA driver (``tests/mock_cuda_driver.cpp``) for the runtime tests: how
to build it, the environment that makes a process load it, its test controls, and the
stand-ins that run on top of it.

The runtime suite (``tests/driver/``) runs in a process whose ``LD_LIBRARY_PATH`` starts
with the folder holding this ``libcuda.so.1``; the real ``cuda.bindings`` and ``cuda.core``
then run on it. TensorRT is the one part replaced: :class:`InterpretedTensorRT` loads a
"plan" as the network it was built from and executes it with the CPU interpreter, queued on
the driver's streams like a kernel, on device buffers that are host memory here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

SOURCE = Path(__file__).resolve().parent / "mock_cuda_driver.cpp"
ENV_FLAG = "TRTVIT_CPU_DRIVER"  # set, to the library's folder, in the processes that load it


def cuda_include() -> Path:
    """The folder holding cuda.h (the driver's types and signatures)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda.h").is_file():
            return Path(c) / "include"
    raise RuntimeError(f"cuda.h not found (looked in {', '.join(str(c) for c in candidates if c)}): the CPU-backed "
                       f"driver is compiled against the CUDA toolkit's headers")


def build() -> Path:
    """Compile the driver (once per source version) and return the folder with libcuda.so.1."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"trtvit-cpu-driver-{digest}"
    lib = folder / "libcuda.so.1"
    if not lib.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"libcuda.so.1.{os.getpid()}"
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        proc = subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall",
                               "-Werror", f"-I{cuda_include()}", str(SOURCE), "-o", str(tmp),
                               "-Wl,-soname,libcuda.so.1"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"building the CPU-backed driver failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)
    return folder


def environment(folder: Path, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """An environment whose processes load the driver in ``folder``."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(folder)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(
        os.pathsep) if p])
    env[ENV_FLAG] = str(folder)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


_HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class Driver:
    """The test controls of the loaded driver (``trtvit_mock_*``)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        if not hasattr(lib, "trtvit_mock_launch"):
            raise RuntimeError("the libcuda.so.1 this process loaded is not the CPU-backed driver")
        self.lib = lib
        for name in ("trtvit_mock_violations", "trtvit_mock_missing"):
            getattr(lib, name).restype = ctypes.c_char_p
        lib.trtvit_mock_clock_ms.restype = ctypes.c_double
        lib.trtvit_mock_launch.argtypes = [ctypes.c_void_p, _HOST_FN, ctypes.c_void_p,
                                           ctypes.POINTER(ctypes.c_uint64), ctypes.c_int,
                                           ctypes.POINTER(ctypes.c_uint64), ctypes.c_int, ctypes.c_double]
        lib.trtvit_mock_pending.argtypes = [ctypes.c_void_p]
        lib.trtvit_mock_pointer_kind.argtypes = [ctypes.c_uint64]
        lib.trtvit_mock_fail_next.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._callbacks: List[Any] = []  # kept alive: the driver calls them when their stream runs
        self.errors: List[str] = []  # exceptions raised inside queued work
        self.released: List[Any] = []  # (TensorRT object, the device current when it went)

    def violations(self) -> List[str]:
        """The rules broken since the last call (and forgets them)."""
        return [v for v in self.lib.trtvit_mock_violations().decode().splitlines() if v]

    def contexts_made_current(self, device: int) -> int:
        return self.lib.trtvit_mock_contexts_made_current(device)

    def contexts_created(self, device: int) -> int:
        return self.lib.trtvit_mock_contexts_created(device)

    def legacy_syncs(self, device: int) -> int:
        return self.lib.trtvit_mock_legacy_syncs(device)

    def event_syncs(self, blocking: bool) -> int:
        return self.lib.trtvit_mock_event_syncs(int(blocking))

    def live_pinned(self) -> int:
        return self.lib.trtvit_mock_live_blocks(-1)

    def live_device_blocks(self, device: int) -> int:
        return self.lib.trtvit_mock_live_blocks(device)

    def pointer_kind(self, ptr: int) -> str:
        return {0: "none", 1: "device", 2: "pinned"}[self.lib.trtvit_mock_pointer_kind(ptr)]

    def pending(self, stream: int) -> int:
        return self.lib.trtvit_mock_pending(stream)

    def fail_next(self, entry: str, code: int) -> None:
        """Make the next call of the driver's ``entry`` (e.g. "cuMemcpyAsync") return ``code``."""
        self.lib.trtvit_mock_fail_next(entry.encode(), code)

    def clock_ms(self) -> float:
        return self.lib.trtvit_mock_clock_ms()

    def launch(self, stream: int, work: Callable[[], None], reads: Sequence[int] = (), writes: Sequence[int] = (),
               cost_ms: float = 0.0) -> int:
        """Queue ``work`` on ``stream`` as a kernel reading ``reads`` and writing ``writes``
        (device pointers); the CUresult of the launch."""

        box = [work]  # the work goes once it ran (what it holds is not kept with the callback)

        def run(_: Any) -> None:
            w, box[0] = box[0], None
            try:
                w()
            except Exception as e:  # noqa: BLE001 - reported to the test, not lost in ctypes
                self.errors.append(f"{type(e).__name__}: {e}")

        callback = _HOST_FN(run)
        self._callbacks.append(callback)
        r = (ctypes.c_uint64 * max(len(reads), 1))(*reads)
        w = (ctypes.c_uint64 * max(len(writes), 1))(*writes)
        return self.lib.trtvit_mock_launch(stream, callback, None, r, len(reads), w, len(writes), cost_ms)


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a new thread (which has no CUDA context) and return its result, or
    raise what it raised."""
    import threading

    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _current_device() -> Optional[int]:
    from cuda.bindings import driver as cu

    err, dev = cu.cuCtxGetDevice()
    return int(dev) if int(err) == 0 else None


def numpy_at(ptr: int, shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """A numpy array over device memory (host memory under this driver)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(shape))


# --------------------------------------------------------------------------------------
# Producers of device arrays, as CUDA libraries export them
# --------------------------------------------------------------------------------------


class Produced:
    """Device memory exported through the CUDA array interface by a producer whose writes
    are queued on ``stream``."""

    def __init__(self, ptr: int, shape: Sequence[int], dtype: Any = np.float32, stream: Optional[int] = None,
                 readonly: bool = False):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": np.dtype(dtype).str,
                                         "data": (int(ptr), readonly), "version": 3, "strides": None, "stream": stream}


class ProducedDLPack:
    """Device memory exported through DLPack (``cuda.core``'s own exporter) by a producer
    whose writes are queued on ``stream``: ``__dlpack__(stream=s)`` orders them before ``s``
    with an event, as the protocol asks of a producer."""

    def __init__(self, buffer: Any, shape: Sequence[int], dtype: Any = np.float32, stream: Any = None,
                 readonly: bool = False):
        from cuda.core.utils import StridedMemoryView

        self.view = StridedMemoryView.from_buffer(buffer, tuple(shape), dtype=np.dtype(dtype), is_readonly=readonly)
        self.stream, self.requests = stream, []

    def __dlpack__(self, stream: Optional[int] = None, max_version: Any = None, **kwargs: Any) -> Any:
        from cuda.core import Stream

        self.requests.append({"stream": stream, "max_version": max_version})
        if stream not in (None, -1) and self.stream is not None and int(self.stream.handle) != stream:
            consumer = Stream.from_handle(stream)
            consumer.wait(self.stream.record())
        return self.view.__dlpack__(max_version=max_version)

    def __dlpack_device__(self) -> Any:
        return self.view.__dlpack_device__()


# --------------------------------------------------------------------------------------
# TensorRT's runtime, executing the built network with the CPU interpreter
# --------------------------------------------------------------------------------------


class InterpretedEngine:
    """An ICudaEngine's runtime surface over a built network."""

    def __init__(self, built: Any, driver: Driver, logger: Any, device: int):
        self.built, self.driver, self.trt, self.logger = built, driver, built.backend.trt, logger
        self.outputs = list(built.outputs)
        self.num_io_tensors = 1 + len(self.outputs)
        self.device = device
        self.executions = 0
        self._memo: Dict[Any, Any] = {}

    def interpret(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """The network's outputs for ``images`` (memoized: timing loops repeat one batch)."""
        import torch

        import trtvit_native as tv

        key = (images.shape, images.tobytes())
        if key not in self._memo:
            out = tv.interpret(self.built, torch.from_numpy(images.copy()))
            out = out if isinstance(out, dict) else {self.outputs[0]: out}
            self._memo[key] = {k: v.numpy() for k, v in out.items()}
        return self._memo[key]

    def get_tensor_name(self, i: int) -> str:
        return (["images"] + self.outputs)[i]

    def get_tensor_mode(self, name: str) -> Any:
        return self.trt.TensorIOMode.INPUT if name == "images" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name: str, index: int) -> Any:
        return self.built.profile.get_shape(name)

    def get_tensor_dtype(self, name: str) -> Any:
        return self.trt.float32

    def __del__(self) -> None:  # TensorRT frees the engine's device memory in the current context
        self.driver.released.append(("engine", _current_device()))

    def create_execution_context(self) -> "InterpretedContext":
        return InterpretedContext(self)


class InterpretedContext:
    """An IExecutionContext: shapes, addresses, and ``execute_async_v3`` queued on the driver.
    Like TensorRT's, it owns a workspace that every execution writes, so two executions on
    streams that nothing orders are a violation the driver reports."""

    def __init__(self, engine: InterpretedEngine):
        from cuda.bindings import driver as cu

        self.engine, self.shape, self.addresses = engine, None, {}
        self.fail_next: Optional[str] = None  # the next execute_async_v3 reports this error and returns False
        err, self.workspace = cu.cuMemAlloc(256)
        assert int(err) == 0, err

    def __del__(self) -> None:
        self.engine.driver.released.append(("context", _current_device()))

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if not all(a <= v <= b for v, a, b in zip(shape, lo, hi)):
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> Any:
        return (self.shape[0],) + tuple(self.engine.built.output_shape(name)[1:])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if self.engine.driver.pointer_kind(ptr) != "device":
            self.engine.logger.log(self.engine.trt.ILogger.Severity.ERROR, f"{name}: address {ptr:#x} is not on the GPU")
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        engine, severity = self.engine, self.engine.trt.ILogger.Severity.ERROR
        if self.fail_next is not None:
            engine.logger.log(severity, self.fail_next)
            self.fail_next = None
            return False
        shape, addresses = self.shape, dict(self.addresses)
        shapes = {n: self.get_tensor_shape(n) for n in engine.outputs}

        def run() -> None:
            out = engine.interpret(numpy_at(addresses["images"], shape).copy())
            for name, value in out.items():
                numpy_at(addresses[name], shapes[name])[...] = value
            engine.executions += 1

        writes = [addresses[n] for n in engine.outputs] + [int(self.workspace)]
        result = engine.driver.launch(int(stream), run, reads=[addresses["images"]], writes=writes,
                                      cost_ms=0.5 * shape[0])
        if result:
            engine.logger.log(severity, f"enqueue failed: CUresult {result}")
            return False
        return True


class InterpretedTensorRT:
    """The TensorRT module, with ``Runtime`` deserializing the plans in ``plans`` (bytes ->
    built network) as interpreted engines."""

    def __init__(self, real: Any, driver: Driver, plans: Dict[bytes, Any]):
        self._real, self._driver, self._plans = real, driver, plans

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def Runtime(self, logger: Any) -> Any:  # noqa: N802 - TensorRT's name
        from cuda.bindings import driver as cu

        def deserialize(plan: bytes) -> Any:
            built = self._plans.get(bytes(plan))
            if built is None:
                return None
            err, device = cu.cuCtxGetDevice()  # TensorRT loads an engine on the current device
            assert int(err) == 0, err
            return InterpretedEngine(built, self._driver, logger, int(device))

        return SimpleNamespace(deserialize_cuda_engine=deserialize)
