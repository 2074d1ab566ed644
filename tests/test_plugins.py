"""The IPluginV3 plugins' methods that need no GPU, and their torch references.

The plugin classes derive from the TensorRT module's interface classes; TensorRT-RTX has
those classes (only the network's plugin layers are missing), so their methods are
exercised here with whichever backend is installed.
"""

import numpy as np
import pytest
import torch

import trtvit_native as tv
from trtvit_native import trt_plugins as tp

trt = tv.get_backend().trt
LayerNormPlugin, LayerNormCreator = tp.plugin_classes(trt)[tp.LAYERNORM]
AttentionPlugin, AttentionCreator = tp.plugin_classes(trt)[tp.ATTENTION]


def _desc(dtype, fmt=None):
    d = trt.DynamicPluginTensorDesc()
    d.desc.type = dtype
    d.desc.format = fmt or trt.TensorFormat.LINEAR
    return d


def _fields(fc):
    return {fc[i].name: np.array(fc[i].data).item() for i in range(len(fc))}


def test_names_namespace_version_and_outputs():
    ln = LayerNormPlugin({"eps": 1e-5, "residual": 0})
    res = LayerNormPlugin({"eps": 1e-5, "residual": 1})
    att = AttentionPlugin({"heads": 32, "head_dim": 32, "scale": 32 ** -0.5})
    for p, name in ((ln, "LayerNorm"), (res, "LayerNorm"), (att, "Attention")):
        assert (p.plugin_name, p.plugin_namespace, p.plugin_version) == (name, "trtvit", "1")
        assert p.get_capability_interface(trt.PluginCapabilityType.BUILD) is p
    assert (ln.num_outputs, res.num_outputs, att.num_outputs) == (1, 2, 1)
    assert res.get_output_data_types([trt.DataType.HALF] * 4) == [trt.DataType.HALF] * 2
    assert att.get_output_data_types([trt.DataType.FLOAT]) == [trt.DataType.FLOAT]


@pytest.mark.parametrize("creator_cls, fields", [
    (LayerNormCreator, {"eps": 1e-5, "residual": 1}),
    (LayerNormCreator, {"eps": 1e-6, "residual": 0}),
    (AttentionCreator, {"heads": 16, "head_dim": 32, "scale": 0.125}),
    (AttentionCreator, {"heads": 8, "head_dim": 64, "scale": 0.125}),
])
def test_fields_serialize_round_trip_through_the_creator(creator_cls, fields):
    creator = creator_cls()
    original = creator.create_plugin("layer", _collection(fields), trt.TensorRTPhase.BUILD)
    serialized = original.get_fields_to_serialize()
    restored = creator.create_plugin("layer", serialized, trt.TensorRTPhase.RUNTIME)
    assert restored.fields == original.fields
    assert restored.fields == pytest.approx(fields, rel=1e-7)
    assert _fields(serialized) == pytest.approx(fields, rel=1e-7)
    clone = restored.clone()
    assert clone is not restored and clone.fields == restored.fields and clone.num_outputs == restored.num_outputs
    assert {creator.field_names[i].name for i in range(len(creator.field_names))} == set(fields)


def _collection(fields):
    collection, _collection.keep = tp._field_collection(trt, "LayerNorm" if "eps" in fields else "Attention", fields)
    return collection  # (its field buffers are kept alive on the function)


@pytest.mark.parametrize("fields, message", [
    ({"eps": 1e-5}, r"missing fields \['residual'\]"),
    ({"eps": 1e-5, "residual": 0, "bogus": 1}, r"unknown fields \['bogus'\]"),
    ({"eps": 0.0, "residual": 0}, "eps must be positive"),
    ({"eps": 1e-5, "residual": 2}, "residual must be 0 or 1"),
])
def test_layernorm_field_errors(fields, message):
    with pytest.raises(tp.PluginError, match=message):
        LayerNormPlugin(fields)


@pytest.mark.parametrize("fields, message", [
    ({"heads": 0, "head_dim": 32, "scale": 0.1}, "heads must be positive"),
    ({"heads": 4, "head_dim": 48, "scale": 0.1}, "head_dim 48 is not supported"),
    ({"heads": 4, "head_dim": 32, "scale": -1.0}, "scale must be positive"),
    ({"heads": [4, 5], "head_dim": 32, "scale": 0.1}, "field 'heads' must hold one value"),
])
def test_attention_field_errors(fields, message):
    with pytest.raises(tp.PluginError, match=message):
        AttentionPlugin(fields)


def test_formats_linear_fp32_or_fp16_all_alike():
    ln = LayerNormPlugin({"eps": 1e-5, "residual": 1})
    f32, f16 = trt.DataType.FLOAT, trt.DataType.HALF
    assert ln.supports_format_combination(0, [_desc(f16)] * 6, 4)
    assert ln.supports_format_combination(0, [_desc(f32)] * 6, 4)
    assert not ln.supports_format_combination(0, [_desc(trt.DataType.INT32)] * 6, 4)
    assert not ln.supports_format_combination(3, [_desc(f16)] * 3 + [_desc(f32)] + [_desc(f16)] * 2, 4)
    assert not ln.supports_format_combination(0, [_desc(f16, trt.TensorFormat.CHW32)] * 6, 4)
    att = AttentionPlugin({"heads": 32, "head_dim": 32, "scale": 32 ** -0.5})
    assert att.supports_format_combination(1, [_desc(f16), _desc(f16)], 1)
    assert not att.supports_format_combination(1, [_desc(f16), _desc(f32)], 1)
    with pytest.raises(tp.PluginError, match="unsupported data type"):
        att.dtype_code(trt.DataType.INT8)


def test_shape_checks():
    att = AttentionPlugin({"heads": 32, "head_dim": 32, "scale": 32 ** -0.5})
    att.check_shapes([(8, 49, 3072)])
    att.check_shapes([(1, 196, 3072)])
    with pytest.raises(tp.PluginError, match="qkv width 1024 != 3 \\* heads 32 \\* head_dim 32"):
        att.check_shapes([(8, 49, 1024)])
    from trtvit_native.kernels import attention_max_tokens

    limit = attention_max_tokens(32)
    assert limit >= 196
    with pytest.raises(tp.PluginError, match=f"{limit + 1} tokens exceed the kernel's maximum of {limit}"):
        att.check_shapes([(1, limit + 1, 3072)])
    ln = LayerNormPlugin({"eps": 1e-5, "residual": 1})
    ln.check_shapes([(8, 49, 1024), (8, 49, 1024), (1024,), (1024,)])
    with pytest.raises(tp.PluginError, match="residual shape"):
        ln.check_shapes([(8, 49, 1024), (8, 49, 512), (1024,), (1024,)])
    with pytest.raises(tp.PluginError, match="gamma has 512 values, the normalized axis has 1024"):
        ln.check_shapes([(8, 49, 1024), (8, 49, 1024), (512,), (1024,)])
    with pytest.raises(tp.PluginError, match="expected 4 inputs"):
        ln.check_shapes([(8, 49, 1024), (1024,), (1024,)])


def test_creators_register_in_the_namespace():
    creators = tp.register_plugins(trt)
    assert tp.register_plugins(trt) is creators  # once per module
    registry = trt.get_plugin_registry()
    for name in ("LayerNorm", "Attention"):
        creator = registry.get_creator(name, "1", "trtvit")
        assert creator is not None and creator.name == name and creator.plugin_namespace == "trtvit"


def test_torch_references_match_the_model():
    model = tv.create_model("trt-vit-a")
    block = model.stages[3][1].transformer
    z = torch.randn(3, 49, 1024)
    with torch.no_grad():
        ref_ln = block.norm1(z)
        ln, _ = tp.reference_layer_norm(z, block.norm1.weight, block.norm1.bias, 1e-5)
        assert (ln - ref_ln).abs().max() < 1e-5
        r = torch.randn(3, 49, 1024)
        ln2, total = tp.reference_layer_norm(z, block.norm2.weight, block.norm2.bias, 1e-5, residual=r)
        assert torch.equal(total, z + r)
        assert (ln2 - block.norm2(z + r)).abs().max() < 1e-5
        qkv = block.qkv(ln)
        assert (tp.reference_attention(qkv, 32, 32, 32 ** -0.5) - block.attn(qkv)).abs().max() < 1e-5
        # fp16: output in fp16, the residual sum rounded before normalization
        z16, r16 = z.half(), r.half()
        y16, s16 = tp.reference_layer_norm(z16, block.norm2.weight.half(), block.norm2.bias.half(), 1e-5, r16)
        assert y16.dtype == s16.dtype == torch.float16 and torch.equal(s16, (z16.float() + r16.float()).half())


def test_interpreter_executes_plugin_layers_by_kind():
    x = torch.randn(2, 49, 96)
    out = tp.interpret_plugin_layer("Attention", {"heads": 1, "head_dim": 32, "scale": 0.2}, [x])
    assert out[0].shape == (2, 49, 32)
    outs = tp.interpret_plugin_layer("LayerNorm", {"eps": 1e-5, "residual": 1},
                                     [x, x, torch.ones(96), torch.zeros(96)])
    assert len(outs) == 2 and torch.equal(outs[1], 2 * x)
    with pytest.raises(tp.PluginError, match="unknown plugin"):
        tp.interpret_plugin_layer("Softmax", {}, [x])


class _FakePluginLayer:
    """What the interpreter sees of an IPluginV3Layer: its name and the plugin it holds."""

    def __init__(self, plugin):
        self.name, self._plugin = "stages.3.1.transformer.norm1", plugin

    def get_plugin(self):
        return self._plugin


def test_interpreter_takes_plugin_fields_from_the_layer_s_plugin():
    from trtvit_native.interpreter import InterpreterError, _plugin_layer

    trt = tv.get_backend().trt
    plugin_cls = tp.plugin_classes(trt)["LayerNorm"][0]
    layer = _FakePluginLayer(plugin_cls({"eps": 0.5, "residual": 0}))
    assert tp.plugin_layer_fields(trt, layer) == ("LayerNorm", {"eps": 0.5, "residual": 0})
    x, gamma, beta = torch.randn(2, 7, 64) * 0.1, torch.ones(64), torch.zeros(64)
    (out,) = _plugin_layer(trt, layer, [x, gamma, beta])
    assert torch.allclose(out, torch.nn.functional.layer_norm(x, (64,), eps=0.5), atol=1e-6)
    assert not torch.allclose(out, torch.nn.functional.layer_norm(x, (64,), eps=1e-5), atol=1e-2)
    foreign = plugin_cls({"eps": 0.5, "residual": 0})
    foreign.plugin_namespace = "other"
    with pytest.raises(InterpreterError, match="layer 'stages.3.1.transformer.norm1': plugin other::LayerNorm "
                                               "version 1 is not one of this project's plugins"):
        _plugin_layer(trt, _FakePluginLayer(foreign), [x, gamma, beta])


def test_attention_plugin_refuses_at_build_time_what_the_gpu_cannot_run(monkeypatch):
    """configure_plugin (build time, on the target GPU) checks the profile's largest token
    count with the kernel library's device query: a Turing-like device (64 KB of shared
    memory: fp32 up to 224 tokens at head_dim 32) refuses 256 fp32 tokens, not fp16."""
    from trtvit_native import kernels

    class TuringLike:
        def attention_supported(self, tokens, head_dim, dtype):
            return kernels.UNSUPPORTED if dtype == kernels.FLOAT32 and tokens > 224 else kernels.OK

        def describe(self, status):
            return "unsupported on this device"

    monkeypatch.setattr(kernels, "load_kernel_library", lambda *args: TuringLike())
    trt = tv.get_backend().trt
    plugin = tp.plugin_classes(trt)["Attention"][0]({"heads": 8, "head_dim": 32, "scale": 0.17})

    def desc(dtype, max_tokens):
        d = trt.DynamicPluginTensorDesc()
        d.desc.type = dtype
        d.desc.dims = trt.Dims([-1, -1, 768])
        d.min, d.max = trt.Dims([1, 1, 768]), trt.Dims([2, max_tokens, 768])
        return d

    import trtvit_native.network as network

    monkeypatch.setattr(network, "resolve_plugins", lambda backend, plugins: plugins is not False)
    with pytest.raises(ValueError, match=r"images up to 512x512 give 256 attention tokens; the fused attention "
                                         r"kernel handles at most 224 \(head_dim 32\)"):
        tv.build_network("trt-vit-a", fp16=False, max_batch=1, image_size=512, plugins=True)
    assert not tv.build_network("trt-vit-a", fp16=False, max_batch=1, image_size=512, plugins="auto").plugins

    plugin.configure_plugin([desc(trt.DataType.FLOAT, 224)], [])
    plugin.configure_plugin([desc(trt.DataType.HALF, 256)], [])
    with pytest.raises(tp.PluginError, match=r"Attention: 256 tokens of head_dim 32 in fp32 cannot run on this GPU"):
        plugin.configure_plugin([desc(trt.DataType.FLOAT, 256)], [])


def test_unavailable_reason_names_what_is_missing():
    backend = tv.get_backend()
    reason = tp.unavailable_reason(backend)
    if not backend.has_plugin_layers:
        assert reason == f"{backend.label} has no plugin layers"
    else:
        assert reason is None or "libtrtvit_kernels.so" in reason


def test_builder_respects_the_attention_token_limit(monkeypatch):
    """Where plugins are usable, too many tokens fail with plugins=True and fall back with 'auto'."""
    import trtvit_native.network as network

    monkeypatch.setattr(network, "resolve_plugins", lambda backend, plugins: plugins is not False)
    with pytest.raises(ValueError, match="images up to 544x544 give 289 attention tokens; the fused attention kernel "
                                         "handles at most 256"):
        tv.build_network("trt-vit-a", fp16=True, max_batch=1, image_size=544, plugins=True)
    built = tv.build_network("trt-vit-a", fp16=True, max_batch=1, image_size=544, plugins="auto")
    assert not built.plugins
    # a dynamic profile is checked at its largest size
    with pytest.raises(ValueError, match="images up to 512x576 give 288 attention tokens"):
        tv.build_network("trt-vit-a", fp16=True, max_batch=1, max_image_size=(512, 576), plugins=True)
    assert not tv.build_network("trt-vit-a", fp16=True, max_batch=1, max_image_size=(512, 576),
                                outputs="features", plugins="auto").plugins
