"""The paper's design space (DESIGN.md section 9): stage patterns, MixBlockA/B/C, the T stage,
the resnet50 and mixnet-v presets, JSON configs, architecture records in weights files and
``trtvit profile``.

Every block kind is built by the real TensorRT builder and the network is checked layer by
layer against the reference on the CPU interpreter, in fp32 and fp16; defects planted in
the reference of each kind are caught at their layer.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import trtvit_native as tv
from trtvit_native.cli import main
from trtvit_native.weights import WeightsError, read_metadata, save_weights
from conftest import network, network_fingerprint, photographs, reference

TRT_VIT_A = tv.get_config("trt-vit-a")
KINDS = {
    "A": dataclasses.replace(TRT_VIT_A, name="trt-vit-a-mixA", mix_block="A"),
    "B": dataclasses.replace(TRT_VIT_A, name="trt-vit-a-mixB", mix_block="B"),
    "C": TRT_VIT_A,
    "T": tv.get_config("mixnet-v"),
}
PRECISIONS = [pytest.param(False, id="fp32"), pytest.param(True, id="fp16")]
BLOCK = "stages.3.1"  # the first mix or Transformer block of each kind's last stage


def _images(size=224) -> torch.Tensor:
    return torch.cat([photographs(1, size) if isinstance(size, int) else tv.synthetic_images(1, size, seed=5),
                      tv.synthetic_images(1, size, seed=3)])


# --------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------


def test_mixnet_v_and_the_mix_kinds_count_as_the_design_says():
    assert tv.count_parameters("mixnet-v") == tv.count_parameters(reference(KINDS["T"])) == 46_028_840
    assert tv.get_config("mixnet-v").stage_kinds == ("C", "C", "C", "T")
    for kind in "AB":  # same keys and shapes as C at R = 0.5
        assert tv.count_parameters(KINDS[kind]) == tv.count_parameters("trt-vit-a") == 27_481_384
        assert tv.expected_shapes(KINDS[kind]) == tv.expected_shapes("trt-vit-a")
    assert type(reference(KINDS["A"]).get_submodule(BLOCK)).__name__ == "MixBlockA"
    assert type(reference(KINDS["B"]).get_submodule(BLOCK)).__name__ == "MixBlockB"
    assert sorted(n for n, _ in reference(KINDS["T"]).get_submodule(BLOCK).named_children()) == \
        ["add", "expand", "reduce", "transformer"]


@pytest.mark.parametrize("variant", ["resnet50", "mixnet-v", "trt-vit-a", "trt-vit-a-mixB"])
def test_profile_macs_from_flop_counter_mode_equal_the_config_count(variant):
    from trtvit_native.profile import profile_variant

    config = KINDS["B"] if variant == "trt-vit-a-mixB" else tv.get_config(variant)
    p = profile_variant(config, 224)
    # FlopCounterMode counts the reference's convolutions, matmuls and attention products
    assert p["macs"] == p["config_macs"] == tv.count_macs(config)
    assert p["params"] == tv.count_parameters(config)
    assert [r["module"] for r in p["blocks"][1:-1]] == [b[0] for b in config.blocks()]
    assert p["blocks"][-2]["output_shape"] == [1, 2048, 7, 7]
    assert all(r["latency_ms"] is None and "needs a GPU" in r["note"] for r in p["blocks"])


def test_profile_blocks_json_fills_everything_but_the_latency(capsys):
    assert main(["profile", "--blocks", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = table["blocks"]
    assert [(r["kind"], r["feature_size"]) for r in rows[:5]] == [(k, 56) for k in
                                                                   ("BottleNeck", "Transformer", "MixBlockA",
                                                                    "MixBlockB", "MixBlockC")]
    assert sorted({r["feature_size"] for r in rows}) == [7, 14, 28, 56] and len(rows) == 20
    for r in rows:
        assert r["params"] > 0 and r["macs"] > 0 and r["output_shape"] == [1, r["channels"], r["feature_size"],
                                                                           r["feature_size"]]
        assert r["latency_ms"] is None and r["tera_flops"] is None and "gpu_checks.sh" in r["note"]
    bottleneck_7 = next(r for r in rows if r["kind"] == "BottleNeck" and r["feature_size"] == 7)
    assert bottleneck_7["params"] == 4_462_592  # a ResNet-50 stage-4 block
    mix = [r for r in rows if r["kind"].startswith("MixBlock") and r["feature_size"] == 14]
    assert len({(r["params"], r["macs"]) for r in mix}) == 1  # A, B, C: the same layers, wired apart


def test_profile_bad_input_is_one_line(capsys):
    assert main(["profile", "--blocks", "--image-size", "200"]) == 1
    assert "not multiples of 56, 28, 14 and 7" in capsys.readouterr().err
    assert main(["profile"]) == 1
    assert "needs a variant, or --blocks" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Configs and their errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"pattern": "C-C-X-M"}, "unknown stage kind(s) ['X']"),
    ({"pattern": "C-C-M"}, "has 3 stage(s); a variant has 4"),
    ({"pattern": "C-C-C-T", "depths": (1, 1, 1, 0)}, "stage 4 (T) at depth 0"),
    ({"mix_block": "D"}, "mix_block 'D' is not one of"),
    ({"mix_block": "B", "mix_ratio": 0.25}, "MixBlockB needs mix_ratio 0.5"),
    ({"mix_ratio": 0.3}, "must be an integer divisible by 4 and by head_dim 32"),
])
def test_invalid_design_space_configs_are_named(fields, message):
    with pytest.raises(ValueError, match="invalid TRT-ViT variant config") as e:
        tv.VariantConfig(**{"name": "x", "depths": (1, 1, 1, 1), **fields})
    assert message in str(e.value)


def test_a_json_config_is_accepted_wherever_a_variant_name_is(tmp_path, capsys):
    path = tmp_path / "small-b.json"
    path.write_text(json.dumps({"name": "small-b", "depths": [1, 1, 1, 1], "widths": [64, 128, 256, 512],
                                "stem_width": 32, "mix_block": "B"}))
    model = tv.create_model(str(path))
    assert type(model.get_submodule("stages.3.1")).__name__ == "MixBlockB" and model.config.name == "small-b"
    built = tv.build_network(str(path), model.state_dict(), fp16=False, max_batch=1, image_size=64)
    report = tv.parity_report(built, model, tv.synthetic_images(1, 64))
    assert report.ok, report.table()
    weights = tmp_path / "small-b.safetensors"
    save_weights(model, weights, model.config)
    assert json.loads(read_metadata(weights)["config"])["mix_block"] == "B"
    # the file builds, evaluates and describes itself with no config: its architecture is in it
    again = tv.create_model(weights=weights)
    assert again.config == model.config
    assert main(["build", "small-b", "--weights", str(weights), "--fp32", "--image-size", "64", "--max-batch", "1",
                 "-o", str(tmp_path / "e.engine")]) == 0
    capsys.readouterr()
    assert main(["info", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "mix_block B" in out and f"{tv.count_parameters(model):,d}" in out


@pytest.mark.parametrize("fields, message", [
    ({"name": "x"}, "missing required field(s) depths"),
    ({"name": "x", "depths": [1, 1, 1, 1], "colour": "red"}, "unknown field(s) colour"),
    ({"depths": [1, 1, 1, 1]}, "missing required field(s) name"),
])
def test_a_json_config_with_unknown_or_missing_fields_is_named(tmp_path, fields, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="variant config .*bad.json") as e:
        tv.create_model(str(path))
    assert message in str(e.value)


def test_a_file_of_one_mix_block_does_not_load_as_another(tmp_path):
    """At R = 0.5, A, B and C have the same keys and shapes: only the recorded architecture
    tells them apart."""
    disguised = dataclasses.replace(KINDS["A"], name="trt-vit-a")  # MixBlockA weights under C's name
    path = tmp_path / "a.safetensors"
    save_weights(reference(KINDS["A"]), path, disguised)
    with pytest.raises(WeightsError, match="architecture mismatch with 'trt-vit-a'.*mix_block 'A' "
                                           "\\(the variant has 'C'\\)"):
        tv.create_model("trt-vit-a", weights=path)
    with pytest.raises(WeightsError, match="architecture mismatch"):
        tv.build_network("trt-vit-a", path, fp16=False, max_batch=1)


# --------------------------------------------------------------------------------------
# Parity of every kind
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp16", PRECISIONS)
@pytest.mark.parametrize("kind", ["A", "B", "T"])
def test_every_block_kind_matches_the_reference_layer_by_layer(kind, fp16):
    built = network(KINDS[kind], fp16)
    report = tv.parity_report(built, reference(KINDS[kind]), _images())
    assert report.ok, report.table()
    compared = {layer.name for layer in report.layers}
    assert {f"{BLOCK}.reduce", f"{BLOCK}.transformer", f"{BLOCK}.transformer.attn", BLOCK} <= compared
    assert ({f"{BLOCK}.expand"} if kind == "T" else {f"{BLOCK}.conv3", f"{BLOCK}.local_relu"}) <= compared


@pytest.mark.parametrize("fp16", PRECISIONS)
@pytest.mark.parametrize("kind", ["A", "B", "T"])
def test_every_block_kind_at_a_dynamic_non_square_size(kind, fp16):
    config = KINDS[kind]
    built = tv.build_network(config, reference(config).state_dict(), fp16=fp16, max_batch=2, image_size=(96, 160),
                             min_image_size=64, max_image_size=224)
    report = tv.parity_report(built, reference(config), tv.synthetic_images(2, (128, 96), seed=4))
    assert report.ok, report.table()


# --------------------------------------------------------------------------------------
# Planted defects, each caught at its layer
# --------------------------------------------------------------------------------------


def _planted(kind: str, forward) -> nn.Module:
    model = copy.deepcopy(reference(KINDS[kind]))
    block = model.get_submodule(BLOCK)
    base = type(block)

    class Planted(base):
        pass

    Planted.forward = forward
    block.__class__ = Planted
    return model


def _a_branches_swapped(self, x):
    y = self.reduce(x)
    return self.add(x, torch.cat([self.local_branch(y), self.global_branch(y)], dim=1))


def _a_read_serially(self, x):  # MixBlockC's wiring under MixBlockA's weights
    t = self.global_branch(self.reduce(x))
    return self.add(x, torch.cat([t, self.local_branch(t)], dim=1))


def _b_local_residual_dropped(self, x):
    y = self.reduce(x)
    local = self.local_relu(self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(y))))))
    return self.add(x, torch.cat([local, self.global_branch(local)], dim=1))


def _b_global_first(self, x):
    t = self.global_branch(self.reduce(x))
    return self.add(x, torch.cat([self.local_branch(t), t], dim=1))


def _t_expand_bn_missing(self, x):
    return self.add(x, self.expand.conv(self.global_branch(self.reduce(x))))


def _t_residual_dropped(self, x):
    return self.expand(self.global_branch(self.reduce(x)))


DEFECTS = {
    "A: branches swapped in the concat": ("A", _a_branches_swapped, BLOCK),
    "A: BottleNeck fed by the Transformer (C's wiring)": ("A", _a_read_serially, f"{BLOCK}.conv1"),
    "B: local residual dropped": ("B", _b_local_residual_dropped, f"{BLOCK}.local_add"),  # never called
    "B: Transformer first (global then local)": ("B", _b_global_first, f"{BLOCK}.conv1"),  # fed t, not y
    "T: expand's BatchNorm missing": ("T", _t_expand_bn_missing, f"{BLOCK}.expand"),
    "T: residual dropped": ("T", _t_residual_dropped, BLOCK),
}


@pytest.mark.parametrize("fp16", PRECISIONS)
@pytest.mark.parametrize("defect", list(DEFECTS))
def test_planted_defect_of_each_block_kind_is_caught_at_its_layer(defect, fp16):
    kind, forward, expected = DEFECTS[defect]
    report = tv.parity_report(network(KINDS[kind], fp16), _planted(kind, forward), _images())
    assert not report.ok, f"defect not caught: {report.summary()}"
    assert report.first_divergence().name == expected, report.table()


# --------------------------------------------------------------------------------------
# TRT-ViT A-D unchanged by the design space
# --------------------------------------------------------------------------------------

# network_fingerprint of each network before stage patterns and mix kinds existed
# (TensorRT-RTX 1.7.1, torch 2.13.0: the seeded weights come from torch's generator)
TRT_VIT_FINGERPRINTS = {
    ("trt-vit-a", False): "39fb97f15bd5fd985b5ca5f1129daaf140ee37d6721a4f9aca8ae0fff5b6274e",
    ("trt-vit-a", True): "279e0767b2f748b8b552f2d6387e59ed6b46dd096c721949c9635d2a111ef406",
    ("trt-vit-b", False): "b6a8904c93f12eff4955b5233c0b6dbd8719032ad808f8009076eb49690b8a02",
    ("trt-vit-b", True): "8babec5a15d71b98d8d0e5783206db69ea841024045fc34e4f1eb43ea8f1afef",
    ("trt-vit-c", False): "dc179bd677d623e6924189f963a521d69270eb20c80e16806facd430d6798e1e",
    ("trt-vit-c", True): "3befadffae65b118bfb29f9912fabf436e2ac1b63ae089bb3eb1f0f4eb669412",
    ("trt-vit-d", False): "5fdb570997b28389eecf17cf521ac9a6b80e4fb2f979a7939d89a52425b1bbd1",
    ("trt-vit-d", True): "262317aa8450b7f65c06f2f9b81372a9e150c3a03d7fc685438337898bd8e6dc",
}


@pytest.mark.parametrize("fp16", PRECISIONS)
@pytest.mark.parametrize("variant", ["trt-vit-a", "trt-vit-b", "trt-vit-c", "trt-vit-d"])
def test_trt_vit_networks_are_identical_to_the_ones_before_the_design_space(variant, fp16):
    assert network_fingerprint(network(variant, fp16)) == TRT_VIT_FINGERPRINTS[(variant, fp16)]


def test_the_fingerprint_sees_the_mix_kind_and_a_weight():
    a, c = network(KINDS["A"], False), network("trt-vit-a", False)
    assert network_fingerprint(a) != network_fingerprint(c)  # same layers and weights, wired apart
    state = {k: v.clone() for k, v in reference("trt-vit-a").state_dict().items()}
    state["stages.3.1.conv2.bn.bias"][0] += 1e-3
    changed = tv.build_network("trt-vit-a", state, fp16=False, max_batch=4)
    assert network_fingerprint(changed) != network_fingerprint(c)


def test_one_block_alone_builds_for_every_kind():
    """``trtvit profile`` times blocks built alone; each kind builds (TensorRT-RTX builds
    engines without a GPU) with the block's layers named as in a whole network."""
    from trtvit_native.model import MIX_BLOCK_CLASSES, BottleNeck, TransformerBlock
    from trtvit_native.network import build_block_plan

    blocks = {("bottleneck", "C"): BottleNeck(128, 128, 1), ("transformer", "C"): TransformerBlock(128, 64, 32, 3),
              **{("mixblock", k): cls(128, 64, 32, 3) for k, cls in MIX_BLOCK_CLASSES.items()}}
    for (kind, mix), block in blocks.items():
        config = tv.VariantConfig("block", (1, 1, 1, 1), mix_block=mix)
        state = {f"block.{k}": v.detach().numpy() for k, v in block.state_dict().items()}
        plan = build_block_plan(config, kind, 128, 7, 2, state, fp16=True)
        assert isinstance(plan, bytes) and len(plan) > 2 * sum(v.size for v in state.values()) * 0.9
    with pytest.raises(ValueError, match="block kind must be one of"):
        build_block_plan(config, "mix", 128, 7, 2, state)


@pytest.mark.gpu
def test_profile_times_every_block_kind_on_a_gpu(capsys):
    from conftest import engine_backend_or_skip

    engine_backend_or_skip(needs_cuda_python=True)
    assert main(["profile", "--blocks", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["blocks"]
    for r in rows:
        assert r["latency_ms"] > 0 and r["tera_flops"] == pytest.approx(2 * r["macs"] / r["latency_ms"] / 1e9)
