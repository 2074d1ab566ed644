"""EngineRunner on a GPU with every array kind and stream kind (``pytest -m gpu``).

Skipped, with the reason, without a CUDA GPU, without cuda.core or a TensorRT module, or
where TensorRT cannot load its own engine on this device. Every result is compared with
the PyTorch reference on the same GPU (``GPU_TOLERANCES`` of the fp16 engine). Producers
are slow: their writes are queued on a side stream behind ``torch.cuda._sleep``, so a
missing wait reads the buffer before it is written and gives a wrong result.
"""

import numpy as np
import pytest
import torch

import trtvit_native as tv
from trtvit_native import arrays
from trtvit_native.runtime import GPU_TOLERANCES, exact_fp32
from cpu_driver import in_thread
from conftest import (SLEEP_CYCLES, CudaArrayOnly, DLPackOnly, StreamInterface, engine_backend_or_skip, random_images,
                      reference, runner_or_skip, slow_copy)

pytestmark = pytest.mark.gpu

BACKEND = engine_backend_or_skip(needs_cuda_python=True)

DEV = torch.device("cuda")


@pytest.fixture(scope="module")
def plan():
    return tv.build_engine("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=True, max_batch=4)


@pytest.fixture(scope="module")
def runner(plan):
    return runner_or_skip(plan)


@pytest.fixture(scope="module")
def expected():
    """The images and the fp32 PyTorch reference's logits, on the CPU."""
    images = random_images(3, seed=4)
    with torch.no_grad(), exact_fp32():
        want = reference("trt-vit-a").to(DEV).eval()(images.to(DEV)).cpu()
    return images, want


def assert_reference(out, want):
    """``out`` (any kind) against the reference within the fp16 engine's tolerances."""
    if isinstance(out, arrays.DeviceArray):
        out = out.copy_to_host()
    out = torch.as_tensor(np.asarray(out) if isinstance(out, np.ndarray) else out).float().cpu()
    tol = GPU_TOLERANCES["fp16"]
    rel = ((out - want).abs().max() / want.abs().max()).item()
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0).item()
    assert rel <= tol["rel"] and cosine >= tol["cosine"], (rel, cosine)


def test_numpy_in_numpy_out(runner, expected):
    images, want = expected
    out = runner(images.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert_reference(out, want)
    assert_reference(runner(images.numpy().astype(np.float64)), want)  # host arrays are converted
    buffer = np.empty((3, 1000), np.float32)
    assert runner(images.numpy(), out=buffer) is buffer
    assert_reference(buffer, want)


def test_cpu_torch_in_cpu_torch_out(runner, expected):
    images, want = expected
    out = runner(images)
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu"
    assert_reference(out, want)


def test_device_arrays_from_slow_producers(runner, expected):
    images, want = expected
    on_gpu = images.to(DEV)
    side = torch.cuda.Stream()
    # torch through DLPack: torch orders its current stream (the producer's) before the runner's.
    x = slow_copy(on_gpu, side)
    with torch.cuda.stream(side):
        out = runner(x)
    assert isinstance(out, torch.Tensor)
    torch.cuda.synchronize()
    assert_reference(out, want)
    # The array interface's stream, and DLPack of a wrapper, from the side stream.
    x = slow_copy(on_gpu, side)
    out = runner(StreamInterface(x, side))
    assert isinstance(out, tv.DeviceArray)
    assert_reference(out, want)
    x = slow_copy(on_gpu, side)
    with torch.cuda.stream(side):
        out = runner(DLPackOnly(x))
    assert_reference(out, want)
    out = runner(CudaArrayOnly(on_gpu))
    assert_reference(out, want)


def test_out_is_not_overwritten_while_its_producer_reads_it(runner, expected):
    images, want = expected
    on_gpu = images.to(DEV)
    side = torch.cuda.Stream()
    buffer = torch.full((3, 1000), 7.0, device=DEV)
    snapshot = torch.zeros_like(buffer)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        snapshot.copy_(buffer)  # the producer still reads out
    out = StreamInterface(buffer, side)
    assert runner(on_gpu, out=out) is out
    torch.cuda.synchronize()
    assert torch.equal(snapshot, torch.full_like(snapshot, 7.0))
    assert_reference(buffer, want)
    target = torch.empty(3, 1000, device=DEV)
    assert runner(DLPackOnly(on_gpu), out=DLPackOnly(target)).__class__ is DLPackOnly  # the array, not a tuple


def test_caller_streams_of_every_kind_and_one_context_across_them(plan, expected):
    import cuda.core

    images, want = expected
    on_gpu = images.to(DEV)
    stream = cuda.core.Device().create_stream()
    runner = runner_or_skip(plan, stream=stream)
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(a):
        torch.cuda._sleep(SLEEP_CYCLES)  # the first call waits behind this; the second must wait for the first
    out_a = runner(CudaArrayOnly(on_gpu), stream=a)
    out_b = runner(CudaArrayOnly(on_gpu.flip(0).contiguous()), stream=b)
    # The results name the streams their writes are on: viewing them for the current stream waits.
    for out in (out_a, out_b):
        assert out.__cuda_array_interface__["stream"] in (a.cuda_stream, b.cuda_stream)
        arrays.view_array(out, "logits", torch.cuda.current_stream().cuda_stream)
    got_a = torch.as_tensor(out_a, device=DEV).clone()
    got_b = torch.as_tensor(out_b, device=DEV).clone()
    torch.cuda.current_stream().synchronize()
    assert_reference(got_a, want)
    assert_reference(got_b.flip(0), want)
    for given in (stream, int(stream.handle), stream.handle, torch.cuda.Stream()):
        out = runner(on_gpu, stream=given)
        arrays.as_stream(given).sync()
        assert_reference(out, want)
    try:
        import cupy
    except ImportError:
        return
    with cupy.cuda.Stream(non_blocking=True) as side:
        out = runner(cupy.asarray(images.numpy()), stream=side)
        side.synchronize()
    assert_reference(cupy.asnumpy(out), want)


def test_device_errors(runner):
    host = np.zeros((1, 3, 224, 224), np.float32)

    class HostPointer:
        __cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str,
                                    "data": (host.ctypes.data, False), "version": 3}

    with pytest.raises(tv.EngineError, match="images cannot be used as an array"):
        runner(HostPointer())
    with pytest.raises(tv.EngineError, match=r"images is float16 .* the engine takes float32"):
        runner(torch.zeros(1, 3, 224, 224, device=DEV, dtype=torch.float16))
    with pytest.raises(tv.EngineError, match="batch size 5 is outside the engine's profile"):
        runner(torch.zeros(5, 3, 224, 224, device=DEV))
    with pytest.raises(tv.EngineError, match=r"out must be a C-contiguous float32 array of shape \(1, 1000\)"):
        runner(torch.zeros(1, 3, 224, 224, device=DEV), out=torch.empty(2, 1000, device=DEV))
    if torch.cuda.device_count() > 1:  # a tensor on another GPU: the error names it, no raw BufferError
        with pytest.raises(tv.EngineError, match="images"):
            runner(torch.zeros(1, 3, 224, 224, device="cuda:1"))


# The scenarios of tests/driver/test_runner.py on the GPU's one device (gpu_checks.sh step
# runtime_streams), against the PyTorch reference.


def test_stream_a_consumer_on_a_second_stream_drops_an_output_it_still_reads(runner, expected):
    images, want = expected
    x = arrays.DeviceArray.from_host(images.numpy())
    side = torch.cuda.Stream()
    copies = []
    for _ in range(3):
        out = runner(x)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            arrays.view_array(out, "logits", side.cuda_stream)  # the side stream waits for the writes
            torch.cuda._sleep(SLEEP_CYCLES)  # the consumer is slow ...
            copies.append(torch.as_tensor(out, device=DEV).clone())
        out.record_stream(side.cuda_stream)
        del out  # ... and drops the output while its copy is queued; the next call may reuse the block
    torch.cuda.synchronize()
    for got in copies:
        assert_reference(got, want)


def test_stream_a_call_that_fails_midway_is_followed_by_a_good_one(runner, expected, monkeypatch):
    images, want = expected
    monkeypatch.setattr(runner.context, "execute_async_v3", lambda stream: False)  # after the input copy
    with pytest.raises(tv.EngineError, match="TensorRT could not run the engine"):
        runner(images.numpy())
    monkeypatch.undo()
    assert_reference(runner(images.numpy()), want)


def test_stream_a_runner_used_and_closed_from_a_thread_without_context(plan, expected):
    from cuda.bindings import driver as cu

    images, want = expected

    def work():
        r = runner_or_skip(plan, device=0)
        out = r(images.numpy())
        r.close()
        return out, int(cu.cuCtxGetCurrent()[1])

    out, ctx = in_thread(work)
    assert_reference(out, want)
    assert ctx == 0  # the thread is left without a context


def test_stream_a_device_cuda_does_not_have_is_a_cuda_error():
    count = arrays.device_count()
    with pytest.raises(arrays.CudaError, match=rf"CUDA_ERROR_INVALID_DEVICE: device {count} does not exist"):
        arrays.create_stream(count)
    with pytest.raises(tv.EngineError, match=rf"device cuda:{count} does not exist"):
        tv.EngineRunner(b"plan", device=count)
