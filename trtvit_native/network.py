"""TRT-ViT as a TensorRT network, built layer by layer with the network-definition API.

One small function per block adds its layers and names every one after the reference
module path it computes (``stages.2.5.conv2``, ``stages.3.1.transformer.attn``, ...), so a
parity failure can be traced to one layer. BatchNorm is folded into the preceding
convolution here, at build time.

Precision: the network is strongly typed. With ``fp16`` the images are cast to fp16 at
the input, weights are fp16 constants and every tensor is fp16, except LayerNorm and
softmax, which run in fp32 between casts. The engine's I/O is fp32 in both modes:
``images`` (B, 3, S, S) and ``logits`` (B, num_classes).

Quantized weights files (``trtvit quantize``) add explicit quantization: an
``IQuantizeLayer`` / ``IDequantizeLayer`` pair wherever the reference's ModelOpt quantizers
quantize (see :func:`qdq`), int8 or fp8, with fp32 scales; between the pairs the network
stays fp16 or fp32, strongly typed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .backend import Backend, BackendError, CollectingLogger, get_backend
from .variants import BN_EPS, LN_EPS, PREPROCESSING, VariantConfig
from .weights import (Quantization, WeightsError, is_quantized, load_arrays, load_quantization, resolve_config,
                      trained_image_size, validate_arrays)

__all__ = ["BuiltNetwork", "BuildError", "build_network", "build_engine", "INPUT_NAME", "OUTPUT_NAME",
           "STAGE_OUTPUTS", "OUTPUT_NAMES", "MAX_BATCH_LIMIT", "image_hw", "resolve_outputs"]

INPUT_NAME = "images"
# ENGINE.json's format: 2 has ``compute_precision`` as a dict per layer kind (1: one string)
ENGINE_METADATA_FORMAT = "trtvit-engine-metadata/2"
OUTPUT_NAME = "logits"
STAGE_OUTPUTS = ("stage1", "stage2", "stage3", "stage4")  # strides 4, 8, 16, 32
OUTPUT_NAMES = STAGE_OUTPUTS + (OUTPUT_NAME,)


def output_stride(name: str) -> Optional[int]:
    """Input pixels per output pixel of a stage output (4, 8, 16, 32); None for the logits."""
    return None if name == OUTPUT_NAME else 4 * 2 ** STAGE_OUTPUTS.index(name)

MAX_BATCH_LIMIT = 4096
# Native attention: MatMul-SoftMax-MatMul with an fp32 softmax, or the backend's fused
# attention layer (IAttention, INetworkDefinition.add_attention).
ATTENTION_KINDS = ("matmul", "fused")

log = logging.getLogger("trtvit_native")

WeightsArg = Union[None, str, "os.PathLike[str]", Mapping[str, Any]]  # Any: torch.Tensor or np.ndarray


class BuildError(RuntimeError):
    """TensorRT refused the network or the build; the message carries TensorRT's errors."""


@dataclass
class BuiltNetwork:
    """A TensorRT network definition ready to build, and what it was made from.

    Holds the builder, the network and the builder config, plus the numpy arrays whose
    memory the network's weights point into (TensorRT does not copy them until build).
    """

    backend: Backend
    builder: Any
    network: Any
    config: Any
    profile: Any
    logger: Any
    variant: VariantConfig
    fp16: bool
    max_batch: int
    image_size: Any  # (H, W): the optimization shape (fixed unless min/max differ)
    num_classes: int
    plugins: bool
    weight_bytes: int
    weights_source: str
    definition_seconds: float
    attention: str = "matmul"  # native attention where the plugins are not used: ATTENTION_KINDS
    min_image_size: Optional[Tuple[int, int]] = None  # (H, W) range of the profile; None: image_size
    max_image_size: Optional[Tuple[int, int]] = None
    outputs: Tuple[str, ...] = (OUTPUT_NAME,)
    quantization: Optional[Quantization] = None  # int8/fp8 Q/DQ where the reference quantizes
    trained_image_size: Optional[int] = None  # what the weights file records, when it does
    _keepalive: List[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.image_size = image_hw(self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)
        self.min_image_size = tuple(self.min_image_size or self.image_size)
        self.max_image_size = tuple(self.max_image_size or self.image_size)

    @property
    def dynamic_size(self) -> bool:
        return self.min_image_size != self.max_image_size

    def output_shape(self, name: str) -> List[int]:
        """(B, C, H, W) of a stage output or (B, classes) of the logits; -1 where dynamic."""
        if name == OUTPUT_NAME:
            return [-1, self.num_classes]
        stride = output_stride(name)
        hw = [-1, -1] if self.dynamic_size else [self.image_size[0] // stride, self.image_size[1] // stride]
        return [-1, self.variant.widths[STAGE_OUTPUTS.index(name)]] + hw

    @property
    def num_layers(self) -> int:
        return self.network.num_layers

    def layer_names(self) -> List[str]:
        return [self.network.get_layer(i).name for i in range(self.network.num_layers)]

    def output_names(self) -> List[str]:
        return [self.network.get_output(i).name for i in range(self.network.num_outputs)]

    @property
    def compute_precision(self) -> str:
        """The dtype of the tensors between quantization pairs: ``fp16`` or ``fp32``."""
        return "fp16" if self.fp16 else "fp32"

    @property
    def precision(self) -> str:
        """The file's quantization (``int8``, ``fp8``: see :class:`~trtvit_native.weights.Quantization`)
        for a quantized network, else its compute precision. What each kind of layer
        computes in is :meth:`layer_precisions`."""
        return self.quantization.precision if self.quantization is not None else self.compute_precision

    def layer_precisions(self) -> Dict[str, str]:
        """What each kind of layer computes in (ENGINE.json ``compute_precision``):
        ``conv`` (convolutions), ``gemm`` (the Transformers' linear layers and the head),
        ``attention`` (the two attention products and softmax), ``norm`` (LayerNorm),
        ``other`` (activations, adds, pooling, reshapes): for convolutions, GEMMs and attention
        ``int8``/``fp8`` where every such layer is quantized, ``mixed (int8, fp16)`` where
        some are; everything else computes in the compute precision (LayerNorm reads a
        quantized input but normalizes in floating point)."""
        compute = self.compute_precision
        out = {"conv": compute, "gemm": compute, "attention": compute, "norm": compute, "other": compute}
        q = self.quantization
        if q is None:
            return out
        from .weights import quantizable_modules

        kinds = {"conv": "conv", "linear": "gemm", "attention": "attention"}
        for kind in ("conv", "gemm", "attention"):  # a LayerNorm's input is quantized, but it computes in floating point
            modules = [m for m, k in quantizable_modules(self.variant, self.num_classes).items() if kinds.get(k) == kind]
            if kind == "gemm":
                modules.append("head")
            site = "q_bmm_quantizer" if kind == "attention" else "input_quantizer"  # a product's first operand
            used = sorted({q.precision_of(f"{m}.{site}") for m in modules if f"{m}.{site}" in q.amax})
            if used:
                everywhere = all(f"{m}.{site}" in q.amax for m in modules)
                out[kind] = used[0] if everywhere and len(used) == 1 else f"mixed ({', '.join(used + [compute])})"
        return out

    def build_serialized(self) -> bytes:
        """Run the TensorRT builder; returns the serialized engine (plan)."""
        self.logger.messages.clear()
        start = time.perf_counter()
        plan = self.builder.build_serialized_network(self.network, self.config)
        if plan is None:
            errors = self.logger.errors() or ["(TensorRT reported no error message)"]
            raise BuildError(f"TensorRT could not build {self.describe()}: " + " | ".join(errors))
        data = bytes(memoryview(plan))
        log.info("built %s with %s in %.2f s: %d bytes", self.describe(), self.backend.label,
                 time.perf_counter() - start, len(data))
        return data

    def metadata(self, plan: bytes) -> Dict[str, Any]:
        """What a pipeline needs to know about the engine ``plan`` built from this network.

        Written next to engine files by ``trtvit build`` (``ENGINE.json``): tensor names,
        dtypes and shapes (-1: dynamic), output strides, the batch and image-size ranges,
        the preprocessing the input expects, how the engine was built, and the plan's
        SHA-256.
        """
        import hashlib

        h, w = (-1, -1) if self.dynamic_size else self.image_size
        outputs = [{"name": n, "dtype": "float32", "shape": self.output_shape(n),
                    "stride": output_stride(n)} for n in self.outputs]
        meta = {
            "format": ENGINE_METADATA_FORMAT,
            "variant": self.variant.name,
            "precision": self.precision,
            "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [-1, 3, h, w], "layout": "NCHW",
                      "preprocessing": dict(PREPROCESSING)},
            "outputs": outputs,
            "batch": {"min": 1, "opt": self.max_batch, "max": self.max_batch},
            "image_size": {"min": list(self.min_image_size), "opt": list(self.image_size),
                           "max": list(self.max_image_size)},
            "trained_image_size": self.trained_image_size,
            "plugins": self.plugins,
            "loads_in": (["Python processes that import trtvit_native (the trtvit plugin creators are Python)"]
                         if self.plugins else ["any process with the same TensorRT version (C++ or Python)"]),
            # a quantized (fp8) attention is built from native layers even where the plugins are used
            "attention": "plugin" if self.plugins and not (self.quantization and self.quantization.attention_modules)
            else self.attention,
            "backend": self.backend.label,
            "weights": self.weights_source,
            "layers": self.num_layers,
            "engine_bytes": len(plan),
            "sha256": hashlib.sha256(plan).hexdigest(),
        }
        meta["compute_precision"] = self.layer_precisions()
        if self.quantization is not None:
            meta["quantization"] = self.quantization.metadata()
        if self.outputs == (OUTPUT_NAME,):
            meta["output"] = {k: v for k, v in outputs[0].items() if k != "stride"}  # the classifier's one output
        return meta

    def describe(self) -> str:
        size = "x".join(map(str, self.image_size))
        if self.dynamic_size:
            size += f" ({'x'.join(map(str, self.min_image_size))}..{'x'.join(map(str, self.max_image_size))})"
        precision = self.compute_precision if self.quantization is None else \
            f"{'+'.join(self.quantization.precisions())} (Q/DQ, {self.compute_precision} between)"
        return (f"{self.variant.name} {precision}, batch 1..{self.max_batch}, {size}, "
                f"plugins {'on' if self.plugins else 'off'}" + ("" if self.plugins else f", {self.attention} attention")
                + ("" if self.outputs == (OUTPUT_NAME,) else f", outputs {','.join(self.outputs)}"))


# --------------------------------------------------------------------------------------
# Layer functions. Each adds TensorRT layers for one reference module and names them.
# --------------------------------------------------------------------------------------


class _Net:
    """Network under construction: the TensorRT objects, weights and the compute dtype."""

    def __init__(self, backend: Backend, network: Any, state: Mapping[str, np.ndarray], fp16: bool,
                 plugins: bool = False, attention: str = "matmul", quantization: Optional[Quantization] = None):
        self.trt = backend.trt
        self.plugins = plugins  # fused CUDA plugins for LayerNorm and attention (full TensorRT only)
        self.attention = attention  # native attention without plugins: one of ATTENTION_KINDS
        self.network = network
        self.state = state
        self.fp16 = fp16
        self.np_dtype = np.float16 if fp16 else np.float32
        self.dtype = self.trt.float16 if fp16 else self.trt.float32
        self.keep: List[np.ndarray] = []
        self.weight_bytes = 0
        self.quant = quantization

    def qtype(self, quantizer: str) -> Any:
        """The TensorRT data type ``quantizer`` quantizes to (int8 or fp8)."""
        return {"int8": self.trt.int8, "fp8": getattr(self.trt, "fp8", None)}[self.quant.precision_of(quantizer)]

    def weights(self, array: np.ndarray, dtype: Optional[type] = None) -> Any:
        # Always a private copy: a view would keep the (memory-mapped) source state alive.
        array = np.array(array, dtype=dtype or self.np_dtype, order="C", copy=True)
        self.keep.append(array)
        self.weight_bytes += array.nbytes
        return self.trt.Weights(array)

    def constant(self, name: str, array: np.ndarray, dtype: Optional[type] = None) -> Any:
        w = self.weights(array, dtype)
        layer = self.network.add_constant(tuple(array.shape), w)
        layer.name = name
        return layer.get_output(0)

    def named(self, layer: Any, name: str) -> Any:
        if layer is None:
            raise BuildError(f"TensorRT refused to create layer {name!r}")
        layer.name = name
        out = layer.get_output(0)
        out.name = name
        return out


def _quantize_dequantize(net: _Net, x: Any, quantizer: str, scale: np.ndarray, axis: Optional[int],
                         name: str) -> Any:
    """``x`` -> IQuantizeLayer -> IDequantizeLayer with ``scale`` (per tensor, or per
    ``axis``); the quantize layer is ``quantizer.quantize``, the dequantize layer ``name``.
    The dequantized tensor has the network's dtype.

    The scale has the type of ``x``: a strongly typed network needs the quantize input and
    its scale in fp16 both, or in fp32 both (ModelOpt's exporter asserts fp16 Q/DQ for an
    fp16 input, or casts it to fp32 around them), and a matmul's two operands' scales of
    one type (TensorRT-RTX refuses others). Activations and linear weights of an fp16 network get fp16 scales, which are
    exact: the quantizer writes their amax so that amax / bound is an fp16 number
    (:func:`trtvit_native.quantization.save_quantized`); weights are constants of the
    network's type with scales rounded to it, their codes checked
    (:func:`_quantized_weight`). So every quantize and dequantize layer has its input,
    scale and output in one type, as TensorRT's operator documentation defines them."""
    half = x.dtype == net.trt.float16
    if half:
        exact = scale.astype(np.float16)
        if not np.array_equal(exact.astype(np.float32), scale.astype(np.float32)):
            raise BuildError(f"{quantizer}: scale {float(scale.reshape(-1)[0])!r} is not an fp16 number, which an "
                             f"fp16 network's quantize layer needs; quantize the weights again with this version")
    s = net.constant(f"{quantizer}.scale", scale, np.float16 if half else np.float32)
    q = net.network.add_quantize(x, s, net.qtype(quantizer))
    if q is None:
        raise BuildError(f"TensorRT refused the quantize layer {quantizer}.quantize")
    if axis is not None:
        q.axis = axis
    net.named(q, f"{quantizer}.quantize")
    dq = net.network.add_dequantize(q.get_output(0), s, net.dtype)
    if dq is None:
        raise BuildError(f"TensorRT refused the dequantize layer {name}")
    if axis is not None:
        dq.axis = axis
    return net.named(dq, name)


def qdq(net: _Net, x: Any, quantizer: str) -> Any:
    """The activation ``x`` quantized and dequantized per tensor where the reference's
    quantizer ``quantizer`` (e.g. ``stem.conv.input_quantizer``) is enabled; else ``x``.

    The dequantize layer carries the quantizer's name, so parity compares it with the
    quantizer's output in the fake-quantized reference. Scale: ``amax / 127`` (int8) or
    ``amax / 448`` (fp8), the reference's scale, typed as the tensor is.
    """
    if net.quant is None or quantizer not in net.quant.amax:
        return x
    return _quantize_dequantize(net, x, quantizer, net.quant.scale(quantizer).reshape(()), None, quantizer)


def _e4m3(v: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest fp8 E4M3 value (ties to even), saturated to +-448."""
    v = np.clip(v, -448.0, 448.0).astype(np.float32)
    _, e = np.frexp(v)  # |v| = m * 2**e, m in [0.5, 1)
    step = np.ldexp(np.float32(1.0), np.maximum(e - 1, -6) - 3).astype(np.float32)  # 3 mantissa bits; subnormals
    return (np.round(v / step) * step).astype(np.float32)  # v / step is exact (a power of two)


def fake_quantized_weight(weight: np.ndarray, amax: np.ndarray, precision: str) -> np.ndarray:
    """The weight as the reference quantizes it, per output channel (axis 0), with
    ModelOpt's fp32 arithmetic, operation for operation: q = round(W * (bound / amax))
    (half to even, saturated to [-128, 127]; fp8: the nearest E4M3 value), dequantized.
    (A last-bit difference in W * (bound / amax) would flip ties: fp8 weights hit them.)"""
    w = weight.astype(np.float32)
    amax = amax.astype(np.float32).reshape((-1,) + (1,) * (w.ndim - 1))
    if precision == "int8":  # ModelOpt: scale = 127 / amax; clamp(round(w * scale)) / scale
        inv = (np.float32(127.0) / amax).astype(np.float32)
        return (np.clip(np.round(w * inv), -128, 127) / inv).astype(np.float32)
    # ModelOpt: scale = 448.0 / amax, which torch computes as (1 / amax) * 448; e4m3(w * scale) * (1 / scale)
    inv = ((np.float32(1.0) / amax).astype(np.float32) * np.float32(448.0)).astype(np.float32)
    return (_e4m3((w * inv).astype(np.float32)) * (np.float32(1.0) / inv).astype(np.float32)).astype(np.float32)


def _weight_codes(weight: np.ndarray, scale: np.ndarray, axis: Optional[int], precision: str) -> np.ndarray:
    """The codes TensorRT's quantize layer gives ``weight`` with ``scale`` (float64 division)."""
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    v = weight.astype(np.float64) / scale.astype(np.float64).reshape(shape)
    return np.clip(np.round(v), -128, 127) if precision == "int8" else _e4m3(v.astype(np.float32))


def _quantized_weight(net: _Net, quantizer: str, weight: np.ndarray, channel_scale: np.ndarray,
                      axis: Optional[int], name: str, dtype: type = np.float32) -> Any:
    """A weight constant (``dtype``), quantized and dequantized per output channel along
    ``axis`` (or per tensor: None) with ``channel_scale`` (fp16 ones rounded to fp16).
    ``weight`` holds the reference's fake-quantized values (:func:`fake_quantized_weight`),
    so TensorRT's quantize layer, which divides by the scale, lands within a few ulps of the
    reference's integers, never near a rounding boundary, and none flips. In fp16 the
    constant and the scale are rounded (2^-11 relative each), which stays under a quarter
    step of int8's 127 and E4M3's 3-bit mantissa, except where fp16 has no such precision
    (subnormal fp16 values, tiny weights): the codes are checked here, and a weight whose
    codes would change is refused, never built wrong."""
    if dtype == np.float16:
        precision = net.quant.precision_of(quantizer)
        scale16 = channel_scale.astype(np.float16)
        scale16 = np.where(scale16 == 0, np.float16(1.0), scale16)  # an all-zero channel: any scale is exact
        intended = _weight_codes(weight, channel_scale, axis, precision)
        got = _weight_codes(weight.astype(np.float16), scale16, axis, precision)
        if not np.array_equal(intended, got):
            raise BuildError(f"{quantizer}: {int((intended != got).sum())} weight code(s) change when the weight "
                             f"and its scale are rounded to fp16 (weights or scales below fp16's normal range); "
                             f"build with --fp32 between the pairs")
        channel_scale = scale16.astype(np.float32)
    const = net.constant(f"{quantizer}.weight", weight, dtype)
    return _quantize_dequantize(net, const, quantizer, channel_scale, axis, name)


def conv_bn(net: _Net, x: Any, name: str, stride: int = 1, layer_name: Optional[str] = None) -> Any:
    """Convolution ``name.conv`` with BatchNorm ``name.bn`` folded into kernel and bias.

    The layer is named ``name`` (the reference's ConvBN module) unless ``layer_name`` says.

    Quantized: the input gets the reference's per-tensor Q/DQ, and the folded kernel a
    per-output-channel Q/DQ whose scale is the reference's weight scale times the channel's
    BatchNorm factor in magnitude. That is exact. The reference quantizes the unfolded
    weight, q = round(W / s) per output channel c, and BatchNorm then multiplies channel c
    of the convolution by f = gamma / sqrt(var + eps), so it computes f * s * q. The
    network quantizes the folded kernel K = f * W with the scale |f| * s:
    round(f * W / (|f| * s)) = round(sign(f) * W / s) = sign(f) * q, because symmetric
    quantization commutes with per-channel scaling by a positive number and rounding to
    nearest even (int8) or to the nearest fp8 value is odd-symmetric, round(-v) = -round(v).
    Dequantized: sign(f) * q * |f| * s = f * s * q, the reference's value. The one asymmetric
    step is int8's saturation to [-128, 127]; it is never reached, since weights are
    calibrated to their per-channel maximum (|W / s| <= 127), and a file where it could be
    reached with a negative f is refused. A channel with f = 0 has K = 0 and keeps scale s.
    """
    w = net.state[f"{name}.conv.weight"].astype(np.float64)
    gamma, beta = net.state[f"{name}.bn.weight"], net.state[f"{name}.bn.bias"]
    mean, var = net.state[f"{name}.bn.running_mean"], net.state[f"{name}.bn.running_var"]
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)
    kernel = w * scale[:, None, None, None]
    bias = beta - mean * scale
    cout, _, kh, kw = w.shape
    x = qdq(net, x, f"{name}.conv.input_quantizer")
    wq = f"{name}.conv.weight_quantizer"
    if net.quant is not None and wq in net.quant.amax:
        s = net.quant.scale(wq).astype(np.float64)
        if net.quant.precision_of(wq) == "int8":
            reach = np.abs(w).reshape(cout, -1).max(axis=1) / s
            bad = np.nonzero((reach > 127.5) & (scale < 0))[0]
            if bad.size:
                raise BuildError(f"{wq}: amax below the weights' maximum in channels {bad[:8].tolist()} with a "
                                 f"negative BatchNorm factor: int8 saturation ([-128, 127]) does not fold exactly")
        folded_scale = np.where(scale == 0, s, s * np.abs(scale))
        exact = fake_quantized_weight(w, net.quant.amax[wq], net.quant.precision_of(wq)).astype(np.float64)
        # fp16 networks: an fp16 kernel with an fp16 scale, the dequantize layer's output type
        kernel_in = _quantized_weight(net, wq, exact * scale[:, None, None, None], folded_scale, 0, f"{wq}.folded",
                                      net.np_dtype)
        layer = net.network.add_convolution_nd(x, cout, (kh, kw), net.trt.Weights(), net.weights(bias))
        layer.set_input(1, kernel_in)
    else:
        layer = net.network.add_convolution_nd(x, cout, (kh, kw), net.weights(kernel), net.weights(bias))
    layer.stride_nd = (stride, stride)
    layer.padding_nd = (kh // 2, kw // 2)
    return net.named(layer, layer_name or name)


def relu(net: _Net, x: Any, name: str) -> Any:
    return net.named(net.network.add_activation(x, net.trt.ActivationType.RELU), name)


def add(net: _Net, a: Any, b: Any, name: str) -> Any:
    return net.named(net.network.add_elementwise(a, b, net.trt.ElementWiseOperation.SUM), name)


def residual_add(net: _Net, branch: Any, residual: Any, module: str, name: Optional[str] = None) -> Any:
    """``branch + residual`` (the reference's :class:`~trtvit_native.model.ResidualAdd`
    ``module``); quantized, ``residual`` gets the module's Q/DQ and ``branch`` stays as
    it is, so TensorRT fuses the add into the layer computing ``branch``."""
    return add(net, branch, qdq(net, residual, f"{module}.input_quantizer"), name or module)


def cast(net: _Net, x: Any, dtype: Any, name: str) -> Any:
    return net.named(net.network.add_cast(x, dtype), name)


def shuffle(net: _Net, x: Any, name: str, first: Optional[Tuple[int, ...]] = None,
            reshape: Optional[Tuple[int, ...]] = None, second: Optional[Tuple[int, ...]] = None) -> Any:
    layer = net.network.add_shuffle(x)
    if first is not None:
        layer.first_transpose = first
    if reshape is not None:
        layer.reshape_dims = reshape  # 0 copies the input dimension (the dynamic batch)
    if second is not None:
        layer.second_transpose = second
    return net.named(layer, name)


def stem(net: _Net, x: Any) -> Any:
    x = conv_bn(net, x, "stem", stride=2, layer_name="stem.conv_bn")
    x = qdq(net, relu(net, x, "stem.relu"), "stem.pool.input_quantizer")
    pool = net.network.add_pooling_nd(x, net.trt.PoolingType.MAX, (3, 3))
    pool.stride_nd = (2, 2)
    pool.padding_nd = (1, 1)
    return net.named(pool, "stem")


def bottleneck(net: _Net, x: Any, name: str, cin: int, cout: int, stride: int) -> Any:
    body = relu(net, conv_bn(net, x, f"{name}.conv1"), f"{name}.relu1")
    body = relu(net, conv_bn(net, body, f"{name}.conv2", stride), f"{name}.relu2")
    body = conv_bn(net, body, f"{name}.conv3")
    short = conv_bn(net, x, f"{name}.shortcut", stride) if (cin != cout or stride != 1) else x
    return relu(net, residual_add(net, body, short, f"{name}.add"), name)


def linear(net: _Net, x: Any, name: str) -> Any:
    """``x @ W^T + b`` on (B, N, in) tokens or (B, in) vectors; W is a (1,) in x out constant."""
    w = net.state[f"{name}.weight"]
    b = net.state[f"{name}.bias"]
    rank = len(x.shape)
    wt = w.T.reshape((1,) * (rank - 2) + w.T.shape)
    x = qdq(net, x, f"{name}.input_quantizer")
    wq = f"{name}.weight_quantizer"
    if net.quant is not None and wq in net.quant.amax:  # per output channel (the last axis of W^T) or tensor
        exact = fake_quantized_weight(w, net.quant.amax[wq], net.quant.precision_of(wq))
        scale = net.quant.scale(wq)
        # in fp16 networks an fp16 weight with an fp16 scale: TensorRT wants a matmul's two
        # operand scales of one type (the weight amax is written fp16-exact for this)
        weight = _quantized_weight(net, wq, exact.T.reshape(wt.shape), scale, rank - 1 if scale.ndim else None,
                                   f"{wq}.transposed", net.np_dtype)
    else:
        weight = net.constant(f"{name}.weight", wt)
    mm = net.network.add_matrix_multiply(x, net.trt.MatrixOperation.NONE, weight, net.trt.MatrixOperation.NONE)
    y = net.named(mm, f"{name}.matmul")
    bias = net.constant(f"{name}.bias", b.reshape((1,) * (rank - 1) + b.shape))
    return add(net, y, bias, name)


def layer_norm(net: _Net, x: Any, name: str) -> Any:
    """LayerNorm over the last axis with fp32 statistics (fp16 tensors cast around it)."""
    x = qdq(net, x, f"{name}.input_quantizer")
    if net.plugins:
        from .trt_plugins import add_layer_norm

        return add_layer_norm(net, x, name, eps=LN_EPS)[0]
    d = net.state[f"{name}.weight"].shape[0]
    f32 = net.trt.float32
    src = cast(net, x, f32, f"{name}.cast_in") if net.fp16 else x
    scale = net.constant(f"{name}.weight", net.state[f"{name}.weight"].reshape(1, 1, d), np.float32)
    bias = net.constant(f"{name}.bias", net.state[f"{name}.bias"].reshape(1, 1, d), np.float32)
    layer = net.network.add_normalization(src, scale, bias, 1 << 2)
    layer.epsilon = LN_EPS
    y = net.named(layer, f"{name}.normalize" if net.fp16 else name)
    return cast(net, y, net.dtype, name) if net.fp16 else y


def attention(net: _Net, qkv: Any, name: str, heads: int, head_dim: int) -> Any:
    """softmax(Q K^T * scale) V from the packed qkv projection (B, N, 3*heads*head_dim).

    Q is scaled before the first product (in both native forms: NVIDIA's guidance, for
    numeric range and so TensorRT can recognize and fuse the pattern). q, k and v are
    (B, heads, N, head_dim); the first product transposes k. MatMul-SoftMax-MatMul
    normalizes the scores in fp32; the fused form is the backend's IAttention layer.
    Quantized (an fp8 file: :data:`~trtvit_native.weights.ATTENTION_QUANTIZERS`), the
    scaled q, k, v and the softmax probabilities each get a Q/DQ pair feeding the product
    directly, the placement of TensorRT's FP8 attention fusion (MatMul form only).
    Output (B, N, heads*head_dim), ready for the proj matmul.
    """
    quantized = net.quant is not None and f"{name}.q_bmm_quantizer" in net.quant.amax
    if net.plugins and not quantized:
        from .trt_plugins import add_attention

        return add_attention(net, qkv, name, heads, head_dim)
    trt = net.trt
    fused = net.attention == "fused"
    if fused and quantized:
        raise BuildError(f"{name}: attention='fused' (the IAttention layer) with an fp8 file's attention quantizers "
                         f"is not implemented (IAttention's normalization quantization); use attention='matmul', the "
                         f"MatMul-SoftMax-MatMul form with a Q/DQ pair on each operand")
    packed = shuffle(net, qkv, f"{name}.unpack", reshape=(0, 0, 3, heads, head_dim))
    parts = []
    for i, part in enumerate("qkv"):
        index = net.constant(f"{name}.{part}_index", np.array(i, dtype=np.int32), np.int32)
        g = net.named(net.network.add_gather(packed, index, 2), f"{name}.{part}")
        parts.append(shuffle(net, g, f"{name}.{part}_heads", first=(0, 2, 1, 3)))  # (B, heads, N, hd)
    q, k, v = parts
    scale = net.constant(f"{name}.scale", np.full((1, 1, 1, 1), head_dim ** -0.5))
    q = net.named(net.network.add_elementwise(q, scale, trt.ElementWiseOperation.PROD), f"{name}.q_scaled")
    q, k, v = (qdq(net, t, f"{name}.{part}_bmm_quantizer") for t, part in zip((q, k, v), "qkv"))
    if fused:
        layer = net.network.add_attention(q, k, v, trt.AttentionNormalizationOp.SOFTMAX, False)
        if layer is None:
            raise BuildError(f"TensorRT refused to create the fused attention layer {name!r}")
        layer.decomposable = True  # primitive layers where the device has no fused kernel
        layer.name = f"{name}.fused"
        context = layer.get_output(0)
        context.name = f"{name}.fused"
        return shuffle(net, context, name, first=(0, 2, 1, 3), reshape=(0, 0, heads * head_dim))
    scores = net.named(net.network.add_matrix_multiply(q, trt.MatrixOperation.NONE, k, trt.MatrixOperation.TRANSPOSE),
                       f"{name}.scores")
    if net.fp16:
        scores = cast(net, scores, trt.float32, f"{name}.scores_fp32")
    sm = net.network.add_softmax(scores)
    sm.axes = 1 << 3
    probs = net.named(sm, f"{name}.softmax")
    if net.fp16:
        probs = cast(net, probs, net.dtype, f"{name}.probs")
    probs = qdq(net, probs, f"{name}.softmax_quantizer")
    context = net.named(net.network.add_matrix_multiply(probs, trt.MatrixOperation.NONE, v, trt.MatrixOperation.NONE),
                        f"{name}.context")
    return shuffle(net, context, name, first=(0, 2, 1, 3), reshape=(0, 0, heads * head_dim))


def transformer(net: _Net, z: Any, name: str, heads: int, head_dim: int) -> Any:
    """Pre-norm block on tokens (B, N, d): z + proj(MHSA(LN1 z)), then z + fc2(GELU(fc1(LN2 z)))."""
    a = attention(net, linear(net, layer_norm(net, z, f"{name}.norm1"), f"{name}.qkv"), f"{name}.attn",
                  heads, head_dim)
    proj = linear(net, a, f"{name}.proj")
    if net.plugins and net.quant is None:  # one kernel: s = z + proj (attention residual), LN2(s)
        from .trt_plugins import add_layer_norm

        normed, z = add_layer_norm(net, z, f"{name}.norm2", residual=proj, sum_name=f"{name}.attn_residual",
                                   eps=LN_EPS)
    else:
        z = residual_add(net, z, proj, f"{name}.attn_residual")
        normed = layer_norm(net, z, f"{name}.norm2")
    h = linear(net, normed, f"{name}.fc1")
    h = net.named(net.network.add_activation(h, net.trt.ActivationType.GELU_ERF), f"{name}.gelu")
    return residual_add(net, z, linear(net, h, f"{name}.fc2"), f"{name}.mlp_residual", name)


def _global_branch(net: _Net, y: Any, name: str, config: VariantConfig, hw: Optional[Tuple[int, int]]) -> Any:
    """The Transformer ``{name}.transformer`` on the map y (B, d, H, W), as tokens (B, H*W, d),
    back to a map. ``hw``: the map's (H, W), or None where the network's spatial size is
    dynamic: then the tokens come from a -1 reshape, and the map from y's shape read at run
    time (a shape tensor), never a constant."""
    d = y.shape[1]
    tokens = shuffle(net, y, f"{name}.to_tokens", reshape=(0, d, -1 if hw is None else hw[0] * hw[1]),
                     second=(0, 2, 1))
    tokens = transformer(net, tokens, f"{name}.transformer", d // config.head_dim, config.head_dim)
    if hw is not None:
        return shuffle(net, tokens, f"{name}.to_map", first=(0, 2, 1), reshape=(0, d, hw[0], hw[1]))
    map_shape = net.named(net.network.add_shape(y), f"{name}.map_shape")
    layer = net.network.add_shuffle(tokens)
    layer.first_transpose = (0, 2, 1)
    layer.set_input(1, map_shape)
    return net.named(layer, f"{name}.to_map")


def _local_branch(net: _Net, y: Any, name: str, channels: int) -> Any:
    """The mix block's BottleNeck on y (d channels) to C - d; with C - d = d, y is its residual."""
    local = relu(net, conv_bn(net, y, f"{name}.conv1"), f"{name}.relu1")
    local = relu(net, conv_bn(net, local, f"{name}.conv2"), f"{name}.relu2")
    local = conv_bn(net, local, f"{name}.conv3")
    if channels - y.shape[1] == y.shape[1]:
        local = relu(net, residual_add(net, local, y, f"{name}.local_add"), f"{name}.local_relu")
    return local


def mixblock(net: _Net, x: Any, name: str, channels: int, config: VariantConfig,
             hw: Optional[Tuple[int, int]]) -> Any:
    """The mix block of ``config.mix_block`` (the reference's MixBlockA/B/C), x + concat(...):

    * A, parallel: t = Transformer(y), b = BottleNeck(y), concat(t, b);
    * B, serial, local then global: b = BottleNeck(y), t = Transformer(b), concat(b, t);
    * C, serial, global then local: t = Transformer(y), b = BottleNeck(t), concat(t, b);

    with y = reduce(x) on d = R*C channels. ``hw`` as in :func:`_global_branch`.
    """
    y = conv_bn(net, x, f"{name}.reduce")
    if config.mix_block == "A":
        parts = [_global_branch(net, y, name, config, hw), _local_branch(net, y, name, channels)]
    elif config.mix_block == "B":
        local = _local_branch(net, y, name, channels)
        parts = [local, _global_branch(net, local, name, config, hw)]
    else:
        t = _global_branch(net, y, name, config, hw)
        parts = [t, _local_branch(net, t, name, channels)]
    cat = net.network.add_concatenation(parts)
    cat.axis = 1
    return residual_add(net, net.named(cat, f"{name}.concat"), x, f"{name}.add", name)


def transformer_block(net: _Net, x: Any, name: str, config: VariantConfig, hw: Optional[Tuple[int, int]]) -> Any:
    """A ``T`` stage's block (MixNetV): x + expand(Transformer(reduce(x))), no activation."""
    t = _global_branch(net, conv_bn(net, x, f"{name}.reduce"), name, config, hw)
    return residual_add(net, conv_bn(net, t, f"{name}.expand"), x, f"{name}.add", name)


def head(net: _Net, x: Any) -> Any:
    pool = net.network.add_reduce(x, net.trt.ReduceOperation.AVG, (1 << 2) | (1 << 3), False)
    return linear(net, net.named(pool, "pool"), "head")


def mark_output(net: _Net, x: Any, name: str) -> None:
    """Mark ``x`` as the network output ``name`` (fp32: fp16 networks cast it)."""
    if net.fp16:
        x = cast(net, x, net.trt.float32, name)
    x.name = name
    net.network.mark_output(x)


def _last_stage(outputs: Tuple[str, ...]) -> int:
    """The last stage (0-based) the network computes for ``outputs``."""
    return 3 if OUTPUT_NAME in outputs else max(STAGE_OUTPUTS.index(o) for o in outputs)


def define_network(net: _Net, config: VariantConfig, image_hw: Tuple[int, int], dynamic: bool,
                   outputs: Tuple[str, ...] = (OUTPUT_NAME,)) -> None:
    """Add the TRT-ViT graph from ``images`` to the requested ``outputs`` (stage1..stage4,
    logits); layers that feed none of them are left out. ``dynamic``: H and W of the input
    are -1, set per call within the optimization profile."""
    trt = net.trt
    h, w = (-1, -1) if dynamic else image_hw
    images = net.network.add_input(INPUT_NAME, trt.float32, (-1, 3, h, w))
    x = cast(net, images, net.dtype, "input_cast") if net.fp16 else images
    x = stem(net, x)
    hw = None if dynamic else (image_hw[0] // 4, image_hw[1] // 4)
    last_stage = _last_stage(outputs)
    blocks = [b for b in config.blocks() if int(b[0].split(".")[1]) <= last_stage]
    for i, (name, kind, cin, cout, stride) in enumerate(blocks):
        if kind == "bottleneck":
            x = bottleneck(net, x, name, cin, cout, stride)
            hw = None if hw is None else (hw[0] // stride, hw[1] // stride)
        elif kind == "transformer":
            x = transformer_block(net, x, name, config, hw)
        else:
            x = mixblock(net, x, name, cout, config, hw)
        stage = int(name.split(".")[1])
        if (i + 1 == len(blocks) or int(blocks[i + 1][0].split(".")[1]) != stage) \
                and STAGE_OUTPUTS[stage] in outputs:
            mark_output(net, x, STAGE_OUTPUTS[stage])
    if OUTPUT_NAME in outputs:
        mark_output(net, head(net, x), OUTPUT_NAME)


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


SizeArg = Union[int, Tuple[int, int], Sequence[int]]


def image_hw(value: Any, what: str = "image_size") -> Tuple[int, int]:
    """An image size, an int (square) or (H, W), as (H, W); both positive multiples of 32."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        hw = tuple(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        hw = (value, value)
    else:
        raise ValueError(f"{what} must be an int or (H, W), got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 32 or v % 32 for v in hw):
        raise ValueError(f"{what} must be a positive multiple of 32 (the network's total stride), or (H, W) of "
                         f"such, got {value!r}")
    return hw  # type: ignore[return-value]


def resolve_outputs(outputs: Any) -> Tuple[str, ...]:
    """``"logits"``, ``"features"`` (stage1..stage4) or names from OUTPUT_NAMES, in network order."""
    if outputs == "logits":
        return (OUTPUT_NAME,)
    if outputs == "features":
        return STAGE_OUTPUTS
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs) if isinstance(outputs, (list, tuple)) else None
    if not names:
        raise ValueError(f"outputs must be 'logits', 'features' or names from {', '.join(OUTPUT_NAMES)}, "
                         f"got {outputs!r}")
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"unknown output {unknown[0]!r}: outputs are 'logits', 'features' or names from "
                         f"{', '.join(OUTPUT_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"outputs name an output twice: {list(names)}")
    return tuple(n for n in OUTPUT_NAMES if n in names)


def _check_arguments(fp16: Any, max_batch: Any, plugins: Any, attention: Any = "matmul") -> None:
    if not isinstance(fp16, bool):
        raise ValueError(f"fp16 must be True or False, got {fp16!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ValueError(f"max_batch must be an integer in 1..{MAX_BATCH_LIMIT}, got {max_batch!r}")
    if plugins not in ("auto", True, False):
        raise ValueError(f"plugins must be 'auto', True or False, got {plugins!r}")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {', '.join(repr(k) for k in ATTENTION_KINDS)}, got {attention!r}")


def _profile_sizes(image_size: Any, min_image_size: Any, max_image_size: Any) -> Tuple[Tuple[int, int], ...]:
    opt = image_hw(image_size)
    low = image_hw(min_image_size, "min_image_size") if min_image_size is not None else opt
    high = image_hw(max_image_size, "max_image_size") if max_image_size is not None else opt
    if not (low[0] <= opt[0] <= high[0] and low[1] <= opt[1] <= high[1]):
        raise ValueError(f"image sizes must satisfy min <= image_size <= max in H and in W, got min "
                         f"{low[0]}x{low[1]}, image_size {opt[0]}x{opt[1]}, max {high[0]}x{high[1]}")
    return low, opt, high


def _quantization_of(weights: WeightsArg, config: VariantConfig,
                     quantization: Optional[Quantization]) -> Optional[Quantization]:
    """The quantization to build with: ``quantization`` when given, else what a weights file carries."""
    if quantization is not None:
        if not isinstance(quantization, Quantization):
            raise WeightsError(f"quantization must be a Quantization (trtvit_native.weights.load_quantization), got "
                               f"{type(quantization).__name__}")
        return quantization
    if isinstance(weights, (str, os.PathLike)) and is_quantized(weights):
        return load_quantization(weights, config)
    return None


def _state_as_numpy(weights: WeightsArg, config: VariantConfig, seed: int) -> Tuple[Dict[str, np.ndarray], str]:
    """Validated weights as numpy arrays (memory-mapped when they come from a file)."""
    if weights is None:
        from .model import create_model  # torch is only needed for the seeded weights

        arrays = validate_arrays(create_model(config, seed=seed).state_dict(), config)
        return arrays, f"seeded untrained weights (seed {seed})"
    if isinstance(weights, Mapping):
        return validate_arrays(weights, config), "state dict"
    if isinstance(weights, (str, os.PathLike)):
        return load_arrays(weights, arch=config), os.fspath(weights)
    raise WeightsError(f"weights must be None, a safetensors path or a state dict, got {type(weights).__name__}")


def resolve_plugins(backend: Backend, plugins: Union[str, bool]) -> bool:
    """Decide whether the fused CUDA plugins are used; ``True`` fails clearly when impossible."""
    from . import trt_plugins

    if plugins is False:
        return False
    problem = trt_plugins.unavailable_reason(backend)
    if problem is None:
        return True
    if plugins is True:
        raise BackendError(f"plugins=True cannot be honoured: {problem}")
    return False


def _check_quantized(be: Backend, quant: Quantization, fp16: bool, low: Tuple[int, int], mix_strides: List[int],
                     use_plugins: bool) -> None:
    """Refuse fp8 on a TensorRT without it; warn where an fp8 attention will not fuse (an
    fp32 network, fewer than 16 tokens): the engine computes what the file says either way.
    (attention='fused' with an fp8 attention is refused where the attention is defined.)"""
    if "fp8" in quant.precisions() and getattr(be.trt, "fp8", None) is None:
        raise BackendError(f"fp8 quantization needs a TensorRT with the fp8 data type; {be.label} has none")
    fp8_attention = bool(quant.attention_modules)
    if fp8_attention and mix_strides:
        if not fp16:
            log.warning("fp8 attention in an fp32 network: TensorRT fuses FP8 attention with 16-bit tensors "
                        "around its Q/DQ pairs (ModelOpt's FP8 MHA export requires them); build with fp16 for it")
        tokens = (low[0] // max(mix_strides)) * (low[1] // max(mix_strides))  # the fewest
        if tokens < 16:
            log.warning("images of %dx%d give %d attention token(s): an fp8 attention product with a dimension "
                        "below 16 has no efficient FP8 kernel (ModelOpt's ONNX quantizer leaves such products "
                        "unquantized); quantize with --keep %s for small images", low[0], low[1], tokens,
                        ",".join(quant.attention_modules))
    if use_plugins:
        log.info("quantized network: the fused LayerNorm%s plugins are used, with Q/DQ before them%s",
                 "" if fp8_attention else "/attention",
                 "; the fp8 attention is built as MatMul-SoftMax-MatMul with its Q/DQ pairs" if fp8_attention else "")


def build_network(name_or_config: Union[str, VariantConfig], weights: WeightsArg = None, fp16: bool = True,
                  max_batch: int = 32, image_size: Optional[SizeArg] = None, plugins: Union[str, bool] = "auto",
                  seed: int = 0, backend: Optional[str] = None, attention: str = "matmul",
                  outputs: Any = "logits", min_image_size: Optional[SizeArg] = None,
                  max_image_size: Optional[SizeArg] = None,
                  quantization: Optional[Quantization] = None) -> BuiltNetwork:
    """Define the TensorRT network of a variant; nothing is compiled yet.

    ``weights`` is a safetensors path, a state dict, or None for the seeded untrained
    weights of :func:`trtvit_native.create_model`. The batch dimension is dynamic
    (optimization profile 1 / max_batch / max_batch). ``image_size`` (an int or (H, W),
    multiples of 32) is the spatial size, fixed unless ``min_image_size`` /
    ``max_image_size`` make H and W dynamic, with ``image_size`` the optimization shape;
    by default the size a weights file was trained at (its ``image_size`` metadata), else
    224. ``outputs``: ``"logits"``, ``"features"`` (stage1..stage4, strides 4..32) or a tuple of
    names from ``stage1``..``stage4``, ``logits``. ``attention`` chooses the native attention
    where the plugins are not used: ``"matmul"`` (MatMul-SoftMax-MatMul, softmax in fp32) or
    ``"fused"`` (the backend's IAttention layer, where it has one).

    A quantized weights file (``trtvit quantize``) builds the int8 or fp8 network with
    Q/DQ layers where the reference quantizes; ``quantization`` (a
    :class:`~trtvit_native.weights.Quantization`) does the same for weights given as a
    state dict or an unquantized file.
    """
    config = resolve_config(name_or_config, weights)
    _check_arguments(fp16, max_batch, plugins, attention)
    trained = trained_image_size(weights) if isinstance(weights, (str, os.PathLike)) else None
    if image_size is None:
        image_size = trained or 224
    low, opt, high = _profile_sizes(image_size, min_image_size, max_image_size)
    wanted = resolve_outputs(outputs)
    dynamic = low != high
    be = get_backend(backend)
    if attention == "fused" and not be.has_attention_layer:
        raise BackendError(f"attention='fused' needs the IAttention layer (INetworkDefinition.add_attention), which "
                           f"{be.label} does not have; use attention='matmul'")
    use_plugins = resolve_plugins(be, plugins)
    mix_strides = [4 * 2 ** s for s in config.transformer_stages if s <= _last_stage(wanted)]  # the stages holding attention
    if use_plugins and mix_strides:
        from .kernels import FLOAT32, UNSUPPORTED, attention_max_tokens, load_kernel_library

        stride = min(mix_strides)  # the most tokens
        tokens, limit = (high[0] // stride) * (high[1] // stride), attention_max_tokens(config.head_dim)
        if not fp16 and 0 < tokens <= limit and load_kernel_library().attention_supported(
                tokens, config.head_dim, FLOAT32) == UNSUPPORTED:
            limit = next(n for n in range(tokens, 0, -1)  # what this GPU's shared memory allows
                         if load_kernel_library().attention_supported(n, config.head_dim, FLOAT32) != UNSUPPORTED)
        if tokens > limit:
            largest = f"{high[0]}x{high[1]}"
            if plugins is True:
                raise ValueError(
                    f"the fused attention kernel supports head_dim 32 and 64, not {config.head_dim}" if limit == 0
                    else f"images up to {largest} give {tokens} attention tokens; the fused attention kernel "
                         f"handles at most {limit} (head_dim {config.head_dim})")
            log.warning("images up to %s give %d attention tokens, more than the fused attention kernel's %d: "
                        "building with native attention and LayerNorm layers", largest, tokens, limit)
            use_plugins = False
    state, source = _state_as_numpy(weights, config, seed)
    quant = _quantization_of(weights, config, quantization)
    if quant is not None:
        _check_quantized(be, quant, fp16, low, mix_strides, use_plugins)
    start = time.perf_counter()
    trt = be.trt
    logger = CollectingLogger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    net = _Net(be, network, state, fp16, plugins=use_plugins, attention=attention, quantization=quant)
    define_network(net, config, opt, dynamic, wanted)
    builder_config = builder.create_builder_config()
    if not fp16 and hasattr(trt.BuilderFlag, "TF32"):
        # fp32 means fp32: no TF32 tensor-core math (10-bit mantissa) in convolutions
        # and matrix products, so an fp32 engine stays the exact reference it is meant as.
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    if hasattr(trt, "ProfilingVerbosity"):  # layer names and formats for IEngineInspector (benchmarks/inspect_quantized.py)
        builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, 3) + low, (max_batch, 3) + opt, (max_batch, 3) + high)
    builder_config.add_optimization_profile(profile)
    return BuiltNetwork(
        backend=be, builder=builder, network=network, config=builder_config, profile=profile, logger=logger,
        variant=config, fp16=fp16, max_batch=max_batch, image_size=opt,
        num_classes=int(state["head.weight"].shape[0]), plugins=use_plugins, attention=attention,
        weight_bytes=net.weight_bytes,
        weights_source=source, definition_seconds=time.perf_counter() - start,
        min_image_size=low, max_image_size=high, outputs=wanted, quantization=quant,
        trained_image_size=trained, _keepalive=net.keep,
    )


BLOCK_KINDS = ("bottleneck", "transformer", "mixblock")


def build_block_plan(config: VariantConfig, kind: str, channels: int, side: int, batch: int,
                     state: Mapping[str, np.ndarray], fp16: bool = True, backend: Optional[str] = None) -> bytes:
    """The serialized engine of one block alone (``trtvit profile``'s latency): input
    ``block_input`` (batch, channels, side, side) and output ``block_output`` in the compute
    dtype, the block's layers as in a whole network (``kind``: :data:`BLOCK_KINDS`, a mix
    block of ``config.mix_block``), ``state`` its weights under the module path ``block``.
    Native layers only: the timing is of what the block's layers cost, not of a plugin."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"block kind must be one of {', '.join(BLOCK_KINDS)}, got {kind!r}")
    be = get_backend(backend)
    trt = be.trt
    builder = trt.Builder(CollectingLogger(trt))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    net = _Net(be, network, state, fp16)
    x = network.add_input("block_input", net.dtype, (batch, channels, side, side))
    if kind == "bottleneck":
        y = bottleneck(net, x, "block", channels, channels, 1)
    elif kind == "transformer":
        y = transformer_block(net, x, "block", config, (side, side))
    else:
        y = mixblock(net, x, "block", channels, config, (side, side))
    y.name = "block_output"
    network.mark_output(y)
    builder_config = builder.create_builder_config()
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise BuildError(f"TensorRT could not build the {kind} block at {channels}x{side}x{side}")
    return bytes(plan)


def build_engine(name_or_config: Union[str, VariantConfig], weights: WeightsArg = None, fp16: bool = True,
                 max_batch: int = 32, image_size: Optional[SizeArg] = None, plugins: Union[str, bool] = "auto",
                 seed: int = 0, backend: Optional[str] = None, attention: str = "matmul",
                 outputs: Any = "logits", min_image_size: Optional[SizeArg] = None,
                 max_image_size: Optional[SizeArg] = None, quantization: Optional[Quantization] = None) -> bytes:
    """Build the serialized TensorRT engine of a variant (see :func:`build_network`)."""
    return build_network(name_or_config, weights, fp16, max_batch, image_size, plugins, seed, backend,
                         attention, outputs, min_image_size, max_image_size, quantization).build_serialized()
