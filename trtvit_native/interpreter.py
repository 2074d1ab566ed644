"""A CPU interpreter of a built TensorRT ``INetworkDefinition``.

It walks the real network TensorRT compiles, layer by layer, reading each layer's type,
parameters and weights back from TensorRT, and executes it with torch on the CPU. Parity
tests therefore check the network itself, not a second description of it.

Precision emulation: every tensor is kept in the dtype TensorRT gives it. A layer reads
its inputs, computes in fp32 (float64 is not needed: TensorRT accumulates fp16 math in
fp32) and rounds its output to the output tensor's dtype, so an fp16 network sees fp16
rounding at every layer boundary, as on the GPU. (Inside fused kernels TensorRT may keep
intermediates in higher precision; that only makes the GPU closer to fp32.)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .network import INPUT_NAME, BuiltNetwork

__all__ = ["interpret", "InterpreterError", "run_network", "check_images"]


class InterpreterError(RuntimeError):
    """A layer the interpreter cannot execute, or inputs that do not fit the network."""


_Handler = Callable[[Any, Any, List[torch.Tensor]], torch.Tensor]
_HANDLERS: Dict[str, Tuple[str, _Handler]] = {}


def _handles(layer_type: str, cls: str) -> Callable[[_Handler], _Handler]:
    def register(fn: _Handler) -> _Handler:
        _HANDLERS[layer_type] = (cls, fn)
        return fn

    return register


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    if getattr(trt, "fp8", None) is not None:
        table[trt.fp8] = torch.float8_e4m3fn
    if dtype not in table:
        raise InterpreterError(f"unsupported tensor dtype {dtype}")
    return table[dtype]


def _axes(mask: int, rank: int) -> List[int]:
    return [i for i in range(rank) if mask & (1 << i)]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


# Quantization as TensorRT defines it (IQuantizeLayer / IDequantizeLayer):
#   int8: q = saturate(round_half_to_even(x / scale)) to [-128, 127]; x' = q * scale
#   fp8 (E4M3): q = the E4M3 value nearest to x / scale (ties to even), saturated to +-448
# with one scale per tensor, or one per index of ``axis``. Computed in fp32.
INT8_RANGE = (-128.0, 127.0)
FP8_MAX = 448.0


def _broadcast_scale(layer: Any, scale: torch.Tensor, rank: int) -> torch.Tensor:
    scale = scale.float()
    if scale.dim() == 0 or scale.numel() == 1:
        return scale.reshape(())
    axis = layer.axis % rank
    if scale.dim() != 1:
        raise InterpreterError(f"layer {layer.name!r}: block quantization scales are not supported by the interpreter")
    shape = [1] * rank
    shape[axis] = scale.numel()
    return scale.reshape(shape)


def quantize_values(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale quantized to ``torch.int8`` or ``torch.float8_e4m3fn`` as TensorRT does."""
    v = x.float() / scale
    if dtype == torch.int8:
        return torch.round(v).clamp(*INT8_RANGE).to(torch.int8)  # torch.round: half to even
    if dtype == torch.float8_e4m3fn:
        return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # nearest, ties to even
    raise InterpreterError(f"quantization to {dtype} is not supported by the interpreter")


@_handles("QUANTIZE", "IQuantizeLayer")
def _quantize(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    x, scale = inputs[0], inputs[1]
    return quantize_values(x, _broadcast_scale(layer, scale, x.dim()), _torch_dtype(trt, layer.to_type))


@_handles("DEQUANTIZE", "IDequantizeLayer")
def _dequantize(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    q, scale = inputs[0], inputs[1]
    return q.float() * _broadcast_scale(layer, scale, q.dim())


@_handles("CONSTANT", "IConstantLayer")
def _constant(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    values = np.array(layer.weights, copy=True)
    return torch.from_numpy(values).reshape(tuple(layer.shape))


def _spatial_padding(trt: Any, layer: Any, size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                     dilation: Sequence[int]) -> List[Tuple[int, int]]:
    """(before, after) padding per spatial axis, as the layer's ``padding_mode`` defines it."""
    mode = layer.padding_mode
    modes = trt.PaddingMode
    pre, post = tuple(layer.pre_padding), tuple(layer.post_padding)
    pads = []
    for i, n in enumerate(size):
        extent = (kernel[i] - 1) * dilation[i] + 1
        if mode in (modes.SAME_UPPER, modes.SAME_LOWER):
            out = -(-n // stride[i])
            total = max((out - 1) * stride[i] + extent - n, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if mode == modes.SAME_UPPER else (large, small))
        elif mode == modes.EXPLICIT_ROUND_DOWN:
            pads.append((pre[i], post[i]))
        elif mode == modes.EXPLICIT_ROUND_UP:
            padded = n + pre[i] + post[i]
            out = -(-(padded - extent) // stride[i]) + 1
            pads.append((pre[i], post[i] + max((out - 1) * stride[i] + extent - padded, 0)))
        else:
            raise InterpreterError(f"layer {layer.name!r}: padding mode {mode} is not supported by the interpreter")
    return pads


def _pad(x: torch.Tensor, pads: List[Tuple[int, int]], value: float = 0.0) -> torch.Tensor:
    flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad: last axis first
    return F.pad(x, flat, value=value) if any(flat) else x


@_handles("CONVOLUTION", "IConvolutionLayer")
def _convolution(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    x = _f32(inputs[0])
    cout, groups = layer.num_output_maps, layer.num_groups
    kh, kw = tuple(layer.kernel_size_nd)
    if len(inputs) > 1:  # the kernel is a tensor (e.g. dequantized weights), not weights
        kernel = _f32(inputs[1]).reshape(cout, x.shape[1] // groups, kh, kw)
    else:
        kernel = torch.from_numpy(np.array(layer.kernel, copy=True)).float().reshape(cout, x.shape[1] // groups,
                                                                                     kh, kw)
    bias_values = np.array(layer.bias, copy=True)
    bias = torch.from_numpy(bias_values).float() if bias_values.size else None
    stride, dilation = tuple(layer.stride_nd), tuple(layer.dilation_nd)
    x = _pad(x, _spatial_padding(trt, layer, x.shape[2:], (kh, kw), stride, dilation))
    return F.conv2d(x, kernel, bias, stride, 0, dilation, groups)


@_handles("ACTIVATION", "IActivationLayer")
def _activation(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    x = _f32(inputs[0])
    kind = layer.type
    if kind == trt.ActivationType.RELU:
        return F.relu(x)
    if kind == trt.ActivationType.GELU_ERF:
        return F.gelu(x)
    if kind == trt.ActivationType.GELU_TANH:
        return F.gelu(x, approximate="tanh")
    if kind == trt.ActivationType.SIGMOID:
        return torch.sigmoid(x)
    if kind == trt.ActivationType.TANH:
        return torch.tanh(x)
    raise InterpreterError(f"layer {layer.name!r}: activation {kind} is not supported by the interpreter")


@_handles("POOLING", "IPoolingLayer")
def _pooling(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    x = _f32(inputs[0])
    window, stride = tuple(layer.window_size_nd), tuple(layer.stride_nd)
    pads = _spatial_padding(trt, layer, x.shape[2:], window, stride, (1, 1))
    if layer.type == trt.PoolingType.MAX:
        return F.max_pool2d(_pad(x, pads, -math.inf), window, stride)
    if layer.type == trt.PoolingType.AVERAGE:
        total = F.avg_pool2d(_pad(x, pads), window, stride, divisor_override=1)
        if layer.average_count_excludes_padding:
            count = F.avg_pool2d(_pad(torch.ones_like(x[:1, :1]), pads), window, stride, divisor_override=1)
        else:
            count = float(window[0] * window[1])
        return total / count
    raise InterpreterError(f"layer {layer.name!r}: pooling {layer.type} is not supported by the interpreter")


@_handles("ELEMENTWISE", "IElementWiseLayer")
def _elementwise(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    a, b = _f32(inputs[0]), _f32(inputs[1])
    op = trt.ElementWiseOperation
    table = {op.SUM: torch.add, op.PROD: torch.mul, op.SUB: torch.sub, op.DIV: torch.div,
             op.MAX: torch.maximum, op.MIN: torch.minimum, op.POW: torch.pow}
    if layer.op not in table:
        raise InterpreterError(f"layer {layer.name!r}: elementwise {layer.op} is not supported by the interpreter")
    return table[layer.op](a, b)


@_handles("SHAPE", "IShapeLayer")
def _shape(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    return torch.tensor(tuple(inputs[0].shape), dtype=torch.int64)


@_handles("SHUFFLE", "IShuffleLayer")
def _shuffle(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    x = inputs[0]
    rank = x.dim()
    x = x.permute(*tuple(layer.first_transpose)[:rank])
    dynamic = len(inputs) > 1  # the reshape dimensions come from a shape tensor
    dims = [int(v) for v in inputs[1].tolist()] if dynamic else layer.reshape_dims
    if dims is not None:
        shape = list(dims)
        if layer.zero_is_placeholder:
            shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
        x = x.reshape(shape)
    return x.permute(*tuple(layer.second_transpose)[:x.dim()])


@_handles("MATRIX_MULTIPLY", "IMatrixMultiplyLayer")
def _matmul(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    ops = (layer.op0, layer.op1)
    operands = []
    for t, op in zip(inputs, ops):
        t = _f32(t)
        if op == trt.MatrixOperation.TRANSPOSE:
            t = t.transpose(-1, -2)
        elif op == trt.MatrixOperation.VECTOR:
            raise InterpreterError(f"layer {layer.name!r}: vector matrix operations are not supported")
        operands.append(t)
    return torch.matmul(*operands)


@_handles("NORMALIZATION", "INormalizationLayer")
def _normalization(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    x, scale, bias = (_f32(t) for t in inputs[:3])
    if layer.num_groups != 1:
        raise InterpreterError(f"layer {layer.name!r}: group normalization is not supported by the interpreter")
    axes = _axes(layer.axes, x.dim())
    mean = x.mean(dim=axes, keepdim=True)
    var = (x - mean).square().mean(dim=axes, keepdim=True)
    return (x - mean) * torch.rsqrt(var + layer.epsilon) * scale + bias


@_handles("SOFTMAX", "ISoftMaxLayer")
def _softmax(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    x = _f32(inputs[0])
    axes = _axes(layer.axes, x.dim())
    if len(axes) != 1:
        raise InterpreterError(f"layer {layer.name!r}: softmax over {len(axes)} axes is not supported")
    return torch.softmax(x, dim=axes[0])


@_handles("CAST", "ICastLayer")
def _cast(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    return inputs[0]  # the result is rounded to the output dtype like every layer's


@_handles("CONCATENATION", "IConcatenationLayer")
def _concatenation(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_f32(t) for t in inputs], dim=layer.axis)


@_handles("REDUCE", "IReduceLayer")
def _reduce(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    x = _f32(inputs[0])
    axes = _axes(layer.axes, x.dim())
    op = trt.ReduceOperation
    if layer.op == op.AVG:
        return x.mean(dim=axes, keepdim=layer.keep_dims)
    if layer.op == op.SUM:
        return x.sum(dim=axes, keepdim=layer.keep_dims)
    if layer.op == op.MAX:
        return x.amax(dim=axes, keepdim=layer.keep_dims)
    raise InterpreterError(f"layer {layer.name!r}: reduce {layer.op} is not supported by the interpreter")


@_handles("GATHER", "IGatherLayer")
def _gather(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    data, index = inputs[0], inputs[1].long()
    if layer.mode != trt.GatherMode.DEFAULT or layer.num_elementwise_dims != 0:
        raise InterpreterError(f"layer {layer.name!r}: only default-mode gather is supported")
    axis = layer.axis
    out = data.index_select(axis, index.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(index.shape) + tuple(data.shape[axis + 1:]))


@_handles("ATTENTION_INPUT", "IAttentionInputLayer")
def _attention(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    """The fused attention layer (IAttention), computed where its inputs enter.

    softmax(Q K^T) V per (batch, head) with fp32 scores and softmax; in an fp16 network
    the probabilities are rounded to fp16 before the product with V, as a fused fp16
    kernel feeds them to its second matrix product.
    """
    att = layer.attention
    name = att.name
    if att.norm_op != trt.AttentionNormalizationOp.SOFTMAX:
        raise InterpreterError(f"attention {name!r}: normalization {att.norm_op} is not supported by the interpreter")
    if att.causal or att.mask is not None:
        raise InterpreterError(f"attention {name!r}: causal or masked attention is not supported by the interpreter")
    q, k, v = inputs[:3]
    probs = torch.softmax(torch.matmul(_f32(q), _f32(k).transpose(-1, -2)), dim=-1)
    if q.dtype == torch.float16:
        probs = probs.half()
    return torch.matmul(_f32(probs), _f32(v))


@_handles("ATTENTION_OUTPUT", "IAttentionOutputLayer")
def _attention_output(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> torch.Tensor:
    return inputs[0]  # computed by the ATTENTION_INPUT layer


def _declared_shapes(network: Any, feeds: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape as TensorRT infers it for the actual input shapes: the network's
    inputs are set to the feeds' shapes, every layer output's shape is read, and the
    inputs' (dynamic) shapes are restored."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    saved = [tuple(t.shape) for t in inputs]
    try:
        for t in inputs:
            t.shape = tuple(feeds[t.name].shape)
        shapes = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            for j in range(layer.num_outputs):
                out = layer.get_output(j)
                shapes[out.name] = tuple(out.shape)
        return shapes
    finally:
        for t, shape in zip(inputs, saved):
            t.shape = shape


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"


def _check_output(layer: Any, j: int, result: torch.Tensor, declared: Tuple[int, ...], dtype: torch.dtype) -> None:
    """Fail loudly where the interpreter's result is not what TensorRT declares for the layer."""
    shape = tuple(result.shape)
    if len(shape) != len(declared) or any(d >= 0 and d != s for d, s in zip(declared, shape)):
        raise InterpreterError(f"layer {layer.name!r} ({str(layer.type).split('.')[-1]}) output {j}: the interpreter "
                               f"computed shape {shape}, TensorRT declares {declared} for these inputs")
    if _kind(result.dtype) != _kind(dtype):
        raise InterpreterError(f"layer {layer.name!r} ({str(layer.type).split('.')[-1]}) output {j}: the interpreter "
                               f"computed {result.dtype}, TensorRT declares {dtype}")


def _plugin_layer(trt: Any, layer: Any, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """A plugin layer, with the plugin TensorRT holds for it (its serialized fields)."""
    from .trt_plugins import PluginError, interpret_plugin_layer, plugin_layer_fields

    try:
        kind, fields = plugin_layer_fields(trt, layer)
        return interpret_plugin_layer(kind, fields, inputs)
    except PluginError as e:
        raise InterpreterError(f"layer {layer.name!r}: {e}") from None


def run_network(built: BuiltNetwork, feeds: Dict[str, torch.Tensor],
                capture: Union[None, str, Iterable[str]] = None,
                tensors: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """Execute ``built.network`` on CPU. Returns the network outputs and captured layers.

    ``tensors``: names of tensors (e.g. a layer's input) to return as well, by name.
    ``capture``: None (outputs only), ``"all"``, or layer names whose first output to keep.
    Every layer's result is checked against the shape and dtype TensorRT declares for it
    with these inputs; a mismatch is an :class:`InterpreterError`, never a silent result.
    """
    trt = built.backend.trt
    network = built.network
    names = built.layer_names()
    if capture == "all":
        wanted = set(names)
    else:
        wanted = set(capture or ())
        unknown = wanted - set(names)
        if unknown:
            raise InterpreterError(f"no layer named {', '.join(sorted(unknown))} in the network")
    values: Dict[str, torch.Tensor] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in feeds:
            raise InterpreterError(f"missing network input {tensor.name!r}")
        values[tensor.name] = feeds[tensor.name].to(_torch_dtype(trt, tensor.dtype))
    declared = _declared_shapes(network, feeds)
    captured: Dict[str, torch.Tensor] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        type_name = str(layer.type).split(".")[-1]
        inputs = [values[layer.get_input(j).name] for j in range(layer.num_inputs) if layer.get_input(j) is not None]
        if type_name == "PLUGIN_V3":
            layer.__class__ = trt.IPluginV3Layer
            results = _plugin_layer(trt, layer, inputs)
        elif type_name in _HANDLERS:
            cls, handler = _HANDLERS[type_name]
            layer.__class__ = getattr(trt, cls)
            results = [handler(trt, layer, inputs)]
        else:
            raise InterpreterError(f"layer {layer.name!r}: layer type {type_name} is not supported by the interpreter")
        if len(results) != layer.num_outputs:
            raise InterpreterError(f"layer {layer.name!r}: the interpreter computed {len(results)} outputs, TensorRT "
                                   f"declares {layer.num_outputs}")
        for j, result in enumerate(results):
            out = layer.get_output(j)
            dtype = _torch_dtype(trt, out.dtype)
            _check_output(layer, j, result, declared[out.name], dtype)
            values[out.name] = result.to(dtype)
        if layer.name in wanted:
            captured[layer.name] = values[layer.get_output(0).name]
    outputs = {network.get_output(i).name: values[network.get_output(i).name] for i in range(network.num_outputs)}
    return {**{t: values[t] for t in tensors}, **captured, **outputs}


def interpret(built: BuiltNetwork, images: torch.Tensor,
              capture: Union[None, str, Sequence[str]] = None) -> Any:
    """Run the built network on CPU and return its fp32 output: a tensor where the network
    has one output (the logits, by default), else ``{output name: tensor}``.

    With ``capture`` (``"all"`` or a list of layer names) also return ``{name: output}``
    of those layers, in the dtype the network gives them.
    """
    if not isinstance(images, torch.Tensor):
        raise InterpreterError(f"images must be a torch.Tensor, got {type(images).__name__}")
    check_images(built, images)
    if not images.is_floating_point():
        raise InterpreterError(f"images must be floating point, got {images.dtype}")
    with torch.no_grad():
        values = run_network(built, {INPUT_NAME: images.detach().cpu().float()}, capture)
    names = built.output_names()
    outputs = {n: values.pop(n).float() for n in names}
    result = outputs[names[0]] if len(names) == 1 else outputs
    if capture is None:
        return result
    return result, values


def check_images(built: BuiltNetwork, images: torch.Tensor) -> None:
    """Images must be (B, 3, H, W) inside the network's optimization profile."""
    (h0, w0), (h1, w1) = built.min_image_size, built.max_image_size
    if built.dynamic_size:
        expected = f"(B, 3, H, W) with H in {h0}..{h1} and W in {w0}..{w1}, multiples of 32"
    else:
        expected = f"(B, 3, {h0}, {w0})"
    if images.dim() != 4 or images.shape[1] != 3:
        raise InterpreterError(f"images must have shape {expected} for this network, got {tuple(images.shape)}")
    h, w = images.shape[2:]
    if not (h0 <= h <= h1 and w0 <= w <= w1) or h % 32 or w % 32:
        if built.dynamic_size:
            raise InterpreterError(f"image size {h}x{w} is outside this network's profile: it accepts "
                                   f"{h0}x{w0} to {h1}x{w1}, H and W multiples of 32")
        raise InterpreterError(f"images must have shape {expected} for this network, got {tuple(images.shape)}")
    if not 1 <= images.shape[0] <= built.max_batch:
        raise InterpreterError(f"batch size {images.shape[0]} is outside this network's profile 1..{built.max_batch}")
