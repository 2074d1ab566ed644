"""What a quantized engine runs, layer by layer, from TensorRT's engine inspector (needs a GPU).

    python benchmarks/inspect_quantized.py ENGINE Q.safetensors [--json OUT.json]

Loads the engine (built by ``trtvit build`` with ``profiling_verbosity`` DETAILED, which
the builder sets), dumps ``IEngineInspector``'s per-layer JSON and counts the layers whose
inputs are int8, fp8 and fp16/fp32. Exit status 1 when

- a convolution or GEMM the file quantizes runs with a floating-point input (its Q/DQ
  pair did not fuse into it: TensorRT ran it in fp16 instead), or
- a standalone quantize/dequantize kernel is left where the placement expects fusion
  (every pair but the stem's input quantizer, whose producer is the network input).

Layers inside a Myelin region (``{ForeignNode[...]}``) are not itemized by the inspector;
they are counted as such and not judged.
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


def judge(layers: List[dict], quantized_modules: Dict[str, str]) -> Dict[str, object]:
    """Counts per input precision, the quantized convolutions/GEMMs that run in floating
    point, and the standalone Q/DQ kernels. ``quantized_modules``: module -> kind (conv or
    linear) whose input the file quantizes."""
    counts: Dict[str, int] = {}
    unfused, standalone, foreign = [], [], 0
    for layer in layers:
        name = str(layer.get("Name", ""))
        kind = str(layer.get("LayerType", ""))
        if "ForeignNode" in name or kind.lower().startswith("myelin"):
            foreign += 1
            continue
        precision = input_precision(layer)
        counts[precision] = counts.get(precision, 0) + 1
        parts = [p.strip() for p in name.replace("||", "+").split("+")]
        if all(p.endswith(".quantize") or p.endswith("_quantizer") for p in parts if p):
            if not any(p.startswith(allowed) for p in parts for allowed in STANDALONE_ALLOWED):
                standalone.append(name)
            continue
        computes = "conv" in kind.lower() or "gemm" in kind.lower() or "matrix" in kind.lower()
        for module in quantized_modules:
            owner = module[:-len(".conv")] if module.endswith(".conv") else module  # ConvBN layers: the ConvBN's name
            if computes and any(p == owner or p == module for p in parts) and precision in ("fp16", "fp32"):
                unfused.append(f"{module} ({precision}): {name}")
    return {"layers_by_input_precision": counts, "myelin_regions": foreign, "unfused": unfused,
            "standalone_qdq": standalone}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("quantized", help="the quantized weights file the engine was built from")
    parser.add_argument("--json", help="write the inspector's per-layer JSON here")
    args = parser.parse_args()
    from trtvit_native.backend import get_backend
    from trtvit_native.weights import load_quantization, quantizable_modules

    trt = get_backend().trt
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(args.engine).read_bytes())
    if engine is None:
        raise SystemExit(f"{args.engine}: TensorRT could not deserialize the engine")
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    layers = [layer if isinstance(layer, dict) else {"Name": layer} for layer in info.get("Layers", [])]
    q = load_quantization(args.quantized)
    arch = json.loads(Path(args.engine + ".json").read_text())["variant"] if Path(args.engine + ".json").exists() \
        else None
    kinds = quantizable_modules(arch) if arch else {}
    quantized = {m: k for m, k in kinds.items() if k in ("conv", "linear") and f"{m}.input_quantizer" in q.amax}
    result = judge(layers, quantized)
    print(json.dumps(result, indent=1))
    return 1 if result["unfused"] or result["standalone_qdq"] else 0


if __name__ == "__main__":
    sys.exit(main())
