"""EngineRunner and the kernel launchers on the real cuda.core, over the CPU-backed driver.

Streams are queues that run only when something waits for them, so a runner that reads
results before they are complete, or runs before the stream that produced its input, reads
stale memory; and the driver reports every use of memory that nothing orders (see
``tests/mock_cuda_driver.cpp``). TensorRT's runtime is the CPU interpreter of the network
the engine was built from; its context owns a workspace that each execution writes.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import trtvit_native as tv
from trtvit_native import arrays
from cpu_driver import Produced, ProducedDLPack, in_thread, numpy_at


def _network(outputs="logits"):
    return tv.build_network("trt-vit-a", tv.create_model("trt-vit-a").state_dict(), fp16=False, max_batch=4,
                            image_size=64, outputs=outputs)


@pytest.fixture(scope="module")
def classifier():
    built = _network()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return built, images, tv.interpret(built, images).numpy()


@pytest.fixture
def loaded(plans, classifier):
    """(a runner of the classifier on device 0 and its own stream, images, the interpreter's logits)."""
    built, images, want = classifier
    plans[b"a"] = built
    runner = tv.EngineRunner(b"a", device=0)
    yield runner, images, want
    runner.close()


def _stream(device=0):
    s = arrays.create_stream(device)
    return s, arrays.stream_handle(s)


def _written_on(host, stream, device=0):
    """Device memory allocated and written by a copy queued on ``stream`` (not run yet)."""
    host = np.ascontiguousarray(host)
    with arrays.device_scope(device):
        a = arrays.DeviceArray(host.shape, host.dtype, device, stream)
        arrays.copy_async(a.ptr, host.ctypes.data, host.nbytes, arrays.as_stream(stream), keep=host)
    a.written_on(stream)
    return a


def test_numpy_and_cpu_torch_in_kind_out(loaded, driver):
    runner, images, want = loaded
    assert runner.describe()["device"] == "CPU-backed CUDA device 0 (cuda:0)" and runner.batch_range == (1, 4)
    pinned, blocks = driver.live_pinned(), driver.live_device_blocks(0)
    out = runner(images.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (3, 1000) and np.array_equal(out, want)
    first = out
    staged = driver.live_pinned() - pinned, driver.live_device_blocks(0) - blocks
    assert staged == (2, 2)  # one pinned and one device buffer for the input and for the output
    assert np.array_equal(runner(images.numpy().astype(np.float64)), want)  # converted while staged
    small = runner(images[:1].numpy())  # a smaller batch through the same staging buffers
    assert np.array_equal(small, tv.interpret(runner.engine.built, images[:1]).numpy())
    out = runner(images)
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(want))
    buffer = np.zeros((3, 1000), np.float32)
    assert runner(images.numpy(), out=buffer) is buffer and np.array_equal(buffer, want)
    assert (driver.live_pinned() - pinned, driver.live_device_blocks(0) - blocks) == staged  # made once
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
    assert (driver.live_pinned(), driver.live_device_blocks(0)) == (pinned, blocks) and runner._own_stream is None
    with pytest.raises(tv.EngineError, match="the runner is closed"):
        runner(images.numpy())


def test_device_arrays_in_place_with_the_producers_stream_waited_for(loaded, driver):
    runner, images, want = loaded
    producer, p = _stream()
    device = _written_on(images.numpy(), p)  # only a wait on `producer` makes it land
    out = runner(Produced(device.ptr, device.shape, stream=p))
    assert isinstance(out, arrays.DeviceArray) and out.shape == (3, 1000)
    # Own stream: the host is not blocked; the result names the stream its writes are on.
    assert runner.engine.executions == 0 and driver.pending(runner.stream) > 0
    assert out.__cuda_array_interface__["stream"] == runner.stream
    assert np.array_equal(out.copy_to_host(), want)
    target = arrays.DeviceArray.from_host(np.zeros((3, 1000), np.float32))
    assert runner(device, out=target) is target and np.array_equal(target.copy_to_host(), want)
    foreign = Produced(target.ptr, target.shape)  # an out= whose consumer's stream is unknown: the host waits
    runner(device, out=foreign)
    assert driver.pending(runner.stream) == 0
    runner.close()  # results that named the runner's stream are complete, and name none now
    assert out.__cuda_array_interface__["stream"] is None and target.__cuda_array_interface__["stream"] is None
    runner = tv.EngineRunner(b"a", device=0)
    host = images.numpy()
    with pytest.raises(tv.EngineError, match=r"images cannot be used as an array \(CUDAError: "
                                             r"CUDA_ERROR_INVALID_VALUE"):
        runner(Produced(host.ctypes.data, host.shape, stream=p))  # a host pointer posing as device memory
    with pytest.raises(tv.EngineError, match="stream 0, which the interface forbids"):
        runner(Produced(device.ptr, device.shape, stream=0))
    with pytest.raises(tv.EngineError, match=r"out is read-only \(cuda"):
        runner(device, out=Produced(target.ptr, target.shape, readonly=True))
    runner.close()
    producer.close()


def test_a_callers_stream_is_not_waited_for_and_results_name_it(plans, classifier, driver):
    built, images, want = classifier
    plans[b"a"] = built
    mine, m = _stream()
    runner = tv.EngineRunner(b"a", stream=mine)
    assert runner.stream == m and runner.describe()["stream"] == "caller's"
    device = arrays.DeviceArray.from_host(images.numpy())
    out = runner(device)
    assert runner.engine.executions == 0 and driver.pending(m) > 0  # queued, not run
    assert out.__cuda_array_interface__["stream"] == m  # a consumer orders itself after the writes
    consumer, c = _stream()
    with arrays.device_scope(0):
        copy = arrays.DeviceArray((3, 1000), np.float32, 0, consumer)
        view = arrays.view_array(out, "logits", c)  # the consumer's stream now waits for the writes
        arrays.copy_async(copy.ptr, view.ptr, copy.nbytes, consumer)
    copy.written_on(c)
    assert np.array_equal(copy.copy_to_host(), want)
    assert np.array_equal(runner(images.numpy()), want)  # numpy results are complete on return
    other, o = _stream()
    runner(device, stream=SimpleNamespace(cuda_stream=o))  # a torch-like stream for one call
    assert driver.pending(o) > 0
    other.sync()
    runner.close()


def test_one_context_on_two_streams_is_ordered(loaded, driver):
    runner, images, want = loaded
    (a, _), (b, _) = _stream(), _stream()
    x = arrays.DeviceArray.from_host(images.numpy())
    y = arrays.DeviceArray.from_host(images.numpy()[::-1].copy())
    out_a, out_b = runner(x, stream=a), runner(y, stream=b)  # b waits for the event after a's call
    b.sync()
    a.sync()
    assert np.array_equal(numpy_at(out_b.ptr, out_b.shape), want[::-1])
    assert np.array_equal(numpy_at(out_a.ptr, out_a.shape), want)


def test_a_context_used_on_two_streams_without_order_is_reported(loaded, driver, monkeypatch):
    runner, images, _ = loaded
    (a, _), (b, _) = _stream(), _stream()
    x = arrays.DeviceArray.from_host(images.numpy())
    monkeypatch.setattr(runner, "_order_after_last_call", lambda stream: None)  # planted: no ordering
    runner(x, stream=a)
    runner(x, stream=b)
    broken = driver.violations()
    assert broken and "written on stream" in broken[0] and "nothing orders the two" in broken[0]
    a.sync()
    b.sync()


def test_out_is_written_only_after_its_producer_is_done_with_it(loaded, driver):
    runner, images, want = loaded
    sentinel = np.full((3, 1000), 7.0, np.float32)
    producer, p = _stream()
    target = _written_on(sentinel, p)
    with arrays.device_scope(0):
        snapshot = arrays.DeviceArray((3, 1000), np.float32, 0, producer)
        arrays.copy_async(snapshot.ptr, target.ptr, sentinel.nbytes, producer)  # the producer still reads out
    snapshot.written_on(p)
    out = Produced(target.ptr, target.shape, stream=p)
    assert runner(arrays.DeviceArray.from_host(images.numpy()), out=out) is out
    producer.sync()
    assert np.array_equal(numpy_at(snapshot.ptr, snapshot.shape), sentinel)  # read before it was overwritten
    runner._last.sync()
    assert np.array_equal(numpy_at(target.ptr, target.shape), want)


def test_dlpack_arrays_through_the_library(loaded, driver):
    runner, images, want = loaded
    producer, p = _stream()
    device = _written_on(images.numpy(), p)
    dl_images = ProducedDLPack(device.buffer, device.shape, stream=producer)
    target = arrays.DeviceArray.from_host(np.zeros((3, 1000), np.float32))
    dl_out = ProducedDLPack(target.buffer, target.shape)
    assert runner(dl_images, out=dl_out) is dl_out  # the array itself, not (array, capsule)
    assert np.array_equal(target.copy_to_host(runner.stream), want)
    # cuda.core asked for a versioned capsule, for the runner's stream (the producer ordered itself before it).
    assert dl_images.requests[-1]["stream"] == runner.stream and dl_images.requests[-1]["max_version"] >= (1, 0)
    with pytest.raises(tv.EngineError, match=r"out is read-only \(cuda"):  # the versioned capsule's read-only flag
        runner(dl_images, out=ProducedDLPack(target.buffer, target.shape, readonly=True))
    out = runner(dl_images)
    assert isinstance(out, arrays.DeviceArray) and np.array_equal(out.copy_to_host(), want)


def test_tensorrts_refusal_of_an_address_is_reported(loaded):
    runner, images, _ = loaded
    logger = runner._logger
    severity = runner.backend.trt.ILogger.Severity.ERROR
    runner.context.set_tensor_address = lambda name, ptr: logger.log(severity, f"{name}: misaligned") or False
    with pytest.raises(tv.EngineError, match=r"TensorRT refused the address of images \(0x[0-9a-f]+\): "
                                             r"images: misaligned"):
        runner(arrays.DeviceArray.from_host(images.numpy()))
    assert runner.engine.executions == 0


def test_several_outputs_come_back_by_name(plans):
    built = _network("features")
    plans[b"f"] = built
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    want = tv.interpret(built, images)
    with tv.EngineRunner(b"f") as runner:
        assert runner.output_names == ["stage1", "stage2", "stage3", "stage4"]
        out = runner(images.numpy())
        assert set(out) == set(want)
        for name, value in out.items():
            assert isinstance(value, np.ndarray) and np.array_equal(value, want[name].numpy()), name
        device_out = runner(arrays.DeviceArray.from_host(images.numpy()))
        assert all(np.array_equal(device_out[n].copy_to_host(), want[n].numpy()) for n in want)
        with pytest.raises(tv.EngineError, match="out= is for engines with one output"):
            runner(images.numpy(), out=np.zeros(1, np.float32))


def test_engines_that_do_not_load_and_devices_that_do_not_exist_are_named(plans):
    with pytest.raises(tv.EngineError, match=r"could not deserialize the engine \(7 bytes\) on CPU-backed CUDA "
                                             r"device 0 \(cuda:0\)"):
        tv.EngineRunner(b"unknown", device=0)
    with pytest.raises(tv.EngineError, match=r"device cuda:2 does not exist: CUDA sees 2 device\(s\), cuda:0..cuda:1"):
        tv.EngineRunner(b"unknown", device="cuda:2")
    with pytest.raises(tv.EngineError, match=r"device must be a CUDA device .* got 'cpu'"):
        tv.EngineRunner(b"unknown", device="cpu")
    with pytest.raises(tv.EngineError, match="stream must be an int handle"):
        tv.EngineRunner(b"unknown", stream="fast")
    # cuda.core raises ValueError for an ordinal it does not have: named as CUDA's error.
    with pytest.raises(arrays.CudaError, match=r"CUDA_ERROR_INVALID_DEVICE: device 3 does not exist: CUDA sees 2 "
                                               r"device\(s\), cuda:0..cuda:1"):
        arrays.create_stream(3)


def test_a_driver_failure_is_an_engine_error_naming_the_cuda_error(loaded, driver):
    runner, images, want = loaded
    runner(images.numpy())
    driver.fail_next("cuMemcpyAsync", 719)  # the input's copy to the GPU fails
    with pytest.raises(tv.EngineError, match=r"running the engine on CPU-backed CUDA device 0 \(cuda:0\): "
                                             r"CUDA_ERROR_LAUNCH_FAILED"):
        runner(images.numpy())
    driver.fail_next("cuStreamSynchronize", 700)
    with pytest.raises(arrays.CudaError, match="CUDA_ERROR_ILLEGAL_ADDRESS"):
        arrays.synchronize(runner.stream)
    assert np.array_equal(runner(images.numpy()), want)  # the runner still works
    gone, g = _stream()
    gone.close()
    with pytest.raises(tv.EngineError, match="CUDA_ERROR_INVALID_HANDLE"):
        runner(images.numpy(), stream=g)
    assert any("was used after cuStreamDestroy" in v for v in driver.violations())  # undefined in CUDA: flagged


def test_a_driver_too_old_for_the_bindings_names_the_extra(plans, monkeypatch):
    import cuda.bindings

    monkeypatch.setenv("TRTVIT_MOCK_DRIVER_VERSION", "12040")  # what the driver's cuDriverGetVersion answers
    monkeypatch.setattr(cuda.bindings, "__version__", "13.4.4")
    with pytest.raises(tv.EngineError, match=r"the NVIDIA driver supports CUDA 12\.4, and the installed cuda-bindings "
                                             r"13\.4\.4 needs a CUDA 13 driver \(580 or newer\): update the driver, "
                                             r"or pip install 'trtvit_native\[runtime-cu12\]'"):
        tv.EngineRunner(b"unknown")


def test_trtvit_run_times_an_engine_file(plans, classifier, tmp_path, capsys):
    from trtvit_native.cli import main

    built, _, _ = classifier
    plans[b"engine bytes"] = built
    (tmp_path / "a.engine").write_bytes(b"engine bytes")
    assert main(["run", str(tmp_path / "a.engine"), "--batch", "1", "--batch", "4", "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    assert "batch 1..4, images 3x64x64" in out and "CPU-backed CUDA device 0 (cuda:0)" in out
    # The driver's clock: an execution costs 0.5 ms per image.
    assert "batch    1: median    0.500 ms" in out and "batch    4: median    2.000 ms" in out
    assert main(["run", str(tmp_path / "a.engine"), "--batch", "5"]) == 1
    assert "batch size 5 is outside the engine's profile" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The review's defects, each on the driver
# --------------------------------------------------------------------------------------


def _current_context():
    from cuda.bindings import driver as cu

    err, ctx = cu.cuCtxGetCurrent()
    assert int(err) == 0
    return int(ctx)


def test_a_runner_on_device_1_takes_inputs_while_device_0_is_current_and_from_a_bare_thread(plans, classifier):
    built, images, want = classifier
    plans[b"a"] = built
    runner = tv.EngineRunner(b"a", device=1)
    producer, p = _stream(1)
    x = _written_on(images.numpy(), p, device=1)

    def call_with_device_0_current():
        with arrays.device_scope(0):
            before = _current_context()
            out = runner(Produced(x.ptr, x.shape, stream=p))  # the view's event is made in the runner's context
            logits = out.copy_to_host()
            return logits, before, _current_context()

    logits, before, after = in_thread(call_with_device_0_current)
    assert np.array_equal(logits, want) and before != 0 and after == before  # device 0's context is current again

    def call_from_a_bare_thread():
        out = runner(Produced(x.ptr, x.shape, stream=p))
        return out.copy_to_host(), _current_context()

    logits, ctx = in_thread(call_from_a_bare_thread)
    assert np.array_equal(logits, want) and ctx == 0  # and the thread is left with no context
    with pytest.raises(tv.EngineError, match=r"images is on cuda:1, the runner on cuda:0"):
        with tv.EngineRunner(b"a", device=0) as other:
            other(Produced(x.ptr, x.shape, stream=p))
    runner.close()


def test_a_consumer_on_a_second_stream_may_drop_an_output_it_still_reads(loaded, driver):
    runner, images, want = loaded
    x = arrays.DeviceArray.from_host(images.numpy())
    consumer, c = _stream()
    with arrays.device_scope(0):
        copy = arrays.DeviceArray((3, 1000), np.float32, 0, consumer)
    out = runner(x)
    with arrays.device_scope(0):
        cai = out.__cuda_array_interface__  # the consumer orders its stream after the writes ...
        consumer.wait(arrays.as_stream(cai["stream"]))
        arrays.copy_async(copy.ptr, cai["data"][0], copy.nbytes, consumer)
    out.record_stream(consumer)  # ... says it reads the array there ...
    del out  # ... and drops it while its copy is queued: the free waits for the copy
    runner(x)  # the next call's output may be the same block
    runner._last.sync()
    assert driver.pending(c) > 0  # the runner's stream did not wait for the consumer: only the free does
    copy.written_on(c)
    assert np.array_equal(copy.copy_to_host(), want)
    assert not driver.violations()


def test_a_runner_on_its_own_stream_takes_a_call_on_another_stream_first(plans, classifier, driver):
    built, images, want = classifier
    plans[b"a"] = built
    with tv.EngineRunner(b"a", device=0) as runner:
        other, o = _stream()
        assert np.array_equal(runner(images.numpy(), stream=o), want)  # staging made on the runner's stream


def test_an_empty_device_array_names_the_stream_its_allocation_is_on(driver):
    a = arrays.DeviceArray((3, 4), np.float32, 0)  # on the legacy stream
    assert a.__cuda_array_interface__["stream"] == arrays.LEGACY_STREAM
    consumer, c = _stream()
    with arrays.device_scope(0):
        view = arrays.view_array(a, "a", c)
        host = np.ones((3, 4), np.float32)
        arrays.copy_async(view.ptr, host.ctypes.data, host.nbytes, consumer, keep=host)
    a.written_on(c)
    assert np.array_equal(a.copy_to_host(), host)


def test_a_call_that_fails_midway_leaves_nothing_in_flight(loaded, driver):
    runner, images, want = loaded
    runner.context.fail_next = "out of workspace"
    with pytest.raises(tv.EngineError, match="TensorRT could not run the engine on a batch of 3: out of workspace"):
        runner(images.numpy())  # its input copy was queued before the failure
    assert np.array_equal(runner(images.numpy()[::-1].copy()), want[::-1])  # rewrites the pinned input


def test_close_from_a_bare_thread_or_another_device_frees_everything_in_the_runners_context(plans, classifier, driver):
    built, images, want = classifier
    plans[b"a"] = built
    pinned = driver.live_pinned()
    runner = tv.EngineRunner(b"a", device=1)
    assert np.array_equal(runner(images.numpy()), want)
    assert driver.live_pinned() == pinned + 2
    syncs = driver.legacy_syncs(0), driver.legacy_syncs(1)
    driver.released.clear()
    in_thread(runner.close)  # a thread with no context
    assert driver.live_pinned() == pinned
    assert driver.released == [("context", 1), ("engine", 1)]  # TensorRT's objects went in the runner's context
    runner = tv.EngineRunner(b"a", device=1)
    runner(images.numpy())

    def close_with_device_0_current():
        with arrays.device_scope(0):
            before = _current_context()
            runner.close()
            return before, _current_context()

    before, after = in_thread(close_with_device_0_current)
    assert before != 0 and after == before
    assert driver.live_pinned() == pinned
    # The staging memory is freed after the runner's own stream, not after a legacy stream
    # (which waits for every blocking stream of its device): neither device's is synchronized.
    assert (driver.legacy_syncs(0), driver.legacy_syncs(1)) == syncs


def test_a_host_call_waits_for_its_results_without_spinning_a_core(loaded, driver):
    runner, images, want = loaded
    blocking, spinning = driver.event_syncs(True), driver.event_syncs(False)
    for _ in range(3):
        runner(images.numpy())
    assert driver.event_syncs(True) - blocking == 3 and driver.event_syncs(False) == spinning


# --------------------------------------------------------------------------------------
# The kernel launchers' data flow, with the kernels computed in numpy on the driver
# --------------------------------------------------------------------------------------


class InterpretedKernels:
    """The launchers of KernelLibrary, computing in numpy, queued on the driver's streams."""

    def __init__(self, driver):
        self.driver, self.launches = driver, []

    def _dtype(self, code):
        return np.float32 if code == 0 else np.float16

    def layernorm(self, x, gamma, beta, y, rows, d, eps, dtype, stream):
        self.layernorm_residual(x, None, gamma, beta, None, y, rows, d, eps, dtype, stream)

    def layernorm_residual(self, x, residual, gamma, beta, sum_out, y, rows, d, eps, dtype, stream):
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

        reads = [x, gamma, beta] + ([residual] if residual else [])
        assert self.driver.launch(int(stream), run, reads, [y] + ([sum_out] if residual else [])) == 0

    def attention(self, qkv, out, b, n, heads, head_dim, scale, dtype, stream):
        self.launches.append(("attention", b, n, heads, head_dim, int(stream)))
        t = self._dtype(dtype)

        def run():
            q, k, v = numpy_at(qkv, (b, n, 3, heads, head_dim), t).astype(np.float64).transpose(2, 0, 3, 1, 4)
            s = q @ k.swapaxes(-1, -2) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            o = (p / p.sum(-1, keepdims=True)) @ v
            numpy_at(out, (b, n, heads * head_dim), t)[...] = o.transpose(0, 2, 1, 3).reshape(b, n, -1)

        assert self.driver.launch(int(stream), run, [qkv], [out]) == 0


def _layernorm_reference(x, w, b, eps=1e-5):
    x = x.astype(np.float64)
    return ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b).astype(np.float32)


def test_kernel_launchers_with_host_and_device_arrays(driver):
    from trtvit_native import kernels

    lib = InterpretedKernels(driver)
    rng = np.random.default_rng(0)
    x, r = rng.standard_normal((6, 24), np.float32), rng.standard_normal((6, 24), np.float32)
    w, b = rng.standard_normal(24, np.float32), rng.standard_normal(24, np.float32)
    y = kernels.layernorm(x, w, b, library=lib)  # host arrays: copied in, computed, copied out
    assert isinstance(y, np.ndarray) and np.allclose(y, _layernorm_reference(x, w, b), atol=1e-5)
    total, y = kernels.layernorm(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                 residual=torch.from_numpy(r), library=lib)
    assert isinstance(total, torch.Tensor) and torch.equal(total, torch.from_numpy(x + r))
    assert np.allclose(y.numpy(), _layernorm_reference(x + r, w, b), atol=1e-5)

    producer, p = _stream()
    dx = _written_on(x, p)  # x as its producer describes it: ready once `producer` has run
    dw, db = (arrays.DeviceArray.from_host(a) for a in (w, b))
    out = kernels.layernorm(Produced(dx.ptr, dx.shape, stream=p), dw, db, library=lib)
    # No stream given and no torch or CuPy array first: the legacy stream, after the producer.
    assert isinstance(out, arrays.DeviceArray) and lib.launches[-1] == ("layernorm", 6, 24, arrays.LEGACY_STREAM)
    assert out.__cuda_array_interface__["stream"] == arrays.LEGACY_STREAM  # its writes are still queued there
    assert np.allclose(out.copy_to_host(), _layernorm_reference(x, w, b), atol=1e-5)
    given, g = _stream()
    out = kernels.layernorm(Produced(dx.ptr, dx.shape, stream=p), dw, db, library=lib, stream=given)
    assert lib.launches[-1][-1] == g and out.__cuda_array_interface__["stream"] == g
    assert np.allclose(out.copy_to_host(), _layernorm_reference(x, w, b), atol=1e-5)

    qkv = rng.standard_normal((2, 9, 3 * 2 * 32)).astype(np.float16)
    got = kernels.attention(qkv, 2, 32, library=lib)
    q, k, v = qkv.astype(np.float64).reshape(2, 9, 3, 2, 32).transpose(2, 0, 3, 1, 4)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(32)
    want = (np.exp(s) / np.exp(s).sum(-1, keepdims=True)) @ v
    assert got.dtype == np.float16 and got.shape == (2, 9, 64)
    assert np.allclose(got, want.transpose(0, 2, 1, 3).reshape(2, 9, 64), atol=2e-3)
    with pytest.raises(ValueError, match=r"attention: qkv cannot be used as an array \(CUDAError"):
        kernels.attention(Produced(qkv.ctypes.data, qkv.shape, np.float16), 2, 32, library=lib)


def test_launchers_order_every_input_after_its_producer_on_the_run_stream(driver):
    from trtvit_native import kernels

    lib = InterpretedKernels(driver)
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((4, 16), np.float32), rng.standard_normal(16, np.float32), np.zeros(16, np.float32)
    (_, p), (qs, q) = _stream(), _stream()
    dx, dw, db = _written_on(x, p), _written_on(w, q), arrays.DeviceArray.from_host(b)
    weight = ProducedDLPack(dw.buffer, dw.shape, stream=qs)  # DLPack: told the run stream, it orders itself
    out = kernels.layernorm(Produced(dx.ptr, dx.shape, stream=p), weight, db, library=lib)
    assert np.allclose(out.copy_to_host(), _layernorm_reference(x, w, b), atol=1e-5)
    assert weight.requests[-1]["stream"] == lib.launches[-1][-1]


def test_kernel_launchers_view_device_1_arrays_in_their_context(driver):
    from trtvit_native import kernels

    lib = InterpretedKernels(driver)
    x, w, b = np.ones((2, 8), np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)
    producer, p = _stream(1)
    arrays_1 = [_written_on(a, p, device=1) for a in (x, w, b)]

    def launch():
        with arrays.device_scope(0):  # another device current
            given, g = _stream(1)
            out = kernels.layernorm(*(Produced(a.ptr, a.shape, stream=p) for a in arrays_1), library=lib, stream=g)
            return out.copy_to_host()

    assert np.allclose(in_thread(launch), _layernorm_reference(x, w, b), atol=1e-5)


def test_a_stream_of_another_context_or_device_is_refused_by_name(loaded):
    from cuda.bindings import driver as cu

    runner, images, want = loaded

    def pycuda_style():  # pycuda.autoinit: a context of its own on device 0, and a stream in it
        err, ctx = cu.cuCtxCreate(None, 0, 0)
        assert int(err) == 0
        err, stream = cu.cuStreamCreate(1)
        assert int(err) == 0
        try:
            with pytest.raises(tv.EngineError, match=r"belongs to a CUDA context other than cuda:0's primary context"):
                runner(images.numpy(), stream=int(stream))
            with pytest.raises(tv.EngineError, match=r"other than cuda:0's primary context"):
                tv.EngineRunner(b"a", device=0, stream=int(stream))
        finally:
            cu.cuStreamDestroy(stream)
            cu.cuCtxDestroy(ctx)

    in_thread(pycuda_style)
    other, o = _stream(1)
    with pytest.raises(tv.EngineError, match=r"is a stream of cuda:1, and this work runs on cuda:0"):
        runner(images.numpy(), stream=o)
    assert np.array_equal(runner(images.numpy()), want)


def test_kernel_launchers_run_host_arrays_on_the_given_streams_device_and_name_mixed_devices(driver):
    from trtvit_native import kernels

    lib = InterpretedKernels(driver)
    x, w, b = np.ones((2, 8), np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)
    given, g = _stream(1)
    with arrays.device_scope(0):  # device 0 current, the stream on device 1
        y = kernels.layernorm(x, w, b, library=lib, stream=given)
    assert np.allclose(y, _layernorm_reference(x, w, b), atol=1e-5)
    on_0, on_1 = arrays.DeviceArray.from_host(x, 0), arrays.DeviceArray.from_host(w, 1)
    with pytest.raises(ValueError, match=r"layernorm: the arrays are on several devices \(x on cuda:0, weight on "
                                         r"cuda:1, bias on cuda:1\)"):
        kernels.layernorm(on_0, on_1, arrays.DeviceArray.from_host(b, 1), library=lib)


def test_cuda_cores_own_runtime_errors_are_cuda_errors():
    s, _ = _stream()

    def record_without_a_context():
        with arrays.cuda_errors():
            s.record()  # cuda.core: RuntimeError("Failed to create CUDA event")

    with pytest.raises(arrays.CudaError, match="Failed to create CUDA event"):
        in_thread(record_without_a_context)
    with pytest.raises(RuntimeError, match="not cuda.core's") as raised:
        with arrays.cuda_errors():
            raise RuntimeError("not cuda.core's")
    assert type(raised.value) is RuntimeError  # other RuntimeErrors are left as they are
