import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import trtvit_native as tv
from conftest import reference


def _write_raw(path, tensors, metadata):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def test_round_trip_fp32_and_fp16(tmp_path, tmp_weights):
    path, state = tmp_weights
    loaded = tv.load_weights(path)
    assert set(loaded) == {k for k in state if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert tv.load_weights(path, arch="trt-vit-a").keys() == loaded.keys()

    half = tmp_path / "a16.safetensors"
    tv.save_weights(reference("trt-vit-a"), half, "trt-vit-a", dtype=torch.float16)
    loaded16 = tv.load_weights(half)
    assert all(v.dtype == torch.float16 for v in loaded16.values())
    assert half.stat().st_size < path.stat().st_size * 0.51
    model = tv.create_model("trt-vit-a", weights=half)  # a reference built from the fp16 file
    assert torch.equal(model.head.weight, loaded16["head.weight"].float())


def test_metadata_and_num_batches_tracked(tmp_path, tmp_weights):
    path, state = tmp_weights
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "trt-vit-a" and meta["num_classes"] == "1000"
    assert json.loads(meta["config"])["depths"] == [2, 2, 4, 1]
    # num_batches_tracked is neither required ...
    lean = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    tv.save_weights(lean, tmp_path / "lean.safetensors", "trt-vit-a")
    # ... nor rejected
    _write_raw(tmp_path / "full.safetensors", state, {"arch": "trt-vit-a"})
    assert len(tv.load_weights(tmp_path / "full.safetensors")) == 194


def test_load_is_memory_mapped(tmp_weights):
    path, _ = tmp_weights
    import os

    loaded = tv.load_weights(path)
    # A memory-mapped tensor's storage is not owned by the Python heap: its pages are the
    # file's. Check that the biggest tensor's storage is backed by the file mapping.
    maps = open(f"/proc/{os.getpid()}/maps").read()
    assert str(path) in maps or "a.safetensors" in maps
    assert loaded["head.weight"].shape == (1000, 2048)


def test_num_classes_follows_the_head(tmp_path):
    model = tv.create_model("trt-vit-a", num_classes=10)
    tv.save_weights(model, tmp_path / "a10.safetensors", "trt-vit-a")
    assert tv.load_weights(tmp_path / "a10.safetensors")["head.weight"].shape == (10, 2048)
    assert tv.create_model("trt-vit-a", weights=tmp_path / "a10.safetensors").head.out_features == 10


# ----- every WeightsError case -----

def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(tv.WeightsError, match="not a safetensors file"):
        tv.load_weights(bad)
    bad.write_bytes(struct.pack("<Q", 12) + b"not json!!!!")
    with pytest.raises(tv.WeightsError, match="header is not JSON"):
        tv.load_weights(bad)
    bad.write_bytes(b"abc")
    with pytest.raises(tv.WeightsError, match="only 3 bytes"):
        tv.load_weights(bad)
    with pytest.raises(tv.WeightsError, match="no such weights file"):
        tv.load_weights(tmp_path / "missing.safetensors")
    with pytest.raises(tv.WeightsError, match="is a directory"):
        tv.load_weights(tmp_path)


def test_truncated_file(tmp_path, tmp_weights):
    path, _ = tmp_weights
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(tv.WeightsError, match="truncated"):
        tv.load_weights(cut)
    cut.write_bytes(data[:20])
    with pytest.raises(tv.WeightsError, match="truncated"):
        tv.load_weights(cut)


def test_unknown_arch_and_arch_mismatch_and_missing_arch(tmp_path, tmp_weights):
    path, state = tmp_weights
    with pytest.raises(tv.WeightsError, match="arch mismatch: the file holds 'trt-vit-a' weights, 'trt-vit-b'"):
        tv.load_weights(path, arch="trt-vit-b")
    _write_raw(tmp_path / "u.safetensors", state, {"arch": "trt-vit-q"})
    with pytest.raises(tv.WeightsError, match="unknown arch 'trt-vit-q'; known variants: mixnet-v, resnet50, trt-vit-a"):
        tv.load_weights(tmp_path / "u.safetensors")
    _write_raw(tmp_path / "n.safetensors", state, {})
    with pytest.raises(tv.WeightsError, match="no 'arch' in the file's metadata"):
        tv.load_weights(tmp_path / "n.safetensors")
    assert len(tv.load_weights(tmp_path / "n.safetensors", arch="trt-vit-a")) == 194
    with pytest.raises(ValueError, match="unknown TRT-ViT variant"):
        tv.save_weights(state, tmp_path / "x.safetensors", "trt-vit-q")


def test_missing_and_unexpected_keys_are_named(tmp_path, tmp_weights):
    _, state = tmp_weights
    partial = {k: v for k, v in state.items() if k != "stages.3.1.transformer.fc1.bias"}
    partial["stages.3.1.transformer.extra"] = torch.zeros(3)
    _write_raw(tmp_path / "p.safetensors", partial, {"arch": "trt-vit-a"})
    with pytest.raises(tv.WeightsError) as err:
        tv.load_weights(tmp_path / "p.safetensors")
    msg = str(err.value)
    assert "1 missing keys: stages.3.1.transformer.fc1.bias" in msg
    assert "1 unexpected keys: stages.3.1.transformer.extra" in msg


def test_long_key_lists_are_summarized_with_counts(tmp_path, tmp_weights):
    _, state = tmp_weights
    stem_only = {k: v for k, v in state.items() if k.startswith("stem.")}
    _write_raw(tmp_path / "s.safetensors", stem_only, {"arch": "trt-vit-a"})
    with pytest.raises(tv.WeightsError, match=r"189 missing keys: .*\(177 more, 189 in total\)"):
        tv.load_weights(tmp_path / "s.safetensors")
    # a trt-vit-a file loaded as trt-vit-b: the mismatch is reported with counts
    with pytest.raises(tv.WeightsError, match=r"missing keys: .* in total"):
        tv.create_model("trt-vit-b", weights=dict(state))


def test_wrong_shapes_name_key_expected_and_got(tmp_path, tmp_weights):
    _, state = tmp_weights
    bad = dict(state)
    bad["stages.1.0.conv2.conv.weight"] = torch.zeros(128, 128, 1, 1)
    _write_raw(tmp_path / "w.safetensors", bad, {"arch": "trt-vit-a"})
    with pytest.raises(tv.WeightsError, match=r"stages\.1\.0\.conv2\.conv\.weight \(expected \[128, 128, 3, 3\], "
                                              r"got \[128, 128, 1, 1\]\)"):
        tv.load_weights(tmp_path / "w.safetensors")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.int32])
def test_unsupported_dtype(tmp_path, tmp_weights, dtype):
    _, state = tmp_weights
    bad = dict(state)
    bad["head.bias"] = state["head.bias"].to(dtype)
    _write_raw(tmp_path / "d.safetensors", bad, {"arch": "trt-vit-a"})
    name = str(dtype).replace("torch.", "")
    with pytest.raises(tv.WeightsError, match=rf"unsupported dtype .*head\.bias \({name}\)"):
        tv.load_weights(tmp_path / "d.safetensors")
    with pytest.raises(tv.WeightsError, match="unsupported dtype"):
        tv.save_weights(state, tmp_path / "x.safetensors", "trt-vit-a", dtype=dtype)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(tmp_path, tmp_weights, value):
    _, state = tmp_weights
    bad = dict(state)
    bad["stages.2.3.conv1.bn.weight"] = state["stages.2.3.conv1.bn.weight"].clone()
    bad["stages.2.3.conv1.bn.weight"][5] = value
    _write_raw(tmp_path / "f.safetensors", bad, {"arch": "trt-vit-a"})
    with pytest.raises(tv.WeightsError, match=r"non-finite values .* in stages\.2\.3\.conv1\.bn\.weight"):
        tv.load_weights(tmp_path / "f.safetensors")
    with pytest.raises(tv.WeightsError, match="non-finite"):
        tv.build_network("trt-vit-a", bad)  # also for state dicts handed to the builder


def test_weights_error_is_a_value_error():
    assert issubclass(tv.WeightsError, ValueError)


def test_create_model_names_a_bad_weights_argument():
    with pytest.raises(tv.WeightsError, match="weights must be None, a safetensors path or a state dict, got int"):
        tv.create_model("trt-vit-a", weights=42)


def test_weights_files_follow_the_umask(tmp_path, tmp_weights):
    _, state = tmp_weights
    old = os.umask(0o027)
    try:
        tv.save_weights(state, tmp_path / "u.safetensors", "trt-vit-a")
    finally:
        os.umask(old)
    assert (tmp_path / "u.safetensors").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "u.safetensors"]
