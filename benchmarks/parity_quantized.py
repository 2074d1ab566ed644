"""Parity of quantized networks: the largest error of any layer in units of its noise, the
figure ``parity.TOLERANCES["int8-fp32"]`` etc. are set from.

    python benchmarks/parity_quantized.py [--variant trt-vit-a] [--image-size 32] [--batch 4] [--seeds 1,2]
                                          [--precisions int8,fp8,int8+fp8] [--calib-images 8]

Calibrates the seeded variant (10-class head) with ModelOpt on synthetic images (max), then
for int8 and fp8, each with fp32 and fp16 between the Q/DQ pairs, builds the network and
prints, per seed of the synthetic test images, whether parity passes, the largest
error/noise ratio of any layer (max|Δ| or RMS) and the layers that come closest to their
bounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import trtvit_native as tv  # noqa: E402
from trtvit_native.parity import parity_report  # noqa: E402
from trtvit_native.quantization import calibrate_model, save_quantized  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="trt-vit-a")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--precisions", default="int8,fp8,int8+fp8",
                        help="int8, fp8 (the GEMMs), int8+fp8 (fp8 GEMMs, int8 convolutions)")
    parser.add_argument("--calib-images", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trtvit-qparity-"))
    seeded = tv.create_model(args.variant, num_classes=10)
    calib = tv.synthetic_images(args.calib_images, args.image_size, seed=3)
    worst = {}
    for recipe in args.precisions.split(","):
        precision, conv = ("fp8", "int8") if recipe == "int8+fp8" else (recipe, None)
        model = tv.create_model(args.variant, weights=dict(seeded.state_dict()))
        calibrate_model(model, [calib], precision, conv_precision=conv)
        path = work / f"{recipe}.safetensors"
        save_quantized(model, path, precision, "max", args.calib_images, conv_precision=conv)
        reference = tv.create_model(args.variant, weights=path)
        for fp16 in (False, True):
            built = tv.build_network(args.variant, path, fp16=fp16, max_batch=args.batch, image_size=args.image_size)
            for seed in map(int, args.seeds.split(",")):
                start = time.perf_counter()
                report = parity_report(built, reference, tv.synthetic_images(args.batch, args.image_size, seed=seed))
                layers = [p for p in report.layers + report.outputs if p.error is not None]
                top = sorted(layers, key=lambda p: -p.ratio)[:3]
                ratio = max(p.noise_ratio for p in layers if p.noise.max_abs > 0)
                key = f"{recipe}-{'fp16' if fp16 else 'fp32'}"
                worst[key] = max(worst.get(key, 0.0), ratio)
                print(f"{key:14s} seed {seed}: {'PASS' if report.ok else 'FAIL'}, largest error "
                      f"{ratio:.2f}x the noise; closest to the bound: "
                      + ", ".join(f"{p.name} {p.ratio:.2f}" for p in top)
                      + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    print("largest error/noise ratio per precision: "
          + ", ".join(f"{k} {v:.2f} (K = {tv.parity.TOLERANCES[k.replace('int8+fp8', 'fp8')].factor:g})"
                      for k, v in worst.items()))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
