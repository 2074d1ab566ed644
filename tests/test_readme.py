"""The README's commands, run as written.

The Triton section (the blocks after ``<!-- test_readme: triton-setup -->`` and
``<!-- test_readme: triton-query -->``) is run in a temporary folder by bash and Python, with
only what a test must change: the wheel's install replaced by a link to the server
``tests/triton_server.py`` prepared (the same pinned wheel), free ports for 8000/8001, this
interpreter's Python version for 3.11, and ``a.safetensors``/``cat.jpg`` made here (trt-vit-a
weights recording a 32x32 training size, so the build is quick). ``trtvit triton-env``
makes its own fresh stub environment: nothing of the tests' is reused for it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import triton_server

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(marker: str) -> str:
    """The fenced code block that follows ``<!-- test_readme: MARKER -->``."""
    found = re.search(rf"<!-- test_readme: {re.escape(marker)} -->\n```\w*\n(.*?)\n```", README, re.S)
    assert found, f"README.md has no block marked {marker}"
    return found.group(1)


@pytest.fixture(scope="module")
def server_home():
    try:
        return triton_server.prepare()
    except triton_server.Unavailable as e:
        if os.environ.get("TRTVIT_REQUIRE_TRITON"):
            raise
        pytest.skip(f"tritonserver cannot be installed here: {e}")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_the_triton_recipe_serves_a_preprocessing_request_on_a_cpu(server_home, tmp_path):
    import numpy as np
    import tritonclient.http as http
    from PIL import Image

    import trtvit_native as tv

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    http_port, grpc_port = triton_server.free_port(), triton_server.free_port()
    while grpc_port == http_port:
        grpc_port = triton_server.free_port()
    setup = block("triton-setup").replace("3.11", version)
    setup = setup.replace("--http-port 8000", f"--http-port {http_port}").replace("--grpc-port 8001",
                                                                                  f"--grpc-port {grpc_port}")
    install = "pip install --no-deps --target pytriton nvidia-pytriton==0.7.0"
    assert setup.startswith(install + "\n")
    setup = setup.replace(install, f"ln -s {server_home / 'pytriton'} pytriton", 1)
    assert "tritonserver --model-repository models" in setup and "trtvit triton-env stub-env" in setup

    tv.save_weights(tv.create_model("trt-vit-a"), tmp_path / "a.safetensors", "trt-vit-a",
                    metadata={"image_size": "32"})
    y, x = np.mgrid[0:44, 0:60]
    Image.fromarray(np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)).save(tmp_path / "cat.jpg")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    assert shutil.which("trtvit", path=env["PATH"]), "the trtvit command is not installed beside this Python"
    # the whole block, as a user pastes it: the server runs in the foreground at its end
    log = open(tmp_path / "recipe.log", "wb")
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", setup], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not _ready(http_port):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "recipe.log").read_text()
            time.sleep(0.2)
        assert (tmp_path / "stub-env" / "bin" / "python3").exists()
        query = block("triton-query").replace("localhost:8000", f"localhost:{http_port}")
        asked = subprocess.run([sys.executable, "-c", query], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
        assert asked.returncode == 0, asked.stderr + (tmp_path / "recipe.log").read_text()
        assert asked.stdout.strip() == "(1, 3, 32, 32) float32"
        # what the README says of the engine model on a machine without a GPU
        with http.InferenceServerClient(f"127.0.0.1:{http_port}") as client:
            with pytest.raises(Exception) as failed:
                client.load_model("trtvit-a")
            assert "instance group trtvit-a_0 of model trtvit-a has kind KIND_GPU but no GPUs are available" \
                in str(failed.value)
            assert client.is_server_live()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    assert "__pycache__" not in {p.name for p in (tmp_path / "models").rglob("*")}


def test_triton_env_run_from_a_venv_sees_the_venvs_packages(tmp_path):
    """The stub environment made from inside a venv imports what that venv has (here a module
    only it holds) behind numpy < 2; ``python -m venv --system-site-packages`` run from the
    same venv, the recipe before, sees only the base installation."""
    venv = tmp_path / "user-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "only_in_the_venv.py").write_text("WHERE = 'the venv'\n")
    python = venv / "bin" / "python"
    made = subprocess.run([str(python), "-m", "trtvit_native", "triton-env", str(tmp_path / "stub-env")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    check = "import numpy, only_in_the_venv, trtvit_native; print(numpy.__version__, only_in_the_venv.WHERE)"
    seen = subprocess.run([str(tmp_path / "stub-env" / "bin" / "python3"), "-c", check], capture_output=True,
                          text=True)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split()[0].startswith("1.") and seen.stdout.strip().endswith("the venv")
    subprocess.run([str(python), "-m", "venv", "--without-pip", "--system-site-packages", str(tmp_path / "before")],
                   check=True)
    before = subprocess.run([str(tmp_path / "before" / "bin" / "python3"), "-c", "import only_in_the_venv"],
                            capture_output=True, text=True)
    assert before.returncode != 0 and "No module named 'only_in_the_venv'" in before.stderr
