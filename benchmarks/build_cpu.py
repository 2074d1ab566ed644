"""Time the CPU-side engine build of a TRT-ViT variant, and compare with the ONNX route.

    python benchmarks/build_cpu.py                 # trt-vit-c, fp16, batch 1..32
    python benchmarks/build_cpu.py --variant trt-vit-a --fp32 --skip-onnx

Each measured path runs in a fresh Python process, so peak RSS is that path's own:

* native: load_arrays (safetensors, memory-mapped, no torch) -> build_network -> build_serialized
* onnx:   the route a user would otherwise take, on the same builder: reference model from
          the same weights -> torch.onnx.export -> TensorRT's ONNX parser -> build

Targets (trt-vit-c fp16): weight load + network definition + engine build <= 15 s, and
peak RSS <= 3x the fp32 weight bytes. Not a unit test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_prepare(args: argparse.Namespace) -> dict:
    import trtvit_native as tv

    model = tv.create_model(args.variant)
    tv.save_weights(model, args.weights, args.variant)
    return {"params": tv.count_parameters(model)}


def child_native(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import trtvit_native as tv

    backend = tv.get_backend()
    t_import = time.perf_counter() - t0
    rss_after_import = _current_rss_bytes()
    t0 = time.perf_counter()
    state = tv.load_arrays(args.weights)  # numpy views of the memory-mapped file; no torch
    t_load = time.perf_counter() - t0
    built = tv.build_network(args.variant, state, fp16=not args.fp32, max_batch=args.max_batch, plugins=False)
    del state  # the network holds its own (folded, converted) copies; the mapping can go
    t0 = time.perf_counter()
    plan = built.build_serialized()
    t_build = time.perf_counter() - t0
    assert "torch" not in sys.modules, "the native build path imported torch"
    return {"backend": backend.label, "import_s": t_import, "load_s": t_load, "define_s": built.definition_seconds,
            "build_s": t_build, "engine_bytes": len(plan), "layers": built.num_layers,
            "rss_after_import": rss_after_import, "peak_rss": _peak_rss_bytes()}


def child_onnx(args: argparse.Namespace) -> dict:
    import warnings

    import torch

    import trtvit_native as tv

    trt = tv.get_backend().trt
    rss_after_import = _current_rss_bytes()
    t0 = time.perf_counter()
    model = tv.create_model(args.variant, weights=args.weights)
    dtype = torch.float32 if args.fp32 else torch.float16
    model = model.to(dtype)
    t_load = time.perf_counter() - t0
    onnx_path = os.path.join(os.path.dirname(args.weights), "model.onnx")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224, dtype=dtype),), onnx_path, dynamo=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    t_export = time.perf_counter() - t0
    del model
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("ONNX parser failed: " + "; ".join(errors))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, 224, 224), (args.max_batch, 3, 224, 224), (args.max_batch, 3, 224, 224))
    config.add_optimization_profile(profile)
    t_parse = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build the ONNX network")
    t_build = time.perf_counter() - t0
    return {"load_s": t_load, "export_s": t_export, "parse_s": t_parse, "build_s": t_build,
            "engine_bytes": plan.nbytes, "onnx_bytes": os.path.getsize(onnx_path),
            "layers": network.num_layers, "rss_after_import": rss_after_import, "peak_rss": _peak_rss_bytes()}


CHILDREN = {"prepare": child_prepare, "native": child_native, "onnx": child_onnx}


def _run_child(role: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", role, "--variant", args.variant,
           "--max-batch", str(args.max_batch), "--weights", args.weights] + (["--fp32"] if args.fp32 else [])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{role} step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="trt-vit-c")
    parser.add_argument("--fp32", action="store_true", help="fp32 network (default fp16)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--skip-onnx", action="store_true", help="time only the native path")
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0

    mib = 2 ** 20
    precision = "fp32" if args.fp32 else "fp16"
    with tempfile.TemporaryDirectory(prefix="trtvit-bench-") as tmp:
        args.weights = os.path.join(tmp, f"{args.variant}.safetensors")
        prep = _run_child("prepare", args)
        fp32_bytes = prep["params"] * 4
        native = _run_child("native", args)
        onnx = None if args.skip_onnx else _run_child("onnx", args)

    total = native["load_s"] + native["define_s"] + native["build_s"]
    print(f"{args.variant} {precision}, batch 1..{args.max_batch}, 224x224; backend {native['backend']}; "
          f"{os.cpu_count()} CPU cores")
    print(f"fp32 weight bytes          {fp32_bytes / mib:9.1f} MiB ({prep['params']:,d} parameters)")
    print("native network API (this package)")
    print(f"  import trtvit_native     {native['import_s']:9.2f} s   (not counted)")
    print(f"  weight load              {native['load_s']:9.2f} s")
    print(f"  network definition       {native['define_s']:9.2f} s   ({native['layers']} layers)")
    print(f"  engine build             {native['build_s']:9.2f} s   ({native['engine_bytes'] / mib:.1f} MiB engine)")
    print(f"  total                    {total:9.2f} s   target <= 15 s: {'met' if total <= 15 else 'MISSED'}")
    print(f"  peak RSS                 {native['peak_rss'] / mib:9.1f} MiB = {native['peak_rss'] / fp32_bytes:.2f}x "
          f"fp32 weights; target <= 3x: {'met' if native['peak_rss'] <= 3 * fp32_bytes else 'MISSED'} "
          f"(after imports alone: {native['rss_after_import'] / mib:.1f} MiB)")
    if onnx is not None:
        onnx_total = onnx["load_s"] + onnx["export_s"] + onnx["parse_s"] + onnx["build_s"]
        print("ONNX route: torch.onnx.export + TensorRT ONNX parser, same builder")
        print(f"  reference from weights   {onnx['load_s']:9.2f} s")
        print(f"  torch.onnx.export        {onnx['export_s']:9.2f} s   ({onnx['onnx_bytes'] / mib:.1f} MiB ONNX)")
        print(f"  ONNX parse + config      {onnx['parse_s']:9.2f} s   ({onnx['layers']} layers)")
        print(f"  engine build             {onnx['build_s']:9.2f} s   ({onnx['engine_bytes'] / mib:.1f} MiB engine)")
        print(f"  total                    {onnx_total:9.2f} s")
        print(f"  peak RSS                 {onnx['peak_rss'] / mib:9.1f} MiB = {onnx['peak_rss'] / fp32_bytes:.2f}x "
              f"fp32 weights")
        print(f"ratio ONNX route / native: time {onnx_total / total:.2f}x, peak RSS "
              f"{onnx['peak_rss'] / native['peak_rss']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
