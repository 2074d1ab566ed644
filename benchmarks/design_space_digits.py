"""Train each block kind of the design space on scikit-learn's handwritten digits, one table.

    python benchmarks/design_space_digits.py [--kinds A B C T resnet50] [--image-size 64] [--epochs 6]
                                             [--workdir DIR] [--json FILE]

The kinds: MixBlockA, MixBlockB, MixBlockC (trt-vit-a's depths and widths, stage pattern
C-C-C-M, each given to ``trtvit train`` as a JSON variant config), ``T`` (the mixnet-v
preset, C-C-C-T) and ``resnet50`` (C-C-C-C). Each runs ``trtvit train CONFIG --image-size S
--epochs 6 --batch-size 64`` from scratch on the same 1,438 training images and reports the
held-out top-1 of the 359 others after every epoch. At 64x64 the last stage's map is 2x2,
so its attention mixes 4 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trtvit_native.cli import main as trtvit  # noqa: E402
from trtvit_native.data import write_digits  # noqa: E402

KINDS = {
    "A": {"name": "trt-vit-a-mixA", "depths": [2, 2, 4, 1], "mix_block": "A"},
    "B": {"name": "trt-vit-a-mixB", "depths": [2, 2, 4, 1], "mix_block": "B"},
    "C": {"name": "trt-vit-a-mixC", "depths": [2, 2, 4, 1], "mix_block": "C"},
    "T": "mixnet-v",
    "resnet50": "resnet50",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workdir", help="where to write the data and the runs (default: a temporary directory)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trtvit-design-"))
    train_dir, val_dir = write_digits(work / "digits")
    results = {}
    for kind in args.kinds:
        variant = KINDS[kind]
        if isinstance(variant, dict):
            path = work / f"{variant['name']}.json"
            path.write_text(json.dumps(variant))
            variant = str(path)
        out = work / f"{kind}.safetensors"
        cmd = ["train", variant, "--data", str(train_dir), "--val", str(val_dir), "--image-size",
               str(args.image_size), "--epochs", str(args.epochs), "--batch-size", "64", "--quiet", "-o", str(out)]
        print("trtvit " + " ".join(cmd), flush=True)
        start = time.perf_counter()
        if trtvit(cmd) != 0:
            return 1
        metrics = [json.loads(line) for line in out.with_suffix(".run").joinpath("metrics.jsonl").read_text()
                   .splitlines()]
        results[kind] = {"variant": variant, "val_top1": [m["val_top1"] for m in metrics],
                         "seconds": time.perf_counter() - start}
        print(f"  {kind}: held-out top-1 " + ", ".join(f"{100 * v:.1f}" for v in results[kind]["val_top1"])
              + f" % ({results[kind]['seconds']:.0f} s)", flush=True)
    print(f"\n| kind | variant | held-out top-1 after epochs 1-{args.epochs} (%) | final |")
    print("|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {Path(r['variant']).stem} | {', '.join(f'{100 * v:.1f}' for v in r['val_top1'])} | "
              f"**{100 * r['val_top1'][-1]:.1f}** |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
