"""Logits parity of every variant's TensorRT network against the PyTorch reference, on CPU.

    python benchmarks/parity_cpu.py [--batch 3] [--variants trt-vit-a trt-vit-c] [--attention fused]

Builds each network (fp32 and fp16) with the installed TensorRT builder, runs it with the
CPU interpreter on photographs shipped with scikit-image and on Gaussian random images,
and prints max|Δ| / max|ref| and the cosine similarity of the logits. The test suite
asserts the bounds; this prints the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import trtvit_native as tv  # noqa: E402
from trtvit_native.network import ATTENTION_KINDS  # noqa: E402
from trtvit_native.parity import compare, tolerances  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=tv.list_variants())
    parser.add_argument("--attention", choices=ATTENTION_KINDS, default="matmul", help="native attention kind")
    args = parser.parse_args()
    inputs = {"photographs": tv.photographs(args.batch),
              "random": torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))}
    print(f"backend {tv.get_backend().label}; batch {args.batch}; {args.attention} attention; "
          f"seeded untrained weights")
    failures = 0
    for variant in args.variants:
        model = tv.create_model(variant)
        for fp16 in (False, True):
            built = tv.build_network(variant, model.state_dict(), fp16=fp16, max_batch=args.batch,
                                     attention=args.attention)
            for label, images in inputs.items():
                with torch.no_grad():
                    ref = model(images)
                p = compare("logits", tv.interpret(built, images), ref)
                ok = p.ok(tolerances(fp16))
                failures += not ok
                print(f"{variant:10s} {'fp16' if fp16 else 'fp32'} {label:12s} max|Δ|/max|ref| {p.rel:.2e}  "
                      f"cosine {p.cosine:.7f}  {'ok' if ok else 'OUTSIDE TOLERANCE'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
