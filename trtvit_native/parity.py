"""Layer-by-layer parity between the PyTorch reference and a built TensorRT network.

The reference runs with forward hooks on every module whose name is also a layer name in
the network (ConvBN pairs, blocks, Transformer parts, the head); the CPU interpreter
captures the same layers; each pair is compared. The first layer outside tolerance is
where a divergence starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .interpreter import interpret
from .network import OUTPUT_NAME, BuiltNetwork

__all__ = ["LayerParity", "ParityReport", "compare", "parity_report", "tolerances"]


def tolerances(fp16: bool) -> Dict[str, float]:
    """Acceptance bounds for logits: max|Δ| relative to max|ref|, and cosine similarity."""
    return {"rel": 2e-2, "cosine": 0.999} if fp16 else {"rel": 1e-4, "cosine": 0.999999}


@dataclass
class LayerParity:
    name: str
    shape: tuple
    max_abs: float
    max_ref: float
    cosine: float

    @property
    def rel(self) -> float:
        return self.max_abs / self.max_ref if self.max_ref > 0 else float(self.max_abs > 0) * float("inf")

    def ok(self, tol: Dict[str, float]) -> bool:
        return self.rel <= tol["rel"] and self.cosine >= tol["cosine"]


def compare(name: str, out: torch.Tensor, ref: torch.Tensor) -> LayerParity:
    out, ref = out.detach().double().reshape(ref.shape), ref.detach().double()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0, eps=1e-30).item()
    return LayerParity(name, tuple(ref.shape), (out - ref).abs().max().item(), ref.abs().max().item(), cos)


@dataclass
class ParityReport:
    variant: str
    fp16: bool
    batch: int
    layers: List[LayerParity]
    logits: LayerParity

    @property
    def tolerance(self) -> Dict[str, float]:
        return tolerances(self.fp16)

    @property
    def ok(self) -> bool:
        return self.logits.ok(self.tolerance)

    def first_divergence(self) -> Optional[LayerParity]:
        return next((p for p in self.layers if not p.ok(self.tolerance)), None)

    def summary(self) -> str:
        tol = self.tolerance
        verdict = "PASS" if self.ok else "FAIL"
        return (f"{verdict}: {self.variant} {'fp16' if self.fp16 else 'fp32'} batch {self.batch}: "
                f"logits max|Δ| {self.logits.max_abs:.3g} = {self.logits.rel:.2e} of max|ref| "
                f"(limit {tol['rel']:.0e}), cosine {self.logits.cosine:.7f} (limit {tol['cosine']})")

    def table(self) -> str:
        tol = self.tolerance
        rows = [f"{'layer':44s} {'shape':>20s} {'max|Δ|':>10s} {'max|ref|':>10s} {'rel':>9s} {'cosine':>10s}"]
        for p in self.layers + [self.logits]:
            flag = "" if p.ok(tol) else "  <-- outside tolerance"
            rows.append(f"{p.name:44s} {str(p.shape):>20s} {p.max_abs:10.3g} {p.max_ref:10.3g} "
                        f"{p.rel:9.2e} {p.cosine:10.7f}{flag}")
        first = self.first_divergence()
        rows.append(self.summary())
        if first is not None:
            rows.append(f"first layer outside tolerance: {first.name}")
        return "\n".join(rows)


def parity_report(built: BuiltNetwork, model: nn.Module, images: torch.Tensor) -> ParityReport:
    """Compare every reference module that has a same-named network layer, and the logits."""
    layer_names = set(built.layer_names())
    modules = {name: mod for name, mod in model.named_modules() if name in layer_names}
    ref_out: Dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, name=name: ref_out.__setitem__(name, o))
             for name, mod in modules.items()]
    try:
        with torch.no_grad():
            ref_logits = model(images.float())
    finally:
        for h in hooks:
            h.remove()
    logits, captured = interpret(built, images, capture=sorted(ref_out))
    order = {n: i for i, n in enumerate(built.layer_names())}
    layers = [compare(name, captured[name], ref_out[name]) for name in sorted(ref_out, key=order.__getitem__)]
    return ParityReport(built.variant.name, built.fp16, int(images.shape[0]), layers,
                        compare(OUTPUT_NAME, logits, ref_logits))
