"""Parity of every variant's TensorRT network against the PyTorch reference, on CPU, with
the measured rounding noise the bounds are set from.

    python benchmarks/parity_cpu.py [--batch 3] [--variants trt-vit-a trt-vit-c] [--attention fused]

Builds each network (fp32 and fp16) with the installed TensorRT builder and runs the
layer-by-layer parity check (CPU interpreter vs reference) on three inputs: photographs
shipped with scikit-image, image-like synthetic images and Gaussian random images. Per
run it prints the logits' error and the reference's own rounding noise there, and over
all compared layers the largest error in units of the noise (max|Δ| and RMS): the
figures ``trtvit_native.parity.TOLERANCES`` is set from. The test suite asserts the
verdicts; this prints the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import trtvit_native as tv  # noqa: E402
from trtvit_native.network import ATTENTION_KINDS  # noqa: E402
from trtvit_native.parity import TOLERANCES  # noqa: E402


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=tv.list_variants())
    parser.add_argument("--attention", choices=ATTENTION_KINDS, default="matmul", help="native attention kind")
    args = parser.parse_args()
    inputs = {"photographs": tv.photographs(args.batch),
              "synthetic": tv.synthetic_images(args.batch, seed=11),
              "gaussian": torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))}
    print(f"backend {tv.get_backend().label}; batch {args.batch}; {args.attention} attention; seeded untrained "
          f"weights; bounds: fp32 {TOLERANCES['fp32'].factor:g}x noise, fp16 {TOLERANCES['fp16'].factor:g}x noise")
    print(f"{'variant':10s} {'prec':4s} {'input':12s} {'logits rel':>10s} {'noise rel':>10s} "
          f"{'max ×noise (max|Δ|)':>20s} {'max ×noise (RMS)':>17s}  worst layer")
    failures = 0
    worst = {"fp32": 0.0, "fp16": 0.0}
    for variant in args.variants:
        model = tv.create_model(variant)
        for fp16 in (False, True):
            built = tv.build_network(variant, model.state_dict(), fp16=fp16, max_batch=args.batch,
                                     attention=args.attention)
            for label, images in inputs.items():
                report = tv.parity_report(built, model, images)
                rows = report.layers + report.outputs
                by_max = max(rows, key=lambda p: _ratio(p.error.max_abs, p.noise.max_abs))
                by_rms = max(rows, key=lambda p: _ratio(p.error.rms_abs, p.noise.rms_abs))
                r_max = _ratio(by_max.error.max_abs, by_max.noise.max_abs)
                r_rms = _ratio(by_rms.error.rms_abs, by_rms.noise.rms_abs)
                worst[report.precision] = max(worst[report.precision], r_max, r_rms)
                failures += not report.ok
                print(f"{variant:10s} {report.precision:4s} {label:12s} {report.logits.error.rel:10.2e} "
                      f"{report.logits.noise.rel:10.2e} {r_max:20.2f} {r_rms:17.2f}  "
                      f"{by_max.name if r_max >= r_rms else by_rms.name}"
                      f"{'' if report.ok else '  FAIL at ' + report.first_divergence().name}", flush=True)
    for precision, ratio in worst.items():
        factor = TOLERANCES[precision].factor
        print(f"{precision}: largest error {ratio:.2f}x the noise; bound {factor:g}x (margin {factor / ratio:.1f}x)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
