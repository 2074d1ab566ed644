"""EngineRunner's data flow end to end, on an emulated GPU.

``cuda.core`` is replaced by an emulation in host memory (``cuda_emulation.py``) whose
streams are queues: copies and engine executions are queued and run only when something
waits for them, and an event covers only the work recorded before it, so a runner that
reads results before they are complete, or runs before the stream that produced its
input, reads stale memory and fails. TensorRT's runtime is replaced by the CPU
interpreter of the very network the engine was built from; its execution context shares
one workspace between enqueues, so two enqueues on streams that nothing orders give
wrong results. What is left is the runner's own code: the staging buffers, the
copies and their sizes, the output kinds, ``out=``, several outputs, streams, and
``trtvit run``. On a GPU the same paths run in ``tests/test_runtime_gpu.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import trtvit_native as tv
from trtvit_native import arrays, runtime
from conftest import reference
from cuda_emulation import EmulatedCuda, Produced, ProducedDLPack, numpy_at

class EmulatedEngine:
    """An ICudaEngine's runtime surface, executing the built network with the CPU interpreter."""

    def __init__(self, built, cuda, logger):
        self.built, self.cuda, self.trt, self.logger = built, cuda, built.backend.trt, logger
        self.outputs = list(built.outputs)
        self.num_io_tensors = 1 + len(self.outputs)
        self.executions = 0
        self.results = {}

    def interpret(self, images):
        """The network's outputs for ``images`` (memoized: timing loops repeat one batch)."""
        key = (images.shape, images.tobytes())
        if key not in self.results:
            out = tv.interpret(self.built, torch.from_numpy(images.copy()))
            self.results[key] = out if isinstance(out, dict) else {self.outputs[0]: out}
        return self.results[key]

    def get_tensor_name(self, i):
        return (["images"] + self.outputs)[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "images" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name, index):
        return self.built.profile.get_shape(name)

    def get_tensor_dtype(self, name):
        return self.trt.float32

    def create_execution_context(self):
        self.context = EmulatedContext(self)
        return self.context


class EmulatedContext:
    def __init__(self, engine):
        self.engine, self.shape, self.addresses = engine, None, {}
        self.last = None  # (stream, sequence number) of the last enqueue
        self.races = []

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if not all(a <= v <= b for v, a, b in zip(shape, lo, hi)):
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0],) + tuple(self.engine.built.output_shape(name)[1:])

    def set_tensor_address(self, name, ptr):
        if not self.engine.cuda.is_device(ptr):
            severity = self.engine.trt.ILogger.Severity.ERROR
            self.engine.logger.log(severity, f"{name}: address {ptr:#x} is not on the GPU")
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        cuda, stream = self.engine.cuda, int(stream)
        shape, addresses = self.shape, dict(self.addresses)
        shapes = {n: self.get_tensor_shape(n) for n in self.engine.outputs}
        # The workspace is the context's: the previous enqueue must be ordered before this one.
        clobbered = self.last is not None and not cuda.ordered_before(self.last, stream)
        if clobbered:
            self.races.append((self.last[0], stream))

        def run():
            out = self.engine.interpret(numpy_at(addresses["images"], shape))
            for name, value in out.items():
                numpy_at(addresses[name], shapes[name])[...] = np.nan if clobbered else value.numpy()
            self.engine.executions += 1

        self.last = cuda.enqueue(stream, run, cost=0.5 * shape[0])  # 0.5 ms per image on the emulation's clock
        return True


@pytest.fixture
def emulated(monkeypatch):
    """(cuda emulation, {plan bytes: built network}): EngineRunner(plan) loads the network."""
    cuda = EmulatedCuda()
    plans = {}
    monkeypatch.setattr(arrays, "_CORE", cuda.core)
    monkeypatch.setattr(arrays, "_driver_version", lambda: 13000)
    real = tv.get_backend()

    class EmulatedTensorRT:
        def __getattr__(self, name):
            return getattr(real.trt, name)

        def Runtime(self, logger):  # noqa: N802 - TensorRT's name
            return SimpleNamespace(deserialize_cuda_engine=lambda plan: EmulatedEngine(plans[bytes(plan)], cuda, logger)
                                   if bytes(plan) in plans else None)

    backend = SimpleNamespace(trt=EmulatedTensorRT(), label=f"{real.label} runtime emulated on the CPU interpreter")
    monkeypatch.setattr(runtime, "get_backend", lambda name=None: backend)
    return cuda, plans


@pytest.fixture
def loaded(emulated, classifier):
    """(cuda emulation, a runner of the classifier on its own stream, images, the interpreter's logits)."""
    cuda, plans = emulated
    built, images, want = classifier
    plans[b"a"] = built
    return cuda, tv.EngineRunner(b"a"), images, want


def _network(outputs="logits"):
    return tv.build_network("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=False, max_batch=4,
                            image_size=64, outputs=outputs)


@pytest.fixture(scope="module")
def classifier():
    built = _network()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return built, images, tv.interpret(built, images).numpy()


def _on_device(cuda, host, stream):
    """Device memory whose content is written by a copy queued on ``stream`` (not run yet)."""
    host = np.ascontiguousarray(host)
    device = arrays.DeviceArray(host.shape, host.dtype)
    cuda.copy(device.ptr, host.ctypes.data, host.nbytes, stream)
    device.source = host  # the copy reads it later
    return device


def test_numpy_and_cpu_torch_in_kind_out(loaded):
    cuda, runner, images, want = loaded
    assert runner.describe()["device"] == "Emulated GPU (cuda:0)" and runner.batch_range == (1, 4)
    out = runner(images.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (3, 1000) and np.array_equal(out, want)
    first, allocations = out, cuda.allocations
    copies = [c for c in cuda.calls if c[0] == "copy"]
    assert copies == [("copy", "H2D", 3 * 3 * 64 * 64 * 4, runner.stream),
                      ("copy", "D2H", 3 * 1000 * 4, runner.stream)]
    assert np.array_equal(runner(images.numpy().astype(np.float64)), want)  # converted while staged
    small = runner(images[:1].numpy())  # a smaller batch through the same staging buffers
    assert np.array_equal(small, tv.interpret(runner.engine.built, images[:1]).numpy())
    out = runner(images)
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(want))
    buffer = np.zeros((3, 1000), np.float32)
    assert runner(images.numpy(), out=buffer) is buffer and np.array_equal(buffer, want)
    assert len(cuda.pinned_memory) == 2 and cuda.allocations == allocations  # staging made once, no allocation per call
    runner(np.zeros((3, 3, 64, 64), np.float32))
    assert np.array_equal(first, want)  # results are the caller's: later calls do not overwrite them
    with pytest.raises(tv.EngineError, match=r"out must be a C-contiguous float32 array of shape \(3, 1000\)"):
        runner(images.numpy(), out=np.zeros((2, 1000), np.float32))
    readonly = np.zeros((3, 1000), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(tv.EngineError, match=r"out is read-only \(numpy"):
        runner(images.numpy(), out=readonly)
    with pytest.raises(tv.EngineError, match="batch size 5 is outside the engine's profile: it accepts 1..4"):
        runner(np.zeros((5, 3, 64, 64), np.float32))
    with runner:  # closing releases the staging buffers and the runner's own stream
        pass
    assert not cuda.pinned_memory and runner._own_stream is None
    with pytest.raises(tv.EngineError, match="the runner is closed"):
        runner(images.numpy())


def test_device_arrays_in_place_with_the_producers_stream_waited_for(loaded):
    cuda, runner, images, want = loaded
    producer = cuda.new_stream()
    device = _on_device(cuda, images.numpy(), producer)  # only a wait on `producer` makes it land
    out = runner(Produced(device.ptr, device.shape, stream=producer))
    assert isinstance(out, arrays.DeviceArray) and out.shape == (3, 1000)
    assert ("wait", producer, runner.stream) in cuda.calls
    # Own stream: the host is not blocked; the result names the stream its writes are on.
    assert ("synchronize", runner.stream) not in cuda.calls and runner.engine.executions == 0
    assert out.__cuda_array_interface__["stream"] == runner.stream
    assert np.array_equal(out.copy_to_host(), want)
    assert not [c for c in cuda.calls if c[:2] == ("copy", "H2D") and c[3] == runner.stream]  # no staging copy
    target = arrays.DeviceArray((3, 1000), np.float32)
    assert runner(device, out=target) is target and np.array_equal(target.copy_to_host(), want)
    foreign = Produced(target.ptr, target.shape)  # an out= whose consumer's stream is unknown: the host waits
    runner(device, out=foreign)
    assert cuda.queues[runner.stream].ops == []
    runner.close()  # results that named the runner's stream are complete, and name none now
    assert out.__cuda_array_interface__["stream"] is None and target.__cuda_array_interface__["stream"] is None
    runner = tv.EngineRunner(b"a")
    host = images.numpy()
    with pytest.raises(tv.EngineError, match=r"images cannot be used as an array \(CUDAError: CUDA_ERROR_INVALID_"):
        runner(Produced(host.ctypes.data, host.shape))
    with pytest.raises(tv.EngineError, match="stream 0, which the interface forbids"):
        runner(Produced(device.ptr, device.shape, stream=0))
    with pytest.raises(tv.EngineError, match=r"out is read-only \(cuda"):
        runner(device, out=Produced(target.ptr, target.shape, readonly=True))


def test_a_callers_stream_is_not_waited_for_and_results_name_it(emulated, classifier):
    cuda, plans = emulated
    built, images, want = classifier
    plans[b"a"] = built
    mine = cuda.new_stream()
    runner = tv.EngineRunner(b"a", stream=mine)
    assert runner.stream == mine and runner.describe()["stream"] == "caller's"
    device = arrays.DeviceArray.from_host(images.numpy())
    out = runner(device)
    assert runner.engine.executions == 0 and ("synchronize", mine) not in cuda.calls  # queued, not run
    # The result names the stream its writes are queued on, so a consumer orders itself after them.
    assert out.__cuda_array_interface__["stream"] == mine
    consumer = cuda.new_stream()
    arrays.view_array(out, "logits", consumer)
    cuda.synchronize(consumer)
    assert np.array_equal(numpy_at(out.ptr, out.shape), want)
    assert np.array_equal(runner(images.numpy()), want)  # numpy results are complete on return
    other = cuda.new_stream()
    runner(device, stream=SimpleNamespace(cuda_stream=other))  # a torch-like stream for one call
    assert cuda.queues[other].ops


def test_one_context_on_two_streams_is_ordered(loaded):
    cuda, runner, images, want = loaded
    a, b = cuda.new_stream(), cuda.new_stream()
    x = arrays.DeviceArray.from_host(images.numpy())
    y = arrays.DeviceArray.from_host(images.numpy()[::-1].copy())
    out_a, out_b = runner(x, stream=a), runner(y, stream=b)
    cuda.synchronize(b)
    cuda.synchronize(a)
    assert np.array_equal(numpy_at(out_b.ptr, out_b.shape), want[::-1])  # NaN: the workspace was shared
    assert np.array_equal(numpy_at(out_a.ptr, out_a.shape), want)
    assert runner.context.races == [] and ("wait", a, b) in cuda.calls  # b waited for the event after a's call


def test_out_is_written_only_after_its_producer_is_done_with_it(loaded):
    cuda, runner, images, want = loaded
    sentinel = np.full((3, 1000), 7.0, np.float32)
    target = arrays.DeviceArray.from_host(sentinel)
    snapshot = arrays.DeviceArray((3, 1000), np.float32)
    producer = cuda.new_stream()
    cuda.copy(snapshot.ptr, target.ptr, sentinel.nbytes, producer)  # the producer still reads out
    out = Produced(target.ptr, target.shape, stream=producer)
    assert runner(arrays.DeviceArray.from_host(images.numpy()), out=out) is out
    cuda.synchronize(producer)
    assert np.array_equal(numpy_at(snapshot.ptr, snapshot.shape), sentinel)  # read before it was overwritten
    assert np.array_equal(numpy_at(target.ptr, target.shape), want)


def test_dlpack_arrays_through_the_library(loaded):
    cuda, runner, images, want = loaded
    producer = cuda.new_stream()
    device = _on_device(cuda, images.numpy(), producer)
    dl_images = ProducedDLPack(cuda, device.ptr, device.shape, stream=producer)
    target = arrays.DeviceArray((3, 1000), np.float32)
    dl_out = ProducedDLPack(cuda, target.ptr, target.shape)
    assert runner(dl_images, out=dl_out) is dl_out  # the array itself, not (array, capsule)
    assert np.array_equal(numpy_at(target.ptr, target.shape), want)
    # cuda.core asked for a versioned capsule, for the runner's stream (the producer ordered itself before it).
    assert dl_images.requests[-1]["stream"] == runner.stream and dl_images.requests[-1]["max_version"] >= (1, 0)
    assert ("wait", producer, runner.stream) in cuda.calls
    with pytest.raises(tv.EngineError, match=r"out is read-only \(cuda"):  # the versioned capsule's read-only flag
        runner(dl_images, out=ProducedDLPack(cuda, target.ptr, target.shape, readonly=True))
    out = runner(dl_images)
    assert isinstance(out, arrays.DeviceArray) and np.array_equal(out.copy_to_host(), want)


def test_tensorrts_refusal_of_an_address_is_reported(emulated, classifier):
    cuda, plans = emulated
    built, images, _ = classifier
    plans[b"a"] = built
    runner = tv.EngineRunner(b"a")
    logger = runner._logger
    severity = runner.backend.trt.ILogger.Severity.ERROR
    runner.context.set_tensor_address = lambda name, ptr: logger.log(severity, f"{name}: misaligned") or False
    with pytest.raises(tv.EngineError, match=r"TensorRT refused the address of images \(0x[0-9a-f]+\): "
                                             r"images: misaligned"):
        runner(arrays.DeviceArray.from_host(images.numpy()))
    assert runner.engine.executions == 0


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
    with pytest.raises(arrays.CudaError, match="CUDA_ERROR_INVALID_DEVICE"):  # what the CLI reports in one line
        arrays.create_stream(3)


def test_a_driver_too_old_for_the_bindings_names_the_extra(emulated, monkeypatch):
    import cuda.bindings

    monkeypatch.setattr(arrays, "_driver_version", lambda: 12040)
    monkeypatch.setattr(cuda.bindings, "__version__", "13.4.4")
    with pytest.raises(tv.EngineError, match=r"the NVIDIA driver supports CUDA 12\.4, and the installed cuda-bindings "
                                             r"13\.4\.4 needs a CUDA 13 driver \(580 or newer\): update the driver, "
                                             r"or pip install 'trtvit_native\[runtime-cu12\]'"):
        tv.EngineRunner(b"unknown")
    assert arrays.driver_mismatch(13000, "13.0.1") is None and arrays.driver_mismatch(12080, "12.9.2") is None


def test_trtvit_run_times_an_engine_file(emulated, classifier, tmp_path, capsys):
    from trtvit_native.cli import main

    cuda, plans = emulated
    built, _, _ = classifier
    plans[b"engine bytes"] = built
    (tmp_path / "a.engine").write_bytes(b"engine bytes")
    assert main(["run", str(tmp_path / "a.engine"), "--batch", "1", "--batch", "4", "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    assert "batch 1..4, images 3x64x64" in out and "Emulated GPU (cuda:0)" in out
    # The emulation's clock: 0.5 ms per image of an execution.
    assert "batch    1: median    0.500 ms" in out and "batch    4: median    2.000 ms" in out
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
            v = numpy_at(x, (rows, d), t).astype(np.float64)
            if residual:
                total = (v + numpy_at(residual, (rows, d), t)).astype(t)
                numpy_at(sum_out, (rows, d), t)[...] = total
                v = total.astype(np.float64)
            norm = (v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, keepdims=True) + eps)
            numpy_at(y, (rows, d), t)[...] = norm * numpy_at(gamma, (d,), t) + numpy_at(beta, (d,), t)

        self.cuda.enqueue(int(stream), run)

    def attention(self, qkv, out, b, n, heads, head_dim, scale, dtype, stream):
        self.launches.append(("attention", b, n, heads, head_dim, int(stream)))
        t = self._dtype(dtype)

        def run():
            q, k, v = numpy_at(qkv, (b, n, 3, heads, head_dim), t).astype(np.float64).transpose(2, 0, 3, 1, 4)
            s = q @ k.swapaxes(-1, -2) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            o = (p / p.sum(-1, keepdims=True)) @ v
            numpy_at(out, (b, n, heads * head_dim), t)[...] = o.transpose(0, 2, 1, 3).reshape(b, n, -1)

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

    producer = cuda.new_stream()
    dx = _on_device(cuda, x, producer)  # x as its producer describes it: ready once `producer` has run
    dw, db = (arrays.DeviceArray.from_host(a) for a in (w, b))
    out = kernels.layernorm(Produced(dx.ptr, dx.shape, stream=producer), dw, db, library=lib)
    # No stream given and no torch or CuPy array first: the legacy stream, passed as such, after the producer.
    assert isinstance(out, arrays.DeviceArray) and lib.launches[-1] == ("layernorm", 6, 24, arrays.LEGACY_STREAM)
    assert ("wait", producer, arrays.LEGACY_STREAM) in cuda.calls
    assert out.__cuda_array_interface__["stream"] == arrays.LEGACY_STREAM  # its writes are still queued there
    consumer = cuda.new_stream()
    arrays.view_array(out, "y", consumer)
    cuda.synchronize(consumer)
    assert np.allclose(numpy_at(out.ptr, out.shape), _layernorm_reference(x, w, b), atol=1e-5)
    given = cuda.new_stream()
    out = kernels.layernorm(Produced(dx.ptr, dx.shape, stream=producer), dw, db, library=lib, stream=given)
    assert lib.launches[-1][-1] == given and out.__cuda_array_interface__["stream"] == given
    cuda.synchronize(given)
    assert np.allclose(numpy_at(out.ptr, out.shape), _layernorm_reference(x, w, b), atol=1e-5)

    qkv = rng.standard_normal((2, 9, 3 * 2 * 32)).astype(np.float16)
    got = kernels.attention(qkv, 2, 32, library=lib)
    q, k, v = qkv.astype(np.float64).reshape(2, 9, 3, 2, 32).transpose(2, 0, 3, 1, 4)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(32)
    want = (np.exp(s) / np.exp(s).sum(-1, keepdims=True)) @ v
    assert got.dtype == np.float16 and got.shape == (2, 9, 64)
    assert np.allclose(got, want.transpose(0, 2, 1, 3).reshape(2, 9, 64), atol=2e-3)
    with pytest.raises(ValueError, match=r"attention: qkv cannot be used as an array \(CUDAError"):
        class HostPointer:
            __cuda_array_interface__ = {"shape": qkv.shape, "typestr": "<f2", "data": (qkv.ctypes.data, False),
                                        "version": 3}
        kernels.attention(HostPointer(), 2, 32, library=lib)


def test_launchers_order_every_input_after_its_producer_on_the_run_stream(emulated):
    from trtvit_native import kernels

    cuda, _ = emulated
    lib = EmulatedKernels(cuda)
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((4, 16), np.float32), rng.standard_normal(16, np.float32), np.zeros(16, np.float32)
    p, q = cuda.new_stream(), cuda.new_stream()
    dx, dw, db = _on_device(cuda, x, p), _on_device(cuda, w, q), arrays.DeviceArray.from_host(b)
    weight = ProducedDLPack(cuda, dw.ptr, dw.shape, stream=q)  # DLPack: told the run stream, it orders itself
    out = kernels.layernorm(Produced(dx.ptr, dx.shape, stream=p), weight, db, library=lib)
    assert np.allclose(out.copy_to_host(), _layernorm_reference(x, w, b), atol=1e-5)
    run = lib.launches[-1][-1]
    assert weight.requests[-1]["stream"] == run and ("wait", q, run) in cuda.calls and ("wait", p, run) in cuda.calls
