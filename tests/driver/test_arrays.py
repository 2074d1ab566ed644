"""The runtime's checks of device arrays, viewed by the real cuda.core on the CPU-backed
driver: the input contract against device images and ``out=``, every kind of view, and
the kernel launchers' checks (no kernel reached)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trtvit_native as tv
from trtvit_native import arrays, kernels
from trtvit_native.arrays import ArrayError, view_array
from trtvit_native.runtime import EngineError, EngineIO


def _device_block(nbytes):
    from cuda.bindings import driver as cu

    with arrays.device_scope(0):
        err, ptr = cu.cuMemAlloc(nbytes)
    assert int(err) == 0, err
    return int(ptr)


DEVICE_PTR = _device_block(4 * 3 * 224 * 224 * 8)


@pytest.fixture(scope="module")
def io():
    built = tv.build_network("trt-vit-a", tv.create_model("trt-vit-a").state_dict(), fp16=True, max_batch=4)
    contract = EngineIO.from_metadata(built.metadata(b"plan"))
    lo, opt, hi = (tuple(s) for s in built.profile.get_shape("images"))  # the range TensorRT was given
    assert (contract.min_shape, contract.opt_shape, contract.max_shape) == (lo, opt, hi)
    return contract


class DLPackOnly:
    """An array that exposes only the DLPack protocol."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__()

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


class FakeDeviceArray:
    """An array in device memory as a CUDA library describes it (no GPU needed to check it)."""

    def __init__(self, shape, typestr="<f4", strides=None, stream=None, ptr=DEVICE_PTR):
        self.shape = tuple(shape)
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                         "version": 3, "strides": strides, "stream": stream}


def test_contract_from_metadata(io):
    assert io.input_name == "images" and io.input_dtype == np.float32
    assert io.min_shape == (1, 3, 224, 224) and io.max_shape == (4, 3, 224, 224)
    assert io.output_names == ("logits",) and io.output_dtypes == (np.float32,)
    with pytest.raises(EngineError, match="engine metadata lacks the input contract"):
        EngineIO.from_metadata({"input": {"name": "images"}})


@pytest.mark.parametrize("images", [
    np.zeros((2, 3, 224, 224), np.float32), np.zeros((4, 3, 224, 224), np.float64),
    np.zeros((1, 3, 224, 224), np.float16), torch.zeros(2, 3, 224, 224), torch.zeros(2, 3, 224, 224).half(),
    FakeDeviceArray((3, 3, 224, 224)),
], ids=["numpy", "numpy-f64", "numpy-f16", "torch-cpu", "torch-cpu-f16", "device"])
def test_accepted_images(io, images):
    view, out = io.check_call(images)
    assert out is None and view.shape == tuple(images.shape)
    assert view.on_device == isinstance(images, FakeDeviceArray)


@pytest.mark.parametrize("images, message", [
    (np.zeros((5, 3, 224, 224), np.float32), r"batch size 5 is outside the engine's profile: it accepts 1\.\.4"),
    (FakeDeviceArray((5, 3, 224, 224)), r"batch size 5 is outside the engine's profile"),
    (np.zeros((2, 1, 224, 224), np.float32), r"images has 1 channels; the engine takes 3"),
    (np.zeros((2, 3, 256, 256), np.float32), r"images are 256x256; the engine was built for 224x224"),
    (np.zeros((3, 224, 224), np.float32), r"images must have 4 dimensions"),
    (np.zeros((2, 3, 224, 224), np.uint8), r"images must hold floating-point pixels .* got uint8"),
    (torch.zeros(2, 3, 224, 224, dtype=torch.int64), r"images must hold floating-point pixels .* got int64"),
    (FakeDeviceArray((2, 3, 224, 224), "<f8"),
     r"images is float64 \(2, 3, 224, 224\) in device memory on cuda:0; the engine takes float32"),
    (FakeDeviceArray((2, 3, 224, 224), "<f2"), r"images is float16 .* the engine takes float32"),
    (FakeDeviceArray((2, 3, 224, 224), strides=(4, 8, 1792, 401408)), r"images in device memory must be C-contiguous"),
    ([[1.0]], r"images must be a numpy array, a CuPy array, a torch tensor, or an object with "
              r"__cuda_array_interface__ or __dlpack__; got builtins.list"),
    (torch.zeros(1, 3, 224, 224, dtype=torch.bfloat16), r"images has dtype bfloat16, which has no numpy equivalent"),
], ids=["batch-host", "batch-device", "channels", "size", "ndim", "uint8", "int64", "device-f64", "device-f16",
        "strided", "list", "bfloat16"])
def test_refused_images_are_named(io, images, message):
    with pytest.raises(EngineError, match=message):
        io.check_call(images)


def test_out_must_be_where_the_images_are(io):
    with pytest.raises(EngineError, match=r"out is host memory \(numpy\) but images are in device memory"):
        io.check_call(FakeDeviceArray((2, 3, 224, 224)), out=np.empty((2, 1000), np.float32))
    with pytest.raises(EngineError, match=r"out is host memory \(torch\) but images are in device memory"):
        io.check_call(FakeDeviceArray((2, 3, 224, 224)), out=torch.empty(2, 1000))
    with pytest.raises(EngineError, match="out is device memory but images are host memory"):
        io.check_call(np.zeros((2, 3, 224, 224), np.float32), out=FakeDeviceArray((2, 1000)))
    with pytest.raises(EngineError, match=r"out must be a C-contiguous float32 array of shape \(2, 1000\), got "
                                          r"float32 \(3, 1000\)"):
        images, out = io.check_call(np.zeros((2, 3, 224, 224), np.float32), out=np.empty((3, 1000), np.float32))
        io.check_out(images, out, (2, 1000))
    with pytest.raises(EngineError, match=r"out must be a C-contiguous float32 array .* got float16"):
        io.check_call(FakeDeviceArray((2, 3, 224, 224)), out=FakeDeviceArray((2, 1000), "<f2"))


def test_views_of_every_kind():
    host = np.ones((2, 3), np.float32)
    view = view_array(DLPackOnly(host), "x")  # a CPU DLPack array is read as numpy (no copy)
    assert view.kind == "numpy" and not view.on_device and np.shares_memory(view.host, host)
    producer, consumer = arrays.create_stream(0), arrays.create_stream(0)
    p, c = arrays.stream_handle(producer), arrays.stream_handle(consumer)
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    with arrays.device_scope(0):
        arrays.copy_async(DEVICE_PTR, values.ctypes.data, values.nbytes, producer, keep=values)  # queued, not run
        device = view_array(FakeDeviceArray((2, 3), stream=p), "x", c)  # the consumer now waits for the producer
        back = np.zeros_like(values)
        arrays.copy_async(back.ctypes.data, device.ptr, back.nbytes, consumer, keep=back)  # pageable: returns when done
    assert np.array_equal(back, values)  # the producer's copy ran first
    assert device.kind == "cuda" and device.on_device and device.device == 0 and device.contiguous
    broken = FakeDeviceArray((2, 3))
    del broken.__cuda_array_interface__["typestr"]
    with pytest.raises(ArrayError, match="x cannot be used as an array"):
        view_array(broken, "x", c)


# --------------------------------------------------------------------------------------
# The kernel launchers' checks (no GPU reached)
# --------------------------------------------------------------------------------------


def test_kernel_launchers_check_their_arrays():
    x, w, b = FakeDeviceArray((4, 8)), FakeDeviceArray((8,)), FakeDeviceArray((8,))
    with pytest.raises(ValueError, match="layernorm: weight is in host memory and x in device memory"):
        kernels.layernorm(x, np.ones(8, np.float32), b)
    with pytest.raises(ValueError, match="layernorm: bias has dtype float16, x float32"):
        kernels.layernorm(x, w, FakeDeviceArray((8,), "<f2"))
    with pytest.raises(ValueError, match="layernorm: dtype float64 of x is not supported"):
        kernels.layernorm(np.zeros((4, 8)), np.ones(8), np.zeros(8))
    with pytest.raises(ValueError, match="layernorm: weight and bias need 8 values, got 7 and 8"):
        kernels.layernorm(x, FakeDeviceArray((7,)), b)
    with pytest.raises(ValueError, match="layernorm: x must be contiguous"):
        kernels.layernorm(FakeDeviceArray((4, 8), strides=(4, 16)), w, b)
    with pytest.raises(ValueError, match=r"attention: qkv must have shape \(B, N, 96\)"):
        kernels.attention(FakeDeviceArray((1, 8, 95), "<f2"), 1, 32)
    with pytest.raises(ValueError, match="attention: qkv must be a numpy array, a CuPy array"):
        kernels.attention("qkv", 1, 32)
    with pytest.raises(ValueError, match="stream must be an int handle"):
        kernels.attention(FakeDeviceArray((1, 8, 96), "<f2"), 1, 32, stream="default")


