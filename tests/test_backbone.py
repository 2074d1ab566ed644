"""TRT-ViT as a backbone: stage outputs (strides 4..32) and any input size from one network."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

import trtvit_native as tv
from trtvit_native.cli import main
from conftest import photographs, reference

ALL = ("stage1", "stage2", "stage3", "stage4", "logits")
SIZES = [(224, 224), (256, 384), (512, 640)]


def images(batch: int, hw) -> torch.Tensor:
    """Photographs resized to (H, W), and image-like synthetic images."""
    photos = F.interpolate(photographs(batch), size=hw, mode="bilinear", antialias=True, align_corners=False)
    return torch.cat([photos[:1], tv.synthetic_images(batch - 1, hw, seed=5)]) if batch > 1 else photos


def test_features_only_reference_follows_timm():
    model = tv.create_model("trt-vit-a", features_only=True)
    assert model.head is None
    assert model.feature_info == [{"num_chs": c, "reduction": r, "module": f"stages.{i}"}
                                  for i, (c, r) in enumerate(zip((256, 512, 1024, 2048), (4, 8, 16, 32)))]
    x = images(1, (256, 384))
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(1, 256, 64, 96), (1, 512, 32, 48), (1, 1024, 16, 24),
                                               (1, 2048, 8, 12)]
    with torch.no_grad():
        assert torch.equal(feats[-1], reference("trt-vit-a").forward_features(x))  # same seeded weights
    two = tv.create_model("trt-vit-a", features_only=True, out_indices=(1, 2))
    assert len(two.stages) == 3 and [f.shape[1] for f in two(x)] == [512, 1024]
    for bad in ((4,), (0, 0), (), (-1,)):
        with pytest.raises(ValueError, match="out_indices must be distinct stage indices in 0..3"):
            tv.create_model("trt-vit-a", features_only=True, out_indices=bad)


def test_classification_weights_load_into_a_features_model(tmp_weights):
    path, state = tmp_weights
    model = tv.create_model("trt-vit-a", weights=path, features_only=True, out_indices=(3,))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if "num_batches" not in k)
    assert not any(k.startswith("head.") for k in model.state_dict())
    broken = {k: v for k, v in state.items() if k != "stages.1.0.conv1.bn.weight"}
    with pytest.raises(tv.WeightsError, match="missing.*stages.1.0.conv1.bn.weight"):
        tv.create_model("trt-vit-a", weights=broken, features_only=True)


@functools.lru_cache(maxsize=None)
def backbone_network(variant: str, fp16: bool) -> tv.BuiltNetwork:
    return tv.build_network(variant, reference(variant).state_dict(), fp16=fp16, max_batch=2, outputs=ALL,
                            image_size=(224, 224), min_image_size=(128, 128), max_image_size=(512, 640))


# trt-vit-a: every size at batch 1 and 2. trt-vit-c (3x the compute, ~150 s for the full
# matrix on 2 cores): one size per batch here; `python benchmarks/backbone_cpu.py` runs it all.
CASES = {"trt-vit-a": [(hw, b) for hw in SIZES for b in (1, 2)],
         "trt-vit-c": [((256, 384), 2), ((512, 640), 1)]}


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", ["trt-vit-a", "trt-vit-c"])
def test_one_network_serves_every_size_with_every_output(variant, fp16):
    built = backbone_network(variant, fp16)
    assert built.output_names() == list(ALL)
    assert tuple(built.network.get_input(0).shape) == (-1, 3, -1, -1)
    assert [tuple(s) for s in built.profile.get_shape("images")] == [(1, 3, 128, 128), (2, 3, 224, 224),
                                                                     (2, 3, 512, 640)]
    assert len(built.build_serialized()) > built.weight_bytes * 0.9  # the real builder accepts the profile
    model = reference(variant)
    for hw, batch in CASES[variant]:
        x = images(batch, hw)
        report = tv.parity_report(built, model, x)
        assert report.ok, f"{hw} batch {batch}:\n{report.table()}"
        assert [p.name for p in report.outputs] == list(ALL)
        h, w = hw
        assert [p.shape for p in report.outputs] == [(batch, 256, h // 4, w // 4), (batch, 512, h // 8, w // 8),
                                                     (batch, 1024, h // 16, w // 16),
                                                     (batch, 2048, h // 32, w // 32), (batch, 1000)]
        for p in report.outputs:  # never looser than the fixed bounds
            assert p.error.rel <= (2e-2 if fp16 else 1e-4) and p.error.cosine >= 0.999


def test_interpret_returns_one_tensor_or_a_dict_and_refuses_sizes_outside_the_profile():
    built = backbone_network("trt-vit-a", False)
    out = tv.interpret(built, images(1, (256, 384)))
    assert isinstance(out, dict) and list(out) == list(ALL) and out["stage3"].dtype == torch.float32
    with pytest.raises(tv.InterpreterError, match=r"image size 544x640 is outside this network's profile: it "
                                                  r"accepts 128x128 to 512x640"):
        tv.interpret(built, torch.zeros(1, 3, 544, 640))
    with pytest.raises(tv.InterpreterError, match=r"image size 224x200 is outside"):
        tv.interpret(built, torch.zeros(1, 3, 224, 200))
    narrow = tv.build_network("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=False, max_batch=1,
                              min_image_size=(224, 224), max_image_size=(288, 288))
    with pytest.raises(tv.InterpreterError, match=r"image size 160x160 is outside this network's profile: it "
                                                  r"accepts 224x224 to 288x288"):
        tv.interpret(narrow, torch.zeros(1, 3, 160, 160))
    assert isinstance(tv.interpret(narrow, photographs(1)), torch.Tensor)


def test_layers_that_feed_no_requested_output_are_left_out():
    built = tv.build_network("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=True, max_batch=1,
                             outputs=("stage2",))
    names = built.layer_names()
    assert built.output_names() == ["stage2"]
    assert any(n.startswith("stages.1.") for n in names)
    assert not any(n.startswith(("stages.2", "stages.3", "head", "pool")) for n in names)
    x = photographs(1)
    out = tv.interpret(built, x)
    assert tv.parity_report(built, reference("trt-vit-a"), x).ok and out.shape == (1, 512, 28, 28)


def test_the_default_network_is_unchanged():
    """Fixed 224, logits only: no shape tensors, the layer count of before."""
    built = tv.build_network("trt-vit-c", fp16=True, max_batch=2)
    kinds = {str(built.network.get_layer(i).type).split(".")[-1] for i in range(built.num_layers)}
    assert built.num_layers == 345 and "SHAPE" not in kinds
    assert built.output_names() == ["logits"] and tuple(built.network.get_input(0).shape) == (-1, 3, 224, 224)


def test_engine_metadata_lists_every_output():
    meta = backbone_network("trt-vit-a", True).metadata(b"plan")
    assert meta["input"]["shape"] == [-1, 3, -1, -1]
    assert meta["image_size"] == {"min": [128, 128], "opt": [224, 224], "max": [512, 640]}
    assert meta["outputs"] == [
        {"name": "stage1", "dtype": "float32", "shape": [-1, 256, -1, -1], "stride": 4},
        {"name": "stage2", "dtype": "float32", "shape": [-1, 512, -1, -1], "stride": 8},
        {"name": "stage3", "dtype": "float32", "shape": [-1, 1024, -1, -1], "stride": 16},
        {"name": "stage4", "dtype": "float32", "shape": [-1, 2048, -1, -1], "stride": 32},
        {"name": "logits", "dtype": "float32", "shape": [-1, 1000], "stride": None}]
    assert "output" not in meta
    fixed = tv.build_network("trt-vit-a", fp16=False, max_batch=1, outputs="features", image_size=(256, 384))
    assert fixed.metadata(b"")["outputs"][1]["shape"] == [-1, 512, 32, 48]


@pytest.mark.parametrize("kwargs, message", [
    (dict(outputs=("stage5",)), "unknown output 'stage5'"),
    (dict(outputs="everything"), "unknown output 'everything'"),
    (dict(outputs=()), "outputs must be 'logits', 'features' or names"),
    (dict(image_size=(224, 100)), r"image_size must be a positive multiple of 32 .* got \(224, 100\)"),
    (dict(max_image_size=(500, 640)), r"max_image_size must be a positive multiple of 32"),
    (dict(min_image_size=256), "image sizes must satisfy min <= image_size <= max"),
])
def test_bad_backbone_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tv.build_network("trt-vit-a", **kwargs)


def test_cli_builds_a_dynamic_features_engine_and_checks_it(capsys, tmp_path):
    target = tmp_path / "a.engine"
    code = main(["build", "trt-vit-a", "--outputs", "features", "--image-size", "256x384", "--min-image-size", "128",
                 "--max-image-size", "512x640", "--max-batch", "2", "-o", str(target)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "256x384 (128x128..512x640)" in out and "outputs stage1,stage2,stage3,stage4" in out and "PASS" in out
    meta = json.loads((tmp_path / "a.engine.json").read_text())
    assert [o["name"] for o in meta["outputs"]] == ["stage1", "stage2", "stage3", "stage4"]
    code = main(["parity", "trt-vit-a", "--outputs", "stage2,logits", "--image-size", "256x384", "--batch", "1"])
    out, _ = capsys.readouterr()
    assert code == 0 and "stage2 " in out and "logits " in out and "PASS" in out


@pytest.mark.parametrize("argv, message", [
    (["--outputs", "stage1,bogus"], "unknown output 'bogus'"),
    (["--image-size", "100x224"], "image_size must be a positive multiple of 32"),
    (["--image-size", "22x"], "invalid image size '22x': give S or HxW"),
    (["--max-image-size", "200"], "max_image_size must be a positive multiple of 32"),
])
def test_cli_backbone_errors_are_one_line_and_write_nothing(capsys, tmp_path, argv, message):
    code = main(["build", "trt-vit-a", *argv, "-o", str(tmp_path / "x.engine")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1 and err[0].startswith("trtvit: error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []
