"""A real Triton Inference Server for the tests: tritonserver 2.51 as shipped in the
``nvidia-pytriton`` wheel (pinned below), with its Python backend.

``python3 tests/triton_server.py`` prepares it (CI runs this): the wheel installed with
``pip install --no-deps --target`` under ``build/triton/`` (``TRTVIT_TRITON_HOME``), the
Python backend's stub for this interpreter copied beside the backend, and the stub's
environment: a venv with this interpreter's site-packages and numpy < 2 in front of them
(the Python backend of Triton 2.51 fails on numpy 2), this checkout first on its path, and
``sys.dont_write_bytecode`` set at start-up (the stub ignores PYTHON* environment variables,
and would otherwise write ``__pycache__`` into the model repository).

:class:`TritonServer` starts it on 127.0.0.1 with free ports and explicit model control,
and stops it by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver 2.51
ROOT = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("TRTVIT_TRITON_HOME", ROOT / "build" / "triton"))
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


class Unavailable(RuntimeError):
    """The server cannot be installed or prepared here; the message says why."""


def _server_dir(home: Path) -> Path:
    return home / "pytriton" / "pytriton" / "tritonserver"


def _run(cmd: List[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if not ln.startswith("WARNING")]
        tail = " ".join(lines[-2:])
        raise Unavailable(f"{what} failed ({' '.join(cmd)}): {tail}")


def prepare(home: Path = HOME) -> Path:
    """Install what the server needs under ``home`` (once); returns ``home``."""
    server = _server_dir(home)
    if not (server / "bin" / "tritonserver").is_file():
        shutil.rmtree(home / "pytriton", ignore_errors=True)
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(home / "pytriton"),
              PYTRITON], f"installing {PYTRITON}")
    stub = server / "python_backend_stubs" / PY / "triton_python_backend_stub"
    if not stub.is_file():
        raise Unavailable(f"{PYTRITON} has no Python backend stub for Python {PY}")
    target = server / "backends" / "python" / "triton_python_backend_stub"
    if not target.is_file():
        shutil.copy2(stub, target)
    # The stub's environment as the README makes it (`trtvit triton-env`), with this checkout first.
    from trtvit_native.triton import make_stub_environment

    make_stub_environment(str(home / "stub-env"), extra_paths=[str(ROOT)])  # a failure is a failure, not a skip
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """tritonserver on 127.0.0.1 serving ``repository`` with explicit model control."""

    def __init__(self, repository: Path, log: Path, home: Path = HOME):
        self.repository, self.log_path, self.home = Path(repository), Path(log), home
        self.http_port, self.grpc_port = free_port(), free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> List[str]:
        server = _server_dir(self.home)
        return [str(server / "bin" / "tritonserver"), "--model-repository", str(self.repository),
                "--backend-directory", str(server / "backends"), "--cache-directory", str(server / "caches"),
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port), "--allow-metrics", "false",
                "--model-control-mode", "explicit", "--disable-auto-complete-config", "--exit-timeout-secs", "2"]

    def environment(self) -> dict:
        env = dict(os.environ)
        libs = [str(self.home / "pytriton" / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = f"{self.home / 'stub-env' / 'bin'}:{env.get('PATH', '')}"  # the stub runs this python3
        return env

    def start(self, timeout: float = 60.0) -> "TritonServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                         cwd=self.log_path.parent, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s: {self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the server's PID (its stubs exit with it), SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and the stubs it started
            self.proc.wait()

    def http(self, **kwargs):
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.http_url, **kwargs)

    def grpc(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)


# The engine model's CPU stand-in: the folder --runner python writes, with KIND_CPU for
# KIND_GPU in its config and its model.py unchanged (renamed exported_model.py), run with
# trtvit_native.EngineRunner replaced by a runner that executes the network the engine was
# built from (the same weights file, variant, precision, batch and image size, from
# ENGINE.json) on trtvit_native's CPU interpreter. Only the TensorRT runtime is substituted.
STAND_IN_MODEL = '''"""CPU stand-in for an engine model (tests only): the exported model.py
(exported_model.py) with trtvit_native.EngineRunner replaced by the CPU interpreter running
the network the engine was built from."""

import sys

sys.dont_write_bytecode = True

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

import trtvit_native  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "stand_in.json")) as _f:
    SETTINGS = json.load(_f)


class InterpreterRunner:
    """EngineRunner's calling convention: (plan path, device=...), batch_range,
    host_input(shape), runner(numpy, host_views=...) -> numpy, close()."""

    def __init__(self, engine, device=None):
        with open(engine, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != SETTINGS["sha256"]:
            raise RuntimeError(f"{engine} is not the engine this stand-in was made for")
        torch.set_num_threads(1)
        self.built = trtvit_native.build_network(
            SETTINGS["variant"], SETTINGS["weights"], fp16=SETTINGS["fp16"], max_batch=SETTINGS["max_batch"],
            image_size=SETTINGS["image_size"], plugins=False)
        self.batch_range = (1, SETTINGS["max_batch"])
        self._staging = None

    def host_input(self, shape):
        size = 1
        for v in shape:
            size *= int(v)
        if self._staging is None or self._staging.size < size:
            self._staging = torch.empty(size).numpy()
        return self._staging[:size].reshape(tuple(shape))

    def __call__(self, images, host_views=False):
        with torch.no_grad():
            return trtvit_native.interpret(self.built, torch.from_numpy(images)).numpy()

    def close(self):
        self._staging = None


trtvit_native.EngineRunner = InterpreterRunner  # what "from trtvit_native import EngineRunner" now gets
_spec = importlib.util.spec_from_file_location("exported_model", os.path.join(HERE, "exported_model.py"))
_exported = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_exported)
TritonPythonModel = _exported.TritonPythonModel
'''


def install_stand_in(model_dir: Path, engine: Path, weights: Optional[Path], version: int = 1) -> None:
    """Turn a ``--runner python`` engine model folder into its CPU stand-in (``weights``: the
    file the engine was built from, None for the seeded weights)."""
    import json

    meta = json.loads(Path(str(engine) + ".json").read_text())
    config = model_dir / "config.pbtxt"
    text = config.read_text()
    assert text.count("kind: KIND_GPU") == 1 and 'backend: "python"' in text
    config.write_text(text.replace("kind: KIND_GPU", "kind: KIND_CPU"))
    folder = model_dir / str(version)
    (folder / "model.py").rename(folder / "exported_model.py")
    (folder / "model.py").write_text(STAND_IN_MODEL)
    (folder / "stand_in.json").write_text(json.dumps({
        "variant": meta["variant"], "weights": None if weights is None else str(weights),
        "fp16": meta["precision"] == "fp16", "max_batch": meta["batch"]["max"],
        "image_size": meta["image_size"]["opt"], "sha256": meta["sha256"]}))


def load_payloads(size: Tuple[int, int] = (60, 44)) -> List[bytes]:
    """Eight different photographs from scikit-image, each resized to ``size`` (width, height)
    and encoded as JPEG: one per client of :func:`run_load`."""
    import io

    from PIL import Image
    from skimage import data

    photos = [data.coffee(), data.astronaut(), data.chelsea(), data.rocket(), data.camera(), data.moon(),
              data.immunohistochemistry(), data.hubble_deep_field()]
    payloads = []
    for photo in photos:
        buf = io.BytesIO()
        Image.fromarray(photo).resize(size).save(buf, "JPEG", quality=90)
        payloads.append(buf.getvalue())
    return payloads


def run_load(server: TritonServer, model: str, payloads: Sequence[bytes], output: str, clients: int = 8,
             requests: int = 200, expected: Optional[Sequence[Any]] = None, atol: float = 0.0) -> dict:
    """``clients`` threads, each with its own HTTP client, sending ``requests`` requests one
    after the other; client ``i`` sends the encoded image ``payloads[i % len(payloads)]``.
    With ``expected`` (one array per payload), every response's ``output`` is compared with
    its payload's: a wrong shape or a max |difference| over ``atol`` counts as a failure, like
    an error. Returns the latencies (s), the failures (messages), the wall time (s) and the
    largest difference seen."""
    import threading

    import numpy as np
    import tritonclient.http as httpclient

    latencies: List[float] = []
    failures: List[str] = []
    largest = [0.0]
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        mine, errors, worst = [], [], 0.0
        payload = payloads[index % len(payloads)]
        want = None if expected is None else np.asarray(expected[index % len(payloads)])
        with server.http() as client:
            data = httpclient.InferInput("image_bytes", [1, 1], "BYTES")
            data.set_data_from_numpy(np.array([[payload]], dtype=object))
            wanted = [httpclient.InferRequestedOutput(output)]
            for n in range(requests):
                start = time.perf_counter()
                try:
                    got = client.infer(model, [data], outputs=wanted).as_numpy(output)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(f"client {index} request {n}: {e}")
                    got = None
                mine.append(time.perf_counter() - start)
                if got is not None and want is not None:
                    if got.shape != (1, *want.shape):
                        errors.append(f"client {index} request {n}: shape {got.shape}, expected {(1, *want.shape)}")
                    else:
                        difference = float(np.abs(got[0] - want).max())
                        worst = max(worst, difference)
                        if not difference <= atol:
                            errors.append(f"client {index} request {n}: max|difference| {difference:.3g} > {atol:g}")
        with lock:
            latencies.extend(mine)
            failures.extend(errors)
            largest[0] = max(largest[0], worst)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "failures": failures, "wall": time.perf_counter() - start,
            "max_difference": largest[0]}


if __name__ == "__main__":
    try:
        print(f"tritonserver ready to start from {prepare()}")
    except Unavailable as e:
        sys.exit(f"triton_server: error: {e}")
