"""INT8 and FP8 against fp32 and fp16 on the handwritten digits: top-1, agreement, engine
bytes and build seconds.

    python benchmarks/quantize_digits.py [--weights W.safetensors --data DIR] [--workdir DIR] [--images 512]

Without ``--weights`` it first trains trt-vit-a on scikit-learn's digits at 32x32 as
``benchmarks/train_digits.py`` does (``trtvit train trt-vit-a --image-size 32 --epochs 6``).
Then, with the training images as calibration data and the held-out images for
evaluation: ``trtvit quantize`` int8, fp8 (the GEMMs) and int8+fp8 (fp8 GEMMs, int8
convolutions; max calibration), ``trtvit eval --network
--json`` for the fp32 and fp16 networks of the unquantized weights and the int8 and fp8
networks (fp16 between the Q/DQ pairs) of the quantized files, and ``trtvit build`` of each
engine (TensorRT-RTX, no GPU needed) for its size and build time. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trtvit_native.cli import main as trtvit  # noqa: E402


def _run(argv: list) -> str:
    print("trtvit " + " ".join(map(str, argv)), flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = trtvit([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"trtvit {argv[0]} failed ({code})")
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="trained trt-vit-a digits weights (default: train them)")
    parser.add_argument("--data", help="the digits folder holding train/ and val/ (with --weights)")
    parser.add_argument("--workdir", help="where to write (default: a temporary directory)")
    parser.add_argument("--images", type=int, default=512, help="calibration images (512)")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trtvit-quant-digits-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.weights:
        weights, digits = Path(args.weights), Path(args.data)
    else:
        from trtvit_native.data import write_digits

        train_dir, _ = write_digits(work / "digits")
        digits, weights = train_dir.parent, work / "trt-vit-a-digits.safetensors"
        _run(["train", "trt-vit-a", "--data", train_dir, "--val", digits / "val", "--image-size", 32, "--epochs",
              args.epochs, "--batch-size", 64, "--quiet", "-o", weights])
    train, val = digits / "train", digits / "val"
    rows = []
    files = {"fp32": (weights, ["--fp32"]), "fp16": (weights, ["--fp16"])}
    recipes = {"int8": ["--precision", "int8"], "fp8": ["--precision", "fp8"],  # fp8: the GEMMs only
               "int8+fp8": ["--precision", "fp8", "--conv-precision", "int8"]}  # fp8 GEMMs, int8 convolutions
    for name, recipe in recipes.items():
        path = work / f"trt-vit-a-digits-{name.replace('+', '-')}.safetensors"
        start = time.perf_counter()
        _run(["quantize", "trt-vit-a", "--weights", weights, "--calib", train, *recipe, "--images", args.images,
              "--quiet", "-o", path])
        print(f"  {name} calibration: {time.perf_counter() - start:.1f} s")
        files[name] = (path, ["--fp16"])
    for name, (path, flags) in files.items():
        r = json.loads(_run(["eval", "trt-vit-a", "--weights", path, "--data", val, "--network", *flags, "--json"]))
        engine = work / f"{name}.engine"
        start = time.perf_counter()
        _run(["build", "trt-vit-a", "--weights", path, *flags, "--image-size", 32, "--max-batch", 32, "--no-parity",
              "-o", engine])
        seconds = time.perf_counter() - start
        rows.append((name, r, os.path.getsize(engine), seconds))
        print(f"  {name}: {json.dumps(r)}", flush=True)
    print(f"\n{'network':8s} {'top-1':>7s} {'fp32 ref':>9s} {'fq ref':>7s} {'agreement':>10s} {'engine bytes':>13s} "
          f"{'build s':>8s}   (held-out digits: {rows[0][1]['images']} images; agreement with the fp32 reference)")
    for name, r, size, seconds in rows:
        fq = f"{100 * r['quantized_reference_top1']:.2f}" if "quantized_reference_top1" in r else "-"
        print(f"{name:8s} {100 * r['top1']:7.2f} {100 * r['reference_top1']:9.2f} {fq:>7s} "
              f"{100 * r['agreement']:9.2f}% {size:13,d} {seconds:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
