"""INT8 and FP8: ModelOpt calibration on the CPU, the quantized file format, the
fake-quantized reference, Q/DQ networks against it layer by layer, and planted Q/DQ
defects each caught at its layer.

Small on purpose (trt-vit-a with a 10-class head at 32x32, 20 calibration images); the
accuracy measurement on the handwritten digits is ``benchmarks/quantize_digits.py``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="NVIDIA ModelOpt is not installed (pip install "
                    "'trtvit_native[quant]')")

import trtvit_native as tv  # noqa: E402
from trtvit_native import interpreter, network, weights as W  # noqa: E402
from trtvit_native.cli import main  # noqa: E402
from trtvit_native.parity import parity_report  # noqa: E402
from trtvit_native.quantization import fp16_exact_amax, quantize  # noqa: E402

from conftest import reference  # noqa: E402

SIZE = 32
CLASSES = 10


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 10-class trt-vit-a weights file (the seeded reference's head cut to 10 classes) and
    an ImageFolder of 10 classes x 2 PNG images, 32x32, made from synthetic images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("quant")
    state = dict(reference("trt-vit-a").state_dict())
    state["head.weight"], state["head.bias"] = state["head.weight"][:CLASSES] * 50, state["head.bias"][:CLASSES]
    classes = [f"c{i}" for i in range(CLASSES)]
    tv.save_weights(state, root / "a.safetensors", "trt-vit-a",
                    metadata={"image_size": str(SIZE), "classes": json.dumps(classes)})
    images = tv.synthetic_images(2 * CLASSES, SIZE, seed=5)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for i, img in enumerate(images):
        folder = root / "data" / classes[i % CLASSES]
        folder.mkdir(parents=True, exist_ok=True)
        rgb = ((img * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(rgb).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def quantized(work):
    """int8, fp8 (GEMMs) and mixed (fp8 GEMMs, int8 convolutions) files calibrated by
    trtvit_native.quantize on the 20 images."""
    out = {}
    for kind, precision, conv in (("int8", "int8", None), ("fp8", "fp8", None), ("mixed", "fp8", "int8")):
        out[kind] = work / f"a-{kind}.safetensors"
        quantize("trt-vit-a", work / "a.safetensors", work / "data", out[kind], precision=precision,
                 images=20, batch_size=10, progress=False, conv_precision=conv)
    return out


@pytest.fixture(scope="module")
def fake(quantized):
    """The fake-quantized references restored from the files (parity does not change them)."""
    return {precision: tv.create_model("trt-vit-a", weights=path) for precision, path in quantized.items()}


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return tv.synthetic_images(batch, SIZE, seed=seed)


# --- calibration, file format, the fake-quantized reference -------------------------------


def test_file_holds_the_weights_and_the_amax_of_every_enabled_quantizer(work, quantized, fake):
    from safetensors.numpy import load_file

    from trtvit_native.quantization import _quantizers

    counts = {"int8": 96, "fp8": 16, "mixed": 100}  # see below
    for kind, path in quantized.items():
        q = W.load_quantization(path, "trt-vit-a")
        precision = "int8" if kind == "int8" else "fp8"
        assert q.precision == precision and q.method == "max" and q.images == 20 and q.keep == ()
        assert q.conv_precision == {"int8": "int8", "fp8": "none", "mixed": "int8"}[kind]
        assert set(q.amax) == set(W.quantizer_sites("trt-vit-a", (), CLASSES, precision, q.conv_precision))
        # int8: the inputs of 36 convolutions, 4 linears, 2 LayerNorms, the max pooling and 13
        # residual adds; the weights of the 40 convolutions and linears (the head is not
        # quantized). fp8: the Transformer's 4 linears (input, weight), 2 LayerNorms, 2 adds and
        # its attention (q, k, v, softmax); mixed: both, less int8's Transformer sites.
        assert len(q.amax) == counts[kind]
        attention = {n for n in q.amax if ".attn." in n}
        assert attention == ({f"stages.3.1.transformer.attn.{a}" for a in W.ATTENTION_QUANTIZERS}
                             if precision == "fp8" else set())
        for name in attention:  # the probabilities' range is [0, 1]: amax 1 (its scale the fp16 number above 1/448)
            want = 1.0006103515625 if name.endswith("softmax_quantizer") else None
            assert want is None or float(q.amax[name]) == want, name
        assert not any(n.startswith("head.") for n in q.amax)
        assert q.precisions() == {"int8": ("int8",), "fp8": ("fp8",), "mixed": ("int8", "fp8")}[kind]
        stored = load_file(str(path))  # a plain safetensors file: the weights unchanged, plus the amax
        original = load_file(str(work / "a.safetensors"))
        assert all(np.array_equal(stored[k], v) for k, v in original.items())
        assert set(stored) - set(original) == {n + ".amax" for n in q.amax}
        meta = W.read_metadata(path)
        assert json.loads(meta["classes"]) == [f"c{i}" for i in range(CLASSES)] and meta["image_size"] == str(SIZE)
        # the reference restored from the file is ModelOpt's: the same quantizers enabled, the file's amax
        model = fake[kind]
        enabled = {n: m for n, m in _quantizers(model).items() if m.is_enabled}
        assert set(enabled) == set(q.amax)
        for name, m in enabled.items():
            assert np.array_equal(m.amax.reshape(-1).numpy(), q.amax[name].reshape(-1))
            assert m.num_bits == (8 if q.precision_of(name) == "int8" else (4, 3)), name
            if name.endswith("weight_quantizer"):  # int8 per output channel, fp8 per tensor
                assert m.axis == (0 if q.precision_of(name) == "int8" else None), name
            else:  # activation scales are fp16 numbers, so fp16 networks take them exactly
                scale = q.scale(name)
                assert np.array_equal(scale.astype(np.float16).astype(np.float32), scale), name
        # the builder's weight integers (ModelOpt's arithmetic, operation for operation) are the
        # reference's, for every convolution and linear layer: no weight ever flips
        for name, m in enabled.items():
            if name.endswith("weight_quantizer"):
                weight = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
                mine = network.fake_quantized_weight(weight.numpy(), m.amax.reshape(-1).numpy(), q.precision_of(name))
                assert np.array_equal(mine, m(weight).numpy()), name


def test_the_softmax_amax_is_one_whatever_the_calibration_data():
    """The probabilities lie in [0, 1]: their quantizer's amax is fixed at 1 (its scale the
    fp16 number just above 1/448), as ModelOpt's FP8 exporter fixes it, never the largest
    probability the calibration images gave (16 tokens here; with one token it is 1 anyway)."""
    from trtvit_native.quantization import _quantizers, calibrate_model

    model = calibrate_model(tv.create_model("trt-vit-a"), [tv.synthetic_images(2, 128, seed=5)], "fp8")
    softmax = _quantizers(model)["stages.3.1.transformer.attn.softmax_quantizer"]
    assert float(softmax.amax) == 1.0006103515625
    assert float(_quantizers(model)["stages.3.1.transformer.attn.q_bmm_quantizer"].amax) != 1.0006103515625


def test_keep_leaves_modules_unquantized(work, tmp_path):
    out = tmp_path / "kept.safetensors"
    q = quantize("trt-vit-a", work / "a.safetensors", work / "data", out, images=10, batch_size=10,
                 keep="stages.3.1.transformer", progress=False)
    assert q.keep == ("stages.3.1.transformer",)
    assert not any(n.startswith(("head.", "stages.3.1.transformer.")) for n in q.amax)
    assert "stages.3.1.conv1.conv.input_quantizer" in q.amax
    built = tv.build_network("trt-vit-a", out, fp16=False, max_batch=2, image_size=SIZE)
    names = built.layer_names()
    assert not any(n.startswith(("head.input_quantizer", "stages.3.1.transformer.qkv.input")) for n in names)
    assert "stages.3.1.conv1.conv.input_quantizer.quantize" in names


# --- the interpreter's Q/DQ, as TensorRT defines them --------------------------------------


def test_quantize_values_round_half_to_even_and_saturate():
    s = torch.tensor(0.5)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.4, 127.6, -128.4, -130.0, 200.0]) * s
    q = interpreter.quantize_values(x, s, torch.int8)
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 127, 127, -128, -128, 127]
    f = interpreter.quantize_values(torch.tensor([17.0, 19.0, 500.0, -1000.0, 0.1]), torch.tensor(1.0),
                                    torch.float8_e4m3fn)
    assert f.float().tolist() == [16.0, 20.0, 448.0, -448.0, 0.1015625]  # ties to even mantissa; saturated


def test_e4m3_rounding_of_the_builder_is_torchs():
    v = torch.randn(100000, generator=torch.Generator().manual_seed(0)) * torch.exp(
        3 * torch.randn(100000, generator=torch.Generator().manual_seed(1)))
    expected = v.clamp(-448, 448).to(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(network._e4m3(v.numpy()), expected)


# --- networks against the fake-quantized reference -----------------------------------------


def _count(built, kind: str) -> int:
    return sum(str(built.network.get_layer(i).type).split(".")[-1] == kind for i in range(built.num_layers))


@pytest.mark.parametrize("kind,fp16", [("mixed", True), ("fp8", False)])  # int8: test_cli_quantize_build_and_eval
def test_quantized_network_matches_the_fake_quantized_reference_layer_by_layer(quantized, fake, kind, fp16):
    built = tv.build_network("trt-vit-a", quantized[kind], fp16=fp16, max_batch=2, image_size=SIZE)
    q = built.quantization
    precision = q.precision
    assert precision == "fp8"
    assert _count(built, "QUANTIZE") == _count(built, "DEQUANTIZE") == len(q.amax)
    names = set(built.layer_names())
    assert all(f"{n}.quantize" in names for n in q.amax)
    report = parity_report(built, fake[kind], images())
    assert report.ok, report.table()
    assert report.precision == f"{precision}-{'fp16' if fp16 else 'fp32'}"
    compared = {p.name for p in report.layers}
    assert "stages.3.1.transformer.fc2.input_quantizer" in compared
    assert ("stem.conv.input_quantizer" in compared) == (kind == "mixed")
    compute = "fp16" if fp16 else "fp32"
    meta = built.metadata(b"plan")
    assert meta["precision"] == precision and meta["format"] == "trtvit-engine-metadata/2"
    assert meta["compute_precision"] == {"conv": "int8" if kind == "mixed" else compute,
                                         "gemm": f"mixed (fp8, {compute})",  # the head stays in floating point
                                         "attention": "fp8", "norm": compute, "other": compute}
    assert meta["quantization"] == {"format": "trtvit-quantized/3", "precision": precision,
                                    "conv_precision": q.conv_precision, "fp8_weights": "per-tensor", "method": "max",
                                    "images": 20, "keep": [], "modelopt": q.modelopt}
    # strongly typed: every quantize layer's input and scale, every dequantize layer's scale and
    # output in one type (TensorRT's operator definitions), fp16 in an fp16 network
    layers = {built.network.get_layer(i).name: built.network.get_layer(i) for i in range(built.num_layers)}
    want = tv.get_backend().trt.float16 if fp16 else tv.get_backend().trt.float32
    dequantize = [layer for layer in layers.values() if str(layer.type).endswith("DEQUANTIZE")]
    assert len(dequantize) == len(q.amax)
    for layer in dequantize:
        assert layer.get_input(1).dtype == layer.get_output(0).dtype == want, layer.name
    for n in q.amax:
        quantize_layer = layers[f"{n}.quantize"]
        assert quantize_layer.get_input(1).dtype == quantize_layer.get_input(0).dtype == want, n


def test_batchnorm_folds_exactly_into_the_weight_scales_with_negative_and_zero_factors(work, quantized, tmp_path):
    """Negative BN factors on half the channels of two convolutions, a zero one on another:
    the network's weight integers are sign(f) times the reference's, and parity holds."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(quantized["int8"]))
    for conv in ("stages.0.0.conv2", "stem"):
        g = tensors[f"{conv}.bn.weight"].copy()
        g[::2] *= -1
        g[1] = 0.0
        tensors[f"{conv}.bn.weight"] = g
    path = tmp_path / "negative.safetensors"
    save_file(tensors, str(path), metadata=W.read_metadata(quantized["int8"]))
    model = tv.create_model("trt-vit-a", weights=path)
    built = tv.build_network("trt-vit-a", path, fp16=False, max_batch=2, image_size=SIZE, outputs="stage1")
    wq = "stages.0.0.conv2.conv.weight_quantizer"
    _, got = tv.interpret(built, images(), capture=[f"{wq}.quantize", f"{wq}.folded"])
    conv = model.stages[0][0].conv2
    amax = conv.conv.weight_quantizer.amax.reshape(-1, 1, 1, 1)
    w = conv.conv.weight.detach()
    ref_int = torch.clamp(torch.round(w * (127.0 / amax)), -128, 127)
    bn = conv.bn
    f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    assert (f < 0).sum() >= 16 and (f == 0).sum() == 1
    expected = torch.sign(f).view(-1, 1, 1, 1) * ref_int  # f = 0: a zero kernel, all integers 0
    assert torch.equal(got[f"{wq}.quantize"].float(), expected)  # the very integers, sign(f) * q
    dequantized = conv.conv.weight_quantizer(w) * f.view(-1, 1, 1, 1)  # f * s * q
    # equal up to fp32 rounding: q * (|f| s) in the network, f * (q / (127 / amax)) in the reference
    assert torch.allclose(got[f"{wq}.folded"].double(), dequantized.double(), rtol=8 * 2.0 ** -24, atol=0)
    report = parity_report(built, model, images())
    assert report.ok, report.table()


# --- planted Q/DQ defects, each caught at its layer ------------------------------------------


def _stage1_report(fake, path, quantization=None, x=None, model=None):
    built = tv.build_network("trt-vit-a", path, fp16=False, max_batch=2, image_size=SIZE, outputs="stage1",
                             quantization=quantization)
    return parity_report(built, model or fake["int8"], images() if x is None else x)


def test_planted_wrong_axis_on_one_weight_scale_is_caught_at_its_convolution(quantized, fake, monkeypatch):
    original = network._quantize_dequantize

    def wrong_axis(net, x, quantizer, scale, axis, name):
        return original(net, x, quantizer, scale, 1 if quantizer == "stages.0.0.conv2.conv.weight_quantizer" else axis,
                        name)

    monkeypatch.setattr(network, "_quantize_dequantize", wrong_axis)  # conv2 is 64 -> 64: axis 1 fits too
    report = _stage1_report(fake, quantized["int8"])
    assert report.first_divergence().name == "stages.0.0.conv2"


def test_planted_doubled_activation_scale_in_the_network_only_is_caught_at_its_quantizer(quantized, fake):
    q = W.load_quantization(quantized["int8"])
    name = "stages.0.0.conv3.conv.input_quantizer"
    doubled = W.Quantization(q.precision, q.method, q.images, q.keep, q.modelopt, {**q.amax, name: q.amax[name] * 2})
    report = _stage1_report(fake, quantized["int8"], quantization=doubled)
    assert report.first_divergence().name == name


def test_planted_dropped_qdq_pair_is_named(quantized, fake, monkeypatch):
    original = network.qdq
    name = "stages.0.1.conv1.conv.input_quantizer"
    monkeypatch.setattr(network, "qdq", lambda net, x, quantizer: x if quantizer == name else original(net, x,
                                                                                                       quantizer))
    report = _stage1_report(fake, quantized["int8"])
    assert report.first_divergence().name == name
    assert "no quantize layer" in report.first_divergence().describe()
    assert not next(p for p in report.layers if p.name == "stages.0.1.conv1").ok  # and it shows in the numbers


def _ties(quantized, fake, x_scale: float):
    """The int8 file with the stem's input amax 127/32 (scale 1/32 exactly), a reference with
    it, and images of exact ties (k + 1/2)/32, some beyond the range (saturated)."""
    q = W.load_quantization(quantized["int8"])
    name = "stem.conv.input_quantizer"
    amax = np.array(127.0 / 32.0, dtype=np.float32)
    quant = W.Quantization(q.precision, q.method, q.images, q.keep, q.modelopt, {**q.amax, name: amax})
    model = copy.deepcopy(fake["int8"])
    model.stem.conv.input_quantizer.amax = torch.tensor(amax)
    k = torch.randint(-100, 100, (2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)).float()
    x = (k + 0.5) / 32.0
    x[:, :, 0, :8] = x_scale  # beyond 127.5 steps: saturates
    x[:, :, 1, :8] = -x_scale
    return quant, model, x


@pytest.mark.parametrize("defect", ["none", "half away from zero", "saturate at 128"])
def test_planted_rounding_and_saturation_defects_are_caught_at_the_first_quantizer(quantized, fake, monkeypatch, defect):
    quant, model, x = _ties(quantized, fake, 5.0)
    if defect == "half away from zero":
        monkeypatch.setattr(interpreter, "quantize_values", lambda v, s, dtype: (
            torch.sign(v / s) * torch.floor((v / s).abs() + 0.5)).clamp(-128, 127).to(dtype))
    elif defect == "saturate at 128":
        monkeypatch.setattr(interpreter, "INT8_RANGE", (-128.0, 128.0))
    report = _stage1_report(fake, quantized["int8"], quantization=quant, x=x, model=model)
    if defect == "none":  # exact ties and saturation: the network's integers are the reference's
        assert report.ok, report.table()
        stem_q = next(p for p in report.layers if p.name == "stem.conv.input_quantizer")
        assert stem_q.error.max_abs == 0.0
    else:
        assert report.first_divergence().name == "stem.conv.input_quantizer"


def _near_ties(quantized, fake):
    """The int8 file with the stem's input amax 2.4850264 (scale amax / 127, not a power of
    two), its reference, and images of near-ties: (k + 1/2) * scale and one fp32 ulp either
    side, where TensorRT's x / scale and ModelOpt's x * (127 / amax) round differently for
    some (164 of the 720 here)."""
    q = W.load_quantization(quantized["int8"])
    name = "stem.conv.input_quantizer"
    amax = np.array(2.4850263595581055, dtype=np.float32)
    quant = W.Quantization(q.precision, q.method, q.images, q.keep, q.modelopt, {**q.amax, name: amax})
    model = copy.deepcopy(fake["int8"])
    model.stem.conv.input_quantizer.amax = torch.tensor(amax)
    s = torch.tensor(amax) / 127.0
    k = torch.randint(-120, 120, (2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0)).float()
    x = (k + 0.5) * s
    x = torch.where(k.remainder(3) == 0, torch.nextafter(x, x + 1), torch.where(k.remainder(3) == 1, x,
                                                                                torch.nextafter(x, x - 1)))
    return quant, model, x


def test_one_code_is_allowed_only_where_the_two_computations_of_x_over_scale_round_apart(quantized, fake,
                                                                                        monkeypatch):
    quant, model, x = _near_ties(quantized, fake)
    report = _stage1_report(fake, quantized["int8"], quantization=quant, x=x, model=model)
    assert report.ok, report.table()
    stem_q = next(p for p in report.layers if p.name == "stem.conv.input_quantizer")
    assert stem_q.boundary_codes > 0 and "at a rounding boundary" in report.summary()
    # One code off anywhere else is still a failure, at the quantizer.
    original = interpreter.quantize_values

    def one_off(v, scale, dtype):
        q = original(v, scale, dtype)
        if v.shape[-1] == SIZE and v.shape[1] == 3:  # the stem's input quantizer
            exact = (v.float() / scale - (v.float() / scale).round()).abs() < 0.25  # far from any boundary
            idx = exact.flatten().nonzero()[0, 0]
            q = q.flatten().clone()
            q[idx] += 1
            q = q.reshape(v.shape)
        return q

    x = x.clone()
    x[0, 0, 0, 0] = 0.1  # 5.1 steps: nowhere near a boundary
    monkeypatch.setattr(interpreter, "quantize_values", one_off)
    report = _stage1_report(fake, quantized["int8"], quantization=quant, x=x, model=model)
    assert report.first_divergence().name == "stem.conv.input_quantizer"


def test_planted_quantize_layer_fed_the_pre_relu_tensor_is_caught_at_its_input(quantized, fake, monkeypatch):
    """In stages.0.1, conv3's quantize layer reads conv2's output before the ReLU. The
    reference quantizer is replayed on the network's tensor, so the quantizer row passes;
    the row of its input, against what the reference feeds the quantizer, does not."""
    original = network.qdq
    name = "stages.0.1.conv3.conv.input_quantizer"

    def pre_relu(net, x, quantizer):
        if quantizer == name:
            for i in range(net.network.num_layers):
                layer = net.network.get_layer(i)
                if layer.get_output(0).name == x.name:
                    assert str(layer.type).endswith("ACTIVATION"), layer.type
                    x = layer.get_input(0)
                    break
        return original(net, x, quantizer)

    monkeypatch.setattr(network, "qdq", pre_relu)
    report = _stage1_report(fake, quantized["int8"])
    assert report.first_divergence().name == f"{name}.input", report.table()
    assert next(p for p in report.layers if p.name == name).ok  # the blind spot: the pair itself matches


def test_a_reference_layer_that_produced_no_output_is_named_not_a_key_error(quantized, fake, monkeypatch):
    from trtvit_native.model import BottleNeck

    def skips_relu1(self, x):  # calls F.relu, not its relu1 module
        body = self.conv3(self.relu2(self.conv2(torch.relu(self.conv1(x)))))
        return torch.relu(body + (x if self.shortcut is None else self.shortcut(x)))

    monkeypatch.setattr(BottleNeck, "forward", skips_relu1)
    report = _stage1_report(fake, quantized["int8"])
    bad = next(p for p in report.layers if p.name == "stages.0.0.relu1")
    assert not bad.ok and "produced no output" in bad.describe() and not report.ok


# --- weights file validation --------------------------------------------------------------


FC2 = "stages.3.1.transformer.fc2.input_quantizer.amax"


@pytest.mark.parametrize("edit,message", [
    (lambda t, m: t.pop("stem.conv.input_quantizer.amax"), "amax missing for 1 quantizers: stem.conv.input_quantizer"),
    (lambda t, m: t.__setitem__(FC2, np.array(0.0, np.float32)), f"amax zero in {FC2}"),
    (lambda t, m: t.__setitem__(FC2, np.array(-1.0, np.float32)), f"amax negative in {FC2}"),
    (lambda t, m: t.__setitem__(FC2, np.array(np.nan, np.float32)), f"amax not finite in {FC2}"),
    (lambda t, m: t.__setitem__("stem.relu.input_quantizer.amax", np.array(1.0, np.float32)),
     "for a module that does not exist: stem.relu.input_quantizer.amax"),
    (lambda t, m: m.__setitem__("quantization", m["quantization"].replace('"trtvit-quantized/3"',
                                                                          '"trtvit-quantized/4"')),
     "quantization format 'trtvit-quantized/4' is not one this version reads ('trtvit-quantized/3'): written by a "
     "newer trtvit_native"),
    (lambda t, m: t.__setitem__("head.input_quantizer.amax", np.array(1.0, np.float32)),
     "of a module left unquantized or a quantizer that does not exist: head.input_quantizer.amax"),
    (lambda t, m: m.__setitem__("quantization", m["quantization"].replace('"trtvit-quantized/3"',
                                                                          '"trtvit-quantized/1"')),
     "quantization format 'trtvit-quantized/1', this version reads 'trtvit-quantized/3' (residual adds"),
    (lambda t, m: m.__setitem__("quantization", m["quantization"].replace('"int8"', '"int4"')),
     "quantized to precision 'int4', which this version does not carry"),
])
def test_bad_amax_entries_are_named(quantized, tmp_path, edit, message):
    """(A zero amax is never written by trtvit quantize: test_an_all_zero_filter_is_written_as_a_scale_of_one.)"""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(quantized["int8"]))
    meta = W.read_metadata(quantized["int8"])
    edit(tensors, meta)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(W.WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        W.load_weights(path)
    with pytest.raises(W.WeightsError, match="carries int8 quantization, not fp8"):
        W.load_quantization(quantized["int8"], precision="fp8")


def test_an_fp8_file_whose_softmax_amax_is_not_the_fixed_one_is_refused(quantized, tmp_path):
    """The reference and the network both take the softmax amax from the file, so parity
    cannot see a wrong one (0.21875 clips the larger probabilities): the loader refuses it."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(quantized["fp8"]))
    key = "stages.3.1.transformer.attn.softmax_quantizer.amax"
    assert float(tensors[key]) == W.SOFTMAX_AMAX == float(fp16_exact_amax(torch.tensor(1.0), 448.0))
    tensors[key] = np.array(0.21875, np.float32)
    path = tmp_path / "softmax.safetensors"
    save_file(tensors, str(path), metadata=W.read_metadata(quantized["fp8"]))
    with pytest.raises(W.WeightsError, match=f"amax other than {W.SOFTMAX_AMAX!r} .the probabilities' fixed "
                                             f"range. in {key}"):
        W.load_quantization(path)


def test_format_2_is_read_for_int8_files_and_refused_for_fp8_files(quantized, tmp_path):
    """Format /3 added the attention's quantizers to fp8 files; int8 files are unchanged."""
    from safetensors.numpy import load_file, save_file

    for kind in ("int8", "fp8"):
        meta = W.read_metadata(quantized[kind])
        meta["quantization"] = meta["quantization"].replace('"trtvit-quantized/3"', '"trtvit-quantized/2"')
        path = tmp_path / f"{kind}-v2.safetensors"
        save_file(load_file(str(quantized[kind])), str(path), metadata=meta)
        if kind == "int8":
            assert W.load_quantization(path).amax.keys() == W.load_quantization(quantized[kind]).amax.keys()
        else:
            with pytest.raises(W.WeightsError, match=r"'trtvit-quantized/2', this version reads 'trtvit-quantized/3' "
                                                     r"\(the attention products of fp8 files are quantized since\)"):
                W.load_quantization(path)


# --- the command line ----------------------------------------------------------------------


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_quantize_build_and_eval(work, quantized, capsys, tmp_path):
    out = tmp_path / "q.safetensors"
    code, text, err = _run(capsys, "quantize", "trt-vit-a", "--weights", work / "a.safetensors", "--calib",
                           work / "data", "--precision", "fp8", "--images", 10, "--batch-size", 5, "--quiet",
                           "--sensitivity", "-o", out)
    assert code == 0, err
    assert "fp8 GEMMs and attention, floating-point convolutions (max calibration on 10 images)" in text
    assert "stages.3.1.transformer.fc2" in text and "on 10 images (" in text and "not used for calibration" in text
    engine = tmp_path / "e.engine"
    code, text, err = _run(capsys, "build", "trt-vit-a", "--weights", quantized["int8"], "--fp16", "--image-size",
                           SIZE, "--max-batch", 2, "-o", engine)
    assert code == 0, err
    assert "parity     PASS" in text and "int8 (Q/DQ, fp16 between)" in text and "96 quantize/dequantize pairs" in text
    meta = json.loads((tmp_path / "e.engine.json").read_text())
    assert meta["precision"] == "int8" and meta["quantization"]["images"] == 20
    code, text, err = _run(capsys, "eval", "trt-vit-a", "--weights", quantized["int8"], "--data", work / "data",
                           "--network", "--json")
    assert code == 0, err
    r = json.loads(text)
    for key in ("top1", "reference_top1", "quantized_reference_top1", "agreement", "quantized_reference_agreement"):
        assert 0.0 <= r[key] <= 1.0
    assert r["quantization"]["precision"] == "int8" and r["images"] == 2 * CLASSES


def test_build_from_a_quantized_file_with_no_parity_needs_no_torch(quantized, tmp_path):
    script = ("import sys\nsys.modules['torch'] = None\nfrom trtvit_native.cli import main\n"
              f"sys.exit(main(['build', 'trt-vit-a', '--weights', {str(quantized['fp8'])!r}, '--image-size', "
              f"'{SIZE}', '--max-batch', '1', '--no-parity', '-o', {str(tmp_path / 'e.engine')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "e.engine.json").read_text())["precision"] == "fp8"


@pytest.mark.parametrize("args,message", [
    (["--images", "0"], "--images must be at least 1, got 0"),
    (["--keep", "stages.0,stages.9"], "--keep 'stages.9' names no module of trt-vit-a that is quantized"),
    (["--keep", "head"], "--keep 'head' names no module of trt-vit-a that is quantized"),  # the head never is
    (["--keep", "stages.3.1.transformer.attn"],  # int8 files leave the attention's products in floating point
     "--keep 'stages.3.1.transformer.attn' names no module of trt-vit-a that this recipe (--precision int8) quantizes"),
    # impossible recipes, refused before calibration
    (["--precision", "fp8", "--method", "entropy"], "--method entropy cannot calibrate FP8 ranges"),
    (["--precision", "fp8", "--method", "mse"], "--method mse cannot calibrate FP8 ranges"),
    (["--conv-precision", "none"], "--conv-precision none needs --precision fp8"),
    (["--fp8-weights", "per-channel"], "--fp8-weights needs --precision fp8"),
    (["--sensitivity", "--images", "20"], "--images 20 uses every image of"),
    (["--sensitivity-data", "EMPTY"], "--sensitivity-data is for --sensitivity"),
    (["--sensitivity", "--sensitivity-data", "EMPTY"], "--sensitivity-data: folder"),
    (["--precision", "fp8", "--keep", "stages.3.1.transformer"], "this recipe quantizes nothing of trt-vit-a"),
    (["--batch-size", "64"], "holds 20 images, fewer than one batch (--batch-size 64)"),
    (["--calib", "EMPTY"], "holds no images"),
    (["--calib", "MISSING"], "does not exist"),
])
def test_cli_quantize_bad_input_is_one_line_and_writes_nothing(work, capsys, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [{"EMPTY": str(tmp_path / "empty"), "MISSING": str(tmp_path / "missing")}.get(a, a) for a in args]
    base = {"--calib": str(work / "data"), "--batch-size": "10"}
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    out = tmp_path / "q.safetensors"
    code, _, err = _run(capsys, "quantize", "trt-vit-a", "--weights", work / "a.safetensors", *args, "-o", out)
    assert code == 1 and err.startswith("trtvit: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_calibration_skips_and_counts_an_image_it_cannot_decode(work, capsys, tmp_path):
    import shutil

    calib = tmp_path / "calib"
    shutil.copytree(work / "data", calib)
    source = next((calib / "c3").iterdir())
    truncated = calib / "c3" / "truncated.png"
    truncated.write_bytes(source.read_bytes()[:len(source.read_bytes()) // 2])  # the header intact
    out = tmp_path / "q.safetensors"
    code = main(["quantize", "trt-vit-a", "--weights", str(work / "a.safetensors"), "--calib", str(calib),
                 "--images", "21", "--batch-size", "7", "--quiet", "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0] == "image size 32x32 (the size a.safetensors was trained at)"
    assert lines[1] == f"skipped 1 unreadable image(s), calibrated on 20: {truncated}"
    assert W.load_quantization(out, "trt-vit-a").images == 20
    for path in calib.rglob("*.png"):  # nothing decodable: an error naming the folder, nothing written
        path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code = main(["quantize", "trt-vit-a", "--weights", str(work / "a.safetensors"), "--calib", str(calib),
                 "--images", "21", "--batch-size", "7", "--quiet", "-o", str(tmp_path / "none.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and f"none of the 21 calibration images of {calib} could be decoded" in err
    assert not (tmp_path / "none.safetensors").exists()


def test_predict_on_a_quantized_file_agrees_with_eval(work, quantized, capsys):
    """The reference of both is the unquantized one; the network of both is the int8 one."""
    picks = sorted(str(p) for p in (work / "data").rglob("*.png"))  # all: most probabilities saturate at 1
    for extra in ([], ["--network", "--fp32"]):
        assert main(["eval", "trt-vit-a", "--weights", str(quantized["int8"]), "--data", str(work / "data"),
                     "--per-image", "--json", *extra]) == 0
        by_image = {p["image"]: p for p in json.loads(capsys.readouterr().out)["predictions"]}
        assert main(["predict", str(quantized["int8"]), *picks, "--top", "1", "--json", *extra]) == 0
        for p in json.loads(capsys.readouterr().out)["predictions"]:
            assert p["top"][0]["label"] == by_image[p["image"]]["predicted"]
            assert p["top"][0]["probability"] == pytest.approx(by_image[p["image"]]["probability"], abs=1e-5)


def test_missing_modelopt_names_the_extra(work, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    code, _, err = _run(capsys, "quantize", "trt-vit-a", "--weights", work / "a.safetensors", "--calib",
                        work / "data", "--batch-size", "10", "-o", tmp_path / "q.safetensors")
    assert code == 1 and "pip install 'trtvit_native[quant]'" in err and err.count("\n") == 1


def test_fp8_from_a_tensorrt_without_fp8_is_refused(quantized, monkeypatch, tmp_path, capsys):
    be = tv.get_backend()
    monkeypatch.delattr(be.trt, "fp8")
    engine = tmp_path / "e.engine"
    code, _, err = _run(capsys, "build", "trt-vit-a", "--weights", quantized["fp8"], "--image-size", SIZE,
                        "--no-parity", "-o", engine)
    assert code == 1 and "fp8 quantization needs a TensorRT with the fp8 data type" in err
    assert not engine.exists()


# --- placement, scales, zero amax ------------------------------------------------------------


def test_planted_residual_add_quantizing_the_branch_is_caught_at_its_input(quantized, fake, monkeypatch):
    """The add's Q/DQ on the conv3 branch instead of the residual: the row of the add
    quantizer's input, against what the reference feeds it (the residual), fails."""
    def swapped(net, branch, residual, module, name=None):
        return network.add(net, network.qdq(net, branch, f"{module}.input_quantizer"), residual, name or module)

    monkeypatch.setattr(network, "residual_add", swapped)
    report = _stage1_report(fake, quantized["int8"])
    assert report.first_divergence().name == "stages.0.0.add.input_quantizer.input", report.table()


def test_an_all_zero_filter_is_written_as_a_scale_of_one(work, capsys, tmp_path):
    """A pruned (all-zero) output channel has weight amax 0; the file holds the bound
    instead (a scale of 1, as ModelOpt's exporter writes), loads, and builds to a network
    that matches its reference."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(work / "a.safetensors"))
    tensors["stages.0.0.conv2.conv.weight"][5] = 0.0
    pruned = tmp_path / "pruned.safetensors"
    save_file(tensors, str(pruned), metadata=W.read_metadata(work / "a.safetensors"))
    out = tmp_path / "pruned-int8.safetensors"
    code, text, err = _run(capsys, "quantize", "trt-vit-a", "--weights", pruned, "--calib", work / "data",
                           "--images", 10, "--batch-size", 10, "--quiet", "-o", out)
    assert code == 0, err
    assert "amax zero in 1 quantizer(s)" in text and "stages.0.0.conv2.conv.weight_quantizer" in text
    q = W.load_quantization(out, "trt-vit-a")
    amax = q.amax["stages.0.0.conv2.conv.weight_quantizer"]
    assert amax[5] == 127.0 and (amax > 0).all()
    report = _stage1_report(None, out, model=tv.create_model("trt-vit-a", weights=out))
    assert report.ok, report.table()


@pytest.mark.parametrize("kind,between", [("int8", "--fp32"), ("fp8", "--fp32"), ("mixed", "--fp32"),
                                          ("mixed", "--fp16")])
def test_quantized_files_at_224_pass_parity(quantized, capsys, tmp_path, kind, between):
    """At 224 px (49 attention tokens: the fp8 attention's pairs on real softmax rows), fp32
    or fp16 between the pairs, the build's parity check passes and the engine is written
    (the one-code allowance where TensorRT's x / scale and ModelOpt's x * (127 / amax)
    round apart: test_one_code_is_allowed_only_where_...). The mixed file has every kind
    of pair: int8 convolutions, fp8 GEMMs and attention. (These files are calibrated at
    32x32; test_fp8_attention_at_16_tokens_... calibrates at its size.)"""
    engine = tmp_path / "e.engine"
    code, text, err = _run(capsys, "build", "trt-vit-a", "--weights", quantized[kind], between, "--image-size", 224,
                           "--max-batch", 1, "-o", engine)
    assert code == 0, err
    assert "parity     PASS" in text and engine.exists()


@pytest.fixture(scope="module")
def fp8_at_128(tmp_path_factory):
    """An fp8 file of the seeded trt-vit-a calibrated at 128x128 (16 attention tokens: real
    softmax rows) on synthetic images, and its fake-quantized reference."""
    from trtvit_native.quantization import calibrate_model, save_quantized

    model = calibrate_model(tv.create_model("trt-vit-a"), [tv.synthetic_images(4, 128, seed=s) for s in (11, 12)],
                            "fp8")
    path = tmp_path_factory.mktemp("fp8at128") / "a-fp8.safetensors"
    save_quantized(model, path, "fp8", "max", 8)
    return path, tv.create_model("trt-vit-a", weights=path)


def _scaled(net, x, factor):
    c = net.constant(f"planted.{x.name}.factor", np.full((1,) * len(x.shape), factor, np.float32), net.np_dtype)
    return net.network.add_elementwise(x, c, net.trt.ElementWiseOperation.PROD).get_output(0)


ATTN = "stages.3.1.transformer.attn"
# Planted defects of the fp8 attention, each a change to the Q/DQ pairs network.attention adds
# (network.qdq wrapped): the quantizer it plants at, and what it does instead.
ATTENTION_PLANTS = {
    # the softmax probabilities enter the second product unquantized
    "softmax pair dropped": ("softmax_quantizer", lambda qdq, net, x, q: x),
    # the query quantized before its 1/sqrt(d) scale, the scale applied after the pair
    "query quantized before its scale": ("q_bmm_quantizer", lambda qdq, net, x, q: _scaled(
        net, qdq(net, _scaled(net, x, 32 ** 0.5), q), 32 ** -0.5)),
    # the key's and the value's pairs exchanged
    "key and value quantizers swapped": ("_bmm_quantizer", lambda qdq, net, x, q: qdq(
        net, x, q.replace("k_bmm", "@").replace("v_bmm", "k_bmm").replace("@", "v_bmm"))),
}


@pytest.mark.parametrize("plant", [None, *ATTENTION_PLANTS])
def test_fp8_attention_at_16_tokens_matches_and_planted_defects_are_caught_at_their_layer(fp8_at_128, monkeypatch,
                                                                                           plant):
    path, fake = fp8_at_128
    if plant is not None:
        suffix, change = ATTENTION_PLANTS[plant]
        original = network.qdq
        monkeypatch.setattr(network, "qdq", lambda net, x, q: change(original, net, x, q)
                            if q.startswith(ATTN) and q.endswith(suffix) else original(net, x, q))
    built = tv.build_network("trt-vit-a", path, fp16=False, max_batch=2, image_size=128)
    report = parity_report(built, fake, tv.synthetic_images(2, 128, seed=13))
    if plant is None:
        assert report.ok, report.table()
        rows = {p.name: p for p in report.layers}
        assert all(f"{ATTN}.{q}" in rows and f"{ATTN}.{q}.input" in rows for q in W.ATTENTION_QUANTIZERS)
        return
    first = report.first_divergence()
    assert not report.ok and first is not None
    expected = {"softmax pair dropped": {f"{ATTN}.softmax_quantizer"},
                "query quantized before its scale": {f"{ATTN}.q_bmm_quantizer.input"},
                "key and value quantizers swapped": {f"{ATTN}.k_bmm_quantizer.input", f"{ATTN}.v_bmm_quantizer.input"},
                }[plant]
    assert first.name in expected, (plant, first.describe())


def test_the_gpu_steps_inspector_judge_fails_unfused_and_standalone_pairs(quantized):
    """benchmarks/inspect_quantized.judge on inspector layers as TensorRT names them (the
    GPU step runs it on a real engine's IEngineInspector JSON)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "inspect_quantized.py"
    spec = importlib.util.spec_from_file_location("inspect_quantized", path)
    inspect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inspect)

    def layer(name, kind, fmt):
        return {"Name": name, "LayerType": kind, "Inputs": [{"Format/Datatype": fmt}]}

    modules = {"stages.0.0.conv1.conv": "conv", "stages.3.1.transformer.qkv": "linear",
               f"{ATTN}.scores": "attention", f"{ATTN}.context": "attention"}
    fused = [layer("stages.0.0.conv1.conv.input_quantizer.quantize + stages.0.0.conv1 + stages.0.0.relu1",
                   "CaskConvolution", "Int8 NC/32HW32"),
             layer("stages.3.1.transformer.qkv.matmul", "CaskGemmMatrixMultiply", "FP8 Row major linear"),
             layer(f"{ATTN}.scores", "CaskGemmMatrixMultiply", "FP8"), layer(f"{ATTN}.context", "Gemm", "FP8")]
    good = inspect.judge(fused, modules)
    assert good["quantized_judged"] == 4 and not good["unfused"] and not good["standalone_qdq"], good
    assert good["layers_by_input_precision"] == {"int8": 1, "fp8": 3}
    bad = inspect.judge(fused[:3] + [layer(f"{ATTN}.context", "Gemm", "Half"),
                                     layer(f"{ATTN}.softmax_quantizer.quantize", "Scale", "Half"),
                                     layer("stages.3.1.transformer.norm1.input_quantizer.quantize", "Scale", "Half")],
                        modules)
    assert bad["unfused"] == [f"{ATTN}.context (fp16): {ATTN}.context"]
    assert bad["standalone_qdq"] == [f"{ATTN}.softmax_quantizer.quantize"]  # the LayerNorm's pair: reported only
    myelin = inspect.judge(fused[:2] + [{"Name": "{ForeignNode[stages.3.1.transformer.attn.unpack...]}",
                                         "LayerType": "Myelin"}], modules)
    assert myelin["quantized_inside_myelin"] == [f"{ATTN}.context", f"{ATTN}.scores"] and not myelin["quantized_not_found"]
    assert inspect.judge(fused[:2], modules)["quantized_not_found"] == [f"{ATTN}.context", f"{ATTN}.scores"]
    # what the step judges, from the files: 36 convolutions and 4 linear layers (int8), the
    # 4 linear layers and the attention's 2 products (fp8), all of it (int8+fp8)
    judged = {kind: inspect.judged_modules("trt-vit-a", W.load_quantization(path)) for kind, path in quantized.items()}
    counts = {kind: sorted((k, list(m.values()).count(k)) for k in set(m.values())) for kind, m in judged.items()}
    assert counts == {"int8": [("conv", 36), ("linear", 4)], "fp8": [("attention", 2), ("linear", 4)],
                      "mixed": [("attention", 2), ("conv", 36), ("linear", 4)]}


def test_fp8_attention_with_the_iattention_layer_is_refused_and_small_or_fp32_builds_warn(quantized, caplog):
    with pytest.raises(network.BuildError, match="attention='fused' .the IAttention layer. with an fp8 file's "
                                                 "attention quantizers is not implemented"):
        tv.build_network("trt-vit-a", quantized["fp8"], fp16=True, max_batch=1, image_size=SIZE, attention="fused")
    tv.build_network("trt-vit-a", quantized["int8"], fp16=True, max_batch=1, image_size=SIZE, attention="fused")
    caplog.clear()
    with caplog.at_level("WARNING", logger="trtvit_native"):
        tv.build_network("trt-vit-a", quantized["fp8"], fp16=False, max_batch=1, image_size=SIZE)
    text = caplog.text
    assert "fp8 attention in an fp32 network" in text
    assert "images of 32x32 give 1 attention token(s)" in text and "--keep stages.3.1.transformer.attn " in text


def test_fp16_weights_whose_codes_would_change_are_refused(quantized):
    """E4M3's smallest steps fall below fp16's precision for tiny weights: an fp16 network
    would re-quantize such a weight to other codes, so the build refuses it (fp32 builds)."""
    q = W.load_quantization(quantized["fp8"])
    state = {k: np.array(v) for k, v in W.load_arrays(quantized["fp8"], "trt-vit-a").items()}
    name = "stages.3.1.transformer.qkv.weight_quantizer"
    state["stages.3.1.transformer.qkv.weight"] *= 1e-3
    tiny = W.Quantization(q.precision, q.method, q.images, q.keep, q.modelopt,
                          {**q.amax, name: np.asarray(q.amax[name] * 1e-3, np.float32)}, q.conv_precision, q.fp8_weights)
    with pytest.raises(network.BuildError, match=f"{name}: .* weight code.s. change when the weight and its scale are "
                                                 f"rounded to fp16"):
        tv.build_network("trt-vit-a", state, fp16=True, max_batch=1, image_size=SIZE, quantization=tiny)
    tv.build_network("trt-vit-a", state, fp16=False, max_batch=1, image_size=SIZE, quantization=tiny)
