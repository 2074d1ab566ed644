"""What a quantized engine runs, layer by layer, from TensorRT's engine inspector (needs a GPU).

    python benchmarks/inspect_quantized.py ENGINE Q.safetensors [--json OUT.json]

Loads the engine (built by ``trtvit build`` with ``profiling_verbosity`` DETAILED, which
the builder sets), dumps ``IEngineInspector``'s per-layer JSON and counts the layers whose
inputs are int8, fp8 and fp16/fp32. Exit status 1 when

- a convolution or GEMM the file quantizes (an fp8 file's attention products included:
  ``<attn>.scores``, ``<attn>.context``) runs with a floating-point input (its Q/DQ pair
  did not fuse into it: TensorRT ran it in fp16 instead),
- a quantized convolution or GEMM is nowhere to be found in an engine without Myelin
  regions (``{ForeignNode[...]}``, which the inspector does not itemize: with any, the
  modules not itemized are reported as possibly inside one, not judged), or
- a standalone quantize/dequantize kernel is left in the convolution part or in an fp8
  attention, where the placement expects every pair to fuse (but the stem's input
  quantizer, whose producer is the network input). Other standalone pairs in the
  Transformer (LayerNorm inputs, residual adds) are reported, not judged. A fused FP8
  attention usually sits inside a Myelin region, whose inner layers the inspector does
  not list: its products are then reported as possibly inside one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STANDALONE_ALLOWED = ("stem.conv.input_quantizer",)  # quantizes the network input: nothing to fuse into


def input_precision(layer: dict) -> str:
    """``int8``, ``fp8``, ``fp16``, ``fp32`` or ``?`` from the layer's first input's format."""
    inputs = layer.get("Inputs") or []
    text = str(inputs[0].get("Format/Datatype", "")) if inputs and isinstance(inputs[0], dict) else ""
    for key, name in (("Int8", "int8"), ("FP8", "fp8"), ("Float8", "fp8"), ("E4M3", "fp8"), ("Half", "fp16"),
                      ("FP16", "fp16"), ("Float", "fp32"), ("FP32", "fp32")):
        if key in text:
            return name
    return "?"


def _is_qdq(part: str) -> bool:
    """A layer name of the network's Q/DQ pairs: ``<q>.quantize``, ``<q>`` (an activation's
    dequantize), ``<q>.folded`` / ``<q>.transposed`` (a weight's), ``<q>.scale``."""
    return "_quantizer" in part


def _owner(module: str) -> str:
    """The prefix of the network layers computing ``module``: a ConvBN's convolution is the
    ConvBN's layer (``stages.0.0.conv1``; the stem's ``stem.conv_bn``), a linear layer's
    product ``<module>.matmul``."""
    return module[:-len(".conv")] if module.endswith(".conv") else module


def judge(layers: List[dict], quantized_modules: Dict[str, str]) -> Dict[str, object]:
    """Counts per input precision, the quantized convolutions/GEMMs judged, those that run in
    floating point, those not found, and the standalone Q/DQ kernels. ``quantized_modules``:
    module -> kind (conv or linear) whose input the file quantizes."""
    counts: Dict[str, int] = {}
    unfused, standalone, foreign, judged = [], [], [], set()
    for layer in layers:
        name = str(layer.get("Name", ""))
        kind = str(layer.get("LayerType", ""))
        if "ForeignNode" in name or kind.lower().startswith("myelin"):
            foreign.append(name)
            continue
        precision = input_precision(layer)
        counts[precision] = counts.get(precision, 0) + 1
        parts = [p.strip() for p in name.replace("||", "+").split("+") if p.strip()]
        if parts and all(_is_qdq(p) for p in parts):
            # judged where the placement expects every pair to fuse: the convolution part, and
            # an fp8 attention's products (standalone attention Q/DQ: FP8 attention did not fuse)
            conv_part = not any(".transformer." in p for p in parts) or any(".attn." in p for p in parts)
            if conv_part and not any(p.startswith(allowed) for p in parts for allowed in STANDALONE_ALLOWED):
                standalone.append(name)
            continue
        computes = any(k in kind.lower() for k in ("conv", "gemm", "matrix", "matmul"))
        for module in quantized_modules:
            owner = _owner(module)
            if computes and any(p == owner or (p.startswith(owner + ".") and not _is_qdq(p)) for p in parts):
                judged.add(module)
                if precision in ("fp16", "fp32"):
                    unfused.append(f"{module} ({precision}): {name}")
    # a Myelin region's name lists its first and last layers only ("{ForeignNode[a...b]}"):
    # with any such region, what is not itemized may be inside one
    unjudged = sorted(m for m in quantized_modules if m not in judged)
    missing, in_myelin = ([], unjudged) if foreign else (unjudged, [])
    return {"layers_by_input_precision": counts, "quantized_judged": len(judged), "myelin_regions": len(foreign),
            "quantized_inside_myelin": in_myelin, "quantized_not_found": missing, "unfused": unfused,
            "standalone_qdq": standalone}


def judged_modules(arch: str, q) -> Dict[str, str]:
    """What the file quantizes that must run in int8/fp8: module -> kind, the convolutions and
    linear layers whose input is quantized, and an fp8 attention's two products
    (``<attn>.scores``, ``<attn>.context``)."""
    from trtvit_native.weights import quantizable_modules

    modules = {m: k for m, k in quantizable_modules(arch).items()
               if k in ("conv", "linear") and f"{m}.input_quantizer" in q.amax}
    for m in q.attention_modules:
        modules.update({f"{m}.scores": "attention", f"{m}.context": "attention"})
    return modules


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("quantized", help="the quantized weights file the engine was built from")
    parser.add_argument("--json", help="write the inspector's per-layer JSON here")
    parser.add_argument("--variant", help="the engine's variant (default: from ENGINE.json beside the engine)")
    args = parser.parse_args()
    try:
        return _inspect(args)
    except (OSError, ValueError, KeyError) as e:  # WeightsError is a ValueError
        print(f"inspect_quantized: error: {e}", file=sys.stderr)
        return 2


def _inspect(args: argparse.Namespace) -> int:
    from trtvit_native.backend import get_backend
    from trtvit_native.weights import load_quantization

    sidecar = Path(args.engine + ".json")
    arch = args.variant or (json.loads(sidecar.read_text())["variant"] if sidecar.exists() else None)
    if arch is None:
        raise ValueError(f"{sidecar} is missing: give --variant")
    q = load_quantization(args.quantized, arch)
    if q is None:
        raise ValueError(f"{args.quantized} is not a quantized weights file")
    trt = get_backend().trt
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(args.engine).read_bytes())
    if engine is None:
        raise SystemExit(f"{args.engine}: TensorRT could not deserialize the engine")
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    layers = [layer if isinstance(layer, dict) else {"Name": layer} for layer in info.get("Layers", [])]
    result = judge(layers, judged_modules(arch, q))
    print(json.dumps(result, indent=1))
    return 1 if result["unfused"] or result["standalone_qdq"] or result["quantized_not_found"] else 0


if __name__ == "__main__":
    sys.exit(main())
