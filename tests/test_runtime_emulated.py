"""EngineRunner's data flow end to end, on an emulated GPU.

The CUDA runtime is replaced by an emulation in host memory whose streams are queues:
copies and engine executions are queued and run only when the stream is synchronized,
or when another stream waits on an event of it, so a runner that reads results before
synchronizing, or runs before the stream that produced its input, reads stale memory
and fails. TensorRT's runtime is replaced by the CPU interpreter of the very network the
engine was built from. What is left is the runner's own code: the staging buffers, the
copies and their sizes, the output kinds, ``out=``, several outputs, streams, and
``trtvit run``. On a GPU the same paths run in ``tests/test_runtime_gpu.py``.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
from types import SimpleNamespace
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch

import trtvit_native as tv
from trtvit_native import arrays, runtime
from conftest import reference

OK = 0


class EmulatedCudaRuntime:
    """The subset of cuda-python's runtime that the package calls, on host memory."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaMemoryType(enum.IntEnum):
        cudaMemoryTypeUnregistered = 0
        cudaMemoryTypeHost = 1
        cudaMemoryTypeDevice = 2
        cudaMemoryTypeManaged = 3

    cudaStreamNonBlocking = 1
    cudaEventDisableTiming = 2

    def __init__(self):
        self.device_memory: Dict[int, ctypes.Array] = {}
        self.pinned_memory: Dict[int, ctypes.Array] = {}
        self.queues: Dict[int, List[Callable[[], None]]] = {0: [], 1: [], 2: []}
        self.events: Dict[int, int] = {}
        self.ids = itertools.count(100)
        self.calls: List[tuple] = []

    # errors and devices
    def cudaGetErrorName(self, err):
        return OK, self.cudaError_t(err).name.encode()

    def cudaGetErrorString(self, err):
        return OK, b"emulated error"

    def cudaGetDeviceCount(self):
        return self.cudaError_t.cudaSuccess, 1

    def cudaGetDevice(self):
        return self.cudaError_t.cudaSuccess, 0

    def cudaSetDevice(self, device):
        return (self.cudaError_t.cudaSuccess if device == 0 else self.cudaError_t.cudaErrorInvalidValue,)

    def cudaGetDeviceProperties(self, device):
        return self.cudaError_t.cudaSuccess, SimpleNamespace(name=b"Emulated GPU\0\0")

    # memory
    def _allocate(self, table, nbytes):
        buffer = (ctypes.c_byte * nbytes)()
        table[ctypes.addressof(buffer)] = buffer
        return self.cudaError_t.cudaSuccess, ctypes.addressof(buffer)

    def cudaMalloc(self, nbytes):
        return self._allocate(self.device_memory, nbytes)

    def cudaMallocHost(self, nbytes):
        return self._allocate(self.pinned_memory, nbytes)

    def cudaFree(self, ptr):
        self.device_memory.pop(ptr)
        return (self.cudaError_t.cudaSuccess,)

    def cudaFreeHost(self, ptr):
        self.pinned_memory.pop(ptr)
        return (self.cudaError_t.cudaSuccess,)

    def is_device(self, ptr):
        return any(base <= ptr < base + len(buf) for base, buf in self.device_memory.items())

    def cudaPointerGetAttributes(self, ptr):
        kind = self.cudaMemoryType.cudaMemoryTypeDevice if self.is_device(ptr) else \
            self.cudaMemoryType.cudaMemoryTypeUnregistered
        return self.cudaError_t.cudaSuccess, SimpleNamespace(type=kind, device=0)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.calls.append(("memcpy", kind.name, nbytes, int(stream)))
        self.enqueue(int(stream), lambda: ctypes.memmove(dst, src, nbytes))
        return (self.cudaError_t.cudaSuccess,)

    # streams and events
    def enqueue(self, stream, op):
        self.queues[stream].append(op)

    def flush(self, stream):
        queue = self.queues[stream]
        while queue:
            queue.pop(0)()

    def cudaStreamCreateWithFlags(self, flags):
        handle = next(self.ids)
        self.queues[handle] = []
        return self.cudaError_t.cudaSuccess, handle

    def cudaStreamDestroy(self, stream):
        self.flush(stream)
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        self.calls.append(("synchronize", int(stream)))
        self.flush(int(stream))
        return (self.cudaError_t.cudaSuccess,)

    def cudaEventCreateWithFlags(self, flags):
        return self.cudaError_t.cudaSuccess, next(self.ids)

    cudaEventCreate = lambda self: self.cudaEventCreateWithFlags(0)  # noqa: E731

    def cudaEventRecord(self, event, stream):
        self.events[event] = int(stream)
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamWaitEvent(self, stream, event, flags):
        producer = self.events[event]
        self.calls.append(("wait", producer, int(stream)))
        self.enqueue(int(stream), lambda: self.flush(producer))
        return (self.cudaError_t.cudaSuccess,)

    def cudaEventSynchronize(self, event):
        self.flush(self.events[event])
        return (self.cudaError_t.cudaSuccess,)

    def cudaEventElapsedTime(self, start, end):
        return self.cudaError_t.cudaSuccess, 1.0

    def cudaEventDestroy(self, event):
        return (self.cudaError_t.cudaSuccess,)


def _numpy_at(ptr, shape, dtype=np.float32):
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class EmulatedEngine:
    """An ICudaEngine's runtime surface, executing the built network with the CPU interpreter."""

    def __init__(self, built, cuda):
        self.built, self.cuda, self.trt = built, cuda, built.backend.trt
        self.outputs = list(built.outputs)
        self.num_io_tensors = 1 + len(self.outputs)
        self.executions = 0

    def get_tensor_name(self, i):
        return (["images"] + self.outputs)[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "images" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name, index):
        return self.built.profile.get_shape(name)

    def get_tensor_dtype(self, name):
        return self.trt.float32

    def create_execution_context(self):
        return EmulatedContext(self)


class EmulatedContext:
    def __init__(self, engine):
        self.engine, self.shape, self.addresses = engine, None, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if not all(a <= v <= b for v, a, b in zip(shape, lo, hi)):
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0],) + tuple(self.engine.built.output_shape(name)[1:])

    def set_tensor_address(self, name, ptr):
        assert self.engine.cuda.is_device(ptr), f"{name}: TensorRT was given a host pointer"
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        shape, addresses = self.shape, dict(self.addresses)
        shapes = {n: self.get_tensor_shape(n) for n in self.engine.outputs}

        def run():
            images = torch.from_numpy(_numpy_at(addresses["images"], shape).copy())
            out = tv.interpret(self.engine.built, images)
            out = out if isinstance(out, dict) else {self.engine.outputs[0]: out}
            for name, value in out.items():
                _numpy_at(addresses[name], shapes[name])[...] = value.numpy()
            self.engine.executions += 1

        self.engine.cuda.enqueue(int(stream), run)
        return True


@pytest.fixture
def emulated(monkeypatch):
    """(cuda emulation, {plan bytes: built network}): EngineRunner(plan) loads the network."""
    cuda = EmulatedCudaRuntime()
    plans = {}
    monkeypatch.setattr(arrays, "_RUNTIME", cuda)
    real = tv.get_backend()

    class EmulatedTensorRT:
        def __getattr__(self, name):
            return getattr(real.trt, name)

        def Runtime(self, logger):  # noqa: N802 - TensorRT's name
            return SimpleNamespace(deserialize_cuda_engine=lambda plan: EmulatedEngine(plans[bytes(plan)], cuda)
                                   if bytes(plan) in plans else None)

    backend = SimpleNamespace(trt=EmulatedTensorRT(), label=f"{real.label} runtime emulated on the CPU interpreter")
    monkeypatch.setattr(runtime, "get_backend", lambda name=None: backend)
    return cuda, plans


def _network(outputs="logits"):
    return tv.build_network("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=False, max_batch=4,
                            image_size=64, outputs=outputs)


@pytest.fixture(scope="module")
def classifier():
    built = _network()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return built, images, tv.interpret(built, images).numpy()


def test_numpy_and_cpu_torch_in_kind_out(emulated, classifier):
    cuda, plans = emulated
    built, images, want = classifier
    plans[b"a"] = built
    runner = tv.EngineRunner(b"a")
    assert runner.describe()["device"] == "Emulated GPU (cuda:0)" and runner.batch_range == (1, 4)
    out = runner(images.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (3, 1000) and np.array_equal(out, want)
    first = out
    copies = [c for c in cuda.calls if c[0] == "memcpy"]
    assert copies == [("memcpy", "cudaMemcpyHostToDevice", 3 * 3 * 64 * 64 * 4, runner.stream),
                      ("memcpy", "cudaMemcpyDeviceToHost", 3 * 1000 * 4, runner.stream)]
    assert np.array_equal(runner(images.numpy().astype(np.float64)), want)  # converted while staged
    small = runner(images[:1].numpy())  # a smaller batch through the same staging buffers
    assert np.array_equal(small, tv.interpret(built, images[:1]).numpy())
    out = runner(images)
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(want))
    buffer = np.zeros((3, 1000), np.float32)
    assert runner(images.numpy(), out=buffer) is buffer and np.array_equal(buffer, want)
    assert len(cuda.pinned_memory) == 2  # input and output staging, made once
    runner(np.zeros((3, 3, 64, 64), np.float32))
    assert np.array_equal(first, want)  # results are the caller's: later calls do not overwrite them
    with pytest.raises(tv.EngineError, match=r"out must be a C-contiguous float32 array of shape \(3, 1000\)"):
        runner(images.numpy(), out=np.zeros((2, 1000), np.float32))
    with pytest.raises(tv.EngineError, match="batch size 5 is outside the engine's profile: it accepts 1..4"):
        runner(np.zeros((5, 3, 64, 64), np.float32))
    with runner:  # closing releases the staging buffers and the runner's own stream
        pass
    assert not cuda.pinned_memory and runner._own_stream is None
    with pytest.raises(tv.EngineError, match="the runner is closed"):
        runner(images.numpy())


def test_device_arrays_in_place_with_the_producers_stream_waited_for(emulated, classifier):
    cuda, plans = emulated
    built, images, want = classifier
    plans[b"a"] = built
    runner = tv.EngineRunner(b"a")
    device = arrays.DeviceArray((3, 3, 64, 64), np.float32)
    producer = cuda.cudaStreamCreateWithFlags(0)[1]
    host = images.numpy().copy()
    # The producer's copy is queued on its stream, not run yet: only a wait makes it land.
    cuda.cudaMemcpyAsync(device.ptr, host.ctypes.data, host.nbytes, cuda.cudaMemcpyKind.cudaMemcpyHostToDevice,
                         producer)

    class Produced:
        __cuda_array_interface__ = dict(device.__cuda_array_interface__, stream=producer)

    out = runner(Produced())
    assert isinstance(out, arrays.DeviceArray) and out.shape == (3, 1000)
    assert ("wait", producer, runner.stream) in cuda.calls
    assert np.array_equal(out.copy_to_host(), want)  # complete on return: the own stream was synchronized
    assert not [c for c in cuda.calls if c[0] == "memcpy" and c[3] == runner.stream]  # no staging copy
    target = arrays.DeviceArray((3, 1000), np.float32)
    assert runner(device, out=target) is target and np.array_equal(target.copy_to_host(), want)
    with pytest.raises(tv.EngineError, match="images points to host memory"):
        class HostPointer:
            __cuda_array_interface__ = {"shape": host.shape, "typestr": "<f4", "data": (host.ctypes.data, False),
                                        "version": 3}
        runner(HostPointer())


def test_a_callers_stream_is_not_waited_for_except_for_host_results(emulated, classifier):
    cuda, plans = emulated
    built, images, want = classifier
    plans[b"a"] = built
    mine = cuda.cudaStreamCreateWithFlags(0)[1]
    runner = tv.EngineRunner(b"a", stream=mine)
    assert runner.stream == mine and runner.describe()["stream"] == "caller's"
    device = arrays.DeviceArray.from_host(images.numpy())
    out = runner(device)
    assert cuda.queues[mine] and ("synchronize", mine) not in cuda.calls  # queued, not run
    cuda.cudaStreamSynchronize(mine)
    assert np.array_equal(out.copy_to_host(), want)
    assert np.array_equal(runner(images.numpy()), want)  # numpy results are complete on return
    other = cuda.cudaStreamCreateWithFlags(0)[1]
    runner(device, stream=SimpleNamespace(cuda_stream=other))  # a torch-like stream for one call
    assert cuda.queues[other]


def test_several_outputs_come_back_by_name(emulated):
    cuda, plans = emulated
    built = _network("features")
    plans[b"f"] = built
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    want = tv.interpret(built, images)
    runner = tv.EngineRunner(b"f")
    assert runner.output_names == ["stage1", "stage2", "stage3", "stage4"]
    out = runner(images.numpy())
    assert set(out) == set(want)
    for name, value in out.items():
        assert isinstance(value, np.ndarray) and np.array_equal(value, want[name].numpy()), name
    device_out = runner(arrays.DeviceArray.from_host(images.numpy()))
    assert all(np.array_equal(device_out[n].copy_to_host(), want[n].numpy()) for n in want)
    with pytest.raises(tv.EngineError, match="out= is for engines with one output"):
        runner(images.numpy(), out=np.zeros(1, np.float32))


def test_engines_that_do_not_load_and_devices_that_do_not_exist_are_named(emulated):
    with pytest.raises(tv.EngineError, match=r"could not deserialize the engine \(7 bytes\) on Emulated GPU"):
        tv.EngineRunner(b"unknown")
    with pytest.raises(tv.EngineError, match=r"device cuda:2 does not exist: CUDA sees 1 device\(s\), cuda:0..cuda:0"):
        tv.EngineRunner(b"unknown", device="cuda:2")
    with pytest.raises(tv.EngineError, match=r"device must be a CUDA device .* got 'cpu'"):
        tv.EngineRunner(b"unknown", device="cpu")
    with pytest.raises(tv.EngineError, match="stream must be an int handle"):
        tv.EngineRunner(b"unknown", stream="fast")


def test_trtvit_run_times_an_engine_file(emulated, classifier, tmp_path, capsys):
    from trtvit_native.cli import main

    cuda, plans = emulated
    built, _, _ = classifier
    plans[b"engine bytes"] = built
    (tmp_path / "a.engine").write_bytes(b"engine bytes")
    assert main(["run", str(tmp_path / "a.engine"), "--batch", "1", "--batch", "4", "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    assert "batch 1..4, images 3x64x64" in out and "Emulated GPU (cuda:0)" in out
    assert "batch    1: median    1.000 ms" in out and "batch    4: median    1.000 ms" in out
    assert main(["run", str(tmp_path / "a.engine"), "--batch", "5"]) == 1
    assert "batch size 5 is outside the engine's profile" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The kernel launchers' data flow, with the kernels computed in numpy on the emulated GPU
# --------------------------------------------------------------------------------------


class EmulatedKernels:
    """The launchers of KernelLibrary, computing in numpy on the emulated streams."""

    def __init__(self, cuda):
        self.cuda, self.launches = cuda, []

    def _dtype(self, code):
        return np.float32 if code == 0 else np.float16

    def layernorm(self, x, gamma, beta, y, rows, d, eps, dtype, stream):
        self.layernorm_residual(x, None, gamma, beta, None, y, rows, d, eps, dtype, stream)

    def layernorm_residual(self, x, residual, gamma, beta, sum_out, y, rows, d, eps, dtype, stream):
        assert all(self.cuda.is_device(p) for p in (x, gamma, beta, y) + ((residual, sum_out) if residual else ()))
        self.launches.append(("layernorm", rows, d, int(stream)))
        t = self._dtype(dtype)

        def run():
            v = _numpy_at(x, (rows, d), t).astype(np.float64)
            if residual:
                total = (v + _numpy_at(residual, (rows, d), t)).astype(t)
                _numpy_at(sum_out, (rows, d), t)[...] = total
                v = total.astype(np.float64)
            norm = (v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, keepdims=True) + eps)
            _numpy_at(y, (rows, d), t)[...] = norm * _numpy_at(gamma, (d,), t) + _numpy_at(beta, (d,), t)

        self.cuda.enqueue(int(stream), run)

    def attention(self, qkv, out, b, n, heads, head_dim, scale, dtype, stream):
        self.launches.append(("attention", b, n, heads, head_dim, int(stream)))
        t = self._dtype(dtype)

        def run():
            q, k, v = _numpy_at(qkv, (b, n, 3, heads, head_dim), t).astype(np.float64).transpose(2, 0, 3, 1, 4)
            s = q @ k.swapaxes(-1, -2) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            o = (p / p.sum(-1, keepdims=True)) @ v
            _numpy_at(out, (b, n, heads * head_dim), t)[...] = o.transpose(0, 2, 1, 3).reshape(b, n, -1)

        self.cuda.enqueue(int(stream), run)


def _layernorm_reference(x, w, b, eps=1e-5):
    x = x.astype(np.float64)
    return ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b).astype(np.float32)


def test_kernel_launchers_with_host_and_device_arrays(emulated):
    from trtvit_native import kernels

    cuda, _ = emulated
    lib = EmulatedKernels(cuda)
    rng = np.random.default_rng(0)
    x, r = rng.standard_normal((6, 24), np.float32), rng.standard_normal((6, 24), np.float32)
    w, b = rng.standard_normal(24, np.float32), rng.standard_normal(24, np.float32)
    y = kernels.layernorm(x, w, b, library=lib)  # host arrays: copied in, computed, copied out
    assert isinstance(y, np.ndarray) and np.allclose(y, _layernorm_reference(x, w, b), atol=1e-5)
    total, y = kernels.layernorm(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                 residual=torch.from_numpy(r), library=lib)
    assert isinstance(total, torch.Tensor) and torch.equal(total, torch.from_numpy(x + r))
    assert np.allclose(y.numpy(), _layernorm_reference(x + r, w, b), atol=1e-5)

    producer = cuda.cudaStreamCreateWithFlags(0)[1]
    dx, dw, db = (arrays.DeviceArray.from_host(a) for a in (x, w, b))

    class OnProducer:  # x as its producer describes it: ready once `producer` has run
        __cuda_array_interface__ = dict(dx.__cuda_array_interface__, stream=producer)

    out = kernels.layernorm(OnProducer(), dw, db, library=lib)
    assert isinstance(out, arrays.DeviceArray) and lib.launches[-1] == ("layernorm", 6, 24, producer)
    cuda.cudaStreamSynchronize(producer)
    assert np.allclose(out.copy_to_host(), _layernorm_reference(x, w, b), atol=1e-5)
    given = cuda.cudaStreamCreateWithFlags(0)[1]
    out = kernels.layernorm(OnProducer(), dw, db, library=lib, stream=given)
    assert lib.launches[-1][-1] == given and ("wait", producer, given) in cuda.calls
    cuda.cudaStreamSynchronize(given)
    assert np.allclose(out.copy_to_host(), _layernorm_reference(x, w, b), atol=1e-5)

    qkv = rng.standard_normal((2, 9, 3 * 2 * 32)).astype(np.float16)
    got = kernels.attention(qkv, 2, 32, library=lib)
    q, k, v = qkv.astype(np.float64).reshape(2, 9, 3, 2, 32).transpose(2, 0, 3, 1, 4)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(32)
    want = (np.exp(s) / np.exp(s).sum(-1, keepdims=True)) @ v
    assert got.dtype == np.float16 and got.shape == (2, 9, 64)
    assert np.allclose(got, want.transpose(0, 2, 1, 3).reshape(2, 9, 64), atol=2e-3)
    with pytest.raises(ValueError, match="attention: qkv points to host memory"):
        class HostPointer:
            __cuda_array_interface__ = {"shape": qkv.shape, "typestr": "<f2", "data": (qkv.ctypes.data, False),
                                        "version": 3}
        kernels.attention(HostPointer(), 2, 32, library=lib)
