"""Shared fixtures: reference models, built networks and images, each made once per session."""

from __future__ import annotations

import functools
import hashlib
import os

import numpy as np

import pytest

import trtvit_native as tv

try:
    import torch
except ImportError:  # the kernel library's tests run without torch; the fixtures below need it
    torch = None

# The runtime suite loads the CPU-backed CUDA driver, so it runs in a process of its own
# (tests/test_cpu_driver.py starts it); everywhere else CUDA sees what the machine has.
if not os.environ.get("TRTVIT_CPU_DRIVER"):
    collect_ignore = ["driver"]


@functools.lru_cache(maxsize=None)
def reference(variant: str) -> torch.nn.Module:
    """The seeded (untrained) reference model of a variant."""
    return tv.create_model(variant)


@functools.lru_cache(maxsize=None)
def network(variant: str, fp16: bool, max_batch: int = 4) -> tv.BuiltNetwork:
    """The TensorRT network of a variant with the reference's weights."""
    return tv.build_network(variant, reference(variant).state_dict(), fp16=fp16, max_batch=max_batch)


@functools.lru_cache(maxsize=None)
def _photographs(batch: int, size: int) -> torch.Tensor:
    return tv.photographs(batch, size)


def photographs(batch: int, size: int = 224) -> torch.Tensor:
    """Real photographs shipped with scikit-image, ImageNet-normalized."""
    return _photographs(batch, size).clone()


def random_images(batch: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """I.i.d. Gaussian pixels: the hardest input for the untrained network's numerics."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.fixture
def tmp_weights(tmp_path):
    """A valid trt-vit-a weights file (fp32) and its state dict."""
    state = reference("trt-vit-a").state_dict()
    path = tmp_path / "a.safetensors"
    tv.save_weights(state, path, "trt-vit-a")
    return path, state


# --- for the GPU tests ------------------------------------------------------------------


def engine_backend_or_skip(needs_cuda_python: bool = False) -> "tv.Backend":
    """The TensorRT backend that builds and runs engines here; skips the calling test module
    (with the reason) without a CUDA GPU, without cuda-python where it is needed, or
    without a TensorRT module."""
    import importlib.util

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)
    if needs_cuda_python and importlib.util.find_spec("cuda") is None:
        pytest.skip("cuda.core is not installed (pip install 'trtvit_native[runtime-cu13]', or runtime-cu12)",
                    allow_module_level=True)
    try:
        return tv.get_backend()
    except tv.BackendError as e:
        pytest.skip(f"no TensorRT module to build and run engines: {e}", allow_module_level=True)


def runner_or_skip(plan: bytes, **kwargs) -> "tv.EngineRunner":
    """An EngineRunner of ``plan``; skips, with TensorRT's words, where this TensorRT cannot
    load its own engine on the device at hand (TensorRT-RTX lists compute capabilities)."""
    try:
        return tv.EngineRunner(plan, **kwargs)
    except tv.EngineError as e:
        if "could not deserialize" not in str(e) and "could not create an execution context" not in str(e):
            raise
        pytest.skip(f"engines of {tv.get_backend().label} do not load on {torch.cuda.get_device_name()}: {e}")


class CudaArrayOnly:
    """A device array that exposes only ``__cuda_array_interface__`` (as numba or a C
    extension would)."""

    def __init__(self, t):
        self._t = t
        # torch exports version 2 (no stream), which cuda.core refuses: version 3, naming the
        # stream torch wrote it on (its legacy default stream is 0, which version 3 writes 1).
        stream = torch.cuda.current_stream(t.device).cuda_stream or 1
        self.__cuda_array_interface__ = dict(t.__cuda_array_interface__, version=3, stream=stream)


SLEEP_CYCLES = 200_000_000  # of torch.cuda._sleep: about 0.1 s of GPU time, far longer than a launch


def slow_copy(source: torch.Tensor, stream: "torch.cuda.Stream") -> torch.Tensor:
    """A copy of ``source`` written on ``stream`` behind a long sleep (zeros until then): a
    consumer that does not wait for ``stream`` reads zeros."""
    out = torch.zeros_like(source)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        out.copy_(source)
    out.record_stream(stream)
    return out


class StreamInterface:
    """``t`` exported through the CUDA array interface (version 3) with the stream its
    writes are queued on."""

    def __init__(self, t, stream):
        self._t = t
        self.__cuda_array_interface__ = dict(t.__cuda_array_interface__, version=3,
                                             stream=int(stream.cuda_stream) or 1)


class DLPackOnly:
    """An array that exposes only the DLPack protocol."""

    def __init__(self, t, device=None):
        self._t, self._device = t, device

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__(stream=stream) if stream is not None else self._t.__dlpack__()

    def __dlpack_device__(self):
        return self._device or self._t.__dlpack_device__()


# the attributes of the layer kinds the networks use that define what a layer computes
_FINGERPRINT_ATTRIBUTES = ("kernel", "bias", "weights", "shape", "kernel_size_nd", "stride_nd", "padding_nd",
                           "dilation_nd", "num_groups", "num_output_maps", "first_transpose", "second_transpose",
                           "reshape_dims", "zero_is_placeholder", "axes", "axis", "keep_dims", "op", "operation",
                           "type", "alpha", "beta", "epsilon", "to_type", "window_size_nd", "pooling_type",
                           "average_count_excludes_padding", "compute_precision", "transpose_a", "transpose_b")


def network_fingerprint(built) -> str:
    """SHA-256 of a built network's definition: each layer's name, type, inputs, outputs
    (name, shape, dtype) and the attributes that define what it computes (weights by their
    bytes); independent of the builder's own choices, which make plans differ between builds."""
    from trtvit_native.interpreter import _HANDLERS

    trt = built.backend.trt
    h = hashlib.sha256()
    network = built.network
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        type_name = str(layer.type).split(".")[-1]
        h.update(f"{layer.name}|{type_name}|".encode())
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            h.update(f"in:{None if t is None else t.name}|".encode())
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            h.update(f"out:{t.name}:{tuple(t.shape)}:{str(t.dtype).split('.')[-1]}|".encode())
        if type_name in _HANDLERS:
            layer.__class__ = getattr(trt, _HANDLERS[type_name][0])
        for attr in _FINGERPRINT_ATTRIBUTES:
            try:
                value = getattr(layer, attr)
            except Exception:
                continue
            if isinstance(value, trt.Weights):
                value = value.numpy()
            if isinstance(value, np.ndarray):  # weights: by their bytes (str() would summarize them)
                value = f"{value.dtype}{value.shape}" + hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
            elif hasattr(value, "__len__") and not isinstance(value, str):
                value = tuple(value)
            h.update(f"{attr}={str(value).split('.')[-1]}|".encode())
    return h.hexdigest()
