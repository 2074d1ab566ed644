"""INT8 and FP8 post-training quantization with NVIDIA ModelOpt, on the CPU.

    trtvit quantize trt-vit-a --weights a.safetensors --calib images/ --precision int8 -o a-int8.safetensors

:func:`quantize` runs ``modelopt.torch.quantization`` on the PyTorch reference over
calibration images read through the project's one preprocessing definition
(:func:`trtvit_native.data.eval_transform`) and writes a quantized weights file: the
weights file as it was plus the ``amax`` of every enabled quantizer, under the quantizer's
module path (``stem.conv.input_quantizer.amax``), and a ``quantization`` metadata entry
(see ``weights/README.md``). Nothing is pickled: ModelOpt's own checkpoint format is
``torch.save``, so it is not used.

What is quantized is placed the way ModelOpt's ONNX quantizer places Q/DQ for TensorRT
(``tests/test_quantize_placement.py`` compares the two): per tensor, the input of every
convolution, Transformer linear layer and LayerNorm, of the stem's max pooling, and the
residual operand of every residual add (:class:`trtvit_native.model.ResidualAdd`); the
weight of every convolution and linear layer, per output channel; in fp8 files, the four
operands of the attention's two products (:data:`~trtvit_native.weights.ATTENTION_QUANTIZERS`;
the softmax probabilities' amax fixed at 1). The classifier head, the output layer, stays
in floating point. ``precision="int8"`` quantizes all of it but the attention to int8.
``precision="fp8"`` quantizes the GEMM part (inside the Transformers) to FP8, with
per-tensor weight scales unless ``fp8_weights="per-channel"``; FP8 convolutions have few or
no kernels (TensorRT-RTX: "FP8 is only supported for matrix multiplications (GEMM)";
ModelOpt: "For CNN models, only INT8 quantization is supported"), so the convolution part
stays in floating point, or in int8 with ``conv_precision="int8"``: a mixed file.
``method`` chooses how activation ranges are calibrated (``max``, or ``entropy``,
``percentile``, ``mse`` from a histogram; FP8 ranges ``max`` or ``percentile``); weights
always take their maximum.

:func:`restore_quantizers` puts the file's amax values back onto a reference:
``create_model(variant, weights=quantized_file)`` returns that fake-quantized reference.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .weights import (AMAX_SUFFIX, CONV_PRECISIONS, FP8_METHODS, FP8_WEIGHT_SCALES, QUANT_METHODS, QUANT_PRECISIONS,
                      SOFTMAX_AMAX, Quantization, _QUANT_KEY, check_keep, is_activation_quantizer,
                      load_quantization, quantizer_sites, read_metadata, write_atomically)

__all__ = ["quantize", "calibrate_model", "restore_quantizers", "quantizer_amax", "save_quantized",
           "sensitivity", "QuantizeError", "modelopt_available",
           "check_recipe", "held_out_files"]

PathLike = Union[str, "os.PathLike[str]"]


class QuantizeError(ValueError):
    """Bad input to quantization (folder, counts, modules, a missing ModelOpt); one line."""


def _mtq():
    """``modelopt.torch.quantization``; a one-line error naming the extra when it is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise QuantizeError(f"quantization needs NVIDIA ModelOpt, which is not installed or does not import ({e}): "
                            f"pip install 'trtvit_native[quant]'") from None
    return mtq


def modelopt_available() -> bool:
    try:
        _mtq()
        return True
    except QuantizeError:
        return False


def modelopt_version() -> str:
    import modelopt

    return str(getattr(modelopt, "__version__", "unknown"))


def check_recipe(precision: str, method: str, conv_precision: Optional[str] = None,
                 fp8_weights: str = "per-tensor") -> str:
    """Refuse impossible recipes before any work; returns the convolution precision
    (``int8`` for int8 files; ``none`` by default for fp8 files)."""
    if precision not in QUANT_PRECISIONS:
        raise QuantizeError(f"--precision must be one of {', '.join(QUANT_PRECISIONS)}, got {precision!r}")
    if method not in QUANT_METHODS:
        raise QuantizeError(f"--method must be one of {', '.join(QUANT_METHODS)}, got {method!r}")
    if fp8_weights not in FP8_WEIGHT_SCALES:
        raise QuantizeError(f"--fp8-weights must be one of {', '.join(FP8_WEIGHT_SCALES)}, got {fp8_weights!r}")
    if precision == "int8":
        if conv_precision not in (None, "int8"):
            raise QuantizeError(f"--conv-precision {conv_precision} needs --precision fp8: an int8 file quantizes "
                                f"the convolutions to int8")
        if fp8_weights != "per-tensor":
            raise QuantizeError("--fp8-weights needs --precision fp8 (int8 weights are per output channel)")
        return "int8"
    conv_precision = conv_precision or "none"
    if conv_precision not in CONV_PRECISIONS:
        raise QuantizeError(f"--conv-precision must be one of {', '.join(CONV_PRECISIONS)}, got {conv_precision!r} "
                            f"(FP8 convolutions are not supported: FP8 is for the GEMMs)")
    if method not in FP8_METHODS:
        raise QuantizeError(f"--method {method} cannot calibrate FP8 ranges (ModelOpt computes entropy and mse for "
                            f"integer formats only); use {' or '.join(FP8_METHODS)} with --precision fp8")
    return conv_precision


def quant_config(precision: str, method: str = "max", keep: Sequence[str] = (), conv_precision: Optional[str] = None,
                 fp8_weights: str = "per-tensor", num_classes: int = 1000, variant: Any = None) -> Dict[str, Any]:
    """The ModelOpt configuration that enables exactly the quantizers of
    :func:`trtvit_native.weights.quantizer_sites`, each with its format (int8: 8 bits; fp8:
    E4M3), its axis (per tensor, or 0: per output channel) and, for an activation calibrated
    by a method other than ``max``, a histogram calibrator (never for the softmax
    probabilities, whose amax is fixed: :func:`_finish_calibration`)."""
    conv_precision = check_recipe(precision, method, conv_precision, fp8_weights)
    bits = {"int8": 8, "fp8": (4, 3)}
    entries: List[Dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for name, site in quantizer_sites(variant, keep, num_classes, precision, conv_precision, fp8_weights).items():
        cfg: Dict[str, Any] = {"num_bits": bits[site.precision], "axis": 0 if site.shape else None}
        if is_activation_quantizer(name) and not name.endswith(".softmax_quantizer") and method != "max":
            cfg["calibrator"] = "histogram"
        entries.append({"quantizer_name": name, "cfg": cfg, "enable": True})
    return {"quant_cfg": entries, "algorithm": "max"}


def _register_modules() -> None:
    """Teach ModelOpt the reference's residual add and attention core.

    A quantized :class:`~trtvit_native.model.ResidualAdd` quantizes its first operand
    (``residual``) with its ``input_quantizer``. A quantized
    :class:`~trtvit_native.model.Attention` has ModelOpt's four attention quantizers
    (:data:`~trtvit_native.weights.ATTENTION_QUANTIZERS`, the names of ModelOpt's own
    attention plugins) on the operands of its two products, as TensorRT fuses FP8
    attention: ``softmax(Q(q * scale) Q(k)^T) -> Q -> @ Q(v)``. The query is scaled before
    it is quantized (ModelOpt's FP8 ONNX exporter moves the scale there too, so each
    dequantized operand feeds its product directly); the key is quantized in the layout of
    q and v, (B, heads, N, head_dim), and transposed by the product. With the quantizers
    disabled (int8 files) this is the plain attention, the scale applied first."""
    mtq = _mtq()
    from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import QuantInputBase, QuantModule

    from .model import Attention, ResidualAdd
    from .weights import ATTENTION_QUANTIZERS

    if QuantModuleRegistry.get(ResidualAdd) is None:
        class QuantResidualAdd(QuantInputBase):
            pass

        mtq.register(original_cls=ResidualAdd, quantized_cls=QuantResidualAdd)
    if QuantModuleRegistry.get(Attention) is None:
        class QuantAttention(QuantModule):
            def _setup(self):
                for name in ATTENTION_QUANTIZERS:
                    self._register_temp_attribute(name, TensorQuantizer(QuantInputBase.default_quant_desc_input))

            def forward(self, qkv: torch.Tensor) -> torch.Tensor:
                q, k, v = self.split_heads(qkv)
                scores = self.q_bmm_quantizer(q * self.scale) @ self.k_bmm_quantizer(k).transpose(-2, -1)
                return self.merge_heads(self.softmax_quantizer(scores.softmax(dim=-1)) @ self.v_bmm_quantizer(v))

        mtq.register(original_cls=Attention, quantized_cls=QuantAttention)


@contextlib.contextmanager
def _quiet():
    """ModelOpt prints to stdout and warns about packages this model does not use."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _quantizers(model: nn.Module) -> Dict[str, Any]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _insert(model: nn.Module, precision: str, method: str, keep: Sequence[str], conv_precision: Optional[str],
            fp8_weights: str) -> Dict[str, Any]:
    """Insert ModelOpt's quantizers (no calibration), enabled where the format places them.
    Returns the enabled quantizers by path, checked against the format's sites."""
    mtq = _mtq()
    _register_modules()
    cfg = quant_config(precision, method, keep, conv_precision, fp8_weights, model.num_classes, model.config)
    cfg["algorithm"] = None  # calibration is run (or amax restored) by the caller
    with _quiet():
        mtq.quantize(model, cfg, forward_loop=None)
    enabled = {name: q for name, q in _quantizers(model).items() if q.is_enabled}
    _check_sites(model, enabled, keep, precision, check_recipe(precision, method, conv_precision, fp8_weights),
                 fp8_weights)
    return enabled


def _check_sites(model: nn.Module, enabled: Dict[str, Any], keep: Sequence[str], precision: str,
                 conv_precision: str, fp8_weights: str) -> None:
    """ModelOpt's enabled quantizers must be the ones the file format defines."""
    sites = quantizer_sites(model.config, keep, model.num_classes, precision, conv_precision, fp8_weights)
    if set(enabled) != set(sites):
        extra, missing = sorted(set(enabled) - set(sites)), sorted(set(sites) - set(enabled))
        raise QuantizeError(f"ModelOpt {modelopt_version()} quantizes other modules than this format defines: "
                            f"extra {extra[:4]}, missing {missing[:4]}")


def restore_quantizers(model: nn.Module, quantization: Quantization) -> nn.Module:
    """Insert ModelOpt's quantizers into ``model`` (in place) with the amax values of
    ``quantization``: the fake-quantized reference the quantized network is checked
    against. Returns the model, in eval mode."""
    enabled = _insert(model, quantization.precision, quantization.method, quantization.keep,
                      quantization.conv_precision, quantization.fp8_weights)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, q in enabled.items():
            amax = torch.from_numpy(np.array(quantization.amax[name], dtype=np.float32))
            if name.endswith(".weight_quantizer") and amax.dim():  # ModelOpt's per-channel shape: (C, 1, ...)
                weight = params[name[:-len("weight_quantizer")] + "weight"]
                amax = amax.reshape((-1,) + (1,) * (weight.dim() - 1))
            q.amax = amax
            q.enable_quant()
            q.disable_calib()
    return model.eval()


def quantizer_amax(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The amax of every enabled quantizer of a ModelOpt-quantized model, as the file
    stores it: shape () per tensor, (C,) per output channel, float32."""
    out = {}
    for name, q in _quantizers(model).items():
        if q.is_enabled:
            if q.amax is None:
                raise QuantizeError(f"quantizer {name} has no amax: it saw no calibration data")
            amax = q.amax.detach().float().cpu()
            per_channel = name.endswith(".weight_quantizer") and q.axis is not None
            out[name] = amax.reshape(-1) if per_channel else amax.reshape(())
    return out


FP16_NORMAL = (2.0 ** -14, 65504.0)  # fp16's normal range: 11 significant bits


def fp16_exact_amax(amax: torch.Tensor, bound: float) -> torch.Tensor:
    """The smallest amax' >= ``amax`` whose scale amax' / bound is an fp16 number (so an
    fp16 network's quantize layer takes the scale exactly, in the tensor's type): at most
    2^-10 relative larger, which saturates nothing. Scales outside fp16's normal range are
    left as they are (rounding them would cost precision or saturate); an fp16 build
    refuses them, naming the quantizer, and an fp32 build takes them."""
    scale = amax.float() / bound
    half = scale.half()
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    normal = (scale >= FP16_NORMAL[0]) & (half.float() <= FP16_NORMAL[1])
    return torch.where(normal, half.float() * bound, amax.float())  # exact in fp32: 11 bits times 127 or 448


def _export_amax(model: nn.Module) -> List[str]:
    """Make every enabled quantizer's amax one the engine can use exactly, on the model's
    quantizers (so the fake-quantized reference is the one the file describes):

    - an amax of zero (an all-zero, pruned weight channel; an input that was always zero)
      becomes the bound, a scale of 1, as ModelOpt's exporter does
      (``TensorQuantizer._sanitize_export_amax``): zeros quantize exactly with any scale,
      and TensorRT needs a positive one;
    - activation and linear-weight amax values are raised to :func:`fp16_exact_amax`
      (fp16 networks quantize them with fp16 scales: :mod:`trtvit_native.network`).

    Returns the quantizers whose amax was zero."""
    zero = []
    with torch.no_grad():
        for name, q in _quantizers(model).items():
            if not q.is_enabled or q.amax is None:
                continue
            bound = 127.0 if q.num_bits == 8 else 448.0
            amax = q.amax.float()
            if bool((amax == 0).any()):
                amax = torch.where(amax == 0, torch.full_like(amax, bound), amax)
                zero.append(name)
            if is_activation_quantizer(name) or isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Linear):
                amax = fp16_exact_amax(amax, bound)
            q.amax = amax
    return zero


def save_quantized(model: nn.Module, path: PathLike, precision: str, method: str, images: int,
                   keep: Sequence[str] = (), metadata: Optional[Dict[str, str]] = None,
                   conv_precision: Optional[str] = None, fp8_weights: str = "per-tensor") -> List[str]:
    """Write the quantized weights file: the model's weights (float32), the amax of every
    enabled quantizer under ``<quantizer path>.amax``, and the metadata (atomically).
    Amax values are made exact for the engine first (:func:`_export_amax`; the zero ones are returned), and
    every amax is checked before anything is written."""
    from safetensors.torch import save

    from .weights import FORMAT_VERSION, WeightsError, check_amax, validate_state_dict

    conv_precision = check_recipe(precision, method, conv_precision, fp8_weights)
    state = {k: v for k, v in model.state_dict().items() if "_quantizer." not in k}
    state = validate_state_dict(state, model.config)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    substituted = _export_amax(model)
    amax = quantizer_amax(model)
    try:
        check_amax({k: v.numpy() for k, v in amax.items()}, f"{path} not written")
    except WeightsError as e:
        raise QuantizeError(str(e)) from None
    tensors.update({k + AMAX_SUFFIX: v.contiguous() for k, v in amax.items()})
    meta = {"arch": model.config.name, "format": FORMAT_VERSION, "num_classes": str(model.num_classes)}
    meta.update(metadata or {})
    meta[_QUANT_KEY] = json.dumps(Quantization(precision, method, int(images), tuple(keep), modelopt_version(), {},
                                               conv_precision, fp8_weights).metadata())
    write_atomically(path, save(tensors, metadata=meta))
    return substituted


def _finish_calibration(model: nn.Module, method: str) -> None:
    """Compute each enabled quantizer's amax from what its calibrator collected: the
    histogram ``method`` for inputs calibrated by histogram, the maximum otherwise."""
    for name, q in _quantizers(model).items():
        if not q.is_enabled:
            continue
        cal = getattr(q, "_calibrator", None)
        histogram = type(cal).__name__ == "HistogramCalibrator"
        if histogram:
            q.load_calib_amax(method)
        else:
            q.load_calib_amax()
        if name.endswith(".softmax_quantizer"):  # data-independent: probabilities lie in [0, 1]
            q.amax = torch.tensor(SOFTMAX_AMAX)
        q.enable_quant()
        q.disable_calib()


def calibrate_model(model: nn.Module, batches: Iterable[torch.Tensor], precision: str = "int8",
                    method: str = "max", keep: Sequence[str] = (), conv_precision: Optional[str] = None,
                    fp8_weights: str = "per-tensor") -> nn.Module:
    """Quantize ``model`` in place with ModelOpt: insert the quantizers, run ``batches``
    (preprocessed image tensors) through it collecting statistics, set every amax."""
    from modelopt.torch.quantization.model_calib import enable_stats_collection

    enabled = _insert(model, precision, method, keep, conv_precision, fp8_weights)
    if not enabled:
        raise QuantizeError(f"this recipe quantizes nothing of {model.config.name}: --precision {precision}"
                            f"{' (the Transformer GEMMs only)' if precision == 'fp8' and conv_precision != 'int8' else ''}"
                            f" with --keep {','.join(keep)}")
    model.eval()
    with _quiet(), torch.no_grad():
        enable_stats_collection(model)
        for images in batches:
            model(images)
        _finish_calibration(model, method)
    return model


def calibration_files(calib: PathLike, images: int, batch_size: int, seed: int = 0) -> List[str]:
    """``images`` image files from the folder ``calib`` (searched recursively), chosen by a
    seeded shuffle so every sub-folder (class) is represented; errors name the problem."""
    from .data import IMAGE_EXTENSIONS
    from pathlib import Path

    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise QuantizeError(f"--images must be a positive number of calibration images, got {images!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QuantizeError(f"--batch-size must be a positive integer, got {batch_size!r}")
    root = Path(calib)
    if not root.exists():
        raise QuantizeError(f"calibration folder {calib} does not exist")
    if not root.is_dir():
        raise QuantizeError(f"calibration folder {calib} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise QuantizeError(f"calibration folder {calib} is not readable")
    try:
        files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError as e:
        raise QuantizeError(f"calibration folder {calib} cannot be read: {e.strerror or e}") from None
    if not files:
        raise QuantizeError(f"calibration folder {calib} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if len(files) < batch_size:
        raise QuantizeError(f"calibration folder {calib} holds {len(files)} images, fewer than one batch "
                            f"(--batch-size {batch_size})")
    random.Random(seed).shuffle(files)
    return files[:images]


def held_out_files(calib: PathLike, images: int, count: int, seed: int = 0) -> List[str]:
    """Up to ``count`` images of the folder ``calib`` that :func:`calibration_files` with
    the same ``images`` and ``seed`` does not choose: data to judge quantization on."""
    every = calibration_files(calib, 1 << 62, 1, seed)
    return every[images:images + count]


def _batches(files: Sequence[str], image_size: Any, batch_size: int, progress: bool,
             skipped: Optional[List[str]] = None, source: str = "") -> Iterable[torch.Tensor]:
    """Preprocessed batches of ``files``; an image that cannot be decoded (a truncated file)
    is left out of its batch and appended to ``skipped``, as training and evaluation do."""
    from .data import DataError, eval_transform, load_rgb

    def load(path: str) -> Optional[torch.Tensor]:
        try:
            return eval_transform(load_rgb(path), image_size)
        except DataError:
            if skipped is not None:
                skipped.append(path)
            return None

    bar, decoded = None, False
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="calibrating", unit="image", leave=False)
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images = [x for x in map(load, chunk) if x is not None]
            if images:
                decoded = True
                yield torch.stack(images)
            if bar is not None:
                bar.update(len(chunk))
        if files and not decoded:  # before the calibrators are asked for ranges they never saw
            raise QuantizeError(f"none of the {len(files)} calibration images{source} could be decoded (first: "
                                f"{files[0]})")
    finally:
        if bar is not None:
            bar.close()


def _image_size(weights: PathLike, image_size: Any) -> Tuple[Any, str]:
    """The calibration size (by default the size the weights were trained at) and where it came from."""
    from .network import image_hw
    from .weights import resolve_image_size

    image_size, line = resolve_image_size(weights, image_size)
    image_hw(image_size, "--image-size")
    return image_size, line


def quantize(variant: str, weights: PathLike, calib: PathLike, output: PathLike, precision: str = "int8",
             method: str = "max", images: int = 512, batch_size: int = 32, image_size: Any = None,
             keep: Union[str, Sequence[str]] = (), progress: bool = True, seed: int = 0,
             say: Optional[Callable[[str], None]] = None, conv_precision: Optional[str] = None,
             fp8_weights: str = "per-tensor") -> Quantization:
    """Calibrate ``variant`` with ``weights`` on images of the folder ``calib`` and write the
    quantized weights file ``output``. Returns what was written (read back and validated).

    ``images``: how many images (a seeded sample of the folder; all of them when it holds
    fewer); ``image_size``: S or (H, W), by default the size the weights were trained at;
    ``keep``: module prefixes (a comma list or a sequence) left unquantized, e.g.
    ``"stages.3.1.transformer"``; ``conv_precision`` (fp8 only): ``"none"`` (default) or
    ``"int8"``; ``fp8_weights``: ``"per-tensor"`` (default) or ``"per-channel"``. Images that
    cannot be decoded are skipped and counted; ``say`` receives one line each for the image
    size (and where it came from) and, when there are any, the skipped images and the zero
    amax values replaced.
    """
    from .model import create_model
    from .weights import load_arrays

    conv_precision = check_recipe(precision, method, conv_precision, fp8_weights)
    keep = check_keep(variant, keep.split(",") if isinstance(keep, str) else keep, precision, conv_precision)
    if read_metadata(weights).get(_QUANT_KEY) is not None:
        raise QuantizeError(f"{weights} is already quantized; quantize the unquantized weights")
    load_arrays(weights, variant)  # every weights problem named before any work
    say = say or (lambda line: None)
    image_size, size_line = _image_size(weights, image_size)
    say(f"image size {size_line}")
    files = calibration_files(calib, images, batch_size, seed)
    _mtq()
    model = create_model(variant, weights=weights)
    skipped: List[str] = []
    calibrate_model(model, _batches(files, image_size, batch_size, progress, skipped, f" of {calib}"), precision,
                    method, keep, conv_precision, fp8_weights)
    if skipped:
        say(f"skipped {len(skipped)} unreadable image(s), calibrated on {len(files) - len(skipped)}: "
            f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    meta = {k: v for k, v in read_metadata(weights).items() if k not in ("arch", "format", "num_classes")}
    zero = save_quantized(model, output, precision, method, len(files) - len(skipped), keep, meta, conv_precision,
                          fp8_weights)
    if zero:
        say(f"amax zero in {len(zero)} quantizer(s) (a channel or input that was all zero), written as a scale of 1 "
            f"as ModelOpt's exporter does: {', '.join(zero[:4])}{' ...' if len(zero) > 4 else ''}")
    return load_quantization(output, variant)


def sensitivity(variant: str, quantized: PathLike, images: torch.Tensor) -> List[Tuple[str, float, float]]:
    """For each quantized module (a convolution, linear layer, LayerNorm, pooling, residual
    add, or an fp8 attention with its four quantizers), the error of the logits when only
    that module is quantized: (module, RMS of the logit difference, top-1 agreement
    with the unquantized model), largest error first. This is how to choose ``--keep``."""
    from .model import create_model

    q = load_quantization(quantized, variant)
    if q is None:
        raise QuantizeError(f"{quantized} is not a quantized weights file (trtvit quantize makes one)")
    model = create_model(variant, weights=_unquantized_state(quantized, variant))
    with torch.no_grad():
        reference = model(images)
    restore_quantizers(model, q)
    quantizers = _quantizers(model)
    modules = sorted({name.rsplit(".", 1)[0] for name in q.amax})
    for name in q.amax:
        quantizers[name].disable()
    rows = []
    with torch.no_grad():
        for module in modules:
            mine = [n for n in q.amax if n.rsplit(".", 1)[0] == module]
            for n in mine:
                quantizers[n].enable()
            out = model(images)
            for n in mine:
                quantizers[n].disable()
            rms = float((out - reference).square().mean().sqrt())
            agree = float((out.argmax(1) == reference.argmax(1)).float().mean())
            rows.append((module, rms, agree))
    return sorted(rows, key=lambda r: -r[1])


def _unquantized_state(path: PathLike, variant: str) -> Dict[str, torch.Tensor]:
    from .weights import load_arrays

    return {k: torch.from_numpy(np.array(v)) for k, v in load_arrays(path, variant).items()}
