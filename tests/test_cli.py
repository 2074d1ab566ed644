import hashlib
import json
import os
import subprocess
import sys

import pytest

from trtvit_native.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_lists_variants(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "trt-vit-c" in out and "64,663,616" in out and "66,712,616" in out and "7.43" in out


def test_build_writes_the_engine_and_reports(capsys, tmp_path):
    target = tmp_path / "a.engine"
    code, out, err = run(capsys, "build", "trt-vit-a", "--fp16", "--max-batch", "2", "-o", str(target))
    assert code == 0, err
    size = target.stat().st_size
    assert size > 40_000_000
    for field in ("backend", "layers", "weight", "time", "network definition", "engine build"):
        assert field in out
    assert f"{size:,d} bytes" in out
    assert "PASS: trt-vit-a fp16" in out
    assert "(trt-vit-a fp16, batch 1..2, 224x224, plugins off, matmul attention)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.engine", "a.engine.json"]  # no temp file left behind
    meta = json.loads((tmp_path / "a.engine.json").read_text())
    assert meta["variant"] == "trt-vit-a" and meta["precision"] == "fp16" and meta["attention"] == "matmul"
    assert meta["input"]["name"] == "images" and meta["input"]["shape"] == [-1, 3, 224, 224]
    assert meta["input"]["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["output"] == {"name": "logits", "dtype": "float32", "shape": [-1, 1000]}
    assert meta["batch"] == {"min": 1, "opt": 2, "max": 2}
    assert meta["plugins"] is False and "C++" in meta["loads_in"][0]
    assert meta["engine_bytes"] == size
    assert meta["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert meta["parity"].startswith("PASS")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_build_with_the_fused_attention_layer(capsys, tmp_path):
    import trtvit_native as tv

    if not tv.get_backend().has_attention_layer:
        pytest.skip("this TensorRT has no IAttention layer")
    code, out, err = run(capsys, "build", "trt-vit-a", "--attention", "fused", "--max-batch", "2", "-o",
                         str(tmp_path / "a.engine"))
    assert code == 0, err
    assert "fused attention" in out and "PASS: trt-vit-a fp16" in out


def test_build_from_weights_fp32(capsys, tmp_path, tmp_weights):
    path, _ = tmp_weights
    target = tmp_path / "a32.engine"
    code, out, err = run(capsys, "build", "trt-vit-a", "--weights", str(path), "--fp32", "--max-batch", "1",
                         "--no-parity", "-o", str(target))
    assert code == 0, err
    assert target.exists() and str(path) in out and "fp32" in out and "parity" not in out


def test_parity_prints_per_layer_report(capsys):
    code, out, _ = run(capsys, "parity", "trt-vit-a", "--batch", "1", "--plugins", "off")
    assert code == 0
    assert "stages.3.1.transformer.attn" in out and "PASS" in out and "max|Δ|" in out and "×noise" in out
    assert "plugins off" in out


@pytest.fixture
def wrong_layernorm_eps(monkeypatch):
    """The network's LayerNorms get eps 1e-3 (the reference keeps 1e-5): a defect that moves
    the logits by ~1e-5 of their magnitude but its layer by ~3e-4."""
    import trtvit_native.network as network_module

    monkeypatch.setattr(network_module, "LN_EPS", 1e-3)


def test_a_flagged_layer_makes_parity_exit_nonzero(capsys, wrong_layernorm_eps):
    code, out, err = run(capsys, "parity", "trt-vit-a", "--fp32", "--batch", "1")
    assert code == 1
    assert "FAIL" in out and "first layer outside tolerance: stages.3.1.transformer.norm1" in out
    assert "first divergent layer stages.3.1.transformer.norm1" in _one_error_line(err)


def test_build_leaves_no_engine_and_replaces_none_when_parity_fails(capsys, tmp_path, wrong_layernorm_eps):
    target = tmp_path / "a.engine"
    target.write_bytes(b"previous engine")
    code, out, err = run(capsys, "build", "trt-vit-a", "--fp32", "--max-batch", "1", "-o", str(target))
    assert code == 1
    line = _one_error_line(err)
    assert "parity check failed at layer stages.3.1.transformer.norm1" in line and f"{target} not written" in line
    assert target.read_bytes() == b"previous engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.engine"]  # no JSON, no temp file
    code, out, err = run(capsys, "build", "trt-vit-a", "--fp32", "--max-batch", "1", "--keep-failed", "-o",
                         str(target))
    assert code == 1 and "written anyway (--keep-failed)" in _one_error_line(err)
    assert target.stat().st_size > 1000
    assert json.loads((tmp_path / "a.engine.json").read_text())["parity"].startswith("FAIL")
    code, _, err = run(capsys, "build", "trt-vit-a", "--fp32", "--max-batch", "1", "--no-parity", "-o",
                       str(tmp_path / "b.engine"))
    assert code == 0 and (tmp_path / "b.engine").exists()


def _read_only_directory(tmp_path):
    if os.geteuid() == 0:
        return "/sys"  # sysfs refuses new files even to root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro)


def test_build_checks_the_output_path_before_building(capsys, tmp_path, monkeypatch):
    import trtvit_native.network as network_module

    def must_not_build(*args, **kwargs):
        raise AssertionError("the network was built before the output path was checked")

    monkeypatch.setattr(network_module, "build_network", must_not_build)
    (tmp_path / "file.txt").write_text("x")
    ro = _read_only_directory(tmp_path)
    cases = [
        (str(tmp_path), f"output {tmp_path} is a directory"),
        (str(tmp_path / "file.txt" / "x.engine"), f"output {tmp_path / 'file.txt' / 'x.engine'}: "
                                                  f"{tmp_path / 'file.txt'} is a file, not a directory"),
        (str(tmp_path / "file.txt" / "sub" / "x.engine"), f"{tmp_path / 'file.txt'} is a file, not a directory"),
        (str(tmp_path / "missing" / "x.engine"), f"output directory {tmp_path / 'missing'} does not exist"),
        (f"{ro}/x.engine", f"output {ro}/x.engine: cannot write to {ro}"),
    ]
    for path, message in cases:
        code, _, err = run(capsys, "build", "trt-vit-a", "-o", path)
        line = _one_error_line(err)
        assert code == 1 and message in line, line
        assert ".trtvit-" not in line  # never the internal temp file


def test_run_on_a_directory_says_so(capsys, tmp_path):
    code, _, err = run(capsys, "run", str(tmp_path))
    assert code == 1 and f"{tmp_path} is a directory, not an engine file" in _one_error_line(err)


def test_parity_plugins_on_fails_clearly_without_plugin_layers(capsys):
    import trtvit_native as tv

    if tv.get_backend().has_plugin_layers:
        pytest.skip("this backend has plugin layers")
    code, _, err = run(capsys, "parity", "trt-vit-a", "--plugins", "on")
    assert code == 1 and "plugins=True cannot be honoured" in _one_error_line(err)


def _one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("trtvit: error: "), lines[0]  # usage errors too
    return lines[0]


@pytest.mark.parametrize("argv, code, message", [
    (["build", "trt-vit-x", "-o", "x.engine"], 1, "unknown TRT-ViT variant 'trt-vit-x'"),
    (["build", "trt-vit-a", "--image-size", "100", "-o", "x.engine"], 1, "image_size must be a positive multiple of 32"),
    (["build", "trt-vit-a", "--max-batch", "0", "-o", "x.engine"], 1, "max_batch must be an integer in 1..4096"),
    (["build", "trt-vit-a", "--max-batch", "many", "-o", "x.engine"], 2, "invalid int value: 'many'"),
    (["build", "trt-vit-a", "--weights", "missing.safetensors", "-o", "x.engine"], 1, "no such weights file"),
    (["build", "trt-vit-a"], 2, "build: the following arguments are required: -o/--output"),
    (["build", "trt-vit-a", "--fp16", "--fp32", "-o", "x.engine"], 2, "not allowed with argument"),
    (["build", "trt-vit-a", "-o", "no/such/dir/x.engine"], 1,
     "output no/such/dir/x.engine: output directory"),
    (["parity", "trt-vit-a", "--batch", "0"], 1, "--batch must be in 1..4096, got 0"),
    (["parity", "trt-vit-a", "--batch", "5000"], 1, "--batch must be in 1..4096, got 5000"),
    (["parity", "trt-vit-a", "--plugins", "sometimes"], 2, "parity: argument --plugins: invalid choice"),
    (["parity", "trt-vit-q"], 1, "unknown TRT-ViT variant 'trt-vit-q'"),
    (["run", "missing.engine"], 1, "engine file missing.engine does not exist"),
    (["run", "missing.engine", "--iterations", "0"], 1, "--iterations must be at least 1"),
    (["run", "missing.engine", "--check"], 1, "--check needs missing.engine.json (written by trtvit build)"),
    ([], 2, "a command is required"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
])
def test_error_paths_exit_nonzero_with_one_line(capsys, tmp_path, monkeypatch, argv, code, message):
    monkeypatch.chdir(tmp_path)
    got, _, err = run(capsys, *argv)
    assert got == code
    assert message in _one_error_line(err)
    assert not any(p.suffix == ".engine" for p in tmp_path.iterdir())


def test_bad_weights_files(capsys, tmp_path, tmp_weights):
    path, _ = tmp_weights
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:1000])
    code, _, err = run(capsys, "build", "trt-vit-a", "--weights", str(corrupt), "-o", str(tmp_path / "x.engine"))
    assert code == 1 and "truncated" in _one_error_line(err)
    code, _, err = run(capsys, "build", "trt-vit-b", "--weights", str(path), "-o", str(tmp_path / "x.engine"))
    assert code == 1 and "arch mismatch" in _one_error_line(err)
    code, _, err = run(capsys, "parity", "trt-vit-b", "--weights", str(path))
    assert code == 1 and "arch mismatch" in _one_error_line(err)


def test_plugins_on_without_plugin_layers(capsys, tmp_path):
    import trtvit_native as tv

    if tv.get_backend().has_plugin_layers:
        pytest.skip("this backend has plugin layers")
    code, _, err = run(capsys, "build", "trt-vit-a", "--plugins", "on", "-o", str(tmp_path / "x.engine"))
    assert code == 1 and "has no plugin layers" in _one_error_line(err)


def test_console_entry_point_runs_as_a_process(tmp_path):
    exe = [sys.executable, "-m", "trtvit_native.cli"]
    ok = subprocess.run(exe + ["info"], capture_output=True, text=True, cwd=tmp_path,
                        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert ok.returncode == 0 and "trt-vit-d" in ok.stdout
    bad = subprocess.run(exe + ["build", "nope", "-o", "x"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert bad.returncode == 1 and _one_error_line(bad.stderr).startswith("trtvit: error: unknown TRT-ViT variant")


def test_run_without_a_gpu_says_so(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message given where there is no GPU")
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"\0" * 64)
    code, _, err = run(capsys, "run", str(engine))
    assert code == 1 and "running an engine needs a CUDA GPU" in _one_error_line(err)


def test_run_check_needs_weights_it_can_find(capsys, tmp_path):
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"\0" * 64)
    (tmp_path / "x.engine.json").write_text(json.dumps({"variant": "trt-vit-a", "weights_file": None, "seed": None}))
    code, _, err = run(capsys, "run", str(engine), "--check")
    assert code == 1 and "names no weights file or seed" in _one_error_line(err)
    (tmp_path / "x.engine.json").write_text(json.dumps({"variant": "trt-vit-a", "weights_file": "/no/such.st"}))
    code, _, err = run(capsys, "run", str(engine), "--check")
    assert code == 1 and "weights file /no/such.st named in" in _one_error_line(err)
    (tmp_path / "x.engine.json").write_text("{not json")
    code, _, err = run(capsys, "run", str(engine))
    assert code == 1 and "x.engine.json is not valid JSON" in _one_error_line(err)
    (tmp_path / "x.engine.json").write_text("[1, 2]")
    code, _, err = run(capsys, "run", str(engine))
    assert code == 1 and "is not engine metadata written by trtvit build" in _one_error_line(err)


def test_commands_that_need_torch_say_so_where_it_is_missing(tmp_path):
    import subprocess
    import sys

    script = ("import sys\nsys.modules['torch'] = None\nfrom trtvit_native.cli import main\n"
              f"sys.exit(main(['build', 'trt-vit-a', '-o', {str(tmp_path / 'a.engine')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "trtvit: error: trtvit build needs torch, which is not installed: pip install 'trtvit_native[torch]'" \
        in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "a.engine").exists()
