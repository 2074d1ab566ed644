"""Train trt-vit-a on scikit-learn's handwritten digits, then check that the TensorRT network
built from the trained weights classifies like the model.

    python benchmarks/train_digits.py [--variant trt-vit-a] [--epochs 6] [--workdir DIR] [--no-network]
                                      [-- extra train flags, e.g. --ema 0.98 --trivialaug]

Writes the digits as an ImageFolder of 32x32 RGB PNGs (1,438 train / 359 held out), runs
``trtvit train VARIANT --image-size 32 --epochs 6 --batch-size 64`` (printing images/s and
seconds per epoch), then ``trtvit eval --json`` (held-out top-1, per-class recall, the
confusion matrix's checks) and ``trtvit eval --network`` in fp32 and fp16: held-out top-1
of the reference and of the CPU-interpreted network, and their agreement.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trtvit_native.cli import main as trtvit  # noqa: E402
from trtvit_native.data import write_digits  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="trt-vit-a")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workdir", help="where to write the data and the run (default: a temporary directory)")
    parser.add_argument("--no-network", action="store_true", help="skip the TensorRT network evaluations")
    parser.add_argument("extra", nargs="*", help="more trtvit train flags (after --)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trtvit-digits-"))
    train_dir, val_dir = write_digits(work / "digits")
    out = work / f"{args.variant}-digits.safetensors"
    cmd = ["train", args.variant, "--data", str(train_dir), "--val", str(val_dir), "--image-size", "32",
           "--epochs", str(args.epochs), "--batch-size", "64", "--quiet", *args.extra, "-o", str(out)]
    print("trtvit " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    if trtvit(cmd) != 0:
        return 1
    print(f"training: {time.perf_counter() - start:.1f} s in total")
    for line in (work / f"{args.variant}-digits.run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        first = f" (first step {m['first_step_loss']:.4f})" if "first_step_loss" in m else ""
        print(f"  epoch {m['epoch']}: loss {m['train_loss']:.4f}{first}, val top-1 {100 * m['val_top1']:.2f} %, "
              f"{m['images_per_second']:.1f} images/s, {m['seconds']:.1f} s")
    cmd = ["eval", args.variant, "--weights", str(out), "--data", str(val_dir), "--json"]
    print("trtvit " + " ".join(cmd), flush=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if trtvit(cmd) != 0:
            return 1
    r = json.loads(buffer.getvalue())
    confusion = r["confusion"]
    diagonal = sum(confusion[i][i] for i in range(len(confusion)))
    print(f"  top-1 {100 * r['top1']:.2f} % of {r['images']} images; confusion matrix sums to "
          f"{sum(map(sum, confusion))}, diagonal / images = {diagonal / r['images']:.6f}; recall per class: "
          + ", ".join(f"{c['label']} {100 * c['recall']:.1f}" for c in r["per_class"]))
    if args.no_network:
        return 0
    for precision in ("--fp32", "--fp16"):
        cmd = ["eval", args.variant, "--weights", str(out), "--data", str(val_dir), "--network", precision]
        print("trtvit " + " ".join(cmd), flush=True)
        if trtvit(cmd) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
