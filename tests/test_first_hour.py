"""What a new user meets first: one image size from the weights in every command, a run
extended with ``--resume --epochs``, ``trtvit predict``, ``trtvit info`` without torch,
exit codes and file-type mistakes named.

The weights are a 1-epoch run of the tests' small variant (``test_train.SMALL``) at 32x32
on 4 digit classes.
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
from trtvit_native.weights import read_metadata

from test_train import SMALL, _metrics, _one_error_line, _subset, digits  # noqa: F401  (digits: a fixture)

CLASSES = ["0", "1", "2", "3"]
# no warmup: a 1-epoch run's schedule then ends at its minimum, where a 2-epoch run's is halfway
RECIPE = ["--batch-size", "8", "--lr", "3e-3", "--warmup-epochs", "0", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def tiny(digits, tmp_path_factory):
    """(train folder, val folder, weights trained 1 epoch at 32, its run directory)."""
    train, val = digits
    root = tmp_path_factory.mktemp("first-hour")
    data = _subset(train, root / "train", CLASSES, per_class=8)
    held = _subset(val, root / "val", CLASSES, per_class=3)
    out = root / "w.safetensors"
    assert main(["train", SMALL.name, "--data", str(data), "--val", str(held), "--epochs", "1", "--image-size", "32",
                 *RECIPE, "-o", str(out)]) == 0
    return data, held, out, root / "w.run"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_takes_the_size_the_weights_were_trained_at(tiny, tmp_path, capsys):
    data, held, weights, _ = tiny
    assert read_metadata(weights)["image_size"] == "32"
    engine = tmp_path / "w.engine"
    code, out, err = run(capsys, "build", SMALL.name, "--weights", weights, "--max-batch", "2", "-o", engine)
    assert code == 0, err
    assert out.splitlines()[0] == "image      32x32 (the size w.safetensors was trained at)"
    meta = json.loads((tmp_path / "w.engine.json").read_text())
    assert meta["input"]["shape"] == [-1, 3, 32, 32] and meta["image_size"]["opt"] == [32, 32]
    assert meta["trained_image_size"] == 32 and meta["parity"].startswith("PASS")
    # an explicit size is honoured, and the line says it differs from the trained one
    code, out, err = run(capsys, "build", SMALL.name, "--weights", weights, "--max-batch", "2", "--no-parity",
                         "--image-size", "64", "-o", tmp_path / "w64.engine")
    assert code == 0, err
    assert out.splitlines()[0] == "image      64x64 (--image-size; the weights were trained at 32x32)"
    assert json.loads((tmp_path / "w64.engine.json").read_text())["input"]["shape"] == [-1, 3, 64, 64]
    # seeded weights: the default, said as such
    code, out, _ = run(capsys, "parity", SMALL.name, "--batch", "1")
    assert code == 0 and out.splitlines()[0] == "image size 224x224 (default)"
    code, out, err = run(capsys, "parity", SMALL.name, "--weights", weights, "--batch", "1")
    assert code == 0, err
    assert out.splitlines()[0] == "image size 32x32 (the size w.safetensors was trained at)"
    assert "32x32" in out.splitlines()[1]
    code, out, err = run(capsys, "eval", SMALL.name, "--weights", weights, "--data", held)
    assert code == 0 and out.splitlines()[0] == "image      32x32 (the size w.safetensors was trained at)"
    # the Triton preprocessing model serves what the engine takes
    code, out, err = run(capsys, "export-triton", engine, "--repository", tmp_path / "models", "--preprocess",
                         "--runner", "python")
    assert code == 0, err
    assert out.splitlines()[0] == "image      32x32 (the engine's input, ENGINE.json; the weights were trained at 32x32)"
    settings = json.loads((tmp_path / "models" / f"{SMALL.name}-fp16_preprocess" / "1" / "settings.json").read_text())
    assert settings["image_size"] == [32, 32]
    # the Python API: the same default
    assert tv.build_network(SMALL.name, str(weights), max_batch=1).image_size == (32, 32)
    assert tv.build_network(SMALL.name, str(weights), max_batch=1, image_size=64).image_size == (64, 64)


def test_fine_tuning_with_init_keeps_the_size_of_the_init_weights(tiny, tmp_path, capsys):
    data, held, weights, _ = tiny
    out = tmp_path / "ft.safetensors"
    code, _, err = run(capsys, "train", SMALL.name, "--data", data, "--init", weights, "--epochs", "1", *RECIPE,
                       "-o", out)
    assert code == 0, err
    assert "image size 32x32 (the size w.safetensors was trained at)" in err
    assert read_metadata(out)["image_size"] == "32"
    code, _, err = run(capsys, "train", SMALL.name, "--data", data, "--init", weights, "--epochs", "1", *RECIPE,
                       "--image-size", "64", "--stop-after", "1", "-o", tmp_path / "ft64.safetensors")
    assert code == 0 and "image size 64x64 (--image-size; the weights were trained at 32x32)" in err
    assert read_metadata(tmp_path / "ft64.safetensors")["image_size"] == "64"


def test_resume_with_more_epochs_extends_the_run(tiny, tmp_path, capsys):
    data, held, _, _ = tiny
    weights, extended = tmp_path / "w.safetensors", tmp_path / "w.run"
    code, _, err = run(capsys, "train", SMALL.name, "--data", data, "--val", held, "--epochs", "1", "--image-size",
                       "32", *RECIPE, "-o", weights)
    assert code == 0, err
    first = _metrics(extended)
    # a finished run and no new end: nothing to do, said, and not a success
    code, _, err = run(capsys, "train", SMALL.name, "--resume", extended, "--quiet")
    assert code == 1 and "nothing to do: the run finished all its 1 epochs" in _one_error_line(err)
    # a run stopped after 1 of 2 epochs cannot be shortened to 1
    code, _, err = run(capsys, "train", SMALL.name, "--data", data, "--epochs", "2", "--stop-after", "1",
                       "--image-size", "32", *RECIPE, "-o", tmp_path / "stopped.safetensors")
    assert code == 0, err
    code, _, err = run(capsys, "train", SMALL.name, "--resume", tmp_path / "stopped.run", "--epochs", "1", "--quiet")
    assert code == 1 and "--epochs 1 is fewer than the run's 2 (a run can be extended, not shortened" \
        in _one_error_line(err)
    code, _, err = run(capsys, "train", SMALL.name, "--resume", extended, "--epochs", "2", "--workers", "0", "--quiet",
                       "-o", tmp_path / "w2.safetensors")
    assert code == 1 and "is not the run's -o" in _one_error_line(err)  # the run keeps its own output
    for flag, value, kept in (("--image-size", "64", "32"), ("--lr", "0.1", "0.003"), ("--batch-size", "16", "8")):
        code, _, err = run(capsys, "train", SMALL.name, "--resume", extended, "--epochs", "2", flag, value, "--quiet")
        assert code == 1 and f"{flag} {float(value) if flag == '--lr' else value} is not the run's {flag} {kept}" \
            in _one_error_line(err), err
    code, _, err = run(capsys, "train", SMALL.name, "--resume", extended, "--epochs", "2", "--workers", "0", "--quiet")
    assert code == 0, err
    assert "resuming" in err and "after epoch 1 of 2: extended from 1 epochs, the learning-rate schedule recomputed" \
        in err
    metrics = _metrics(extended)
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[0] == first[0]  # the curves continue
    state = json.loads((extended / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["config"]["epochs"] == 2
    # the schedule is recomputed for the new end: epoch 2 uses the rates a 2-epoch run uses there
    code, _, err = run(capsys, "train", SMALL.name, "--data", data, "--val", held, "--epochs", "2", "--image-size",
                       "32", *RECIPE, "-o", tmp_path / "two.safetensors")
    assert code == 0, err
    two = _metrics(tmp_path / "two.run")
    for key in ("lr_first", "lr"):  # the rates of the epoch's first and last steps
        assert metrics[1][key] == pytest.approx(two[1][key], rel=1e-12), key
    assert metrics[1]["lr"] != pytest.approx(first[0]["lr"], rel=1e-3)
    # the output is written again at the new end: the best of the two epochs (by val top-1)
    assert weights.read_bytes() == (extended / "best.safetensors").read_bytes()
    best = max(metrics, key=lambda m: m["val_top1"])["epoch"]  # the first of equals: a later one must beat it
    assert read_metadata(weights)["epochs"] == str(best)


def test_run_directory_keeps_one_optimizer_state_and_links_best_to_last(tiny):
    _, _, _, run_dir = tiny
    last, best = run_dir / "last.safetensors", run_dir / "best.safetensors"
    assert os.stat(last).st_ino == os.stat(best).st_ino  # epoch 1 is the best: one file, two names
    from safetensors import safe_open

    holders = []
    for path in run_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            if any(k.startswith("optimizer.") for k in f.keys()):
                holders.append(path.name)
    assert holders == ["state.safetensors"]


def test_predict_prints_the_labels_eval_gives_each_image(tiny, capsys):
    data, held, weights, _ = tiny
    picks = [sorted((held / c).iterdir())[0] for c in ("1", "3")]
    model = tv.create_model(weights=str(weights))  # the variant from the file, with its labels and size
    assert model.config.name == SMALL.name and model.labels == CLASSES and model.image_size == 32
    for extra in ([], ["--network", "--fp32"]):
        code, out, err = run(capsys, "eval", SMALL.name, "--weights", weights, "--data", held, "--per-image", "--json",
                             *extra)
        assert code == 0, err
        by_image = {p["image"]: p for p in json.loads(out)["predictions"]}
        assert len(by_image) == 12
        code, out, err = run(capsys, "predict", weights, *picks, "--top", "2", "--json", *extra)
        assert code == 0, err
        r = json.loads(out)
        assert [p["image"] for p in r["predictions"]] == [str(p) for p in picks]
        for p in r["predictions"]:
            first, second = p["top"]
            assert first["label"] == by_image[p["image"]]["predicted"]
            assert first["probability"] == pytest.approx(by_image[p["image"]]["probability"], abs=1e-5)
            assert first["probability"] >= second["probability"] and first["label"] in CLASSES
    code, out, err = run(capsys, "predict", weights, *picks, "--top", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "image      32x32 (the size w.safetensors was trained at)"
    assert lines[2].startswith(f"{picks[0]}: ") and lines[2].count("%") == 3 and len(lines) == 4


def test_predict_and_eval_name_bad_input(tiny, tmp_path, capsys):
    data, held, weights, _ = tiny
    image = sorted((held / "0").iterdir())[0]
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    for argv, message in (
            (["predict", weights, held], f"{held} is a directory: give image files"),
            (["predict", weights, tmp_path / "none.png"], f"image file {tmp_path / 'none.png'} does not exist"),
            (["predict", weights, image, garbage], f"cannot decode image {garbage}"),
            (["predict", weights, image, "--top", "5"], "--top must be in 1..4"),
            (["predict", weights, image, "--network", "--engine", "x.engine"], "not allowed with argument"),
            (["eval", SMALL.name, "--weights", weights, "--data", image],
             f"{image} is a file, not a data folder (an ImageFolder tree, one sub-folder per class); to classify "
             f"image files: trtvit predict WEIGHTS {image}")):
        code, out, err = run(capsys, *argv)
        # nothing printed but, for eval, its first line (the size) before the data is read
        assert code in (1, 2) and message in _one_error_line(err), (argv, err)
        assert out == ("" if argv[0] == "predict" else "image      32x32 (the size w.safetensors was trained at)\n")


def test_usage_errors_exit_2_and_file_types_are_named(tiny, tmp_path, capsys):
    data, held, weights, _ = tiny
    for argv, message in (
            (["train", SMALL.name, "--data", data], "train: -o/--output required"),
            (["train", SMALL.name, "-o", tmp_path / "x.safetensors"], "train: --data required"),
            (["train", SMALL.name, "--data", data, "-o", tmp_path / "x.engine"],
             f"-o {tmp_path / 'x.engine'}: trtvit train writes a safetensors weights file, not an engine; name it "
             f"{tmp_path / 'x'}.safetensors"),
            (["build", SMALL.name, "-o", tmp_path / "x.safetensors"],
             "trtvit build writes a TensorRT engine, not a safetensors weights file")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in _one_error_line(err), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    engine = tmp_path / "w.engine"
    assert main(["build", SMALL.name, "--weights", str(weights), "--max-batch", "1", "--no-parity", "-o",
                 str(engine)]) == 0
    capsys.readouterr()
    for argv, message in (
            (["eval", SMALL.name, "--weights", engine, "--data", held],
             f"{engine} is a TensorRT engine (a serialized plan), not a safetensors weights file: give the weights "
             f"file; {engine}.json names the weights it was built from (weights_file)"),
            (["build", SMALL.name, "--weights", engine, "-o", tmp_path / "y.engine"], "is a TensorRT engine"),
            (["eval", SMALL.name, "--weights", f"{engine}.json", "--data", held],
             f"{engine}.json is a JSON file, not a safetensors weights file"),
            (["export-triton", weights, "--repository", tmp_path / "models"],
             f"{weights} is a safetensors weights file, not a TensorRT engine: build the engine from it (trtvit "
             f"build {SMALL.name} --weights {weights} -o ENGINE)"),
            (["run", weights], f"{weights} is a safetensors weights file, not a TensorRT engine")):
        code, _, err = run(capsys, *argv)
        assert code == 1 and message in _one_error_line(err), (argv, err)
    # a size from the weights outside the dynamic range asked for is named, with the way out
    code, _, err = run(capsys, "build", SMALL.name, "--weights", weights, "--min-image-size", "64",
                       "--max-image-size", "128", "-o", tmp_path / "d.engine")
    assert code == 1 and ("image size 32x32 (the size w.safetensors was trained at) lies outside the profile "
                          "64x64..128x128: give --image-size inside it") in _one_error_line(err)


def test_info_lists_variants_without_torch(tmp_path):
    """torch blocked in a fresh process: the counts come from the configs alone, and equal
    the models' own (tests/test_model.py checks those against DESIGN.md's table)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from trtvit_native.cli import main\n"
            "sys.exit(main(['info']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line.startswith("trt-vit-")}
    assert sorted(rows) == ["trt-vit-a", "trt-vit-b", "trt-vit-c", "trt-vit-d"]
    for name, row in rows.items():
        with torch.device("meta"):
            model = tv.TRTViT(tv.get_config(name))
        backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
        full = sum(p.numel() for p in model.parameters())
        assert row[-3:] == [f"{backbone:,d}", f"{full:,d}", f"{tv.count_macs(name) / 1e9:.2f}"]


def test_a_safetensors_file_whose_header_length_reads_as_text_still_loads(tiny, tmp_path):
    """Safetensors pads its header with spaces to a multiple of 8: a header of 0x5B20 bytes
    begins with b" [" and one of 0x7B20 with b" {". Neither is a JSON file."""
    from safetensors.numpy import load_file, save

    from trtvit_native.weights import load_arrays

    _, _, weights, _ = tiny
    tensors, meta = load_file(str(weights)), read_metadata(weights)
    for target in (0x5B20, 0x7B20):
        for pad in range(0, 40000, 8):
            data = save(tensors, metadata={**meta, "pad": "x" * pad})
            if int.from_bytes(data[:8], "little") >= target:
                break
        data = save(tensors, metadata={**meta, "pad": "x" * (pad - (int.from_bytes(data[:8], "little") - target))})
        assert int.from_bytes(data[:8], "little") == target and data[:2] in (b" [", b" {")
        path = tmp_path / f"padded-{target:x}.safetensors"
        path.write_bytes(data)
        assert read_metadata(path)["image_size"] == "32" and len(load_arrays(path)) == len(tensors)
