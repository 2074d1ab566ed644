"""The network TensorRT compiles, checked against the PyTorch reference on CPU.

Every variant is built by the real TensorRT builder (TensorRT-RTX where full TensorRT is
absent: it builds engines without a GPU), and the built INetworkDefinition is executed
by the CPU interpreter, layer by layer, against the reference.
"""

import copy

import pytest
import torch

import trtvit_native as tv
from conftest import cosine, network, photographs, random_images, reference

VARIANTS = ["trt-vit-a", "trt-vit-b", "trt-vit-c", "trt-vit-d", "resnet50"]


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_and_matches_the_reference_layer_by_layer(variant, fp16):
    built = network(variant, fp16)
    plan = built.build_serialized()
    assert isinstance(plan, bytes) and len(plan) > built.weight_bytes * 0.9
    model = reference(variant)
    inputs = {"photographs x3": photographs(3), "synthetic x3": tv.synthetic_images(3, seed=11),
              "photograph x1": photographs(1), "gaussian x1": random_images(1, seed=2)}
    for label, images in inputs.items():
        report = tv.parity_report(built, model, images)
        assert report.ok, f"{label}:\n{report.table()}"
        assert len(report.layers) > 50 and [p.name for p in report.outputs] == ["logits"]
        assert report.logits.shape == (images.shape[0], 1000)


def test_fp16_network_is_strongly_typed_fp16_with_fp32_layernorm_and_softmax():
    built = network("trt-vit-a", True)
    trt = built.backend.trt
    types = {}
    for i in range(built.network.num_layers):
        layer = built.network.get_layer(i)
        types[layer.name] = (str(layer.type).split(".")[-1], layer.get_output(0).dtype)
    assert built.network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert types["stages.2.1.conv2"] == ("CONVOLUTION", trt.float16)
    assert types["stages.3.1.transformer.qkv.matmul"] == ("MATRIX_MULTIPLY", trt.float16)
    assert types["stages.3.1.transformer.norm1.normalize"] == ("NORMALIZATION", trt.float32)
    assert types["stages.3.1.transformer.norm1"] == ("CAST", trt.float16)
    assert types["stages.3.1.transformer.attn.softmax"] == ("SOFTMAX", trt.float32)
    assert types["logits"] == ("CAST", trt.float32)
    conv = [built.network.get_layer(i) for i in range(built.network.num_layers)
            if built.network.get_layer(i).name == "stages.0.0.conv1"][0]
    conv.__class__ = trt.IConvolutionLayer
    assert conv.kernel.dtype.name == "float16"


def test_layer_names_are_unique_and_follow_the_reference():
    built = network("trt-vit-a", False)
    names = built.layer_names()
    assert len(names) == len(set(names))
    modules = dict(reference("trt-vit-a").named_modules())
    for name in ("stem", "stages.0.0.conv1", "stages.3.0", "stages.3.0.shortcut", "stages.3.1.reduce",
                 "stages.3.1.transformer", "stages.3.1.transformer.attn", "stages.3.1.transformer.fc2", "head"):
        assert name in names and name in modules
    # BatchNorm is folded: no layer of its own
    assert not any(n.endswith(".bn") for n in names)
    assert sum(1 for i in range(built.network.num_layers)
               if str(built.network.get_layer(i).type).endswith("CONVOLUTION")) == sum(
        1 for n, m in modules.items() if isinstance(m, torch.nn.Conv2d))


def test_batchnorm_is_folded_exactly():
    built = network("trt-vit-a", False)
    model = reference("trt-vit-a")
    _, layers = tv.interpret(built, photographs(2), capture=["stem.conv_bn", "stages.1.0.shortcut"])
    with torch.no_grad():
        ref = model.stem.bn(model.stem.conv(photographs(2)))
    assert (layers["stem.conv_bn"] - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert layers["stages.1.0.shortcut"].shape == (2, 512, 28, 28)


def test_dynamic_batch_profile():
    built = tv.build_network("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=True, max_batch=6)
    assert tuple(built.network.get_input(0).shape) == (-1, 3, 224, 224)
    assert [tuple(s) for s in built.profile.get_shape("images")] == [(1, 3, 224, 224), (6, 3, 224, 224),
                                                                     (6, 3, 224, 224)]
    assert built.config.num_optimization_profiles == 1
    out = tv.interpret(built, photographs(6))
    assert out.shape == (6, 1000)
    with pytest.raises(tv.InterpreterError, match="batch size 7 is outside this network's profile 1..6"):
        tv.interpret(built, photographs(7))


def test_other_image_sizes_and_num_classes():
    model = tv.create_model("trt-vit-a", num_classes=10)
    built = tv.build_network("trt-vit-a", model.state_dict(), fp16=False, max_batch=2, image_size=256)
    assert len(built.build_serialized()) > 0
    images = photographs(2, size=256)
    with torch.no_grad():
        ref = model(images)
    out = tv.interpret(built, images)
    assert out.shape == (2, 10)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(tv.InterpreterError, match=r"images must have shape \(B, 3, 256, 256\)"):
        tv.interpret(built, photographs(1))


def test_weights_from_file_equal_weights_from_state_dict(tmp_weights):
    path, state = tmp_weights
    from_file = tv.build_network("trt-vit-a", path, fp16=False, max_batch=1)
    from_state = network("trt-vit-a", False)
    x = photographs(1)
    assert torch.equal(tv.interpret(from_file, x), tv.interpret(from_state, x))
    assert "a.safetensors" in from_file.weights_source


def test_seeded_default_weights():
    built = tv.build_network("trt-vit-a", fp16=False, max_batch=1)
    assert "seeded untrained" in built.weights_source
    with torch.no_grad():
        ref = reference("trt-vit-a")(photographs(1))
    assert torch.allclose(tv.interpret(built, photographs(1)), ref, atol=1e-4 * ref.abs().max().item())


def test_build_engine_returns_bytes_and_reports_backend():
    plan = tv.build_engine("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=True, max_batch=2)
    assert isinstance(plan, bytes) and len(plan) > 40_000_000
    backend = tv.get_backend()
    assert backend.name in ("tensorrt", "tensorrt_rtx") and backend.version in backend.label


def test_layer_capture_traces_divergence():
    built = network("trt-vit-a", True)
    report = tv.parity_report(built, reference("trt-vit-a"), photographs(2))
    assert report.ok and report.first_divergence() is None
    names = [p.name for p in report.layers]
    assert names.index("stem") < names.index("stages.3.1.transformer.attn") < names.index("head")
    for activation in ("stem.relu", "stages.0.0.relu1", "stages.3.1.transformer.gelu", "stages.3.1.local_relu"):
        assert activation in names
    assert len(names) > 50
    with pytest.raises(tv.InterpreterError, match="no layer named nope"):
        tv.interpret(built, photographs(1), capture=["nope"])


def test_parity_report_finds_the_first_broken_layer():
    state = dict(reference("trt-vit-a").state_dict())
    state["stages.2.1.conv2.bn.bias"] = state["stages.2.1.conv2.bn.bias"] + 0.5  # the engine's weights differ
    built = tv.build_network("trt-vit-a", state, fp16=False, max_batch=2)
    report = tv.parity_report(built, reference("trt-vit-a"), photographs(2))
    assert not report.ok
    assert report.first_divergence().name == "stages.2.1.conv2"
    assert "first layer outside tolerance: stages.2.1.conv2" in report.table()
    assert report.summary().startswith("FAIL") and "first divergent layer stages.2.1.conv2" in report.summary()


def test_a_divergent_layer_fails_the_report_even_when_the_logits_pass():
    """The verdict covers every layer: a defect whose effect on the logits is inside their
    bound still fails at its layer."""
    built = network("trt-vit-a", False)
    model = copy.deepcopy(reference("trt-vit-a"))
    model.stages[3][1].transformer.norm1.eps = 1e-3
    report = tv.parity_report(built, model, photographs(2))
    assert report.logits.ok and not report.ok
    assert report.first_divergence().name == "stages.3.1.transformer.norm1"


def test_noise_bounds_scale_with_precision_and_depth():
    """fp16 bounds are the reference's fp16 rounding noise times the factor: larger than
    fp32's by about fp16's rounding unit over fp32's, and growing through the network."""
    r16 = tv.parity_report(network("trt-vit-a", True), reference("trt-vit-a"), photographs(2))
    r32 = tv.parity_report(network("trt-vit-a", False), reference("trt-vit-a"), photographs(2))
    rel16 = {p.name: p.noise.rel for p in r16.layers}
    rel32 = {p.name: p.noise.rel for p in r32.layers}
    assert 3e-4 < rel16["stem.relu"] < 3e-3 and 1e-8 < rel32["stem.relu"] < 1e-6
    assert rel16["stages.3.1"] > rel16["stem.relu"]
    for p in r16.layers:
        assert p.bound_max >= r16.tolerance.factor * p.noise.max_abs and p.ok


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=100), "image_size must be a positive multiple of 32"),
    (dict(image_size=0), "image_size must be a positive multiple of 32"),
    (dict(max_batch=0), "max_batch must be an integer in 1..4096"),
    (dict(max_batch=2.5), "max_batch must be an integer"),
    (dict(fp16="yes"), "fp16 must be True or False"),
    (dict(plugins="maybe"), "plugins must be 'auto', True or False"),
    (dict(attention="flash"), "attention must be one of 'matmul', 'fused', got 'flash'"),
])
def test_bad_build_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tv.build_network("trt-vit-a", **kwargs)


def test_unknown_variant_and_bad_weights_argument():
    with pytest.raises(ValueError, match="unknown TRT-ViT variant 'resnet101'"):
        tv.build_engine("resnet101")
    with pytest.raises(tv.WeightsError, match="weights must be None, a safetensors path or a state dict"):
        tv.build_network("trt-vit-a", weights=42)


def test_plugins_true_fails_clearly_where_there_are_none():
    backend = tv.get_backend()
    if backend.has_plugin_layers:
        pytest.skip("this backend has plugin layers; the failure path is for backends without them")
    with pytest.raises(tv.BackendError, match="plugins=True cannot be honoured: TensorRT-RTX .* has no plugin layers"):
        tv.build_network("trt-vit-a", plugins=True)


def test_interpreter_rejects_unsupported_layers_and_bad_inputs():
    built = network("trt-vit-a", False)
    with pytest.raises(tv.InterpreterError, match="must be a torch.Tensor"):
        tv.interpret(built, [[1.0]])
    with pytest.raises(tv.InterpreterError, match="floating point"):
        tv.interpret(built, torch.zeros(1, 3, 224, 224, dtype=torch.int64))
    # a network with a layer type the interpreter does not know
    from trtvit_native.interpreter import run_network

    trt = built.backend.trt
    builder = trt.Builder(trt.Logger())
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    x = net.add_input("x", trt.float32, (2, 8))
    topk = net.add_topk(x, trt.TopKOperation.MAX, 2, 1 << 1)
    topk.name = "my_topk"
    net.mark_output(topk.get_output(0))
    fake = tv.BuiltNetwork(built.backend, builder, net, None, None, None, built.variant, False, 2, 224, 1000, False,
                           0, "", 0.0)
    with pytest.raises(tv.InterpreterError, match="layer 'my_topk': layer type TOPK is not supported"):
        run_network(fake, {"x": torch.zeros(2, 8)})


def test_fp32_networks_exclude_tf32_and_fp16_networks_keep_the_default():
    fp32, fp16 = network("trt-vit-a", False), network("trt-vit-a", True)
    flag = fp32.backend.trt.BuilderFlag.TF32
    assert not fp32.config.get_flag(flag)
    assert fp16.config.get_flag(flag)


FUSED = pytest.mark.skipif(not tv.get_backend().has_attention_layer, reason="this TensorRT has no IAttention layer")


@FUSED
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", ["trt-vit-a", "trt-vit-b"])
def test_fused_attention_layer_builds_and_matches_the_reference(variant, fp16):
    built = tv.build_network(variant, reference(variant).state_dict(), fp16=fp16, max_batch=4, attention="fused")
    trt = built.backend.trt
    kinds = [built.network.get_layer(i).type for i in range(built.network.num_layers)]
    blocks = sum(built.variant.depths[3:])
    assert kinds.count(trt.LayerType.ATTENTION_INPUT) == blocks and trt.LayerType.SOFTMAX not in kinds
    assert "fused attention" in built.describe()
    names = built.layer_names()
    assert len(names) == len(set(names))
    assert len(built.build_serialized()) > built.weight_bytes * 0.9
    model = reference(variant)
    for images in (photographs(3), random_images(1, seed=4)):
        with torch.no_grad():
            ref = model(images)
        out = tv.interpret(built, images)
        err = (out - ref).abs().max().item() / ref.abs().max().item()
        if fp16:
            assert err <= 2e-2 and cosine(out, ref) >= 0.999, err
        else:
            assert err <= 1e-4, err


@FUSED
def test_fused_attention_output_equals_the_matmul_path_per_layer():
    images = photographs(2)
    name = "stages.3.1.transformer.attn"
    _, fused = tv.interpret(tv.build_network("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=False,
                                             max_batch=2, attention="fused"), images, capture=[name])
    _, matmul = tv.interpret(network("trt-vit-a", False), images, capture=[name])
    assert fused[name].shape == matmul[name].shape
    assert torch.allclose(fused[name], matmul[name], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Interpreter fidelity: every layer's shape and dtype as TensorRT declares them
# --------------------------------------------------------------------------------------


def _declared(built, batch):
    from trtvit_native.interpreter import _declared_shapes

    shapes = _declared_shapes(built.network, {"images": torch.zeros(batch, 3, *built.image_size)})
    return {built.network.get_layer(i).name: (shapes[built.network.get_layer(i).get_output(0).name],
                                              built.network.get_layer(i).get_output(0).dtype)
            for i in range(built.network.num_layers)}


@pytest.mark.parametrize("attention", ["matmul", pytest.param("fused", marks=FUSED)])
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_layer_has_the_shape_and_dtype_tensorrt_declares(variant, fp16, attention):
    built = network(variant, fp16) if attention == "matmul" else tv.build_network(
        variant, reference(variant).state_dict(), fp16=fp16, max_batch=4, attention="fused")
    from trtvit_native.interpreter import run_network

    trt = built.backend.trt
    layers = run_network(built, {"images": photographs(1)}, capture="all")
    declared = _declared(built, 1)
    assert tuple(built.network.get_input(0).shape) == (-1, 3, 224, 224)  # restored after the check
    assert len(declared) == built.num_layers and set(declared) <= set(layers)  # every layer, by name
    for name, (shape, dtype) in declared.items():
        out = layers[name]
        assert tuple(out.shape) == shape, name
        assert out.dtype == {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}[dtype], name


def test_a_layer_computed_with_the_wrong_shape_fails_loudly(monkeypatch):
    from trtvit_native import interpreter

    cls, shuffle = interpreter._HANDLERS["SHUFFLE"]

    def without_second_transpose(trt, layer, inputs):
        layer.second_transpose = tuple(range(8))
        return shuffle(trt, layer, inputs)

    monkeypatch.setitem(interpreter._HANDLERS, "SHUFFLE", (cls, without_second_transpose))
    built = tv.build_network("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=False, max_batch=1)
    with pytest.raises(tv.InterpreterError, match=r"layer 'stages.3.1.to_tokens' \(SHUFFLE\) output 0: the "
                                                  r"interpreter computed shape \(1, 1024, 49\), TensorRT declares "
                                                  r"\(1, 49, 1024\) for these inputs"):
        tv.interpret(built, photographs(1))
    assert tuple(built.network.get_input(0).shape) == (-1, 3, 224, 224)


def _tiny_network(add_layer):
    """A one-layer network on a (1, 2, 9, 10) input, wrapped as a BuiltNetwork."""
    backend = tv.get_backend()
    trt = backend.trt
    builder = trt.Builder(trt.Logger())
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    x = net.add_input("x", trt.float32, (1, 2, 9, 10))
    keep = []
    layer = add_layer(trt, net, x, keep)
    layer.name = layer.get_output(0).name = "probe"
    net.mark_output(layer.get_output(0))
    built = tv.BuiltNetwork(backend, builder, net, None, None, None, tv.get_config("trt-vit-a"), False, 1, 224, 1,
                            False, 0, "", 0.0)
    built._keepalive = keep
    return built


def _conv(mode, pre=(0, 0), post=(0, 0)):
    def add(trt, net, x, keep):
        keep.append(torch.randn(3, 2, 3, 4, generator=torch.Generator().manual_seed(0)).numpy())
        keep.append(torch.zeros(3).numpy())
        layer = net.add_convolution_nd(x, 3, (3, 4), trt.Weights(keep[0]), trt.Weights(keep[1]))
        layer.stride_nd = (2, 3)
        layer.pre_padding, layer.post_padding = pre, post
        layer.padding_mode = getattr(trt.PaddingMode, mode)
        return layer
    return add


def _pool(kind, mode, pre=(0, 0), post=(0, 0), exclude=True):
    def add(trt, net, x, keep):
        layer = net.add_pooling_nd(x, getattr(trt.PoolingType, kind), (3, 3))
        layer.stride_nd = (2, 2)
        layer.pre_padding, layer.post_padding = pre, post
        layer.padding_mode = getattr(trt.PaddingMode, mode)
        if kind == "AVERAGE":
            layer.average_count_excludes_padding = exclude
        return layer
    return add


@pytest.mark.parametrize("add_layer, reference_fn", [
    # SAME_UPPER on 9x10, kernel 3x4, stride 2x3: out 5x4, padding (1, 1) rows, (1, 2) columns
    (_conv("SAME_UPPER"), lambda x, w: torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 2, 1, 1)), w,
                                                                  stride=(2, 3))),
    (_conv("SAME_LOWER"), lambda x, w: torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 1, 1, 1)), w,
                                                                  stride=(2, 3))),
    (_conv("EXPLICIT_ROUND_DOWN", (1, 0), (0, 2)),
     lambda x, w: torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 2, 1, 0)), w, stride=(2, 3))),
    # ROUND_UP: 9+1 rows -> ceil((10-3)/2)+1 = 5 windows (one more than ROUND_DOWN), 10 cols -> ceil(6/3)+1 = 3
    (_conv("EXPLICIT_ROUND_UP", (1, 0), (0, 0)),
     lambda x, w: torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, 1, 1)), w, stride=(2, 3))),
    (_pool("MAX", "SAME_UPPER"), lambda x, w: torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(x, (0, 1, 1, 1), value=-float("inf")), 3, 2)),
    (_pool("AVERAGE", "EXPLICIT_ROUND_DOWN", (1, 0), (1, 1), exclude=True),
     lambda x, w: torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (0, 1, 1, 1)), 3, 2, divisor_override=1)
     / torch.nn.functional.avg_pool2d(torch.nn.functional.pad(torch.ones_like(x), (0, 1, 1, 1)), 3, 2,
                                      divisor_override=1)),
])
def test_padding_modes_are_honoured(add_layer, reference_fn):
    built = _tiny_network(add_layer)
    x = torch.randn(1, 2, 9, 10, generator=torch.Generator().manual_seed(1))
    from trtvit_native.interpreter import run_network

    out = run_network(built, {"x": x})["probe"]
    assert tuple(out.shape) == tuple(built.network.get_output(0).shape)  # what TensorRT declares
    w = torch.from_numpy(built._keepalive[0]) if built._keepalive else None
    assert torch.allclose(out, reference_fn(x, w), atol=1e-5)
