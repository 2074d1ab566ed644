"""TRT-ViT variant configs and their registry: architecture as data, no torch needed.

The paper (arXiv 2205.09579) published design guidelines but no code and no weights.
What this package builds:

* a ResNet-style stem and four stages at strides 4, 8, 16, 32 ("C-C-C-M"): stages 1-3
  are BottleNecks, stage 4 is one down-sampling BottleNeck followed by MixBlockC blocks;
* MixBlockC ("global then local", serial): a 1x1 reduction C -> d = R*C, a pre-norm
  Transformer on the d-channel tokens, a local BottleNeck on its output producing
  C - d channels, and ``x + concat(t, b)``.

The per-variant depths are this project's choice (the paper's per-variant table was not
available), set so that trt-vit-c's backbone has the ~65 M parameters published for it.

The paper's design space is data too: a stage pattern (:data:`STAGE_KINDS`: ``C``, ``M``,
``T``) and the mix block (:data:`MIX_BLOCKS`: ``A``, ``B``, ``C``). MixBlockA, MixBlockB and
the ``T`` stage are this project's reading of the paper's "parallel", "serial, local then
global" and MixNetV (its figures were not at hand); :mod:`trtvit_native.model` gives
their exact definitions. A config can be a JSON file of its fields
(:func:`get_config`), and a weights file records its architecture
(:meth:`VariantConfig.architecture`), so a file of one mix block never loads into another.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Tuple, Union

__all__ = ["VariantConfig", "VARIANTS", "register_variant", "get_config", "list_variants", "count_macs",
           "count_config_parameters", "config_from_json", "STAGE_KINDS", "MIX_BLOCKS",
           "expected_shapes", "BN_EPS", "LN_EPS"]

BN_EPS = 1e-5
LN_EPS = 1e-5
# The input the network expects: RGB in [0, 1], then (x - mean) / std per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The one preprocessing definition (ENGINE.json's "preprocessing"; implemented by
# trtvit_native.data.eval_transform for evaluation and serving, and used by training).
CROP_PCT = 0.875
PREPROCESSING = {
    "color": "RGB",
    "scale": "1/255",
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "resize": "shorter side to round(S / crop_pct), bilinear with antialiasing",
    "crop_pct": CROP_PCT,
    "crop": "center S x S",
    "layout": "NCHW float32",
}


# Block kinds per stage, one letter each in a stage pattern ("C-C-C-M" is TRT-ViT):
STAGE_KINDS = {
    "C": "BottleNecks only (the first one down-samples, but in stage 1)",
    "M": "a down-sampling BottleNeck, then mix blocks (mix_block A, B or C)",
    "T": "a down-sampling BottleNeck, then Transformer blocks (MixNetV)",
}
# The mix block of the M stages:
MIX_BLOCKS = {
    "A": "parallel: Transformer and BottleNeck side by side on the reduced map",
    "B": "serial, local then global: BottleNeck, then Transformer on its output (mix_ratio 0.5 only)",
    "C": "serial, global then local: Transformer, then BottleNeck on its output (TRT-ViT)",
}
# What a weights file records of its config ("config" metadata) and loading compares.
ARCHITECTURE_FIELDS = ("pattern", "mix_block", "mix_ratio", "depths", "widths", "stem_width", "head_dim",
                       "mlp_ratio")


@dataclass(frozen=True)
class VariantConfig:
    """Everything that defines a variant's architecture.

    ``pattern`` gives each stage's kind (:data:`STAGE_KINDS`), ``-`` between stages.
    ``depths`` counts each stage's blocks: a ``C`` stage's BottleNecks, an ``M`` or ``T``
    stage's mix or Transformer blocks after its one down-sampling BottleNeck. In an ``M`` or
    ``T`` stage of width C the Transformer works on d = ``mix_ratio`` * C channels.
    ``mix_block`` is the kind of the ``M`` stages' blocks (:data:`MIX_BLOCKS`).
    """

    name: str
    depths: Tuple[int, int, int, int]
    widths: Tuple[int, int, int, int] = (256, 512, 1024, 2048)
    stem_width: int = 64
    mix_ratio: float = 0.5
    head_dim: int = 32
    mlp_ratio: int = 3
    description: str = ""
    pattern: str = "C-C-C-M"
    mix_block: str = "C"

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append("name must be a non-empty string")
        kinds = self.pattern.split("-") if isinstance(self.pattern, str) else []
        unknown = [k for k in kinds if k not in STAGE_KINDS]
        if unknown or not kinds:
            problems.append(f"pattern {self.pattern!r}: unknown stage kind(s) {unknown or [self.pattern]} (kinds: "
                            f"{', '.join(f'{k} = {v}' for k, v in STAGE_KINDS.items())})")
        elif len(kinds) != 4:
            problems.append(f"pattern {self.pattern!r} has {len(kinds)} stage(s); a variant has 4")
        if len(self.depths) != 4 or any(int(v) != v or v < 0 for v in self.depths):
            problems.append(f"depths must be 4 non-negative integers, got {self.depths!r}")
        elif not problems:
            empty = [f"stage {s + 1} ({k})" for s, k in enumerate(kinds) if self.depths[s] < 1]
            if empty:
                problems.append(f"{', '.join(empty)} at depth 0: every stage needs at least one block, got depths "
                                f"{self.depths!r}")
        if len(self.widths) != 4 or any(int(v) != v or v <= 0 or v % 4 for v in self.widths):
            problems.append(f"widths must be 4 positive multiples of 4, got {self.widths!r}")
        if self.stem_width <= 0:
            problems.append(f"stem_width must be positive, got {self.stem_width}")
        if self.head_dim <= 0 or self.mlp_ratio <= 0:
            problems.append("head_dim and mlp_ratio must be positive")
        if self.mix_block not in MIX_BLOCKS:
            problems.append(f"mix_block {self.mix_block!r} is not one of "
                            f"{', '.join(f'{k} ({v})' for k, v in MIX_BLOCKS.items())}")
        if not problems and not 0.0 < self.mix_ratio < 1.0:
            problems.append(f"mix_ratio must lie in (0, 1), got {self.mix_ratio}")
        if not problems and self.mix_block == "B" and self.mix_stages and self.mix_ratio != 0.5:
            problems.append(f"MixBlockB needs mix_ratio 0.5 (its BottleNeck returns d channels, and "
                            f"concat(b, t) must have C = 2d), got {self.mix_ratio}")
        if not problems:
            for s in self.transformer_stages:
                c = self.widths[s]
                d = self.mix_ratio * c
                if d != int(d) or int(d) % 4 or int(d) % self.head_dim:
                    problems.append(
                        f"stage {s + 1}: mix_ratio {self.mix_ratio} * width {c} = {d} must be an integer "
                        f"divisible by 4 and by head_dim {self.head_dim}"
                    )
        if problems:
            raise ValueError(f"invalid TRT-ViT variant config {self.name!r}: " + "; ".join(problems))

    @property
    def stage_kinds(self) -> Tuple[str, ...]:
        """Each stage's kind, e.g. ("C", "C", "C", "M")."""
        return tuple(self.pattern.split("-"))

    @property
    def mix_stages(self) -> Tuple[int, ...]:
        """The stages (0-based) that hold mix blocks (``M``)."""
        return tuple(s for s, k in enumerate(self.stage_kinds) if k == "M")

    @property
    def transformer_stages(self) -> Tuple[int, ...]:
        """The stages (0-based) that hold a Transformer: ``M`` and ``T`` stages."""
        return tuple(s for s, k in enumerate(self.stage_kinds) if k in ("M", "T"))

    def mix_dim_of(self, channels: int) -> int:
        """d = R * C, the channel count the Transformer of a block of width C works on."""
        return int(self.mix_ratio * channels)

    @property
    def mix_dim(self) -> int:
        """d of a Transformer in the last stage (TRT-ViT's stage 4)."""
        return self.mix_dim_of(self.widths[3])

    def architecture(self) -> Dict[str, Any]:
        """The fields that define the network (:data:`ARCHITECTURE_FIELDS`), JSON-ready: what
        a weights file records, and what loading it compares."""
        return {f: (list(v) if isinstance(v, tuple) else v)
                for f, v in ((f, getattr(self, f)) for f in ARCHITECTURE_FIELDS)}

    @property
    def heads(self) -> int:
        return self.mix_dim // self.head_dim

    @property
    def num_features(self) -> int:
        return self.widths[3]

    def blocks(self) -> Iterator[Tuple[str, str, int, int, int]]:
        """Yield (module path, kind, cin, cout, stride) for every block of the four stages;
        kind is ``bottleneck``, ``mixblock`` (of :attr:`mix_block`) or ``transformer``."""
        cin = self.stem_width
        for s, kind in enumerate(self.stage_kinds):
            cout = self.widths[s]
            n_bottlenecks = self.depths[s] if kind == "C" else 1
            for b in range(n_bottlenecks):
                stride = 2 if (b == 0 and s > 0) else 1
                yield f"stages.{s}.{b}", "bottleneck", cin, cout, stride
                cin = cout
            if kind in ("M", "T"):
                for b in range(1, self.depths[s] + 1):
                    yield f"stages.{s}.{b}", "mixblock" if kind == "M" else "transformer", cout, cout, 1


VARIANTS: Dict[str, VariantConfig] = {}


def register_variant(config: VariantConfig, overwrite: bool = False) -> VariantConfig:
    """Make ``config`` available by name to every function that takes a variant name."""
    if not isinstance(config, VariantConfig):
        raise TypeError(f"register_variant expects a VariantConfig, got {type(config).__name__}")
    if config.name in VARIANTS and not overwrite and VARIANTS[config.name] != config:
        raise ValueError(f"variant {config.name!r} is already registered (pass overwrite=True to replace it)")
    VARIANTS[config.name] = config
    return config


for _cfg in (
    VariantConfig("trt-vit-a", (2, 2, 4, 1), description="25.4 M backbone parameters"),
    VariantConfig("trt-vit-b", (2, 3, 6, 2), description="41.7 M backbone parameters"),
    VariantConfig("trt-vit-c", (3, 4, 14, 3), description="64.7 M backbone parameters"),
    VariantConfig("trt-vit-d", (3, 4, 20, 4), description="85.1 M backbone parameters"),
    # the paper's baseline: torchvision's ResNet-50 v1.5 (stride on the 3x3 convolution),
    # 25,557,032 parameters with a 1000-class head
    VariantConfig("resnet50", (3, 4, 6, 3), pattern="C-C-C-C", description="ResNet-50 v1.5 (the paper's baseline)"),
    # the paper's MixNetV: ResNet-50 with its last stage's blocks replaced by Transformer blocks
    VariantConfig("mixnet-v", (3, 4, 6, 2), pattern="C-C-C-T", description="MixNetV (Transformer blocks in stage 4)"),
):
    register_variant(_cfg)


def list_variants() -> List[str]:
    return sorted(VARIANTS)


_REQUIRED_FIELDS = ("name", "depths")


def config_from_json(fields: Mapping[str, Any], source: str = "config") -> VariantConfig:
    """A :class:`VariantConfig` from a JSON object of its fields: ``name`` and ``depths`` are
    required, the rest default to TRT-ViT's; unknown or missing fields are named."""
    known = VariantConfig.__dataclass_fields__
    if not isinstance(fields, Mapping):
        raise ValueError(f"{source}: a variant config is a JSON object of VariantConfig fields, got "
                         f"{type(fields).__name__}")
    unknown = sorted(set(fields) - set(known))
    missing = [f for f in _REQUIRED_FIELDS if f not in fields]
    if unknown or missing:
        raise ValueError(f"{source}: " + "; ".join(
            ([f"unknown field(s) {', '.join(unknown)} (fields: {', '.join(known)})"] if unknown else [])
            + ([f"missing required field(s) {', '.join(missing)}"] if missing else [])))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return VariantConfig(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _read_json_config(path: str) -> VariantConfig:
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
    except OSError as e:
        raise ValueError(f"variant config {path}: cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"variant config {path}: not JSON ({e})") from None
    return config_from_json(fields, f"variant config {path}")


def get_config(name_or_config: Union[str, "os.PathLike[str]", VariantConfig]) -> VariantConfig:
    """Resolve a registered variant name, or a JSON file of :class:`VariantConfig` fields
    (``name`` and ``depths`` required), or pass a config through."""
    if isinstance(name_or_config, VariantConfig):
        return name_or_config
    if isinstance(name_or_config, str) and name_or_config in VARIANTS:
        return VARIANTS[name_or_config]
    if isinstance(name_or_config, (str, os.PathLike)) and os.fspath(name_or_config).endswith(".json"):
        return _read_json_config(os.fspath(name_or_config))
    raise ValueError(
        f"unknown TRT-ViT variant {name_or_config!r}; known variants: {', '.join(list_variants())} "
        f"(or a JSON file of VariantConfig fields)"
    )


def count_macs(name: Union[str, VariantConfig], image_size: int = 224, num_classes: int = 1000,
               include_attention: bool = True) -> int:
    """Multiply-accumulates of convolutions and matrix products at batch 1.

    ``include_attention`` counts the two attention products (Q K^T and A V, 2 N^2 d per
    MixBlockC). ``trtvit info`` and the README's variant table report the count with them
    (3.24 / 4.57 / 7.43 / 9.41 GMACs at 224²); the design's table gives the count without
    them (3.23 / 4.56 / 7.41 / 9.39, as per-module counting tools report it).
    """
    config = get_config(name)
    macs = 0

    def conv(cin: int, cout: int, k: int, hw: int) -> int:
        return cin * cout * k * k * hw * hw

    hw = image_size // 2
    macs += conv(3, config.stem_width, 7, hw)
    hw //= 2
    for _, kind, cin, cout, stride in config.blocks():
        if kind == "bottleneck":
            mid = cout // 4
            out_hw = hw // stride
            macs += conv(cin, mid, 1, hw) + conv(mid, mid, 3, out_hw) + conv(mid, cout, 1, out_hw)
            if cin != cout or stride != 1:
                macs += conv(cin, cout, 1, out_hw)
            hw = out_hw
        else:  # mix and Transformer blocks: reduce, Transformer, then a BottleNeck or expand
            d, m, n = config.mix_dim_of(cout), config.mix_dim_of(cout) // 4, hw * hw
            macs += conv(cout, d, 1, hw)
            macs += n * d * 3 * d + n * d * d + 2 * n * d * config.mlp_ratio * d
            if include_attention:
                macs += 2 * n * n * d
            if kind == "transformer":
                macs += conv(d, cout, 1, hw)
            else:
                macs += conv(d, m, 1, hw) + conv(m, m, 3, hw) + conv(m, cout - d, 1, hw)
    return macs + config.num_features * num_classes


def count_config_parameters(name: Union[str, VariantConfig], include_head: bool = True,
                            num_classes: int = 1000) -> int:
    """Trainable parameters of a variant from its config alone (no torch): every entry of
    :func:`expected_shapes` but the BatchNorm running statistics, which are buffers."""
    total = 0
    for key, shape in expected_shapes(name, num_classes).items():
        if key.endswith((".running_mean", ".running_var")) or (not include_head and key.startswith("head.")):
            continue
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


def expected_shapes(name: Union[str, VariantConfig], num_classes: int = 1000) -> Dict[str, Tuple[int, ...]]:
    """Every key of a variant's weights file (the reference's state dict) with its shape."""
    config = get_config(name)
    shapes: Dict[str, Tuple[int, ...]] = {}

    def conv_bn(prefix: str, cin: int, cout: int, k: int) -> None:
        shapes[f"{prefix}.conv.weight"] = (cout, cin, k, k)
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{part}"] = (cout,)

    def linear(prefix: str, cin: int, cout: int) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin)
        shapes[f"{prefix}.bias"] = (cout,)

    conv_bn("stem", 3, config.stem_width, 7)
    for path, kind, cin, cout, stride in config.blocks():
        if kind == "bottleneck":
            mid = cout // 4
            conv_bn(f"{path}.conv1", cin, mid, 1)
            conv_bn(f"{path}.conv2", mid, mid, 3)
            conv_bn(f"{path}.conv3", mid, cout, 1)
            if cin != cout or stride != 1:
                conv_bn(f"{path}.shortcut", cin, cout, 1)
        else:
            d, m = config.mix_dim_of(cout), config.mix_dim_of(cout) // 4
            conv_bn(f"{path}.reduce", cout, d, 1)
            t = f"{path}.transformer"
            for norm in ("norm1", "norm2"):
                shapes[f"{t}.{norm}.weight"] = shapes[f"{t}.{norm}.bias"] = (d,)
            linear(f"{t}.qkv", d, 3 * d)
            linear(f"{t}.proj", d, d)
            linear(f"{t}.fc1", d, config.mlp_ratio * d)
            linear(f"{t}.fc2", config.mlp_ratio * d, d)
            if kind == "transformer":
                conv_bn(f"{path}.expand", d, cout, 1)
                continue
            conv_bn(f"{path}.conv1", d, m, 1)
            conv_bn(f"{path}.conv2", m, m, 3)
            conv_bn(f"{path}.conv3", m, cout - d, 1)
    linear("head", config.num_features, num_classes)
    return shapes
