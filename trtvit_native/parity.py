"""Layer-by-layer parity between the PyTorch reference and a built TensorRT network.

Which layers: every reference module whose name is also a layer name in the network
(convolutions with their folded BatchNorm, activations, blocks, the Transformer's
LayerNorms, projections and attention, the head) and every network output.

Tolerances come from the noise. A network evaluated at a precision differs from the fp32
reference by rounding alone when it is right, and the reference itself shows how large
that rounding is at each layer: the **noise** of a layer is how far the reference, run at
the network's precision, lands from itself run one precision higher:

* fp16 networks: the reference with fp16 weights and every operation's result rounded to
  fp16 (:func:`fp16_rounding`), against the fp32 reference;
* fp32 networks: the fp32 reference against the same reference in float64.

A layer passes when its error against the fp32 reference is at most ``factor`` times the
noise at that layer, both in max|Δ| and in RMS, or within a floor of a few rounding units
(for layers the reference computes exactly). The noise grows with depth in fp16, and the
bound grows with it. ``TOLERANCES`` holds the factors and floors; README ("Parity") gives
the measured error/noise ratios they were set from. The report is ok only when every
compared layer and every output passes; the first layer that does not is where a
divergence starts.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .interpreter import run_network
from .network import INPUT_NAME, STAGE_OUTPUTS, BuiltNetwork
from .weights import is_activation_quantizer

__all__ = ["Difference", "LayerParity", "ParityReport", "Tolerance", "TOLERANCES", "compare", "fp16_rounding",
           "comparable_layers", "network_layers", "reference_layers", "parity_report"]


@dataclass(frozen=True)
class Tolerance:
    """A layer's error may be ``factor`` × the reference's own rounding noise at that layer
    (max|Δ| and RMS), and never needs to be below ``floor`` rounding units of the layer's
    magnitude (max|ref| and RMS of ref)."""

    factor: float
    floor: float
    unit: float  # unit roundoff of the precision

    def bounds(self, noise_max: float, noise_rms: float, max_ref: float, rms_ref: float) -> tuple:
        return (max(self.factor * noise_max, self.floor * self.unit * max_ref),
                max(self.factor * noise_rms, self.floor * self.unit * rms_ref))


# Set from the error/noise ratios measured on every layer of the four variants
# (`python benchmarks/parity_cpu.py`; README "Parity"), with the margin stated there.
TOLERANCES: Dict[str, Tolerance] = {
    "fp32": Tolerance(factor=8.0, floor=8.0, unit=2.0 ** -24),
    "fp16": Tolerance(factor=3.0, floor=2.0, unit=2.0 ** -11),
    # Quantized networks against the fake-quantized reference (``int8-fp16``: int8 Q/DQ,
    # fp16 between): set from the error/noise ratios measured on every layer
    # (`python benchmarks/parity_quantized.py`; README "Quantize to INT8 or FP8"). fp32:
    # largest 8.26x (trt-vit-a at 32x32, int8+fp8: transformer.fc2's output on one token,
    # the mlp_residual quantizer's input), so K = 16. A mixed file (fp8 GEMMs, int8
    # convolutions) takes the fp8 bounds.
    "int8-fp32": Tolerance(factor=16.0, floor=8.0, unit=2.0 ** -24),
    "int8-fp16": Tolerance(factor=3.0, floor=2.0, unit=2.0 ** -11),
    "fp8-fp32": Tolerance(factor=16.0, floor=8.0, unit=2.0 ** -24),
    "fp8-fp16": Tolerance(factor=3.0, floor=2.0, unit=2.0 ** -11),
}


@dataclass
class Difference:
    """How far ``out`` is from ``ref``: max|Δ|, RMS of Δ, and the cosine similarity."""

    name: str
    shape: tuple
    max_abs: float
    max_ref: float
    rms_abs: float
    rms_ref: float
    cosine: float

    @property
    def rel(self) -> float:
        """max|Δ| / max|ref|."""
        return self.max_abs / self.max_ref if self.max_ref > 0 else (math.inf if self.max_abs > 0 else 0.0)

    def ok(self, tol: Dict[str, float]) -> bool:
        """Within ``{"rel": max|Δ|/max|ref|, "cosine": minimum}`` (fixed bounds, e.g. on a GPU)."""
        return self.rel <= tol["rel"] and self.cosine >= tol["cosine"]


def compare(name: str, out: torch.Tensor, ref: torch.Tensor) -> Difference:
    """The difference of two tensors of the same number of elements, in float64."""
    out, ref = out.detach().double().reshape(ref.shape), ref.detach().double()
    delta = out - ref
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0, eps=1e-30).item()
    return Difference(name, tuple(ref.shape), delta.abs().max().item(), ref.abs().max().item(),
                      delta.square().mean().sqrt().item(), ref.square().mean().sqrt().item(), cos)


@dataclass
class LayerParity:
    """One layer: the network's difference from the reference, and the reference's noise."""

    name: str
    shape: tuple  # the reference's
    error: Optional[Difference]  # None: the network's output has another shape
    noise: Difference
    bound_max: float
    bound_rms: float
    network_shape: tuple = ()
    problem: str = ""  # set where there is nothing to compare: the layer fails with this explanation
    boundary_codes: int = 0  # quantizer rows: elements one code apart where x / scale is at a rounding boundary

    @property
    def ratio(self) -> float:
        """The error as a fraction of its bound (the larger of max and RMS); ≤ 1 passes."""
        if self.error is None or self.problem:
            return math.inf
        return max(_div(self.error.max_abs, self.bound_max), _div(self.error.rms_abs, self.bound_rms))

    @property
    def noise_ratio(self) -> float:
        """The error in units of the noise (the larger of max and RMS)."""
        if self.error is None:
            return math.inf
        return max(_div(self.error.max_abs, self.noise.max_abs), _div(self.error.rms_abs, self.noise.rms_abs))

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0

    def describe(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        if self.error is None:
            return f"{self.name}: the network gives shape {self.network_shape}, the reference {self.shape}"
        e = self.error
        boundary = (f", {self.boundary_codes} code(s) one step apart at a rounding boundary allowed"
                    if self.boundary_codes else "")
        return (f"{self.name}: max|Δ| {e.max_abs:.3g} = {e.rel:.2e} of max|ref| (bound {self.bound_max:.3g}), "
                f"RMS Δ {e.rms_abs:.3g} (bound {self.bound_rms:.3g}), {self.noise_ratio:.1f}× the reference's "
                f"own rounding noise, cosine {e.cosine:.7f}{boundary}")


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else (math.inf if a > 0 else 0.0)


@dataclass
class ParityReport:
    variant: str
    fp16: bool
    batch: int
    layers: List[LayerParity]  # compared layers in network order
    outputs: List[LayerParity]  # network outputs
    quantized: Optional[str] = None  # "int8" or "fp8": the network against the fake-quantized reference

    @property
    def precision(self) -> str:
        compute = "fp16" if self.fp16 else "fp32"
        return compute if self.quantized is None else f"{self.quantized}-{compute}"

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.precision]

    @property
    def logits(self) -> Optional[LayerParity]:
        return next((p for p in self.outputs if p.name == "logits"), None)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.layers + self.outputs)

    def first_divergence(self) -> Optional[LayerParity]:
        """The first compared layer (network order), or else output, outside its bound."""
        return next((p for p in self.layers + self.outputs if not p.ok), None)

    def summary(self) -> str:
        first = self.first_divergence()
        worst = max(self.layers + self.outputs, key=lambda p: p.ratio)
        head = (f"{'PASS' if first is None else 'FAIL'}: {self.variant} {self.precision} batch {self.batch}: "
                f"{len(self.layers)} layers and {len(self.outputs)} output(s) compared")
        if first is not None:
            return f"{head}; first divergent layer {first.describe()}"
        out = (self.logits or self.outputs[-1])
        noise = (f"the fake-quantized reference's own {'fp16' if self.fp16 else 'fp32'} rounding noise"
                 if self.quantized else f"the reference's own {self.precision} rounding noise")
        boundary = sum(p.boundary_codes for p in self.layers)
        allowed = (f"; {boundary} quantized value(s) one code from the reference's at a rounding boundary"
                   if boundary else "")
        return (f"{head}, each within {self.tolerance.factor:g}× {noise} (worst {worst.name} at {worst.ratio:.2f} of "
                f"its bound){allowed}; {out.name} max|Δ| "
                f"{out.error.max_abs:.3g} = {out.error.rel:.2e} of max|ref|, cosine {out.error.cosine:.7f}")

    def table(self) -> str:
        rows = [f"{'layer':44s} {'shape':>20s} {'max|Δ|':>9s} {'rel':>9s} {'noise rel':>9s} {'×noise':>7s} "
                f"{'/bound':>7s} {'cosine':>10s}"]
        for p in self.layers + self.outputs:
            flag = "" if p.ok else "  <-- outside tolerance"
            if p.problem:
                rows.append(f"{p.name:44s} {p.problem}{flag}")
                continue
            if p.error is None:
                rows.append(f"{p.name:44s} {str(p.shape):>20s}  network shape {p.network_shape}{flag}")
                continue
            boundary = f"  ({p.boundary_codes} at a rounding boundary)" if p.boundary_codes else ""
            rows.append(f"{p.name:44s} {str(p.shape):>20s} {p.error.max_abs:9.3g} {p.error.rel:9.2e} "
                        f"{p.noise.rel:9.2e} {p.noise_ratio:7.2f} {p.ratio:7.3f} {p.error.cosine:10.7f}{boundary}{flag}")
        rows.append(self.summary())
        first = self.first_divergence()
        if first is not None:
            rows.append(f"first layer outside tolerance: {first.name}")
        return "\n".join(rows)


# --------------------------------------------------------------------------------------
# The reference at a precision
# --------------------------------------------------------------------------------------


def _round_fp16(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float16:
        return value.to(torch.float16).to(value.dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_round_fp16(v) for v in value)
    return value


class fp16_rounding(TorchFunctionMode):
    """Within this context every torch operation's floating result is rounded to fp16
    (computed in fp32, stored in fp16: what an fp16 GPU kernel with fp32 accumulation
    does). With fp16-rounded weights this evaluates a model in fp16 at fp32 speed on a CPU,
    where torch's own fp16 kernels are many times slower.

    While ``suspended`` is positive, results are not rounded: a quantizer (a Q/DQ pair in
    the network) computes in fp32 from its fp16 input, and only its output is fp16."""

    suspended = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out if self.suspended else _round_fp16(out)


def comparable_layers(built: BuiltNetwork, model: nn.Module) -> List[str]:
    """Network layer names that are also reference module names, in network order."""
    modules = dict(model.named_modules())
    return [name for name in built.layer_names() if name in modules and name != ""]


def reference_layers(model: nn.Module, images: torch.Tensor, names: Sequence[str],
                     precision: str = "fp32", replay: Optional[Dict[str, torch.Tensor]] = None
                     ) -> Dict[str, torch.Tensor]:
    """Outputs of the modules ``names`` and the model output (``"logits"``), evaluated in
    ``precision``: ``"fp32"`` (the model as it is), ``"fp64"`` or ``"fp16"`` (fp16 weights
    and fp16 rounding of every operation). Returned as float64 tensors.

    ``replay``: {quantizer module: (tensor, the network's dequantized output or None, amax,
    precision)}: those quantizers quantize the given tensor (the network's input to its
    quantize layer) instead of their own input, which is returned as ``"<quantizer>.input"``.
    Where TensorRT's and ModelOpt's computations of x / scale round apart
    (:func:`boundary_codes`), the quantizer gives the network's value; how many, as
    ``"<quantizer>.boundary"``."""
    if precision not in ("fp32", "fp64", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'fp64' or 'fp16', got {precision!r}")
    if precision != "fp32":
        model = copy.deepcopy(model)
        with torch.no_grad():
            # quantizers' amax stays as it is: the network's scales are fp32 in every precision
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if t.is_floating_point() and not _is_quantizer(name):
                    t.data = t.data.double() if precision == "fp64" else _round_fp16(t.data.float())
    x = images.double() if precision == "fp64" else images.float()
    if precision == "fp16":
        x = _round_fp16(x)
    modules = dict(model.named_modules())
    captured: Dict[str, torch.Tensor] = {}
    mode = fp16_rounding() if precision == "fp16" else contextlib.nullcontext()
    hooks = []
    for name, (given, net_out, amax, qprecision) in (replay or {}).items():  # ModelOpt's quantizer, on the network's tensor
        def replayed(m, i, o, given=given, net_out=net_out, amax=amax, qprecision=qprecision, name=name):
            captured[f"{name}.input"] = i[0].detach().double()  # what the reference itself feeds it
            if given.numel() != i[0].numel():
                return o
            x = given.to(i[0].dtype).reshape(i[0].shape)
            out = m.forward(x)
            if net_out is None or net_out.numel() != out.numel():
                return out
            apart = boundary_codes(x, amax, qprecision, net_out, out)
            captured[f"{name}.boundary"] = apart.sum().double()
            return torch.where(apart, net_out.to(out.dtype).reshape(out.shape), out)

        hooks.append(modules[name].register_forward_hook(replayed))
    if precision == "fp64":  # ModelOpt quantizes in fp32: its integers, dequantized in float64
        hooks += [m.register_forward_hook(lambda m, i, o: _dequantize_fp64(m, o))
                  for name, m in modules.items() if _is_quantizer(name + ".") and getattr(m, "is_enabled", False)]
    if precision == "fp16":  # a Q/DQ pair computes in fp32 from fp16 and gives fp16
        for name, m in modules.items():
            if _is_quantizer(name + "."):
                hooks.append(m.register_forward_pre_hook(lambda m, i: setattr(mode, "suspended", mode.suspended + 1)))
                hooks.append(m.register_forward_hook(lambda m, i, o: (setattr(mode, "suspended", mode.suspended - 1),
                                                                      _round_fp16(o))[1]))
    hooks += [modules[name].register_forward_hook(
        lambda m, i, o, name=name: captured.__setitem__(name, o.detach().double())) for name in names]
    try:
        with torch.no_grad(), mode:
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    if torch.is_tensor(out):
        captured["logits"] = out.detach().double()
    for k, stage in enumerate(STAGE_OUTPUTS):  # the stage outputs, as the network names them
        if f"stages.{k}" in captured:
            captured[stage] = captured[f"stages.{k}"]
    return captured


def _dequantize_fp64(quantizer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A ModelOpt quantizer's fp32 output (q / (bound / amax)) as q * amax / bound in float64."""
    amax = quantizer.amax.double()
    bound = 127.0 if quantizer.num_bits == 8 else 448.0
    scaled = out.double() * (bound / amax)
    q = scaled.round() if quantizer.num_bits == 8 else scaled.float().to(torch.float8_e4m3fn).double()
    return q * (amax / bound)


def _is_quantizer(name: str) -> bool:
    """A ModelOpt quantizer module (``...input_quantizer``) or one of its buffers."""
    return "_quantizer." in name


def network_layers(built: BuiltNetwork, images: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The network's outputs and the layers ``names``, from the CPU interpreter."""
    return run_network(built, {INPUT_NAME: images.detach().cpu().float()}, capture=names)


def _layer_parity(name: str, out: torch.Tensor, ref: torch.Tensor, noisy: torch.Tensor, tol: Tolerance) -> LayerParity:
    noise = compare(name, noisy, ref)
    bound_max, bound_rms = tol.bounds(noise.max_abs, noise.rms_abs, noise.max_ref, noise.rms_ref)
    error = compare(name, out, ref) if tuple(out.shape) == tuple(ref.shape) else None
    return LayerParity(name, tuple(ref.shape), error, noise, bound_max, bound_rms, tuple(out.shape))


# A quantized value may be one code from the reference's where the two computations of
# x / scale round to different codes: TensorRT computes x / fl(amax / bound), ModelOpt
# x * fl(bound / amax) for int8 and x * fl(fl(1 / amax) * 448) for fp8, in fp32. They differ
# by at most a few units in the last place, so they disagree only for a value that close to a
# rounding boundary (an exact tie is computed exactly by both, and rounds alike).
BOUNDARY_ULPS = 4


def _codes(v: torch.Tensor, precision: str) -> torch.Tensor:
    if precision == "int8":
        return v.round().clamp(-128, 127)
    return v.clamp(-448, 448).to(torch.float8_e4m3fn).double()


def boundary_codes(x: torch.Tensor, amax: float, precision: str, network_out: torch.Tensor,
                   modelopt_out: torch.Tensor) -> torch.Tensor:
    """Where the network's quantized value may stand for ModelOpt's: TensorRT's and ModelOpt's
    fp32 computations of x / scale (within :data:`BOUNDARY_ULPS` of each other) round to
    different codes, and the two dequantized values are those codes. A mask of ``x``'s shape."""
    a = torch.tensor(float(amax), dtype=torch.float32)
    x32 = x.detach().float()
    bound = torch.tensor(127.0 if precision == "int8" else 448.0, dtype=torch.float32)
    v_ref = x32 * (bound / a) if precision == "int8" else x32 * ((1.0 / a) * bound)
    v_net = x32 / (a / bound)
    code_net, code_ref = _codes(v_net, precision), _codes(v_ref, precision)
    close = (v_net.double() - v_ref.double()).abs() <= BOUNDARY_ULPS * 2.0 ** -23 * v_net.double().abs()
    # The dequantized values differ by the code step, by the two scales' own rounding times
    # the code (a few fp32 ulps of the value), and in an fp16 network by the fp16 rounding of
    # each value (2^-11 of it): all far below a step.
    step = (code_net - code_ref).abs() * float(a / bound)
    net, mo = network_out.double().reshape(x32.shape), modelopt_out.double().reshape(x32.shape)
    apart = (net - mo).abs()
    slack = step * 2.0 ** -10 + torch.maximum(net.abs(), mo.abs()) * 2.0 ** -10
    return (code_net != code_ref) & close & (apart <= step + slack) & (apart > 0)


def quantizer_inputs(built: BuiltNetwork) -> Dict[str, str]:
    """{activation quantizer: the name of the tensor its quantize layer reads} of a
    quantized network."""
    if built.quantization is None:
        return {}
    layers = {built.network.get_layer(i).name: built.network.get_layer(i) for i in range(built.num_layers)}
    return {q: layers[f"{q}.quantize"].get_input(0).name for q in built.quantization.amax
            if is_activation_quantizer(q) and f"{q}.quantize" in layers}


def parity_report(built: BuiltNetwork, model: nn.Module, images: torch.Tensor,
                  network_outputs: Optional[Dict[str, torch.Tensor]] = None) -> ParityReport:
    """Compare every layer the network shares with the reference, and the network outputs.

    ``network_outputs``: the interpreter's results for these images (from
    :func:`network_layers`), when already computed, e.g. to check one network against
    several references.

    A quantized network is compared with the fake-quantized reference (``model``: ModelOpt's
    quantizers). Quantization makes both chaotic at the rounding-unit level: a last-bit
    difference upstream moves a value across a rounding boundary and flips its integer, a
    whole quantization step that no rounding-noise bound covers. So every quantizer of the
    reference quantizes the network's own input to it (both reference runs do): each
    quantize/dequantize pair is checked against ModelOpt's quantization of the same
    tensor (exactly, but where TensorRT's and ModelOpt's computations of x / scale round to
    different codes: there the reference takes the network's code, counted in the row's
    ``boundary_codes``), and every other layer against the rounding noise on the same
    integers. The blind spot of replaying is closed by a row ``<quantizer>.input`` before
    each quantizer: the tensor the network quantizes against what the reference feeds it. A defect still shows where it is: in a quantizer (its scale, axis, rounding,
    saturation) at the quantizer, anywhere else at the layer that computes it.
    """
    names = comparable_layers(built, model)
    q_inputs = quantizer_inputs(built)
    if network_outputs is not None:
        got = network_outputs
    else:
        got = run_network(built, {INPUT_NAME: images.detach().cpu().float()}, capture=names,
                          tensors=sorted(set(q_inputs.values())))
    quant = built.quantization
    replay = {q: (got[t].float(), got.get(q), float(np.asarray(quant.amax[q]).reshape(-1)[0]),
                  quant.precision_of(q)) for q, t in q_inputs.items() if t in got}
    precision = "fp16" if built.fp16 else "fp32"
    modules = dict(model.named_modules())
    hooked = names + [f"stages.{k}" for k in range(4) if STAGE_OUTPUTS[k] in built.output_names()
                      and f"stages.{k}" in modules and f"stages.{k}" not in names]
    if quant is not None:
        _check_fake_quantized(model, quant.precision)
        precision = f"{quant.precision}-{precision}"
    ref = reference_layers(model, images, hooked, "fp32", replay)
    noisy = reference_layers(model, images, hooked, "fp16" if built.fp16 else "fp64", replay)
    tol = TOLERANCES[precision]
    layers = []
    for n in names:
        if n not in ref:
            layers.append(_no_output(n, got[n]))
            continue
        if n in q_inputs and q_inputs[n] in got:
            # What the network quantizes, against what the reference feeds its quantizer: values
            # before quantization are continuous, so the rounding-noise bound holds, the
            # network's own: this tensor is the output of the layer before, checked with it.
            key = f"{n}.input"
            x = got[q_inputs[n]]
            layers.append(_layer_parity(key, x.reshape(ref[key].shape) if x.numel() == ref[key].numel() else x,
                                        ref[key], noisy[key], tol))
            row = _layer_parity(n, got[n], ref[n], noisy[n], tol)
            row.boundary_codes = int(ref[f"{n}.boundary"].item()) if f"{n}.boundary" in ref else 0
            layers.append(row)
        else:
            layers.append(_layer_parity(n, got[n], ref[n], noisy[n], tol))
    if quant is not None:  # structural problems first: the first divergence names them
        layers = _missing_quantizers(built, quant) + layers
    outputs = [_layer_parity(n, got[n], ref[n], noisy[n], tol) for n in built.output_names() if n in ref]
    missing = [n for n in built.output_names() if n not in ref]
    if missing:
        raise ValueError(f"network outputs {missing} have no counterpart in the reference")
    return ParityReport(built.variant.name, built.fp16, int(images.shape[0]), layers, outputs,
                        None if quant is None else quant.precision)


def _no_output(name: str, out: torch.Tensor) -> LayerParity:
    """A network layer whose reference module never ran on these images."""
    return LayerParity(name, (), None, compare(name, out, out), 0.0, 0.0, tuple(out.shape),
                       problem="the reference module of this name produced no output (its forward did not call it)")


def _missing_quantizers(built: BuiltNetwork, quant: Any) -> List[LayerParity]:
    """Quantizers of the reference that have no Q/DQ pair in the network, though the block
    they sit in is there (a network built to stage outputs has no later blocks)."""
    layers = built.layer_names()
    names = set(layers)
    empty = compare("", torch.zeros(1), torch.zeros(1))
    missing = []
    for q in sorted(quant.amax):
        if f"{q}.quantize" in names:
            continue
        parts = q.split(".")
        block = ".".join(parts[:3]) if parts[0] == "stages" else parts[0]  # the block the quantizer sits in
        if any((n == block or n.startswith(block + ".")) and not n.startswith(q) for n in layers):
            missing.append(LayerParity(q, (), None, empty, 0.0, 0.0, problem="the reference quantizes here; the "
                                       f"network has no quantize layer {q}.quantize"))
    return missing


def _check_fake_quantized(model: nn.Module, precision: str) -> None:
    """A quantized network is checked against the fake-quantized reference, never the plain one."""
    if not any(_is_quantizer(n + ".") for n, _ in model.named_modules()):
        raise ValueError(f"the network is quantized ({precision}): compare it with the fake-quantized reference, "
                         f"create_model(variant, weights=<the quantized file>)")
