"""The PyTorch reference of TRT-ViT (see :mod:`trtvit_native.variants` for the architecture).

Module names are the safetensors key names and the TensorRT layer names. Activations are
modules too (``stages.0.0.relu1``, ``stages.3.1.transformer.gelu``), so the parity check
compares them with the network layer of the same name and a wrong activation is named
where it sits.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .variants import BN_EPS, IMAGENET_MEAN, IMAGENET_STD, LN_EPS, VARIANTS, VariantConfig, get_config

__all__ = ["TRTViT", "MixBlockA", "MixBlockB", "MixBlockC", "TransformerBlock", "create_model", "count_parameters", "synthetic_images", "photographs", "imagenet_normalize"]


# --------------------------------------------------------------------------------------
# Reference modules. Module names are the safetensors keys and the TensorRT layer names.
# --------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """Bias-free convolution followed by BatchNorm (folded into one layer in the engine)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ResidualAdd(nn.Module):
    """``branch + residual``, a module so quantization can place a quantizer on ``residual``.

    Quantized (:mod:`trtvit_native.quantization`), ``residual`` is quantized and ``branch``
    is not: TensorRT fuses a residual add into the convolution that computes ``branch``
    (its epilogue), which then reads the residual as int8. Which operand is which follows
    ModelOpt's ONNX quantizer for TensorRT (``tests/test_quantize_placement.py``), also in
    the Transformer, where it quantizes the GEMM outputs (no convolution computes them)."""

    def forward(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return branch + residual


class Stem(nn.Module):
    def __init__(self, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(3, cout, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class BottleNeck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.conv1 = ConvBN(cin, mid, 1)
        self.conv2 = ConvBN(mid, mid, 3, stride)
        self.conv3 = ConvBN(mid, cout, 1)
        self.shortcut = ConvBN(cin, cout, 1, stride) if (cin != cout or stride != 1) else None
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.add = ResidualAdd()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        short = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.add(short, body))


class Attention(nn.Module):
    """Multi-head self-attention core: packed qkv (B, N, 3*d) -> (B, N, d), before proj."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def split_heads(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 3*d) -> q, k, v, each (B, heads, N, head_dim)."""
        b, n, _ = qkv.shape
        qkv = qkv.reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, context: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, N, d)."""
        b, _, n, _ = context.shape
        return context.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(qkv)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.merge_heads(attn @ v)


class Transformer(nn.Module):
    """Pre-norm Transformer block on tokens (B, N, d); no positional embedding."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = Attention(dim // head_dim, head_dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.gelu = nn.GELU()  # exact (erf)
        # quantized, the GEMM outputs (proj, fc2) are the quantized operands, as ModelOpt's
        # ONNX quantizer places them: it finds a convolution (reduce) behind z, none behind them
        self.attn_residual, self.mlp_residual = ResidualAdd(), ResidualAdd()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.attn_residual(self.proj(self.attn(self.qkv(self.norm1(z)))), z)
        return self.mlp_residual(self.fc2(self.gelu(self.fc1(self.norm2(z)))), z)


class MixBlock(nn.Module):
    """The layers every mix block has (keys ``reduce``, ``transformer``, ``conv1|2|3``):
    y = BN(Conv1x1 C -> d)(x), a Transformer on d = R*C channels, and a local BottleNeck
    d -> m = d/4 -> m -> C - d. The kinds differ in how they wire them (``forward``), so at
    R = 0.5 their weights have the same keys and shapes: a weights file records which kind
    it holds (:meth:`~trtvit_native.variants.VariantConfig.architecture`).
    """

    kind = ""

    def __init__(self, channels: int, mix_dim: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        d, m = mix_dim, mix_dim // 4
        self.reduce = ConvBN(channels, d, 1)
        self.transformer = Transformer(d, head_dim, mlp_ratio)
        self.conv1 = ConvBN(d, m, 1)
        self.conv2 = ConvBN(m, m, 3)
        self.conv3 = ConvBN(m, channels - d, 1)
        self.local_residual = channels - d == d
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.local_relu = nn.ReLU() if self.local_residual else None
        self.local_add = ResidualAdd() if self.local_residual else None
        self.add = ResidualAdd()

    def global_branch(self, y: torch.Tensor) -> torch.Tensor:
        """The Transformer on the map y (B, d, H, W), as tokens (B, H*W, d); a map again."""
        b, d, h, w = y.shape
        return self.transformer(y.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, d, h, w)

    def local_branch(self, y: torch.Tensor) -> torch.Tensor:
        """The BottleNeck on y; with C - d = d channels it keeps y as its residual."""
        local = self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(y)))))
        if self.local_relu is not None:
            local = self.local_relu(self.local_add(y, local))
        return local


class MixBlockA(MixBlock):
    """Parallel (any R): t = Transformer(y) and b = BottleNeck(y), then x + concat(t, b)."""

    kind = "A"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(x)
        return self.add(x, torch.cat([self.global_branch(y), self.local_branch(y)], dim=1))


class MixBlockB(MixBlock):
    """Serial, local then global (R = 0.5): b = BottleNeck(y), t = Transformer(b), then
    x + concat(b, t)."""

    kind = "B"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local_branch(self.reduce(x))
        return self.add(x, torch.cat([local, self.global_branch(local)], dim=1))


class MixBlockC(MixBlock):
    """Serial, global then local (any R; TRT-ViT's): t = Transformer(y), b = BottleNeck(t),
    then x + concat(t, b)."""

    kind = "C"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.global_branch(self.reduce(x))
        return self.add(x, torch.cat([t, self.local_branch(t)], dim=1))


MIX_BLOCK_CLASSES = {cls.kind: cls for cls in (MixBlockA, MixBlockB, MixBlockC)}


class TransformerBlock(MixBlock):
    """A ``T`` stage's block (MixNetV): x + BN(Conv1x1 d -> C)(Transformer(BN(Conv1x1 C -> d)(x))),
    keys ``reduce``, ``transformer``, ``expand``; no activation after the sum."""

    kind = "T"

    def __init__(self, channels: int, mix_dim: int, head_dim: int, mlp_ratio: int):
        nn.Module.__init__(self)
        self.reduce = ConvBN(channels, mix_dim, 1)
        self.transformer = Transformer(mix_dim, head_dim, mlp_ratio)
        self.expand = ConvBN(mix_dim, channels, 1)
        self.add = ResidualAdd()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.expand(self.global_branch(self.reduce(x))))


class TRTViT(nn.Module):
    """TRT-ViT. With ``features_only`` (timm's convention) the forward returns the outputs of
    the stages in ``out_indices`` (NCHW; strides 4, 8, 16, 32), ``feature_info`` describes
    them, and the head is not built."""

    def __init__(self, config: VariantConfig, num_classes: int = 1000, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        out_indices = tuple(out_indices)
        if not out_indices or any(not isinstance(i, int) or not 0 <= i <= 3 for i in out_indices) \
                or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct stage indices in 0..3, got {out_indices!r}")
        self.config = config
        self.num_classes = int(num_classes)
        self.features_only = bool(features_only)
        self.out_indices = tuple(sorted(out_indices))
        self.stem = Stem(config.stem_width)
        stages: List[List[nn.Module]] = [[], [], [], []]
        for path, kind, cin, cout, stride in config.blocks():
            s = int(path.split(".")[1])
            if kind == "bottleneck":
                stages[s].append(BottleNeck(cin, cout, stride))
            else:
                block = TransformerBlock if kind == "transformer" else MIX_BLOCK_CLASSES[config.mix_block]
                stages[s].append(block(cout, config.mix_dim_of(cout), config.head_dim, config.mlp_ratio))
        last = self.out_indices[-1] if self.features_only else 3
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages[:last + 1])
        self.head = None if self.features_only else nn.Linear(config.num_features, self.num_classes)
        self.feature_info = [{"num_chs": config.widths[i], "reduction": 4 * 2 ** i, "module": f"stages.{i}"}
                             for i in self.out_indices]
        # What a weights file records (create_model(weights=FILE) sets them): class names in
        # output order, and the image size the weights were trained at.
        self.labels: Optional[List[str]] = None
        self.image_size: Optional[int] = None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.features_only:
            x, out = self.stem(x), []
            for i, stage in enumerate(self.stages):
                x = stage(x)
                if i in self.out_indices:
                    out.append(x)
            return out
        return self.head(self.forward_features(x).mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------
# Seeded initialization
# --------------------------------------------------------------------------------------


def synthetic_images(batch: int, image_size: Union[int, Sequence[int]] = 224, seed: int = 0) -> torch.Tensor:
    """Deterministic, ImageNet-normalized images with natural-image-like spatial structure.

    Smooth random fields at several scales plus edges; used to calibrate the seeded
    model's BatchNorm statistics and as "random" test input. ``image_size``: int or (H, W).
    """
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(batch, 3, *hw)
    for cells, weight in ((4, 1.0), (16, 0.5), (56, 0.25)):
        noise = torch.rand(batch, 3, cells, cells, generator=g)
        out += weight * F.interpolate(noise, size=hw, mode="bilinear", align_corners=False)
    out = out / 1.75
    return imagenet_normalize(out.clamp(0, 1))


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel of RGB images in [0, 1], (..., 3, H, W): the input the
    network expects."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images - mean) / std


_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photographs(batch: int, image_size: int = 224) -> torch.Tensor:
    """Real photographs shipped with scikit-image (cycled to ``batch``), center-cropped,
    resized and ImageNet-normalized. Needs ``pip install scikit-image``."""
    try:
        from skimage import data
    except ImportError:
        raise ImportError("photographs() needs scikit-image (pip install scikit-image)") from None
    images = []
    for name in _PHOTOS[:batch]:
        img = torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1).float().div(255)[None]
        side = min(img.shape[-2:])
        top, left = (img.shape[-2] - side) // 2, (img.shape[-1] - side) // 2
        img = img[..., top:top + side, left:left + side]
        images.append(F.interpolate(img, size=(image_size, image_size), mode="bilinear", antialias=True,
                                    align_corners=False))
    x = imagenet_normalize(torch.cat(images).clamp(0, 1))
    return x[torch.arange(batch) % x.shape[0]]


@torch.no_grad()
def _seeded_init(model: TRTViT, seed: int, calibration_batch: int = 8, image_size: int = 224) -> None:
    """Deterministic untrained weights whose BatchNorm statistics keep activations healthy.

    Convolutions: Kaiming-normal (fan-out, ReLU gain). Linears: normal(0, 1/sqrt(fan_in)),
    which makes attention logits O(1) so softmax is neither uniform nor saturated.
    BatchNorm affine parameters are randomized around (1, 0) so BN folding is exercised,
    the last BN of every residual branch (``conv3``, a ``T`` block's ``expand``) is scaled down (0.25) to keep the residual stream
    bounded, and the running statistics are then calibrated on synthetic images, one
    BatchNorm at a time in network order, so every BN sees the statistics it normalizes.
    """
    g = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            fan_out = mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * math.sqrt(2.0 / fan_out))
        elif isinstance(mod, nn.Linear):
            std = 0.02 if name == "head" else mod.in_features ** -0.5
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.02)
        elif isinstance(mod, nn.BatchNorm2d):
            mod.weight.copy_(1.0 + 0.2 * (torch.rand(mod.weight.shape, generator=g) - 0.5))
            mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            if name.endswith(("conv3.bn", "expand.bn")):  # a residual branch's last BN
                mod.weight.mul_(0.25)
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.copy_(1.0 + 0.2 * (torch.rand(mod.weight.shape, generator=g) - 0.5))
            mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=g))

    # Calibrate running statistics with one train-mode pass over a deterministic batch.
    # In train mode each BN normalizes with its batch statistics and (momentum=None)
    # stores exactly those, so in eval mode every later layer sees the activations it saw
    # during calibration (up to the n/(n-1) factor PyTorch applies to the stored variance).
    images = synthetic_images(calibration_batch, image_size, seed=seed + 1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    model(images)
    model.eval()
    for bn in bns:
        bn.momentum = 0.1


def create_model(
    name: Union[None, str, VariantConfig] = None,
    num_classes: int = 1000,
    weights: Union[None, str, "os.PathLike[str]", Dict[str, torch.Tensor]] = None,
    seed: int = 0,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
) -> TRTViT:
    """Return the PyTorch reference of a variant, in eval mode.

    With ``weights`` (a safetensors path or a state dict) the model carries those weights
    (``num_classes`` is taken from the head in the weights). A quantized weights file
    (``trtvit quantize``) gives the fake-quantized reference: NVIDIA ModelOpt's quantizers
    with the file's amax values (:func:`trtvit_native.quantization.restore_quantizers`). Without, it carries
    deterministic *untrained* weights from ``seed`` whose BatchNorm statistics are
    calibrated on synthetic images; such a model computes meaningful-looking but
    meaningless logits, suited to numerical parity checks and timing only.

    ``features_only=True`` returns the stage outputs in ``out_indices`` instead of logits
    (timm's convention; ``model.feature_info`` lists channels, strides and modules). A
    classification weights file loads into it: the head, and stages after the last
    selected one, are ignored; anything else missing is an error.

    ``name`` may be left out when ``weights`` is a file: its ``arch`` metadata says which
    variant it holds. A model from a file carries what the file records: ``labels`` (the
    class names, in output order) and ``image_size`` (the size it was trained at), each
    None when not recorded.
    """
    if name is None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError("create_model needs a variant name, or weights= a weights file whose metadata names it")
    if name is None or isinstance(weights, (str, os.PathLike)):
        from .weights import resolve_config

        config = resolve_config(name, weights)
    else:
        config = get_config(name)
    if weights is not None:
        from .weights import WeightsError, load_weights, validate_state_dict  # weights imports nothing from here

        if not isinstance(weights, (dict, str, os.PathLike)):
            raise WeightsError(f"weights must be None, a safetensors path or a state dict, got "
                               f"{type(weights).__name__}")
        if isinstance(weights, dict):
            state = validate_state_dict(weights, config)
        else:
            state = load_weights(weights, arch=config.name if config.name in VARIANTS else None, config=config)
        num_classes = int(state["head.weight"].shape[0])
        model = TRTViT(config, num_classes, features_only, out_indices)
        wanted = model.state_dict()
        model.load_state_dict({k: v.float() for k, v in state.items() if k in wanted}, strict=False)
        if not isinstance(weights, dict):
            from .weights import class_names, is_quantized, load_quantization, trained_image_size

            model.labels, model.image_size = class_names(weights), trained_image_size(weights)

            if is_quantized(weights):  # the fake-quantized reference: ModelOpt quantizers with the file's amax
                if features_only:
                    raise WeightsError(f"{weights} is quantized; features_only models are not quantized")
                from .quantization import restore_quantizers

                restore_quantizers(model, load_quantization(weights, config.name if config.name in VARIANTS
                                                            else None))
        return model.eval()
    model = TRTViT(config, num_classes, features_only, out_indices)
    full = model if not features_only else TRTViT(config, num_classes)
    _seeded_init(full, seed)
    if features_only:  # the same seeded weights as the classifier, stages and stem only
        model.load_state_dict({k: v for k, v in full.state_dict().items() if k in model.state_dict()})
    return model.eval()


def count_parameters(model_or_name: Union[nn.Module, str, VariantConfig], include_head: bool = True,
                     num_classes: int = 1000) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    if not isinstance(model_or_name, nn.Module):  # counted from the config (tests check it against a model)
        from .variants import count_config_parameters

        return count_config_parameters(model_or_name, include_head, num_classes)
    model = model_or_name
    return sum(p.numel() for n, p in model.named_parameters() if include_head or not n.startswith("head."))
