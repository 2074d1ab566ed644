"""One dynamic-resolution network per variant and precision, with every output, checked
layer by layer against the reference at several sizes and batch sizes, on CPU.

    python benchmarks/backbone_cpu.py [--variants trt-vit-a trt-vit-c]

Each network: outputs stage1..stage4 and logits, image_size (224, 224), profile
(128, 128)..(512, 640), max_batch 2, built into an engine by the installed builder, then
interpreted at (224, 224), (256, 384) and (512, 640), batch 1 and 2 (photographs, and
image-like synthetic images). Prints each output's max|Δ|/max|ref|, cosine and the worst
layer's error as a fraction of its noise-derived bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import trtvit_native as tv  # noqa: E402

OUTPUTS = ("stage1", "stage2", "stage3", "stage4", "logits")
SIZES = [(224, 224), (256, 384), (512, 640)]


def images(batch: int, hw) -> torch.Tensor:
    photos = F.interpolate(tv.photographs(batch), size=hw, mode="bilinear", antialias=True, align_corners=False)
    return torch.cat([photos[:1], tv.synthetic_images(batch - 1, hw, seed=5)]) if batch > 1 else photos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["trt-vit-a", "trt-vit-c"])
    args = parser.parse_args()
    print(f"backend {tv.get_backend().label}; seeded untrained weights")
    failures = 0
    for variant in args.variants:
        model = tv.create_model(variant)
        for fp16 in (False, True):
            start = time.perf_counter()
            built = tv.build_network(variant, model.state_dict(), fp16=fp16, max_batch=2, outputs=OUTPUTS,
                                     image_size=(224, 224), min_image_size=(128, 128), max_image_size=(512, 640))
            plan = built.build_serialized()
            print(f"{built.describe()}: {built.num_layers} layers, engine {len(plan):,d} bytes, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            for hw in SIZES:
                for batch in (1, 2):
                    report = tv.parity_report(built, model, images(batch, hw))
                    failures += not report.ok
                    worst = max(report.layers + report.outputs, key=lambda p: p.ratio)
                    cells = "  ".join(f"{p.name} {p.error.rel:.1e}/{p.error.cosine:.6f}" for p in report.outputs)
                    print(f"  {hw[0]}x{hw[1]} batch {batch}: {'PASS' if report.ok else 'FAIL'}  worst layer "
                          f"{worst.name} at {worst.ratio:.2f} of its bound  |  {cells}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
