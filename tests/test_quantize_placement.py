"""Where the quantized network has Q/DQ pairs, against a tool built for TensorRT.

ModelOpt's ONNX quantizer (``modelopt.onnx.quantization``) places Q/DQ by TensorRT's
fusion rules: which operator inputs to quantize, which residual-add operand, which
LayerNorms. The reference is exported to ONNX here (in this test only: the engine is
built with the network API) and quantized with it; the set of quantized operator inputs
it chooses must be this format's (:func:`trtvit_native.weights.quantizer_sites`), but
for the differences listed below, each with its reason.
"""

from __future__ import annotations

from typing import Dict, Set, Tuple

import pytest
import torch

pytest.importorskip("modelopt.onnx.quantization", reason="ModelOpt's ONNX quantizer is not installed (pip install "
                    "'nvidia-modelopt[onnx]', part of the test extra)")

import onnx  # noqa: E402

from trtvit_native import weights as W  # noqa: E402
from trtvit_native.model import ResidualAdd, create_model, synthetic_images  # noqa: E402

VARIANT = "trt-vit-a"
IMAGE = 128  # a 4x4 map in the last stage: 16 tokens

# The operands of the attention's two products, as this format names their quantizers:
# the first product's (q, k) and the second's (the softmax probabilities, v).
PRODUCT_OPERANDS = (("q_bmm", "k_bmm"), ("softmax", "v_bmm"))
ATTENTION = "stages.3.1.transformer.attn"

# Quantized by ModelOpt's ONNX quantizer, not by this format, and why.
ONNX_ONLY_INT8 = {
    # int8 files leave the attention's products in floating point (weights.quantizer_sites:
    # int8 codes of softmax probabilities are too coarse); fp8 files quantize all four.
    (ATTENTION, slot) for operands in PRODUCT_OPERANDS for slot in operands
}
ONNX_ONLY = {
    # ONNX has one Q/DQ per tensor: MixBlockC's Transformer output t feeds conv1, the local
    # residual add and the concat, so the concat reads DQ(t) there. The concat output is
    # the non-residual operand of the block's add, which stays in floating point, so
    # quantizing its t half gains no fusion; here the concat reads t as it is.
    ("stages.3.1.concat", "input"),
}
FORMAT_ONLY: Set[Tuple[str, str]] = set()  # none


def _module_of(node_name: str, modules: Set[str]) -> str:
    """The reference module an exported node belongs to: ``/stages.0/stages.0.1/conv1/conv/Conv``
    -> ``stages.0.1.conv1.conv`` (the exporter's scopes mix full and local names)."""
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        if part in modules:
            path = part
        elif f"{path}.{part}" in modules:
            path = f"{path}.{part}"
    return path


def _quantized_source(producer: Dict[str, onnx.NodeProto], tensor: str) -> str:
    """The op type computing the tensor a DequantizeLinear-QuantizeLinear pair carries into ``tensor``."""
    dq = producer.get(tensor)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    return source.op_type if source is not None else ""


def _onnx_quantized_inputs(model: onnx.ModelProto, modules: Set[str]) -> Dict[Tuple[str, str], str]:
    """{(module, "input" | "weight" | "branch"), ...} -> op type, for every operator input fed
    by a DequantizeLinear. Of a residual add, the quantized operand is ``input`` when it is
    the residual (ResidualAdd's), ``branch`` when it is the other one."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    found: Dict[Tuple[str, str], str] = {}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            module = _module_of(node.name, modules)
            if node.op_type == "Concat":
                module = f"{module}.concat"
            q = producer.get(dq.input[0])
            weight = q is None or q.op_type != "QuantizeLinear" or producer.get(q.input[0]) is None
            if node.op_type == "Add":
                slot = "input" if index == 1 else "branch"  # ResidualAdd computes branch + residual
            elif node.op_type == "MatMul" and module.endswith(".attn"):  # the second product reads the softmax
                second = any(_quantized_source(producer, t) == "Softmax" for t in node.input)
                slot = PRODUCT_OPERANDS[second][index]
            else:
                slot = "weight" if weight else "input"
            found[(module, slot)] = node.op_type
    return found


def _format_inputs(precision: str, conv_precision: str = "int8") -> Set[Tuple[str, str]]:
    sites = W.quantizer_sites(VARIANT, (), 1000, precision, conv_precision)
    def slot(quantizer: str) -> str:
        kind = quantizer.rsplit(".", 1)[1][:-len("_quantizer")]
        return kind if kind in ("weight", "q_bmm", "k_bmm", "v_bmm", "softmax") else "input"

    return {(q.rsplit(".", 1)[0], slot(q)) for q in sites}


@pytest.fixture(scope="module")
def onnx_quantized(tmp_path_factory):
    """The reference exported to ONNX and quantized by ModelOpt's ONNX quantizer, int8 and fp8
    (max calibration on 8 synthetic 128x128 images: placement does not depend on the data,
    but on the shapes: it leaves a matrix product with a dimension below 16 in floating
    point, so the images give 16 attention tokens)."""
    import modelopt.onnx.quantization as moq

    root = tmp_path_factory.mktemp("placement")
    model = create_model(VARIANT)
    path = root / "a.onnx"
    torch.onnx.export(model, synthetic_images(1, IMAGE), str(path), opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["logits"])
    calib = synthetic_images(8, IMAGE, seed=3).numpy()
    modules = {n for n, _ in model.named_modules() if n}
    out = {}
    for precision in ("int8", "fp8"):
        quantized = root / f"a.{precision}.onnx"
        moq.quantize(str(path), quantize_mode=precision, calibration_data=calib, calibration_method="max",
                     output_path=str(quantized), log_level="ERROR")
        out[precision] = _onnx_quantized_inputs(onnx.load(str(quantized)), modules)
    return out


def test_int8_placement_is_modelopts_onnx_placement_for_tensorrt(onnx_quantized):
    theirs = onnx_quantized["int8"]
    ours = _format_inputs("int8")
    # what it quantizes, by operator: 36 convolutions (input and weight), the Transformer's 4
    # linear matmuls (8 inputs) and 2 attention products (4), 13 residual adds, both
    # LayerNorms, the max pooling, one concat input
    by_op: Dict[str, int] = {}
    for op in theirs.values():
        by_op[op] = by_op.get(op, 0) + 1
    assert by_op == {"Conv": 72, "MatMul": 12, "Add": 13, "LayerNormalization": 2, "MaxPool": 1, "Concat": 1}
    assert not [k for k in theirs if k[1] == "branch"], "a residual add quantized on the other operand"
    assert set(theirs) - ours == ONNX_ONLY | ONNX_ONLY_INT8
    assert ours - set(theirs) == FORMAT_ONLY
    assert all(isinstance(m, ResidualAdd) for m in [create_model(VARIANT).get_submodule(k[0]) for k in ours
                                                    if theirs.get(k) == "Add"])


def test_fp8_gemm_placement_is_modelopts_onnx_placement_inside_the_transformer(onnx_quantized):
    """Which operator inputs are quantized, not where on the way to them: the exported
    (unquantized) reference scales the attention scores after the first product, so
    ModelOpt's query pair sits on the unscaled query, where this format quantizes the scaled
    one (as ModelOpt's FP8 exporter moves the scale; parity checks that tensor).

    ModelOpt's ONNX FP8 mode also quantizes the convolutions to FP8 (but the stem); this
    format does not (FP8 is for the GEMMs: weights.Quantization). Inside the Transformer
    the two agree, the attention's four operands included; the convolution part of a mixed
    file is the int8 placement."""
    inside = lambda keys: {k for k in keys if ".transformer." in k[0] + "."}  # noqa: E731
    theirs = onnx_quantized["fp8"]
    assert inside(theirs) == inside(_format_inputs("fp8", "none")) == _format_inputs("fp8", "none")
    assert {k for k in theirs if k[0] == ATTENTION} == {(ATTENTION, s) for o in PRODUCT_OPERANDS for s in o}
    assert ("stem.conv", "input") not in theirs  # ModelOpt leaves the stem out of FP8, as this format does
    mixed = _format_inputs("fp8", "int8")
    assert mixed - _format_inputs("fp8", "none") == {k for k in _format_inputs("int8") if k not in inside(mixed)}
