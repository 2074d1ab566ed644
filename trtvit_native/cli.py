"""The ``trtvit`` command: build engines, list variants, print parity reports."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import List, Optional

from .weights import check_output_path  # noqa: F401  (numpy only; used by the commands)

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise _UsageError(f"{command}: {message}" if command else message)


class _UsageError(Exception):
    pass


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _size(text: str):
    """``224`` or ``800x1344`` -> 224 or (800, 1344); checked as image sizes later."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"invalid image size {text!r}: give S or HxW, e.g. 224 or 800x1344")
    values = [int(p) for p in parts]
    return values[0] if len(values) == 1 else tuple(values)


def _outputs(text: str):
    return text if text in ("logits", "features") else tuple(t.strip() for t in text.split(",") if t.strip())


def _add_precision(p: argparse.ArgumentParser) -> None:
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="fp16", action="store_true", default=True, help="fp16 network (default)")
    prec.add_argument("--fp32", dest="fp16", action="store_false", help="fp32 network")


def _add_common(p: argparse.ArgumentParser) -> None:
    """The network options ``build`` and ``parity`` share: ``parity`` checks the network
    ``build`` would make from the same options."""
    from .network import ATTENTION_KINDS  # numpy only: no torch, no TensorRT
    p.add_argument("variant", help="variant name (see `trtvit info`)")
    p.add_argument("--weights", metavar="FILE", help="safetensors weights (default: seeded untrained weights)")
    _add_precision(p)
    p.add_argument("--image-size", type=_size, metavar="S",
                   help="input size S or HxW, multiples of 32 (default: the size the weights were trained at, "
                        "else 224); the optimization shape when dynamic")
    p.add_argument("--min-image-size", type=_size, metavar="S", help="smallest input, S or HxW: dynamic H and W")
    p.add_argument("--max-image-size", type=_size, metavar="S", help="largest input, S or HxW: dynamic H and W")
    p.add_argument("--outputs", default="logits", metavar="LIST",
                   help="logits (default), features (stage1..stage4), or a comma list of stage1..stage4, logits")
    p.add_argument("--attention", choices=ATTENTION_KINDS, default="matmul",
                   help="native attention: matmul (MatMul-SoftMax-MatMul, default) or fused (IAttention layer)")
    p.add_argument("--plugins", choices=["auto", "on", "off"], default="auto",
                   help="fused CUDA plugins: auto (when available), on (required), off")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``trtvit train`` (here, so that parsing imports no torch)."""
    p.add_argument("variant", help="variant name (see `trtvit info`)")
    p.add_argument("--data", metavar="DIR", help="training ImageFolder (one sub-folder per class); required "
                                                  "unless --resume")
    p.add_argument("--val", metavar="DIR", help="validation ImageFolder with the same classes")
    p.add_argument("--epochs", type=int, metavar="N",
                   help="epochs (30); with --resume, a larger number extends the run to that end")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="global batch size (64)")
    p.add_argument("--lr", type=float, metavar="F", help="peak learning rate (1e-3 from scratch, 2e-4 with --init)")
    p.add_argument("--weight-decay", type=float, default=0.05, metavar="F", help="AdamW weight decay (0.05)")
    p.add_argument("--warmup-epochs", type=float, metavar="N", help="linear warmup (1 from scratch, 0 with --init)")
    p.add_argument("--image-size", type=int, metavar="S",
                   help="training image size, a multiple of 32 (default: the size of the --init weights, else 224)")
    p.add_argument("--label-smoothing", type=float, default=0.1, metavar="F", help="(0.1)")
    p.add_argument("--init", metavar="W.safetensors", help="start from these weights (same variant, any classes)")
    p.add_argument("--freeze", default="", metavar="PREFIXES", help="comma-separated module prefixes to freeze")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run with the same number of processes (its saved settings apply)")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after epoch N (resumable)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data loading processes (2)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="(0)")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default: OUT without .safetensors + .run)")
    p.add_argument("--clip-grad", type=float, default=1.0, metavar="F", help="gradient norm clip (1.0)")
    p.add_argument("--min-crop-scale", type=float, default=0.5, metavar="F",
                   help="smallest random crop, as a fraction of the image area (0.5)")
    p.add_argument("--hflip", type=float, default=0.5, metavar="P", help="horizontal flip probability (0.5)")
    p.add_argument("--amp", choices=["auto", "off", "fp16", "bf16"], default="auto",
                   help="mixed precision: auto (bf16 from compute capability 8.0, else fp16 on CUDA; off on CPU), "
                        "off, fp16 (CUDA), bf16")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an EMA of weights and buffers (e.g. 0.999, reached after a warmup as timm's: "
                        "min(DECAY, 1 - (1 + k)^-3/4) after k steps); validated, saved and resumed instead")
    aug = p.add_mutually_exclusive_group()
    aug.add_argument("--randaug", type=_randaug, metavar="N,M", help="kornia RandAugment: N operations, magnitude M "
                                                                     "(0 < M < 30)")
    aug.add_argument("--trivialaug", action="store_true", help="kornia TrivialAugment")
    p.add_argument("--random-erasing", type=float, default=0.0, metavar="P", help="random erasing probability (0)")
    p.add_argument("--mixup", type=float, default=0.0, metavar="A", help="MixUp with Beta(A, A) (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, metavar="A",
                   help="CutMix with Beta(A, A) (0: off; with --mixup, one of the two per batch)")
    p.add_argument("--accum-steps", type=int, default=1, metavar="K",
                   help="gradient accumulation: --batch-size split into K backward passes per step (1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", metavar="OUT.safetensors", help="trained weights file; required unless --resume")


def train_defaults() -> dict:
    """``trtvit train``'s option defaults, by destination (a resume compares what is given with them)."""
    p = argparse.ArgumentParser()
    _add_train_arguments(p)
    return {a.dest: a.default for a in p._actions if a.dest not in ("help", "variant")}


def _randaug(text: str):
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"invalid N,M {text!r}: give operations and magnitude, e.g. 2,9")
    return int(parts[0]), int(parts[1])


def _add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``trtvit quantize`` (here, so that parsing imports no torch)."""
    p.add_argument("variant", help="variant name (see `trtvit info`)")
    p.add_argument("--weights", required=True, metavar="FILE", help="safetensors weights to quantize")
    p.add_argument("--calib", required=True, metavar="DIR", help="folder of calibration images (searched recursively)")
    p.add_argument("--precision", choices=["int8", "fp8"], default="int8",
                   help="int8 (default): convolutions and GEMMs; fp8 (E4M3): the Transformer GEMMs")
    p.add_argument("--conv-precision", choices=["none", "int8"], default=None,
                   help="with --precision fp8: the convolutions in floating point (none, default) or int8")
    p.add_argument("--fp8-weights", choices=["per-tensor", "per-channel"], default="per-tensor",
                   help="fp8 weight scales: per-tensor (default, ModelOpt's torch FP8 recipe) or per-channel")
    p.add_argument("--method", choices=["max", "entropy", "percentile", "mse"], default="max",
                   help="how activation ranges are calibrated (max; fp8: max or percentile); weights take their "
                        "maximum")
    p.add_argument("--images", type=int, default=512, metavar="N", help="calibration images, a seeded sample (512)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="(32)")
    p.add_argument("--image-size", type=_size, metavar="S", help="S or HxW (default: the size trained at, else 224)")
    p.add_argument("--keep", default="", metavar="PREFIXES",
                   help="comma list of modules left unquantized, e.g. head,stages.3.1.transformer")
    p.add_argument("--sensitivity", action="store_true",
                   help="also print, per quantized layer, the logit error when only that layer is quantized, on "
                        "images not used for calibration")
    p.add_argument("--sensitivity-data", metavar="DIR",
                   help="images for --sensitivity (default: up to 64 images of --calib that calibration did not use)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="Q.safetensors", help="quantized weights file")


def _parser() -> _Parser:
    parser = _Parser(prog="trtvit", description="TRT-ViT TensorRT engines built with the network API.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    build = sub.add_parser("build", help="build a serialized engine")
    _add_common(build)
    build.add_argument("--max-batch", type=int, default=32, metavar="N", help="largest batch of the profile (32)")
    build.add_argument("--no-parity", action="store_true", help="skip the CPU parity check")
    build.add_argument("--keep-failed", action="store_true",
                       help="write the engine even when the parity check fails (the exit status is still 1)")
    build.add_argument("-o", "--output", required=True, metavar="FILE", help="engine file to write")
    run = sub.add_parser("run", help="run an engine file on the GPU and time it")
    run.add_argument("engine", help="engine file (from trtvit build)")
    run.add_argument("--batch", type=int, action="append", metavar="N",
                     help="batch size to time (repeatable; default: 1 and the engine's largest)")
    run.add_argument("--iterations", type=int, default=100, metavar="K", help="timed runs per batch size (100)")
    run.add_argument("--check", action="store_true",
                     help="also compare every output of the engine with the PyTorch reference on the same GPU "
                          "(needs ENGINE.json from trtvit build)")
    info = sub.add_parser("info", help="list variants with parameters and GMACs, or a weights file's")
    info.add_argument("weights", nargs="?", help="a weights file: its variant's architecture, parameters and MACs")
    prof = sub.add_parser("profile", help="parameters, MACs and output shape per block (the paper's measures); "
                                          "--blocks: its Table 1 of block kinds")
    prof.add_argument("variant", nargs="?", help="variant name or JSON config (not with --blocks)")
    prof.add_argument("--image-size", type=int, default=224)
    prof.add_argument("--batch", type=int, default=1)
    prof.add_argument("--blocks", action="store_true", help="BottleNeck, Transformer, MixBlockA/B/C alone at each "
                                                            "stage's feature size and width")
    prof.add_argument("--json", action="store_true", help="print JSON")
    _add_train_arguments(sub.add_parser("train", help="train or fine-tune on an ImageFolder tree (see "
                                                       "trtvit_native.train)"))
    tx = sub.add_parser("export-triton", help="write a Triton model repository entry for an engine")
    tx.add_argument("engine", help="engine file from trtvit build (its ENGINE.json beside it)")
    tx.add_argument("--repository", required=True, metavar="DIR", help="Triton model repository")
    tx.add_argument("--name", metavar="NAME", help="model name (default: VARIANT-PRECISION)")
    tx.add_argument("--version", type=int, default=1, metavar="N", help="model version folder (1)")
    tx.add_argument("--instances", type=int, default=1, metavar="N", help="instances per GPU (1)")
    tx.add_argument("--max-queue-delay-us", type=int, default=100, metavar="N",
                    help="dynamic batching: longest wait to fill a batch, microseconds (100)")
    tx.add_argument("--preprocess", action="store_true",
                    help="also NAME_preprocess (Python backend: encoded images -> input) and NAME_pipeline (ensemble)")
    tx.add_argument("--runner", choices=("tensorrt", "python"), default="tensorrt",
                    help="serve the engine with Triton's TensorRT backend (full-TensorRT engines; default) or with "
                         "a Python-backend model running trtvit_native.EngineRunner (either TensorRT)")
    tx.add_argument("--force", action="store_true", help="replace existing model folders")
    env = sub.add_parser("triton-env", help="make the environment Triton's Python backend runs the exported models "
                                             "in (numpy < 2, then this Python's packages)")
    env.add_argument("path", metavar="DIR", help="the venv to make (its bin/ goes first on tritonserver's PATH)")
    ev = sub.add_parser("eval", help="top-1/top-5 of the reference, the network (CPU) or an engine (GPU) on a folder")
    ev.add_argument("variant", help="variant name")
    ev.add_argument("--weights", required=True, metavar="FILE", help="safetensors weights (from trtvit train)")
    ev.add_argument("--data", required=True, metavar="DIR", help="ImageFolder with the weights' classes")
    ev.add_argument("--image-size", type=int, metavar="S", help="input size (default: the size trained at)")
    what = ev.add_mutually_exclusive_group()
    what.add_argument("--network", action="store_true",
                      help="also run the TensorRT network built from the weights on the CPU interpreter")
    what.add_argument("--engine", metavar="FILE", help="also run this engine file on the GPU")
    _add_precision(ev)
    ev.add_argument("--batch-size", type=int, default=32, metavar="N", help="(32)")
    ev.add_argument("--workers", type=int, default=0, metavar="N", help="image decoding processes (0)")
    ev.add_argument("--confusion", metavar="PNG", help="also draw the confusion matrix into this PNG file")
    ev.add_argument("--per-image", action="store_true",
                    help="also each image's predicted class and probability (JSON: 'predictions')")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    pr = sub.add_parser("predict", help="the top classes of image files, by the reference, the network (CPU) or an "
                                        "engine (GPU)")
    pr.add_argument("weights", help="safetensors weights (from trtvit train): the variant and class names come from "
                                    "the file")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, BMP...)")
    what = pr.add_mutually_exclusive_group()
    what.add_argument("--network", action="store_true", help="classify with the TensorRT network on the CPU "
                                                             "interpreter")
    what.add_argument("--engine", metavar="FILE", help="classify with this engine file on the GPU")
    _add_precision(pr)
    pr.add_argument("--top", type=int, metavar="K", help="classes per image (5, or all when there are fewer)")
    pr.add_argument("--image-size", type=int, metavar="S", help="input size (default: the size trained at)")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quantize_arguments(sub.add_parser("quantize", help="calibrate int8 or fp8 quantization with NVIDIA ModelOpt "
                                                            "(CPU) and write a quantized weights file"))
    parity = sub.add_parser("parity", help="per-layer parity report of the network against the reference")
    _add_common(parity)
    parity.add_argument("--batch", type=int, default=2, metavar="N", help="images per check (2)")
    parity.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (0)")
    return parser


def _reference_and_weights(variant: str, weights: Optional[str]):
    from .model import create_model
    from .weights import is_quantized

    model = create_model(variant, weights=weights)
    if weights is not None and is_quantized(weights):  # the fake-quantized reference; the network reads the file
        return model, weights
    return model, model.state_dict()


def _cmd_info(args: argparse.Namespace) -> int:
    from .variants import VARIANTS, count_config_parameters, count_macs  # data: no torch

    if args.weights is not None:
        from .weights import config_of_file, load_arrays, trained_image_size

        cfg = config_of_file(args.weights)
        arrays = load_arrays(args.weights, config=cfg)
        num_classes = int(arrays["head.weight"].shape[0])
        size = trained_image_size(args.weights) or 224
        print(f"file         {args.weights}")
        print(f"variant      {cfg.name}: " + ", ".join(f"{k} {v}" for k, v in cfg.architecture().items()))
        print(f"parameters   {count_config_parameters(cfg, num_classes=num_classes):,d} ({num_classes} classes; "
              f"backbone {count_config_parameters(cfg, include_head=False):,d})")
        print(f"GMACs        {count_macs(cfg, size, num_classes) / 1e9:.2f} at {size}x{size}")
        return 0

    print(f"{'variant':12s} {'pattern':>10s} {'depths':>14s} {'params (backbone)':>18s} {'params (+head)':>15s} "
          f"{'GMACs@224':>10s}")
    for name in sorted(VARIANTS):
        cfg = VARIANTS[name]
        pattern = cfg.pattern.replace("M", f"M{cfg.mix_block}") if cfg.mix_stages else cfg.pattern
        print(f"{name:12s} {pattern:>10s} {str(tuple(cfg.depths)):>14s} "
              f"{count_config_parameters(name, include_head=False):>18,d} "
              f"{count_config_parameters(name):>15,d} {count_macs(name) / 1e9:>10.2f}")
    print("Depths are this project's choice (the paper published no per-variant table of them); "
          "GMACs count convolutions and matrix products, attention included.")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .profile import NO_LATENCY, block_table, format_rows, profile_variant

    if args.blocks == (args.variant is not None):
        raise ValueError("trtvit profile needs a variant, or --blocks (the block kinds alone), not both")
    if args.blocks:
        result = block_table(args.image_size, args.batch)
        table = format_rows(result["blocks"], ["kind", "feature_size", "channels"])
        title = f"block kinds alone, batch {args.batch}, fp16, at the stages' sizes of a {args.image_size}² input"
    else:
        result = profile_variant(args.variant, args.image_size, args.batch)
        table = format_rows(result["blocks"], ["module", "kind"])
        mix = f", mix block {result['mix_block']}" if "M" in result["pattern"] else ""
        title = (f"{result['variant']} ({result['pattern']}{mix}), batch {args.batch}, "
                 f"{args.image_size}²: {result['params']:,d} parameters, {result['macs'] / 1e9:.3f} GMACs "
                 f"(FlopCounterMode; from the config: {result['config_macs'] / 1e9:.3f})")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(title)
    print(table)
    if any(r["latency_ms"] is None for r in result["blocks"]):
        print(f"latency, TeraParams, TeraFLOPS: {NO_LATENCY}")
    return 0


def _network_image_size(args: argparse.Namespace):
    """``build``'s and ``parity``'s image size (the optimization shape) and where it came from;
    a size from the weights outside a given --min/--max-image-size range is named."""
    from .network import image_hw
    from .weights import resolve_image_size

    size, line = resolve_image_size(args.weights, args.image_size)
    if args.image_size is None and (args.min_image_size is not None or args.max_image_size is not None):
        opt = image_hw(size)
        low = image_hw(args.min_image_size, "min_image_size") if args.min_image_size is not None else opt
        high = image_hw(args.max_image_size, "max_image_size") if args.max_image_size is not None else opt
        if not (low[0] <= opt[0] <= high[0] and low[1] <= opt[1] <= high[1]):
            raise ValueError(f"image size {line} lies outside the profile {low[0]}x{low[1]}..{high[0]}x{high[1]}: "
                             f"give --image-size inside it (the optimization shape)")
    return size, line


def _plugins_arg(value: str):
    return {"auto": "auto", "on": True, "off": False}[value]


def _cmd_build(args: argparse.Namespace) -> int:
    from .weights import resolve_config
    from .network import build_network

    variant = resolve_config(args.variant, args.weights)  # fails fast on an unknown name
    _check_engine_output(args.output)
    check_output_path(args.output)
    args.image_size, size_line = _network_image_size(args)
    print(f"image      {size_line}", flush=True)
    t0 = time.perf_counter()
    if args.no_parity and args.weights:
        model, weights = None, args.weights  # numpy from the file: no torch on this path
    else:
        model, weights = _reference_and_weights(variant, args.weights)
    t_weights = time.perf_counter() - t0
    built = build_network(variant, weights, fp16=args.fp16, max_batch=args.max_batch,
                          image_size=args.image_size, plugins=_plugins_arg(args.plugins), attention=args.attention,
                          outputs=_outputs(args.outputs), min_image_size=args.min_image_size,
                          max_image_size=args.max_image_size)
    if args.weights:  # the network may come from the reference's state dict: the file says the size
        from .weights import trained_image_size

        built.trained_image_size = trained_image_size(args.weights)
    t1 = time.perf_counter()
    plan = built.build_serialized()
    t_build = time.perf_counter() - t1
    metadata = built.metadata(plan)
    metadata.update(weights=os.path.abspath(args.weights) if args.weights else "seeded untrained weights (seed 0)",
                    weights_file=os.path.abspath(args.weights) if args.weights else None,
                    seed=None if args.weights else 0)
    if args.weights:
        from .weights import class_names

        labels = class_names(args.weights)
        if labels is not None:
            if len(labels) != built.num_classes:
                raise ValueError(f"{args.weights} names {len(labels)} classes but its head has {built.num_classes}")
            metadata["labels"] = labels
    print(f"engine     {args.output}  ({built.describe()})")
    print(f"backend    {built.backend.label}")
    print(f"weights    {args.weights or 'seeded untrained weights (seed 0): for testing and timing only'}")
    print(f"layers     {built.num_layers}")
    if built.quantization is not None:
        pairs = sum(str(built.network.get_layer(i).type).split(".")[-1] == "QUANTIZE" for i in range(built.num_layers))
        print(f"quantized  {built.quantization.describe()}: {pairs} quantize/dequantize pairs")
    print(f"weight     {built.weight_bytes:,d} bytes ({_human(built.weight_bytes)})")
    print(f"engine     {len(plan):,d} bytes ({_human(len(plan))})")
    print(f"time       weights {t_weights:.2f} s, network definition {built.definition_seconds:.2f} s, "
          f"engine build {t_build:.2f} s")
    status = 0
    if not args.no_parity:
        from .model import synthetic_images
        from .parity import parity_report

        # image-like synthetic inputs: smooth fields and edges at several scales
        report = parity_report(built, model, synthetic_images(min(2, args.max_batch), built.image_size, seed=1))
        print(f"parity     {report.summary()} (CPU interpreter of the built network vs PyTorch reference)")
        metadata["parity"] = report.summary()
        if not report.ok:
            status = 1
            if not args.keep_failed:
                print(f"trtvit: error: parity check failed at layer {report.first_divergence().name}: "
                      f"{args.output} not written (trtvit parity {args.variant} shows every layer; "
                      f"--keep-failed writes the engine anyway)", file=sys.stderr)
                return status
    from .weights import write_atomically

    write_atomically(args.output, plan)
    write_atomically(args.output + ".json", (json.dumps(metadata, indent=2) + "\n").encode())
    print(f"metadata   {args.output}.json (tensor names and shapes, batch range, preprocessing, SHA-256)")
    if status:
        print(f"trtvit: error: parity check failed; {args.output} written anyway (--keep-failed)", file=sys.stderr)
    return status


_WEIGHTS_SUFFIXES = (".safetensors",)
_ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _check_engine_output(path: str) -> None:
    """An engine written under a weights file's name would be mistaken for one."""
    if path.lower().endswith(_WEIGHTS_SUFFIXES):
        raise _UsageError(f"build: -o {path}: trtvit build writes a TensorRT engine, not a safetensors weights file; "
                          f"name it e.g. {os.path.splitext(path)[0]}.engine")


def _check_weights_output(path: Optional[str], command: str) -> None:
    """Weights written under an engine's name would be mistaken for one."""
    if path and path.lower().endswith(_ENGINE_SUFFIXES):
        raise _UsageError(f"{command}: -o {path}: trtvit {command} writes a safetensors weights file, not an engine; "
                          f"name it {os.path.splitext(path)[0]}.safetensors (trtvit build makes the engine from it)")


def _cmd_run(args: argparse.Namespace) -> int:
    """Load an engine and time it on random images; torch only for --check's reference."""
    import statistics

    import numpy as np

    from . import arrays
    from .runtime import EngineRunner, cuda_times_ms

    if os.path.isdir(args.engine):
        raise ValueError(f"{args.engine} is a directory, not an engine file")
    if args.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {args.iterations}")
    sidecar = args.engine + ".json"
    meta = None
    if os.path.isfile(sidecar):
        from .weights import read_engine_json

        meta = read_engine_json(sidecar)
        if "variant" not in meta:
            raise ValueError(f"{sidecar} is not engine metadata written by trtvit build (no 'variant')")
    if args.check:
        _check_metadata(meta, sidecar)
    runner = EngineRunner(args.engine)
    low, high = runner.batch_range
    batches = args.batch or sorted({low, high})
    what = f" ({meta.get('variant')}, {meta.get('precision')}, {meta.get('attention')} attention)" if meta else ""
    info = runner.describe()
    print(f"engine   {args.engine}{what}: batch {low}..{high}, images {'x'.join(map(str, runner.image_shape))}")
    print(f"device   {info['device']}; {info['backend']}")
    rng = np.random.default_rng(0)
    with arrays.device_scope(runner.device):
        stream = arrays.create_stream()  # a caller's stream: calls are queued back to back, not waited for
        try:
            for batch in batches:
                host = rng.standard_normal((batch,) + runner.image_shape, dtype=np.float32)
                runner(host)  # numpy in and out; also checks the batch size against the profile
                images = arrays.DeviceArray.from_host(host, runner.device)
                out = runner(images)
                out = None if isinstance(out, dict) else out  # engines with several outputs allocate per call
                samples = cuda_times_ms(lambda images=images, out=out: runner(images, out=out, stream=stream),
                                        args.iterations, warmup=10, stream=stream)
                median = statistics.median(samples)
                print(f"batch {batch:4d}: median {median:8.3f} ms, min {min(samples):8.3f} ms, "
                      f"{batch / median * 1e3:9.1f} images/s ({args.iterations} runs)")
        finally:
            arrays.synchronize(stream)
            arrays.destroy_stream(stream)
    if args.check:
        return _check_engine(runner, meta)
    return 0


def _check_metadata(meta: Optional[dict], sidecar: str) -> None:
    if meta is None:
        raise ValueError(f"--check needs {sidecar} (written by trtvit build) to know the variant and weights")
    if meta.get("weights_file") is None and meta.get("seed") is None:
        raise ValueError(f"--check: {sidecar} names no weights file or seed, so the reference cannot be rebuilt")
    if meta.get("weights_file") and not os.path.isfile(meta["weights_file"]):
        raise ValueError(f"--check: weights file {meta['weights_file']} named in {sidecar} does not exist")


def _check_engine(runner, meta: dict) -> int:
    """Every output of the engine vs the PyTorch reference (fp32) on the engine's GPU, at the
    engine's optimization image size."""
    import torch

    from .model import create_model, synthetic_images
    from .parity import compare
    from .runtime import GPU_TOLERANCES, exact_fp32

    model = create_model(meta["variant"], weights=meta.get("weights_file"), seed=meta.get("seed") or 0)
    device = torch.device("cuda", runner.device)
    model = model.to(device)
    hw = tuple(meta.get("image_size", {}).get("opt") or runner.image_shape[-2:])
    batch = min(16 if meta.get("quantization") else 4, runner.batch_range[1])  # top-1 agreement needs images
    images = synthetic_images(batch, hw, seed=7).to(device)
    stages = {}
    hooks = [model.stages[k].register_forward_hook(lambda m, i, o, k=k: stages.__setitem__(f"stage{k + 1}", o))
             for k in range(4)]
    with torch.no_grad(), exact_fp32():
        refs = {"logits": model(images)}
    for h in hooks:
        h.remove()
    refs.update(stages)
    got = runner(images)
    got = got if isinstance(got, dict) else {runner.output_name: got}
    if meta.get("quantization"):
        quant = meta["quantization"]
        label = "int8+fp8" if quant.get("precision") == "fp8" and quant.get("conv_precision") == "int8" else \
            quant.get("precision")
        return _check_quantized(got, refs, images.shape[0], label)
    tol = GPU_TOLERANCES["fp16" if meta.get("precision") == "fp16" else "fp32"]
    ok = True
    for name, out in got.items():
        result = compare(name, out, refs[name])
        ok &= result.ok(tol)
        print(f"check    {name} vs PyTorch fp32 on the GPU, batch {images.shape[0]}: max|Δ|/max|ref| "
              f"{result.rel:.2e}, cosine {result.cosine:.7f}: {'PASS' if result.ok(tol) else 'FAIL'}")
    return 0 if ok else 1


def _check_quantized(got: dict, refs: dict, batch: int, precision: str) -> int:
    """A quantized engine against the fake-quantized reference: int8/fp8 kernels round and
    accumulate in their own order, and one flipped code moves everything after it, so
    elementwise bounds do not apply; judged by cosine and, for logits, top-1 agreement
    (:data:`trtvit_native.runtime.QUANTIZED_GPU_CHECK`)."""
    from .parity import compare
    from .runtime import QUANTIZED_GPU_CHECK

    ok = True
    for name, out in got.items():
        result = compare(name, out, refs[name])
        passed = result.cosine >= QUANTIZED_GPU_CHECK["cosine"]
        line = f"cosine {result.cosine:.6f}"
        if name == "logits":
            agree = float((out.float().argmax(1) == refs[name].float().argmax(1)).float().mean())
            passed &= agree >= QUANTIZED_GPU_CHECK["top1"]
            line += f", top-1 agreement {100 * agree:.0f} %"
        ok &= passed
        print(f"check    {name} vs the {precision} fake-quantized reference (ModelOpt, PyTorch) on the GPU, batch "
              f"{batch}: {line}: {'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


def _cmd_parity(args: argparse.Namespace) -> int:
    from .model import synthetic_images
    from .network import MAX_BATCH_LIMIT, build_network
    from .parity import parity_report

    if not 1 <= args.batch <= MAX_BATCH_LIMIT:
        raise ValueError(f"--batch must be in 1..{MAX_BATCH_LIMIT}, got {args.batch}")
    args.image_size, size_line = _network_image_size(args)
    print(f"image size {size_line}", flush=True)
    from .weights import resolve_config

    variant = resolve_config(args.variant, args.weights)
    model, state = _reference_and_weights(variant, args.weights)
    built = build_network(variant, state, fp16=args.fp16, max_batch=args.batch, image_size=args.image_size,
                          plugins=_plugins_arg(args.plugins), attention=args.attention,
                          outputs=_outputs(args.outputs), min_image_size=args.min_image_size,
                          max_image_size=args.max_image_size)
    report = parity_report(built, model, synthetic_images(args.batch, built.image_size, seed=args.seed))
    print(f"backend {built.backend.label}; {built.describe()}; {built.num_layers} layers; weights: "
          f"{args.weights or 'seeded untrained weights (seed 0)'}; image-like synthetic images (seed {args.seed})")
    print(report.table())
    if not report.ok:
        print(f"trtvit: error: parity check failed: first divergent layer {report.first_divergence().name}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .quantization import QuantizeError, quantize, sensitivity

    _check_weights_output(args.output, "quantize")
    check_output_path(args.output)
    if args.images < 1:
        raise QuantizeError(f"--images must be at least 1, got {args.images}")
    t0 = time.perf_counter()
    if args.sensitivity_data is not None and not args.sensitivity:
        raise QuantizeError("--sensitivity-data is for --sensitivity")
    sensitivity_files = _sensitivity_files(args) if args.sensitivity else []  # refused before calibration
    q = quantize(args.variant, args.weights, args.calib, args.output, precision=args.precision, method=args.method,
                 images=args.images, batch_size=args.batch_size, image_size=args.image_size, keep=args.keep,
                 progress=not args.quiet, say=lambda line: print(f"{line}", flush=True),
                 conv_precision=args.conv_precision, fp8_weights=args.fp8_weights)
    weights = sum(1 for n in q.amax if n.endswith(".weight_quantizer"))
    print(f"quantized  {args.output}: {q.describe()}; {len(q.amax) - weights} activation and {weights} weight "
          f"quantizers, ModelOpt {q.modelopt}, {time.perf_counter() - t0:.1f} s")
    if args.sensitivity:
        import torch

        from .quantization import _batches, _image_size

        size, _ = _image_size(args.weights, args.image_size)
        images = torch.cat(list(_batches(sensitivity_files, size, len(sensitivity_files), progress=False)))
        source = args.sensitivity_data or f"{args.calib}, not used for calibration"
        print(f"sensitivity: the logits when only one layer is quantized, against the unquantized model, on "
              f"{images.shape[0]} images ({source}; largest error first)")
        print(f"{'layer':44s} {'RMS logit error':>16s} {'top-1 agreement':>16s}")
        for module, rms, agree in sensitivity(args.variant, args.output, images):
            print(f"{module:44s} {rms:16.4g} {100 * agree:15.1f}%")
    return 0


def _sensitivity_files(args: argparse.Namespace) -> List[str]:
    """Up to 64 images for --sensitivity: of --sensitivity-data, or those of --calib that the
    calibration sample leaves out."""
    from .quantization import QuantizeError, calibration_files, held_out_files

    if args.sensitivity_data is not None:
        try:
            return calibration_files(args.sensitivity_data, 64, 1)
        except QuantizeError as e:
            raise QuantizeError(f"--sensitivity-data: {e}".replace("calibration folder", "folder")) from None
    files = held_out_files(args.calib, args.images, 64)
    if not files:
        raise QuantizeError(f"--sensitivity measures on images calibration does not use, and --images {args.images} "
                            f"uses every image of {args.calib}: give --sensitivity-data DIR, or fewer --images")
    return files


def _cmd_train(args: argparse.Namespace) -> int:
    if args.resume is None:
        missing = [flag for flag, value in (("--data", args.data), ("-o/--output", args.output)) if not value]
        if missing:
            raise _UsageError(f"train: {' and '.join(missing)} required (a resumed run, --resume, keeps its own)")
    _check_weights_output(args.output, "train")
    args.given = [dest for dest, default in train_defaults().items() if getattr(args, dest) != default]
    from .train import run_from_args

    return run_from_args(args)


def _cmd_export_triton(args: argparse.Namespace) -> int:
    from .triton import export_triton, read_engine_metadata

    written = export_triton(args.engine, args.repository, name=args.name, version=args.version,
                            instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                            preprocess=args.preprocess, force=args.force, runner=args.runner)
    meta = read_engine_metadata(args.engine)
    sizes = meta.get("image_size") or {}
    opt, trained = sizes.get("opt") or meta["input"]["shape"][2:], meta.get("trained_image_size")
    dynamic = sizes.get("min") != sizes.get("max")
    note = f"; the weights were trained at {trained}x{trained}" if trained else ""
    print(f"image      {opt[0]}x{opt[1]} (the engine's {'optimization shape' if dynamic else 'input'}, "
          f"ENGINE.json{note})")
    for folder in written:
        print(f"model      {folder}")
    print(f"serve      tritonserver --model-repository {os.path.abspath(args.repository)}")
    return 0


def _cmd_triton_env(args: argparse.Namespace) -> int:
    from .triton import make_stub_environment

    made = make_stub_environment(args.path)
    print(f"environment {made['path']}: Python {made['python_version']}, numpy < 2 first, then "
          f"{len(made['added'])} site-packages folder(s) of {sys.executable}")
    print(f"serve       PATH={os.path.join(made['path'], 'bin')}:$PATH tritonserver ...")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .weights import resolve_image_size

    if not args.json:  # first, before the evaluation runs
        print(f"image      {resolve_image_size(args.weights, args.image_size)[1]}", flush=True)

    r = evaluate(args.variant, args.weights, args.data, image_size=args.image_size, network=args.network,
                 engine=args.engine, fp16=args.fp16, batch_size=args.batch_size, workers=args.workers,
                 confusion_png=args.confusion, per_image=args.per_image)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"data       {args.data}: {r['images']} images, {r['classes']} classes")
    print(f"model      {r['model']}: top-1 {100 * r['top1']:.2f} %, top-5 {100 * r['top5']:.2f} %, "
          f"{r['images_per_second']:.1f} images/s")
    if "agreement" in r:
        print(f"reference  PyTorch fp32: top-1 {100 * r['reference_top1']:.2f} %, top-5 "
              f"{100 * r['reference_top5']:.2f} %")
        print(f"agreement  {100 * r['agreement']:.2f} % of images get the reference's top-1 class; largest logit "
              f"difference {r['max_logit_diff']:.3g}")
    shown = r["per_class"]
    if len(shown) > 20:  # the classes a mean top-1 hides: the lowest recall first (--json has them all)
        shown = sorted(shown, key=lambda c: -1.0 if c["recall"] is None else c["recall"])[:10]
        print(f"classes    the 10 of {len(r['per_class'])} with the lowest recall:")
    width = max(len(c["label"]) for c in shown)
    for c in shown:
        recall, precision = ("-" if c[k] is None else f"{100 * c[k]:.2f} %" for k in ("recall", "precision"))
        print(f"class      {c['label']:<{width}}  {c['images']:6d} images, recall {recall}, precision {precision}")
    if r["skipped"]:
        print(f"skipped    {len(r['skipped'])} undecodable image(s): {', '.join(r['skipped'][:5])}"
              f"{' ... (--json lists them all)' if len(r['skipped']) > 5 else ''}")
    if args.confusion:
        print(f"confusion  {args.confusion}")
    _print_quantized_eval(r)
    for p in r.get("predictions", ()):
        print(f"image      {p['image']}: {p['predicted']} ({100 * p['probability']:.2f} %), true {p['label']}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .evaluate import predict

    r = predict(args.weights, args.images, network=args.network, engine=args.engine, fp16=args.fp16, top=args.top,
                image_size=args.image_size)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"image      {r['image_size_source']}")
    print(f"model      {r['variant']} {r['model']}, {args.weights}")
    for p in r["predictions"]:
        ranked = ", ".join(f"{t['label']} ({100 * t['probability']:.2f} %)" for t in p["top"])
        print(f"{p['image']}: {ranked}")
    return 0


def _print_quantized_eval(r: dict) -> None:
    if "quantized_reference_top1" in r:
        print(f"quantized  {r['quantization']['precision']} fake-quantized reference (ModelOpt, PyTorch): top-1 "
              f"{100 * r['quantized_reference_top1']:.2f} %; the network agrees with it on "
              f"{100 * r['quantized_reference_agreement']:.2f} % of images")


def main(argv: Optional[List[str]] = None) -> int:
    from .arrays import CudaError, CudaUnavailable
    from .backend import BackendError
    from .network import BuildError
    from .runtime import EngineError

    def expected(e: BaseException) -> bool:
        # The interpreter (torch) is imported only by the commands that use it: its error can
        # only have been raised where it was.
        interpreter = sys.modules.get(f"{__package__}.interpreter")
        return isinstance(e, (ValueError, OSError, BackendError, BuildError, EngineError, CudaError,
                              CudaUnavailable)) or (
            interpreter is not None and isinstance(e, interpreter.InterpreterError))

    args = None
    original_showwarning = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # The package's own warnings (a skipped image...) are for the user: one line, no source
        if category.__module__.startswith(__package__ or "trtvit_native"):
            print(f"trtvit: warning: {message}", file=sys.stderr, flush=True)
        else:
            original_showwarning(message, category, filename, lineno, file, line)

    warnings.showwarning = show_warning
    try:
        args = _parser().parse_args(argv)
        if args.command is None:
            raise _UsageError("a command is required: build, run, info, parity, train, quantize, eval, predict, "
                              "export-triton or triton-env (see trtvit --help)")
        commands = {"build": _cmd_build, "run": _cmd_run, "info": _cmd_info, "profile": _cmd_profile, "parity": _cmd_parity,
                    "train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "triton-env": _cmd_triton_env,
                    "export-triton": _cmd_export_triton, "quantize": _cmd_quantize}
        return commands[args.command](args)
    except _UsageError as e:
        print(f"trtvit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trtvit: interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        if e.name not in ("torch", "kornia", "tqdm", "matplotlib", "PIL", "torchmetrics"):
            raise
        extra = "torch" if e.name == "torch" else "train"
        print(f"trtvit: error: trtvit {getattr(args, 'command', '')} needs {e.name}, which is not installed: pip install "
              f"'trtvit_native[{extra}]' (torch: install the build for this machine first, e.g. its CPU build); "
              f"building from a weights file with --no-parity, export-triton and run need no torch", file=sys.stderr)
        return 1
    except Exception as e:
        if not expected(e):
            raise
        # WeightsError is a ValueError: every bad input ends here with its own message.
        print(f"trtvit: error: {e}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = original_showwarning


if __name__ == "__main__":
    sys.exit(main())
