"""Training, fine-tuning, resuming and evaluating on a real labelled data set.

scikit-learn's handwritten digits are written as an ImageFolder of 32x32 RGB PNGs (80/20
split). The tests train ``trt-vit-digits``, a small registered variant (widths 32...256,
one block per stage) that reaches the accuracy bar in seconds per epoch on two CPU cores;
trt-vit-a on the same data is `benchmarks/train_digits.py`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trtvit_native as tv
from trtvit_native.cli import main
from trtvit_native.data import PREPROCESSING, ImageFolder, write_digits
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
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "confusion.png", "curves.png",
                                                     "last.safetensors", "metrics.jsonl", "state.json",
                                                     "state.safetensors"]
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == list(range(1, 11))
    for key in ("train_loss", "lr", "train_top1", "val_top1", "val_recall", "images_per_second", "seconds"):
        assert key in metrics[0]
    assert all(len(m["val_recall"]) == 10 for m in metrics)
    # a new head starts at zero: uniform predictions, loss ln(classes) (the seeded head gave 2.6 for ln 4 = 1.39)
    assert abs(metrics[0]["first_step_loss"] - math.log(10)) < 1e-4, metrics[0]
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


def test_eval_reports_per_class_metrics_like_sklearn(trained, digits, tmp_path, capsys):
    from sklearn.metrics import confusion_matrix, precision_score, recall_score

    from trtvit_native.evaluate import batches

    _, val = digits
    png = tmp_path / "confusion.png"
    assert main(["eval", SMALL.name, "--weights", str(trained), "--data", str(val), "--json", "--confusion",
                 str(png)]) == 0
    r = json.loads(capsys.readouterr().out)
    confusion = torch.tensor(r["confusion"])
    classes = [str(i) for i in range(10)]
    assert confusion.shape == (10, 10) and int(confusion.sum()) == r["images"] == 359
    assert int(confusion.trace()) / r["images"] == r["top1"]
    assert [c["label"] for c in r["per_class"]] == classes
    assert [c["images"] for c in r["per_class"]] == confusion.sum(1).tolist() and all(c["images"] > 0 for c in
                                                                                      r["per_class"])
    model = tv.create_model(SMALL.name, weights=str(trained)).eval()
    predicted, true = [], []
    with torch.no_grad():
        for images, labels in batches(ImageFolder.read(val), 32, 50):
            predicted += model(images).argmax(1).tolist()
            true += labels.tolist()
    assert confusion_matrix(true, predicted, labels=range(10)).tolist() == r["confusion"]
    recall = recall_score(true, predicted, labels=range(10), average=None)
    precision = precision_score(true, predicted, labels=range(10), average=None, zero_division=0)
    for c, rec, prec in zip(r["per_class"], recall, precision):
        assert abs(c["recall"] - rec) < 1e-12 and abs((c["precision"] or 0.0) - prec) < 1e-12, (c, rec, prec)
    assert png.read_bytes()[:4] == b"\x89PNG"
    few = _subset(val, tmp_path / "few", classes, per_class=2)
    assert main(["eval", SMALL.name, "--weights", str(trained), "--data", str(few)]) == 0
    text = capsys.readouterr().out
    assert text.count("\nclass      ") == 10 and "recall" in text and "precision" in text


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_equal_files(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different


def test_resumed_run_ends_bit_for_bit_like_the_uninterrupted_one(digits, tmp_path, capsys):
    """With EMA, TrivialAugment, erasing, MixUp and CutMix drawing random numbers, and the
    first half run with a DataLoader worker: weights, EMA, optimizer state and RNG equal."""
    train, val = digits
    small_train = _subset(train, tmp_path / "t", ["0", "1", "2"], per_class=12)
    small_val = _subset(val, tmp_path / "v", ["0", "1", "2"], per_class=4)
    recipe = ["--ema", "0.9", "--trivialaug", "--random-erasing", "0.5", "--mixup", "0.4", "--cutmix", "1.0",
              "--batch-size", "8", "--image-size", "32", "--lr", "3e-3", "--quiet"]
    args = [SMALL.name, "--data", str(small_train), "--val", str(small_val), "--epochs", "2", *recipe]
    assert main(["train", *args, "--workers", "0", "-o", str(tmp_path / "full.safetensors")]) == 0
    assert main(["train", *args, "--workers", "1", "--stop-after", "1", "-o",
                 str(tmp_path / "split.safetensors")]) == 0
    split = tmp_path / "split.run"
    assert not (tmp_path / "split.safetensors").exists() and len(_metrics(split)) == 1
    after_1 = tmp_path / "after1"
    shutil.copytree(split, after_1)
    # a resumed run keeps its settings: other data or output, or another process count, are named errors
    capsys.readouterr()
    for extra, message in ((["--data", str(train)], f"--data {train} is not the run's --data {small_train}"),
                           (["-o", str(tmp_path / "x.safetensors")],
                            f"-o {tmp_path / 'x.safetensors'} is not the run's -o {tmp_path / 'split.safetensors'}")):
        assert main(["train", SMALL.name, "--resume", str(split), *extra, "--quiet"]) == 1
        assert message in _one_error_line(capsys.readouterr().err)
    two = tmp_path / "two.run"
    shutil.copytree(after_1, two)
    state = json.loads((two / "state.json").read_text())
    assert state["world_size"] == 1
    (two / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    assert main(["train", SMALL.name, "--resume", str(two), "--quiet"]) == 1
    assert "the run was started with 2 process(es), this is 1" in _one_error_line(capsys.readouterr().err)

    assert main(["train", SMALL.name, "--resume", str(split), "--workers", "0", "--quiet"]) == 0
    full_run = tmp_path / "full.run"
    for name in ("last.safetensors", "best.safetensors", "state.safetensors"):
        _assert_equal_files(full_run / name, split / name)
    _assert_equal_files(tmp_path / "full.safetensors", tmp_path / "split.safetensors")
    # the files compared changed after epoch 1: equal at the end is not equal because never written
    for name in ("last.safetensors", "state.safetensors"):
        before, after = _tensors(after_1 / name), _tensors(split / name)
        assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("rng.")), name
    state = _tensors(split / "state.safetensors")
    assert any(k.startswith("optimizer.") for k in state) and "ema.n_averaged" in state
    assert any(not torch.equal(state[f"model.{k}"], v) for k, v in _tensors(split / "last.safetensors").items())
    drop = ("seconds", "images_per_second")
    assert [{k: v for k, v in m.items() if k not in drop} for m in _metrics(full_run)] == \
           [{k: v for k, v in m.items() if k not in drop} for m in _metrics(split)]


def test_two_processes_under_torchrun_score_the_saved_weights(digits, tmp_path, capsys):
    """Validation under DDP (its own data, counts summed over both processes) equals a
    single-process evaluation of the weights written; resuming with one process is refused."""
    from trtvit_native.evaluate import evaluate

    train, val = digits
    small = _subset(train, tmp_path / "t", [str(i) for i in range(10)], per_class=8)
    small_val = _subset(val, tmp_path / "v", [str(i) for i in range(10)], per_class=4)
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "trtvit_native", "train", "trt-vit-a", "--data",
                           str(small), "--val", str(small_val), "--epochs", "1", "--image-size", "32",
                           "--batch-size", "16", "--workers", "0", "--quiet", "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stderr and proc.stderr.count("epoch 1/1:") == 1  # one writer
    (line,) = _metrics(tmp_path / "ddp.run")
    single = evaluate("trt-vit-a", str(out), str(small_val))
    assert single["images"] == 40
    assert line["val_top1"] == single["top1"], (line, single)
    assert line["val_recall"] == [c["recall"] for c in single["per_class"]]
    assert abs(line["val_loss"] - single_loss(out, small_val)) < 1e-4
    assert main(["train", "trt-vit-a", "--resume", str(tmp_path / "ddp.run"), "--quiet"]) == 1
    assert "the run was started with 2 process(es), this is 1" in _one_error_line(capsys.readouterr().err)


def single_loss(weights, folder):
    from trtvit_native.evaluate import evaluate_model

    model = tv.create_model("trt-vit-a", weights=str(weights))
    return evaluate_model(model, ImageFolder.read(folder), 32)["loss"]


def test_bf16_on_cpu_accumulating_without_validation(digits, tmp_path, capsys):
    """Finite losses under autocast (isfinite: x == x lets inf through), the learning rate
    logged is the one the epoch's last step used, and without --val the first epoch is
    already the best (the score is minus the loss, above 1 here)."""
    from trtvit_native.train import TrainConfig, _schedule

    train, _ = digits
    data = _subset(train, tmp_path / "d", ["0", "1", "2", "3"], per_class=4)
    out = tmp_path / "bf16.safetensors"
    assert main(["train", SMALL.name, "--data", str(data), "--epochs", "1", "--amp", "bf16", "--accum-steps", "2",
                 "--batch-size", "8", "--warmup-epochs", "0", "--image-size", "32", "--lr", "3e-3", "--workers", "0",
                 "--quiet", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 process(es) on cpu, bf16; batch 8, 2 steps per epoch; accumulating 2 batches of 4" in err
    (line,) = _metrics(tmp_path / "bf16.run")
    assert math.isfinite(line["train_loss"]) and math.isfinite(line["first_step_loss"])
    assert abs(line["first_step_loss"] - math.log(4)) < 0.01  # bf16 logits of a zero head are zero too
    assert line["train_loss"] > 1 and (tmp_path / "bf16.run" / "best.safetensors").exists()
    factor = _schedule(TrainConfig(SMALL.name, str(data), str(out), epochs=1, warmup_epochs=0), 2)
    assert line["lr"] == pytest.approx(3e-3 * factor(1), rel=1e-12) and factor(1) != factor(2)


def _truncated_jpeg(source: Path, target: Path) -> Path:
    from PIL import Image

    with Image.open(source) as img:
        img.convert("RGB").resize((64, 64)).save(target, format="JPEG", quality=95)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with Image.open(target) as img:  # the header is fine: only decoding finds the damage
        assert img.size == (64, 64)
    return target


def test_a_truncated_jpeg_in_the_validation_folder_is_skipped_and_counted(digits, tmp_path, capsys):
    train, val = digits
    data = _subset(train, tmp_path / "d", ["0", "1"], per_class=6)
    vdata = _subset(val, tmp_path / "v", ["0", "1"], per_class=4)
    bad = _truncated_jpeg(next((vdata / "1").iterdir()), vdata / "1" / "truncated.jpg")
    assert main(["train", SMALL.name, "--data", str(data), "--val", str(vdata), "--epochs", "1", *RECIPE,
                 "--batch-size", "4", "-o", str(tmp_path / "w.safetensors")]) == 0
    assert f"skipped 1 unreadable image(s): {bad}" in capsys.readouterr().err
    (line,) = _metrics(tmp_path / "w.run")
    assert line["skipped_images"] == 1
    assert main(["eval", SMALL.name, "--weights", str(tmp_path / "w.safetensors"), "--data", str(vdata),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["skipped"] == [str(bad)] and r["images"] == 8 == sum(c["images"] for c in r["per_class"])


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
    code = main(["train", SMALL.name, "--data", str(data), "--epochs", "1", *RECIPE, "--batch-size", "4",
                 "-o", str(tmp_path / "w.safetensors")])
    err = capsys.readouterr().err
    assert code == 0 and "skipped 1 unreadable image(s)" in err
    # the file named in one line, with the reason: no warning category, source path or code line
    skipped = [line for line in err.splitlines() if "broken.png" in line]
    assert skipped[0] == f"trtvit: warning: skipped {data / '1' / 'broken.png'}: not an image Pillow can decode"
    assert "Warning" not in err and "warnings.warn" not in err and ".py:" not in err
    bad = _subset(train, tmp_path / "bad", ["0", "1"], per_class=0)
    for c in ("0", "1"):
        (bad / c / "x.png").write_bytes(b"garbage")
    code = main(["train", SMALL.name, "--data", str(bad), "--epochs", "1", "--quiet", "-o",
                 str(tmp_path / "v.safetensors")])
    err = capsys.readouterr().err.splitlines()
    assert [line.startswith("trtvit: warning: skipped ") for line in err] == [True, True, False]
    assert code == 1 and "holds no readable image (2 unreadable" in err[-1]


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
@pytest.mark.parametrize("amp", ["bf16", "fp16", "auto"])
def test_mixed_precision_training_on_cuda(digits, tmp_path, capsys, amp):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    train, val = digits
    out = tmp_path / "gpu.safetensors"
    assert main(["train", SMALL.name, "--data", str(train), "--val", str(val), "--epochs", "3", "--amp", amp,
                 *RECIPE, "-o", str(out)]) == 0
    if amp == "auto":  # bf16 only where it is native (compute capability 8.0 and newer)
        amp = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    assert f"1 process(es) on cuda, {amp}" in capsys.readouterr().err
    metrics = _metrics(tmp_path / "gpu.run")
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"]) for m in metrics)
    assert metrics[-1]["val_top1"] > 0.5
