"""EngineRunner on a GPU with every array kind and stream kind (``pytest -m gpu``).

Skipped, with the reason, without a CUDA GPU, without cuda-python or a TensorRT module,
or where TensorRT cannot load its own engine on this device. The reference for every
kind is the engine's own result on torch tensors: the kinds must change nothing.
"""

import numpy as np
import pytest
import torch

import trtvit_native as tv
from conftest import CudaArrayOnly, DLPackOnly, engine_backend_or_skip, random_images, reference, runner_or_skip

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
def expected(runner):
    images = random_images(3, seed=4)
    out = runner(images.to(DEV))
    assert isinstance(out, torch.Tensor) and out.device.type == "cuda" and out.shape == (3, 1000)
    return images, out.cpu()


def test_numpy_in_numpy_out(runner, expected):
    images, want = expected
    out = runner(images.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.array_equal(out, want.numpy())
    assert np.array_equal(runner(images.numpy().astype(np.float64)), want.numpy())  # host arrays are converted
    buffer = np.empty((3, 1000), np.float32)
    assert runner(images.numpy(), out=buffer) is buffer and np.array_equal(buffer, want.numpy())


def test_cpu_torch_in_cpu_torch_out(runner, expected):
    images, want = expected
    out = runner(images)
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and torch.equal(out, want)


def test_device_arrays_are_used_in_place_and_answered_in_kind(runner, expected):
    images, want = expected
    on_gpu = images.to(DEV)
    for wrapped in (CudaArrayOnly(on_gpu), DLPackOnly(on_gpu)):
        out = runner(wrapped)
        assert isinstance(out, tv.DeviceArray) and out.shape == (3, 1000)
        assert np.array_equal(out.copy_to_host(), want.numpy())
    buffer = torch.empty(3, 1000, device=DEV)
    assert runner(on_gpu, out=buffer) is buffer and torch.equal(buffer.cpu(), want)


def test_cupy_in_cupy_out(runner, expected):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    images, want = expected
    out = runner(cupy.asarray(images.numpy()))
    assert isinstance(out, cupy.ndarray) and np.array_equal(cupy.asnumpy(out), want.numpy())


def test_caller_streams_of_every_kind(plan, expected):
    from cuda.bindings import runtime as rt

    images, want = expected
    on_gpu = images.to(DEV)
    err, stream = rt.cudaStreamCreate()
    try:
        runner = runner_or_skip(plan, stream=stream)
        out = runner(on_gpu)
        rt.cudaStreamSynchronize(stream)
        assert torch.equal(out.cpu(), want)
        torch_stream = torch.cuda.Stream()
        for given in (int(stream), stream, torch_stream):
            out = runner(on_gpu, stream=given)
            torch.cuda.synchronize()
            assert torch.equal(out.cpu(), want)
        try:
            import cupy
        except ImportError:
            return
        with cupy.cuda.Stream(non_blocking=True) as side:
            out = runner(cupy.asarray(images.numpy()), stream=side)
            side.synchronize()
        assert np.array_equal(cupy.asnumpy(out), want.numpy())
    finally:
        rt.cudaStreamDestroy(stream)


def test_device_errors(runner):
    host = np.zeros((1, 3, 224, 224), np.float32)

    class HostPointer:
        __cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str,
                                    "data": (host.ctypes.data, False), "version": 3}

    with pytest.raises(tv.EngineError, match="images points to host memory"):
        runner(HostPointer())
    with pytest.raises(tv.EngineError, match=r"images is float16 .* the engine takes float32"):
        runner(torch.zeros(1, 3, 224, 224, device=DEV, dtype=torch.float16))
    with pytest.raises(tv.EngineError, match="batch size 5 is outside the engine's profile"):
        runner(torch.zeros(5, 3, 224, 224, device=DEV))
    with pytest.raises(tv.EngineError, match=r"out must be a C-contiguous float32 array of shape \(1, 1000\)"):
        runner(torch.zeros(1, 3, 224, 224, device=DEV), out=torch.empty(2, 1000, device=DEV))
