"""Training, fine-tuning, resuming and evaluating on a real labelled data set.

scikit-learn's handwritten digits are written as an ImageFolder of 32x32 RGB PNGs (80/20
split). The tests train ``trt-vit-digits``, a small registered variant (widths 32...256,
one block per stage) that reaches the accuracy bar in seconds per epoch on two CPU cores;
trt-vit-a on the same data is `benchmarks/train_digits.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trtvit_native as tv
from trtvit_native.cli import main
from trtvit_native.data import PREPROCESSING, write_digits
from trtvit_native.weights import read_metadata

SMALL = tv.VariantConfig("trt-vit-digits", depths=(1, 1, 1, 1), widths=(32, 64, 128, 256), stem_width=16,
                         description="a small variant for tests on 32x32 images")
if SMALL.name not in tv.VARIANTS:
    tv.register_variant(SMALL)

RECIPE = ["--image-size", "32", "--batch-size", "32", "--lr", "3e-3", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    train, val = write_digits(root)
    return train, val


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A 10-class run of the small variant (module-scoped: several tests use its weights)."""
    train, val = digits
    out = tmp_path_factory.mktemp("run") / "digits.safetensors"
    assert main(["train", SMALL.name, "--data", str(train), "--val", str(val), "--epochs", "10", *RECIPE,
                 "-o", str(out)]) == 0
    return out


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_training_reaches_90_percent_and_writes_a_complete_run(trained, digits):
    run = trained.with_suffix(".run")
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "curves.png", "last.safetensors",
                                                     "metrics.jsonl", "state.json", "state.safetensors"]
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == list(range(1, 11))
    for key in ("train_loss", "lr", "train_top1", "val_top1", "images_per_second", "seconds"):
        assert key in metrics[0]
    assert max(m["val_top1"] for m in metrics) >= 0.90, metrics
    meta = read_metadata(trained)
    assert meta["arch"] == SMALL.name and json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert meta["image_size"] == "32" and meta["source"] == "trained"
    assert json.loads(meta["data"])["counts"]["0"] == 142 and json.loads(meta["data"])["images"] == 1438
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert b"pickle" not in (run / "state.json").read_bytes()


def test_the_network_built_from_trained_weights_classifies_like_the_reference(trained, digits, capsys):
    _, val = digits
    for precision in ("--fp32", "--fp16"):
        assert main(["eval", SMALL.name, "--weights", str(trained), "--data", str(val), "--network", precision,
                     "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["images"] == 359 and r["top1"] >= 0.90
        assert r["agreement"] >= 0.99, r
        assert abs(r["top1"] - r["reference_top1"]) <= 0.005, r


def test_build_copies_the_class_names_into_engine_json(trained, tmp_path, capsys):
    target = tmp_path / "d.engine"
    assert main(["build", SMALL.name, "--weights", str(trained), "--fp32", "--image-size", "32", "--max-batch", "2",
                 "-o", str(target)]) == 0
    meta = json.loads((tmp_path / "d.engine.json").read_text())
    assert meta["labels"] == [str(i) for i in range(10)]
    assert meta["input"]["preprocessing"] == PREPROCESSING


def _subset(src: Path, dst: Path, classes, per_class=None) -> Path:
    for c in classes:
        files = sorted((src / c).iterdir())[:per_class]
        (dst / c).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dst / c / f.name)
    return dst


def test_fine_tuning_reinitializes_the_head_and_freezes_bit_identically(trained, digits, tmp_path, capsys):
    train, val = digits
    sub_train = _subset(train, tmp_path / "train4", ["0", "1", "2", "3"])
    sub_val = _subset(val, tmp_path / "val4", ["0", "1", "2", "3"])
    out = tmp_path / "ft.safetensors"
    assert main(["train", SMALL.name, "--data", str(sub_train), "--val", str(sub_val), "--init", str(trained),
                 "--freeze", "stem,stages.0", "--epochs", "2", *RECIPE, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"head re-initialized: 10 classes in {trained}, 4 in the data" in err
    assert max(m["val_top1"] for m in _metrics(tmp_path / "ft.run")) >= 0.90
    before, after = tv.load_weights(trained), tv.load_weights(out)
    frozen = [k for k in before if k.startswith(("stem.", "stages.0."))]
    assert len(frozen) == 5 + 20 and all(torch.equal(before[k], after[k]) for k in frozen)  # BN statistics too
    assert not torch.equal(before["stages.1.0.conv1.conv.weight"], after["stages.1.0.conv1.conv.weight"])
    assert after["head.weight"].shape == (4, 256)


def test_resumed_run_ends_like_the_uninterrupted_one(digits, tmp_path):
    train, val = digits
    small_train = _subset(train, tmp_path / "t", [str(i) for i in range(10)], per_class=24)
    args = [SMALL.name, "--data", str(small_train), "--val", str(val), "--epochs", "2", *RECIPE]
    assert main(["train", *args, "-o", str(tmp_path / "full.safetensors")]) == 0
    assert main(["train", *args, "--stop-after", "1", "-o", str(tmp_path / "split.safetensors")]) == 0
    assert not (tmp_path / "split.safetensors").exists() and len(_metrics(tmp_path / "split.run")) == 1
    assert main(["train", SMALL.name, "--data", str(small_train), "--resume", str(tmp_path / "split.run"),
                 "-o", str(tmp_path / "split.safetensors")]) == 0
    full, split = _metrics(tmp_path / "full.run"), _metrics(tmp_path / "split.run")
    assert [m["val_top1"] for m in full] == [m["val_top1"] for m in split]
    assert abs(full[-1]["train_loss"] - split[-1]["train_loss"]) <= 1e-4
    a, b = tv.load_weights(tmp_path / "full.safetensors"), tv.load_weights(tmp_path / "split.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_processes_under_torchrun(digits, tmp_path):
    train, val = digits
    small = _subset(train, tmp_path / "t", [str(i) for i in range(10)], per_class=8)
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "trtvit_native.train", "trt-vit-a", "--data", str(small),
                           "--val", str(small), "--epochs", "1", "--image-size", "32", "--batch-size", "16",
                           "--workers", "0", "--quiet", "-o", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stderr and proc.stderr.count("epoch 1/1:") == 1  # one writer
    assert out.exists() and len(_metrics(tmp_path / "ddp.run")) == 1


def _one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith("trtvit: error: "), err
    return lines[0]


def test_bad_training_input_is_named_and_writes_nothing(digits, trained, tmp_path, capsys):
    train, val = digits
    empty = tmp_path / "empty"
    empty.mkdir()
    one = _subset(train, tmp_path / "one", ["3"], per_class=5)
    other = _subset(val, tmp_path / "other", ["0", "1"], per_class=3)
    not_st = tmp_path / "x.safetensors"
    not_st.write_bytes(b"not a weights file at all")
    a_weights = tmp_path / "a.safetensors"
    tv.save_weights(tv.create_model("trt-vit-a", num_classes=10), a_weights, "trt-vit-a")
    other_run = tmp_path / "otherrun"
    other_run.mkdir()
    (other_run / "state.json").write_text(json.dumps({"format": "trtvit-train-state/1", "variant": "trt-vit-b"}))
    cases = [
        (["--data", str(tmp_path / "missing")], f"data folder {tmp_path / 'missing'} does not exist"),
        (["--data", str(empty)], f"data folder {empty} has no class sub-folders"),
        (["--data", str(one)], f"data folder {one} has 1 class (3); training needs at least 2"),
        (["--data", str(train), "--val", str(other)], f"--val {other} has other classes than --data"),
        (["--data", str(train), "--init", str(not_st)], f"--init: {not_st}: not a safetensors file"),
        (["--data", str(train), "--init", str(a_weights)], "arch mismatch: the file holds 'trt-vit-a' weights"),
        (["--data", str(train), "--image-size", "100"], "--image-size must be a positive multiple of 32"),
        (["--data", str(train), "--resume", str(other_run)], f"--resume {other_run} is a run of trt-vit-b"),
        (["--data", str(train), "--freeze", "stages.9"], "--freeze 'stages.9' matches no parameter"),
    ]
    for extra, message in cases:
        out = tmp_path / "out" / "w.safetensors"
        out.parent.mkdir(exist_ok=True)
        code = main(["train", SMALL.name, *extra, "--epochs", "1", "--quiet", "-o", str(out)])
        line = _one_error_line(capsys.readouterr().err)
        assert code == 1 and message in line, line
        assert list(out.parent.iterdir()) == []  # no output, no run directory


def test_unreadable_images_are_skipped_and_counted(digits, tmp_path, capsys):
    train, _ = digits
    data = _subset(train, tmp_path / "d", ["0", "1"], per_class=6)
    (data / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(RuntimeWarning, match=f"skipping unreadable image {data / '1' / 'broken.png'}"):
        code = main(["train", SMALL.name, "--data", str(data), "--epochs", "1", *RECIPE, "--batch-size", "4",
                     "-o", str(tmp_path / "w.safetensors")])
    assert code == 0 and "skipped 1 unreadable image(s)" in capsys.readouterr().err
    bad = _subset(train, tmp_path / "bad", ["0", "1"], per_class=0)
    for c in ("0", "1"):
        (bad / c / "x.png").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning):
        code = main(["train", SMALL.name, "--data", str(bad), "--epochs", "1", "--quiet", "-o",
                     str(tmp_path / "v.safetensors")])
    assert code == 1 and "holds no readable image (2 unreadable" in _one_error_line(capsys.readouterr().err)


def test_one_preprocessing_definition():
    """ENGINE.json's preprocessing is the data module's, and eval_transform implements it."""
    from trtvit_native.data import eval_transform

    built = tv.build_network("trt-vit-a", fp16=False, max_batch=1)
    assert built.metadata(b"")["input"]["preprocessing"] == PREPROCESSING
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    x = eval_transform(image, 224)
    # shorter side 300 -> 256 (224 / 0.875), width 400 -> 341, center crop 224
    ref = torch.nn.functional.interpolate(image[None].float(), size=(256, 341), mode="bilinear", antialias=True,
                                          align_corners=False)[0, :, 16:240, 58:282]
    assert torch.allclose(x, tv.imagenet_normalize(ref[None].clamp(0, 255) / 255)[0], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(digits, tmp_path, capsys, amp):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    train, val = digits
    out = tmp_path / "gpu.safetensors"
    assert main(["train", SMALL.name, "--data", str(train), "--val", str(val), "--epochs", "3", "--amp", amp,
                 *RECIPE, "-o", str(out)]) == 0
    assert f"1 process(es) on cuda, {amp}" in capsys.readouterr().err
    metrics = _metrics(tmp_path / "gpu.run")
    assert all(m["train_loss"] == m["train_loss"] for m in metrics)  # finite, no NaN
    assert metrics[-1]["val_top1"] > 0.5
