"""Build a TRT-ViT engine, run it on the GPU, check it against PyTorch there, and time it.

    python benchmarks/engine_gpu.py [--variant trt-vit-c] [--precisions fp16 fp32]
                                    [--attention matmul fused] [--batches 1 8 32]
                                    [--repeats 50] [--json engine.json]
                                    [--compute-capability current]

For each precision and native attention (MatMul-SoftMax-MatMul, and the IAttention layer
where the backend has it): builds the engine with the installed TensorRT (TensorRT-RTX where
full TensorRT is absent; by default exactly as on a machine without a GPU), loads it with
:class:`EngineRunner` (a failure to load is reported, with TensorRT's message, as the
result: it answers whether such an engine runs on this device), compares its logits with
the fp32 PyTorch reference on the same GPU (photographs and Gaussian images), and times
it next to the PyTorch reference in eager mode (fp32 with torch's defaults, where cuDNN
may use TF32, and fp16 via ``model.half()``). The parity reference is fp32 without TF32.

Times are medians over ``--repeats`` samples, each the CUDA-event time of 10 back-to-back
calls on preallocated device buffers, divided by 10. Not a unit test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import trtvit_native as tv
from trtvit_native.network import ATTENTION_KINDS
from trtvit_native.parity import compare
from trtvit_native.runtime import cuda_times_ms, exact_fp32

INNER = 10


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median GPU time on torch's current stream, where the runner and the models run."""
    return statistics.median(cuda_times_ms(fn, repeats, inner=INNER, stream=torch.cuda.current_stream().cuda_stream))


def natural_images(batch: int):
    """("photographs", images) where scikit-image is installed, else the synthetic images."""
    try:
        return "photographs", tv.photographs(batch)
    except ImportError:
        return "synthetic", tv.synthetic_images(batch, seed=5)


def set_compute_capability(built: tv.BuiltNetwork, which: str) -> None:
    trt = built.backend.trt
    if not hasattr(trt, "ComputeCapability"):
        raise SystemExit(f"--compute-capability applies to TensorRT-RTX; {built.backend.label} has none")
    members = trt.ComputeCapability.__members__
    key = which.upper()
    if key not in members:
        raise SystemExit(f"--compute-capability {which}: choose one of {', '.join(m.lower() for m in members)}")
    built.config.set_compute_capability(members[key], 0)


def run_engine(args: argparse.Namespace, fp16: bool, attention: str, model: torch.nn.Module,
               result: dict[str, Any]) -> bool:
    label = f"{'fp16' if fp16 else 'fp32'}, {attention} attention"
    entry: dict[str, Any] = {"precision": "fp16" if fp16 else "fp32", "attention": attention}
    result["engines"].append(entry)
    max_batch = max(args.batches)
    built = tv.build_network(args.variant, model.state_dict(), fp16=fp16, max_batch=max_batch, attention=attention)
    if args.compute_capability:
        set_compute_capability(built, args.compute_capability)
    t0 = time.perf_counter()
    plan = built.build_serialized()
    entry.update(build_seconds=round(time.perf_counter() - t0, 2), engine_bytes=len(plan), layers=built.num_layers,
                 plugins=built.plugins)
    print(f"\n{args.variant} {label}: engine built in {entry['build_seconds']} s, {len(plan):,d} bytes, "
          f"{built.num_layers} layers, plugins {'on' if built.plugins else 'off'}")
    try:
        t0 = time.perf_counter()
        runner = tv.EngineRunner(plan, stream=torch.cuda.current_stream())  # queued with torch's work
        images = natural_images(2)[1].cuda()
        runner(images)
        torch.cuda.synchronize()
        entry["load_and_first_run_seconds"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # noqa: BLE001 - whatever TensorRT reports is the result
        entry.update(loaded=False, error=f"{type(e).__name__}: {e}")
        print(f"  engine did not run on this device: {entry['error']}")
        return False
    entry["loaded"] = True
    print(f"  loaded and first run in {entry['load_and_first_run_seconds']} s ({runner.describe()['backend']})")

    entry["parity"] = {}
    gen = torch.Generator().manual_seed(1)
    for name, images in (natural_images(min(4, max_batch)),
                         ("random", torch.randn(min(4, max_batch), 3, 224, 224, generator=gen))):
        images = images.cuda()
        with torch.no_grad(), exact_fp32():
            ref = model(images)
        p = compare("logits", runner(images), ref)
        entry["parity"][name] = {"rel": p.rel, "cosine": p.cosine}
        print(f"  parity vs fp32 PyTorch on the GPU, {name}: max|Δ|/max|ref| {p.rel:.2e}, cosine {p.cosine:.7f}")

    entry["timing"] = []
    print(f"  {'batch':>5s} {'engine ms':>10s} {'img/s':>9s} {'torch fp32 ms':>14s} {'torch fp16 ms':>14s} "
          f"{'vs fp16':>8s}")
    half = _half(model)
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
        out = runner(x)
        engine_ms = median_ms(lambda x=x, out=out: runner(x, out=out), args.repeats)
        with torch.inference_mode():
            fp32_ms = median_ms(lambda x=x: model(x), args.repeats)
            xh = x.half()
            fp16_ms = median_ms(lambda xh=xh: half(xh), args.repeats)
        row = {"batch": batch, "engine_ms": engine_ms, "images_per_s": batch / engine_ms * 1e3,
               "torch_fp32_ms": fp32_ms, "torch_fp16_ms": fp16_ms}
        entry["timing"].append(row)
        print(f"  {batch:5d} {engine_ms:10.3f} {row['images_per_s']:9.0f} {fp32_ms:14.3f} {fp16_ms:14.3f} "
              f"{fp16_ms / engine_ms:7.2f}x")
    return True


_half_cache: dict[int, torch.nn.Module] = {}


def _half(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    if id(model) not in _half_cache:
        _half_cache[id(model)] = copy.deepcopy(model).half().eval()
    return _half_cache[id(model)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="trt-vit-c")
    parser.add_argument("--precisions", nargs="+", choices=["fp16", "fp32"], default=["fp16", "fp32"])
    parser.add_argument("--attention", nargs="+", choices=ATTENTION_KINDS, default=list(ATTENTION_KINDS),
                        help="native attention kinds to build (fused only where the backend has IAttention)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--compute-capability", metavar="CC",
                        help="TensorRT-RTX only: build for this compute capability (e.g. current, sm89) instead of "
                             "the builder's default")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("engine_gpu.py needs a CUDA GPU; torch sees none", file=sys.stderr)
        return 2
    if min(args.batches) < 1:
        parser.error("batch sizes must be at least 1")
    tv.get_config(args.variant)
    backend = tv.get_backend()
    props = torch.cuda.get_device_properties(0)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}", "backend": backend.label,
        "torch": torch.__version__, "variant": args.variant, "command": " ".join(sys.argv), "engines": []}
    print(f"{result['date']}  {props.name} (sm_{props.major}{props.minor})  {backend.label}  torch {torch.__version__}")
    model = tv.create_model(args.variant).cuda().eval()
    kinds = [a for a in args.attention if a != "fused" or backend.has_attention_layer]
    ok = [run_engine(args, p == "fp16", a, model, result) for p in args.precisions for a in kinds]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(ok) else 3


if __name__ == "__main__":
    sys.exit(main())
