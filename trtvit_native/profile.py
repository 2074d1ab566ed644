"""The paper's measures of a variant and of its block kinds (``trtvit profile``).

Per block: parameters, MACs and output shape, the MACs counted by
``torch.utils.flop_counter.FlopCounterMode`` on the reference block run alone at its
feature size (a library count, cross-checked against :func:`~trtvit_native.variants.count_macs`).
The paper's density measures need the TensorRT latency of each block built alone
(:func:`~trtvit_native.network.build_block_plan`, fp16, timed by CUDA events), which needs a
GPU: TeraParams = parameters / latency, TeraFLOPS = FLOPs / latency (FLOPs = 2 MACs). Without
a GPU the rows say so and carry everything else. In a variant, the blocks that change their
shape (a stage's first) are not timed alone.

``block_table`` is the paper's Table 1 for this hardware: a BottleNeck, a Transformer
block (a ``T`` stage's), MixBlockA, B and C at the feature sizes of the four stages (56², 28²,
14², 7² at a 224² input), each at that stage's width.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import MIX_BLOCK_CLASSES, TRTViT, BottleNeck, TransformerBlock
from .variants import VariantConfig, count_macs, get_config

__all__ = ["profile_variant", "block_table", "format_rows", "NO_LATENCY"]

NO_LATENCY = "needs a GPU: the TensorRT latency of a block built alone (benchmarks/gpu_checks.sh step design_space)"


def _count(module: nn.Module, x: torch.Tensor) -> Tuple[Dict[str, Any], torch.Tensor]:
    """Parameters, MACs (FlopCounterMode's FLOPs / 2) and output shape of ``module`` on ``x``,
    and its output (the next block's input)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        y = module(x)
    return {"params": sum(p.numel() for p in module.parameters()), "macs": counter.get_total_flops() // 2,
            "output_shape": list(y.shape)}, y


def gpu_available() -> bool:
    return torch.cuda.is_available()


def block_latency_ms(config: VariantConfig, kind: str, module: nn.Module, channels: int, side: int, batch: int,
                     fp16: bool = True, repeats: int = 20) -> float:
    """The median GPU time of ``module`` (a block of ``kind``) built alone as a TensorRT engine."""
    from .network import build_block_plan
    from .runtime import EngineRunner, cuda_times_ms

    state = {f"block.{k}": v.detach().float().numpy() for k, v in module.state_dict().items()}
    plan = build_block_plan(config, kind, channels, side, batch, state, fp16)
    runner = EngineRunner(plan, stream=torch.cuda.current_stream())  # queued with torch's work
    x = torch.randn(batch, channels, side, side, device="cuda", dtype=torch.float16 if fp16 else torch.float32)
    out = runner(x)
    torch.cuda.synchronize()
    times = sorted(cuda_times_ms(lambda: runner(x, out=out), repeats, inner=10, stream=runner.stream))
    return times[len(times) // 2]


def _with_latency(row: Dict[str, Any], latency_ms: Optional[float]) -> Dict[str, Any]:
    if latency_ms is None:
        row.update(latency_ms=None, tera_params=None, tera_flops=None, note=NO_LATENCY)
    else:
        seconds = latency_ms / 1e3
        row.update(latency_ms=latency_ms, tera_params=row["params"] / seconds / 1e12,
                   tera_flops=2 * row["macs"] / seconds / 1e12)
    return row


def profile_variant(variant: Union[str, VariantConfig], image_size: int = 224, batch: int = 1,
                    num_classes: int = 1000) -> Dict[str, Any]:
    """Every block of ``variant`` (stem, the four stages' blocks, head): module, kind,
    parameters, MACs at ``batch`` x 3 x ``image_size``², output shape; and the totals, with
    ``count_macs`` (from the config alone) beside the library's count."""
    config = get_config(variant)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise ValueError(f"image size must be a multiple of 32 (at least 32), got {image_size!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    model = TRTViT(config, num_classes).eval()  # untrained: counts need no weights
    x = torch.zeros(batch, 3, image_size, image_size)
    rows: List[Dict[str, Any]] = []
    row, x = _count(model.stem, x)
    rows.append(_with_latency({"module": "stem", "kind": "stem", **row}, None))
    kinds = {"bottleneck": "BottleNeck", "transformer": "Transformer (T)", "mixblock": f"MixBlock{config.mix_block}"}
    gpu = gpu_available()
    for path, kind, cin, cout, stride in config.blocks():
        block = model.get_submodule(path)
        latency = None
        if gpu and cin == cout and stride == 1:  # blocks that keep their shape are timed alone
            latency = block_latency_ms(config, kind, block, cout, x.shape[-1], batch)
        row, x = _count(block, x)
        rows.append(_with_latency({"module": path, "kind": kinds[kind], **row}, latency))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.head)
    row, _ = _count(head, x)
    rows.append(_with_latency({"module": "head", "kind": "head", **row}, None))
    total_macs = sum(r["macs"] for r in rows)
    return {"variant": config.name, "pattern": config.pattern, "mix_block": config.mix_block,
            "image_size": image_size, "batch": batch, "blocks": rows,
            "params": sum(r["params"] for r in rows), "macs": total_macs,
            "config_macs": count_macs(config, image_size, num_classes) * batch}


STAGE_WIDTHS = VariantConfig.__dataclass_fields__["widths"].default  # TRT-ViT's (and ResNet-50's) stage widths


def block_table(image_size: int = 224, batch: int = 1, mix_ratio: float = 0.5, head_dim: int = 32,
                mlp_ratio: int = 3) -> Dict[str, Any]:
    """The paper's Table 1: each block kind alone at each stage's feature size and width."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 224 or image_size % 224:
        raise ValueError(f"profile --blocks: image size {image_size!r} gives feature maps that are not multiples of "
                         f"56, 28, 14 and 7 (the paper's sizes at 224); use a multiple of 224")
    rows = []
    gpu = gpu_available()
    kinds = {"BottleNeck": "bottleneck", "Transformer": "transformer"}
    for stage, width in enumerate(STAGE_WIDTHS):
        side = image_size // (4 * 2 ** stage)
        d = int(mix_ratio * width)
        blocks = {"BottleNeck": BottleNeck(width, width, 1),
                  "Transformer": TransformerBlock(width, d, head_dim, mlp_ratio),
                  **{f"MixBlock{k}": cls(width, d, head_dim, mlp_ratio) for k, cls in MIX_BLOCK_CLASSES.items()}}
        for kind, block in blocks.items():
            latency = None
            if gpu:
                config = VariantConfig("block", (1, 1, 1, 1), mix_ratio=mix_ratio, head_dim=head_dim,
                                       mlp_ratio=mlp_ratio, mix_block=kind[-1] if kind.startswith("MixBlock") else "C")
                latency = block_latency_ms(config, kinds.get(kind, "mixblock"), block.eval(), width, side, batch)
            row, _ = _count(block.eval(), torch.zeros(batch, width, side, side))
            rows.append(_with_latency({"kind": kind, "feature_size": side, "channels": width, **row}, latency))
    return {"image_size": image_size, "batch": batch, "mix_ratio": mix_ratio, "precision": "fp16", "blocks": rows}


def format_rows(rows: List[Dict[str, Any]], first: List[str]) -> str:
    """A plain-text table of profile rows, ``first`` the leading columns."""
    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "-"
        if c in ("tera_params", "tera_flops"):
            return f"{v:.3f}"
        if c == "latency_ms":
            return f"{v:.4f}"
        if isinstance(v, int):
            return f"{v:,d}"
        return "x".join(map(str, v)) if isinstance(v, list) else str(v)

    columns = first + ["params", "macs", "output_shape", "latency_ms", "tera_params", "tera_flops"]
    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
