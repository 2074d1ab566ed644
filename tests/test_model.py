import pytest
import torch

import trtvit_native as tv
from conftest import photographs, reference

# DESIGN §1: trainable parameters without / with the 1000-class head, GMACs at 224².
TABLE = {
    "trt-vit-a": (25_432_384, 27_481_384, 3.23),
    "trt-vit-b": (41_661_248, 43_710_248, 4.56),
    "trt-vit-c": (64_663_616, 66_712_616, 7.41),
    "trt-vit-d": (85_081_152, 87_130_152, 9.39),
}


@pytest.mark.parametrize("variant", sorted(TABLE))
def test_parameter_counts_match_the_design_table(variant):
    backbone, full, _ = TABLE[variant]
    model = reference(variant)
    assert tv.count_parameters(model) == full
    assert tv.count_parameters(model, include_head=False) == backbone
    assert tv.count_parameters(variant) == full  # the count from the config alone (no model) agrees
    assert tv.count_parameters(variant, include_head=False) == backbone
    assert tv.count_parameters(variant, num_classes=7) == backbone + 7 * (tv.get_config(variant).num_features + 1)


@pytest.mark.parametrize("variant", sorted(TABLE))
def test_macs(variant):
    gmacs = TABLE[variant][2]
    # The table's column is the count without the two attention products.
    assert round(tv.count_macs(variant, include_attention=False) / 1e9, 2) == gmacs
    config = tv.get_config(variant)
    attention = config.depths[3] * 2 * 49 * 49 * config.mix_dim
    assert tv.count_macs(variant) - tv.count_macs(variant, include_attention=False) == attention


def test_state_dict_keys_follow_the_file_format():
    keys = [k for k in reference("trt-vit-a").state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == 194
    for key in ("stem.conv.weight", "stem.bn.running_var", "stages.0.0.shortcut.conv.weight",
                "stages.3.0.shortcut.bn.bias", "stages.3.1.reduce.conv.weight",
                "stages.3.1.transformer.qkv.weight", "stages.3.1.transformer.norm2.bias",
                "stages.3.1.conv3.bn.running_mean", "head.weight", "head.bias"):
        assert key in keys
    assert "stages.0.1.shortcut.conv.weight" not in keys  # identity shortcut
    assert reference("trt-vit-a").state_dict()["stages.3.1.transformer.qkv.weight"].shape == (3072, 1024)


def test_seeded_model_is_deterministic_eval_mode_and_healthy():
    a, b = tv.create_model("trt-vit-a", seed=3), tv.create_model("trt-vit-a", seed=3)
    assert not a.training
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    other = tv.create_model("trt-vit-a", seed=4)
    assert not torch.equal(other.head.weight, a.head.weight)

    x = photographs(4)
    activations = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: activations.__setitem__(n, o))
             for n, m in a.named_modules() if n.count(".") == 2 and n.startswith("stages.")]
    with torch.no_grad():
        logits = a(x)
    for h in hooks:
        h.remove()
    assert torch.isfinite(logits).all()
    assert logits.std(dim=1).min() > 0.1  # logits with a spread
    assert not torch.allclose(logits[0], logits[1], atol=1e-2)  # different images, different logits
    for name, act in activations.items():  # every block: finite, neither vanishing nor exploding
        assert torch.isfinite(act).all(), name
        assert 0.05 < act.std().item() < 50, (name, act.std().item())


def test_num_classes_and_custom_variant():
    model = tv.create_model("trt-vit-a", num_classes=10)
    assert model.head.weight.shape == (10, 2048)
    config = tv.VariantConfig("test-tiny", depths=(1, 1, 1, 1), widths=(64, 128, 256, 512), stem_width=32)
    tv.register_variant(config)
    try:
        assert "test-tiny" in tv.list_variants()
        tiny = tv.create_model("test-tiny", num_classes=7)
        with torch.no_grad():
            assert tiny(torch.randn(2, 3, 64, 64)).shape == (2, 7)
        assert tiny.stages[3][1].transformer.attn.heads == 256 // 32
        with pytest.raises(ValueError, match="already registered"):
            tv.register_variant(tv.VariantConfig("test-tiny", depths=(2, 1, 1, 1)))
    finally:
        del tv.VARIANTS["test-tiny"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(depths=(1, 1, 1)), "depths must be 4"),
    (dict(depths=(0, 1, 1, 1)), "stage 1 .C. at depth 0: every stage needs at least one block"),
    (dict(depths=(1, 1, 1, 0)), "stage 4 .M. at depth 0"),
    (dict(depths=(1, 1, 1, 1), pattern="C-C-C-X"), r"pattern 'C-C-C-X': unknown stage kind\(s\) \['X'\]"),
    (dict(depths=(1, 1, 1, 1), pattern="C-C-M"), "pattern 'C-C-M' has 3 stage.s.; a variant has 4"),
    (dict(depths=(1, 1, 1, 1), pattern="C-C-M-M", widths=(64, 128, 96, 512)), "stage 3: mix_ratio 0.5 \\* width 96"),
    (dict(depths=(1, 1, 1, 1), widths=(64, 128, 256, 510)), "multiples of 4"),
    (dict(depths=(1, 1, 1, 1), mix_ratio=1.5), "mix_ratio must lie"),
    (dict(depths=(1, 1, 1, 1), mix_ratio=0.3), "divisible"),
])
def test_invalid_variant_configs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tv.VariantConfig("broken", **kwargs)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown TRT-ViT variant 'trt-vit-z'.*trt-vit-a, trt-vit-b"):
        tv.create_model("trt-vit-z")


def test_resnet50_is_torchvisions_resnet50_v1_5_by_its_counts():
    """The `C-C-C-C` preset at depths 3, 4, 6, 3: torchvision's ResNet-50 has 25,557,032
    parameters; its MACs, from the config alone, match torch's own FlopCounterMode (2 FLOPs
    per multiply-accumulate of the convolutions and the head) within 0.5 %."""
    from torch.utils.flop_counter import FlopCounterMode

    from trtvit_native.variants import count_config_parameters

    config = tv.get_config("resnet50")
    assert config.stage_kinds == ("C", "C", "C", "C") and config.mix_stages == ()
    model = tv.create_model("resnet50")
    assert tv.count_parameters(model) == count_config_parameters("resnet50") == 25_557_032
    assert not any("transformer" in n for n, _ in model.named_modules())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    macs = tv.count_macs("resnet50")
    assert abs(macs - counter.get_total_flops() / 2) <= 0.005 * macs, (macs, counter.get_total_flops() / 2)
    assert round(macs / 1e9, 2) == 4.09
