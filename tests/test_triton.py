"""Triton model repositories: every config.pbtxt parsed with Triton's own ModelConfig schema
(the protobuf module shipped in the tritonclient package), the preprocessing function
checked against the evaluation transform, and the repositories served by a real Triton
server: tritonserver 2.51 from the nvidia-pytriton wheel (tests/triton_server.py), on the
CPU, with the engine model's TensorRT runtime replaced by the CPU interpreter where a
test needs its outputs.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import pytest
import torch

import trtvit_native as tv
from trtvit_native.cli import main
from trtvit_native.triton import export_triton
from conftest import reference


def _model_config_module():
    """tritonclient/grpc/model_config_pb2.py, loaded on its own (the grpc package around it
    wants grpcio, which the schema does not need)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.fail("tritonclient is not installed (pip install tritonclient protobuf): the schema check needs it")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_config(path: Path):
    """A config.pbtxt as Triton's ModelConfig message (raises on anything off-schema)."""
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _model_config_module().ModelConfig())


def _engine(tmp_path, name, capsys, *argv, weights=None):
    target = tmp_path / f"{name}.engine"
    extra = ["--weights", str(weights)] if weights else []
    assert main(["build", "trt-vit-a", *extra, "--max-batch", "4", "--no-parity", *argv, "-o", str(target)]) == 0
    capsys.readouterr()
    return target


def _said_full_tensorrt(engine: Path) -> Path:
    """ENGINE.json of ``engine`` saying it was built with full TensorRT. Engines here are
    built with TensorRT-RTX; what export-triton writes for full TensorRT's is decided by
    ENGINE.json alone (the plan's bytes are copied, not read)."""
    sidecar = Path(str(engine) + ".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "backend": "TensorRT 10.13.3.9 (tensorrt)"}))
    return engine


@pytest.fixture(scope="module")
def labelled_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "a.safetensors"
    tv.save_weights(tv.create_model("trt-vit-a", num_classes=3), path, "trt-vit-a",
                    metadata={"classes": json.dumps(["cat", "dog", "fox"])})
    return path


def test_classifier_repository_with_labels_and_pipeline(tmp_path, capsys, labelled_weights):
    engine = _said_full_tensorrt(_engine(tmp_path, "a", capsys, "--fp16", weights=labelled_weights))
    repo = tmp_path / "models"
    assert main(["export-triton", str(engine), "--repository", str(repo), "--name", "a", "--version", "3",
                 "--instances", "2", "--max-queue-delay-us", "500", "--preprocess"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["a", "a_pipeline", "a_preprocess"]
    config = parse_config(repo / "a" / "config.pbtxt")
    assert config.name == "a" and config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("images", 11, [3, 224, 224])]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [("logits", [3], "labels.txt")]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == 1  # KIND_GPU
    assert (repo / "a" / "3" / "model.plan").read_bytes() == engine.read_bytes()
    assert (repo / "a" / "labels.txt").read_text() == "cat\ndog\nfox\n"
    pre = parse_config(repo / "a_preprocess" / "config.pbtxt")
    assert pre.backend == "python" and pre.input[0].data_type == 13  # TYPE_STRING
    assert pre.dynamic_batching.max_queue_delay_microseconds == 500 and pre.max_batch_size == 4
    assert (repo / "a_preprocess" / "requirements.txt").read_text().split("\n")[1].startswith("numpy<2 ")
    assert list(pre.output[0].dims) == [3, 224, 224] and pre.output[0].name == "images"
    assert json.loads((repo / "a_preprocess" / "1" / "settings.json").read_text())["image_size"] == [224, 224]
    assert "preprocess_encoded" in (repo / "a_preprocess" / "1" / "model.py").read_text()
    pipe = parse_config(repo / "a_pipeline" / "config.pbtxt")
    assert pipe.platform == "ensemble" and [s.model_name for s in pipe.ensemble_scheduling.step] == ["a_preprocess",
                                                                                                     "a"]
    assert pipe.output[0].label_filename == "labels.txt" and (repo / "a_pipeline" / "labels.txt").exists()
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_features_and_dynamic_resolution_repositories(tmp_path, capsys):
    engine = _said_full_tensorrt(_engine(tmp_path, "f", capsys, "--outputs", "features", "--image-size", "256x384",
                                         "--min-image-size", "128", "--max-image-size", "512x640"))
    export_triton(str(engine), str(tmp_path / "models"), name="feat")
    config = parse_config(tmp_path / "models" / "feat" / "config.pbtxt")
    assert [list(i.dims) for i in config.input] == [[3, -1, -1]]
    assert [(o.name, list(o.dims)) for o in config.output] == [("stage1", [256, -1, -1]), ("stage2", [512, -1, -1]),
                                                               ("stage3", [1024, -1, -1]), ("stage4", [2048, -1, -1])]
    assert not (tmp_path / "models" / "feat" / "labels.txt").exists()
    fixed = _engine(tmp_path, "s", capsys, "--outputs", "stage3,logits", "--fp32")
    export_triton(str(fixed), str(tmp_path / "models"), preprocess=True, runner="python")
    config = parse_config(tmp_path / "models" / "trt-vit-a-fp32" / "config.pbtxt")
    assert [(o.name, list(o.dims)) for o in config.output] == [("stage3", [1024, 14, 14]), ("logits", [1000])]
    pipe = parse_config(tmp_path / "models" / "trt-vit-a-fp32_pipeline" / "config.pbtxt")
    assert [o.name for o in pipe.output] == ["stage3", "logits"]


def test_export_errors_are_named_and_write_nothing(tmp_path, capsys):
    engine = _engine(tmp_path, "a", capsys)
    repo = tmp_path / "models"
    sidecar = Path(str(engine) + ".json")
    good = sidecar.read_text()

    def fails(message, *argv):
        before = sorted(str(p) for p in repo.rglob("*")) if repo.exists() else []
        code = main(["export-triton", *argv, "--runner", "python"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and err[0].startswith("trtvit: error: ") and message in err[0], err
        assert (sorted(str(p) for p in repo.rglob("*")) if repo.exists() else []) == before

    fails(f"engine file {tmp_path / 'none.engine'} does not exist", str(tmp_path / "none.engine"), "--repository",
          str(repo))
    sidecar.write_text("{broken")
    fails(f"{sidecar} is not valid JSON", str(engine), "--repository", str(repo))
    sidecar.write_text(json.dumps({"format": "something-else"}))
    fails("is not engine metadata written by trtvit build", str(engine), "--repository", str(repo))
    meta = json.loads(good)
    sidecar.write_text(json.dumps({**meta, "plugins": True}))
    fails("holds the trtvit plugins, which are Python classes: Triton's TensorRT backend cannot load it. Build it "
          "with --plugins off", str(engine), "--repository", str(repo))
    sidecar.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    fails(f"{engine} does not match its metadata", str(engine), "--repository", str(repo))
    sidecar.write_text(good)
    assert main(["export-triton", str(engine), "--repository", str(repo), "--name", "m", "--runner", "python"]) == 0
    capsys.readouterr()
    fails(f"model folder {repo / 'm'} exists and is not empty (--force replaces it)", str(engine), "--repository",
          str(repo), "--name", "m")
    fails("--instances must be a positive integer", str(engine), "--repository", str(repo), "--instances", "0")
    assert main(["export-triton", str(engine), "--repository", str(repo), "--name", "m", "--force",
                 "--version", "2", "--runner", "python"]) == 0
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["2", "config.pbtxt", "requirements.txt"]


def _encoded(image, fmt, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_preprocessing_equals_the_evaluation_transform_on_real_photographs():
    import numpy as np
    from PIL import Image
    from skimage import data

    from trtvit_native.data import eval_transform, load_rgb, preprocess_encoded

    cases = {
        "astronaut RGB PNG": _encoded(Image.fromarray(data.astronaut()), "PNG"),
        "coffee RGB JPEG": _encoded(Image.fromarray(data.coffee()), "JPEG", quality=90),
        "camera grayscale PNG": _encoded(Image.fromarray(data.camera()), "PNG"),
        "chelsea RGBA PNG": _encoded(Image.fromarray(data.chelsea()).convert("RGBA"), "PNG"),
        "rocket CMYK JPEG": _encoded(Image.fromarray(data.rocket()).convert("CMYK"), "JPEG"),
        "small BMP": _encoded(Image.fromarray(data.astronaut()).resize((97, 61)), "BMP"),
    }
    for label, encoded in cases.items():
        with Image.open(io.BytesIO(encoded)) as img:
            expected = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(load_rgb(encoded), expected), label
        for size in (224, (256, 384)):
            got = preprocess_encoded(encoded, size)
            ref = eval_transform(expected, size)
            assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-6, label


def test_the_pipeline_preprocessing_feeds_the_network_what_evaluation_does():
    """Bytes -> preprocess_encoded -> network == file -> eval_transform -> reference."""
    from PIL import Image
    from skimage import data

    from trtvit_native.data import preprocess_encoded

    encoded = _encoded(Image.fromarray(data.coffee()), "PNG")
    x = preprocess_encoded(encoded, 224)[None]
    built = tv.build_network("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=False, max_batch=1)
    with torch.no_grad():
        assert torch.allclose(tv.interpret(built, x), reference("trt-vit-a")(x), atol=1e-4)


def test_build_from_a_weights_file_and_export_need_no_torch(tmp_path, labelled_weights):
    """In a process where importing torch fails: import the package, build an engine from a
    weights file without the parity check, export it to a Triton repository."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
        "import trtvit_native\n"
        "from trtvit_native.cli import main\n"
        f"assert main(['build', 'trt-vit-a', '--weights', {str(labelled_weights)!r}, '--no-parity', '--max-batch', "
        f"'2', '-o', {str(tmp_path / 'a.engine')!r}]) == 0\n"
        f"assert main(['export-triton', {str(tmp_path / 'a.engine')!r}, '--repository', "
        f"{str(tmp_path / 'models')!r}, '--preprocess', '--runner', 'python']) == 0\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "models" / "trt-vit-a-fp16" / "1" / "model.plan").read_bytes() == \
        (tmp_path / "a.engine").read_bytes()
    assert json.loads((tmp_path / "a.engine.json").read_text())["labels"] == ["cat", "dog", "fox"]


# ---------------------------------------------------------------------------------------------
# A real Triton server (tritonserver 2.51 from the nvidia-pytriton wheel, tests/triton_server.py)
# serving repositories written by export-triton.

import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import triton_server  # noqa: E402

IMAGE_SIZE = 64  # the served engine's input size: small, so the CPU stand-in keeps up
MAX_BATCH = 4


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """One tritonserver for the module: explicit model control over ``triton.repository``;
    stopped by its PID at the end, whatever the tests did."""
    try:
        triton_server.prepare()
    except triton_server.Unavailable as e:
        if os.environ.get("TRTVIT_REQUIRE_TRITON"):
            pytest.fail(f"the Triton server is required here (TRTVIT_REQUIRE_TRITON) and unavailable: {e}")
        pytest.skip(f"no Triton server: {e}")
    root = tmp_path_factory.mktemp("triton")
    (root / "models").mkdir()
    server = triton_server.TritonServer(root / "models", root / "run" / "server.log").start()
    server.repository = root / "models"
    try:
        yield server
    finally:
        server.stop()


SERVED = ("a", "a_preprocess", "a_pipeline")


def _tree(repository: Path) -> list:
    """Every path in the served models' folders with the SHA-256 of each file's bytes."""
    import hashlib

    return sorted((str(p.relative_to(repository)), hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
                  for model in SERVED for p in [repository / model, *(repository / model).rglob("*")])


def _export_stand_in_pipeline(triton, work: Path, weights: Path, name: str, image_size: int, max_batch: int,
                              queue_delay_us: int) -> Path:
    """Build trt-vit-a from ``weights`` (fp32) into ``work``, export it with --preprocess and
    --runner python as ``name`` into the server's repository and make its engine model the
    CPU stand-in; returns the engine's path."""
    engine = work / f"{name}.engine"
    assert main(["build", "trt-vit-a", "--weights", str(weights), "--fp32", "--image-size", str(image_size),
                 "--max-batch", str(max_batch), "--no-parity", "-o", str(engine)]) == 0
    assert main(["export-triton", str(engine), "--repository", str(triton.repository), "--name", name, "--preprocess",
                 "--runner", "python", "--max-queue-delay-us", str(queue_delay_us)]) == 0
    triton_server.install_stand_in(triton.repository / name, engine, weights)
    return engine


@pytest.fixture(scope="module")
def served(triton, tmp_path_factory, labelled_weights):
    """trt-vit-a (3 labelled classes, fp32, 64x64, batch 1..4) exported with --preprocess and
    --runner python into the server's repository, the engine model on a CPU instance with the
    TensorRT runtime replaced by the CPU interpreter; all three models loaded."""
    engine = _export_stand_in_pipeline(triton, tmp_path_factory.mktemp("engine"), labelled_weights, "a", IMAGE_SIZE,
                                       MAX_BATCH, 20000)
    before = _tree(triton.repository)
    client = triton.http()
    for model in SERVED:
        client.load_model(model)
    client.close()
    yield {"engine": engine, "tree": before}


def _photographs_encoded():
    from PIL import Image
    from skimage import data

    grey16 = Image.fromarray(data.camera().astype(np.uint16) * 257)
    return {
        "RGB JPEG": _encoded(Image.fromarray(data.coffee()), "JPEG", quality=90),
        "CMYK JPEG": _encoded(Image.fromarray(data.rocket()).convert("CMYK"), "JPEG"),
        "RGB PNG": _encoded(Image.fromarray(data.astronaut()), "PNG"),
        "grey PNG": _encoded(Image.fromarray(data.camera()), "PNG"),
        "RGBA PNG": _encoded(Image.fromarray(data.chelsea()).convert("RGBA"), "PNG"),
        "16-bit grey PNG": _encoded(grey16, "PNG"),
        "BMP": _encoded(Image.fromarray(data.astronaut()).resize((97, 61)), "BMP"),
    }


def _infer(client, module, model, images, output, **requested):
    data = module.InferInput("image_bytes", [len(images), 1], "BYTES")
    data.set_data_from_numpy(np.array([[b] for b in images], dtype=object))
    return client.infer(model, [data], outputs=[module.InferRequestedOutput(output, **requested)]).as_numpy(output)


def test_16_bit_grey_png_decodes_to_its_8_bit_values():
    from PIL import Image
    from skimage import data

    from trtvit_native.data import load_rgb

    grey = data.camera()
    for array in (grey.astype(np.uint16) * 257, (grey.astype(np.uint16) * 257).astype(">u2")):
        decoded = load_rgb(_encoded(Image.fromarray(array), "PNG"))
        assert all(torch.equal(decoded[c], torch.from_numpy(grey)) for c in range(3))


def test_served_preprocessing_equals_preprocess_encoded_over_http_and_grpc(triton, served):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    from trtvit_native.data import preprocess_encoded

    cases = _photographs_encoded()
    expected = {k: preprocess_encoded(v, IMAGE_SIZE).numpy() for k, v in cases.items()}
    labels = list(cases)
    batches = [[k] for k in labels] + [labels[i:i + MAX_BATCH] for i in range(0, len(labels), MAX_BATCH)]
    assert max(len(b) for b in batches) == MAX_BATCH
    for module, client in ((http, triton.http()), (grpc, triton.grpc())):
        for batch in batches:
            got = _infer(client, module, "a_preprocess", [cases[k] for k in batch], "images")
            assert got.shape == (len(batch), 3, IMAGE_SIZE, IMAGE_SIZE) and got.dtype == np.float32
            for k, g in zip(batch, got):
                assert np.abs(g - expected[k]).max() == 0.0, (module.__name__, k)
        client.close()
    assert _tree(triton.repository) == served["tree"]  # serving wrote nothing into the repository


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels and holds one row: what a
    decompression bomb shows before it is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def _stats(client, model: str, at_least: int = 0):
    """(inference count, execution count) of ``model``, once it has counted ``at_least``
    inferences: the server may count a request just after answering it."""
    deadline = time.monotonic() + 10
    while True:
        s = client.get_inference_statistics(model)["model_stats"][0]
        if int(s["inference_count"]) >= at_least or time.monotonic() > deadline:
            return int(s["inference_count"]), int(s["execution_count"])
        time.sleep(0.05)


def _concurrently(calls):
    """Run the zero-argument ``calls`` at once; returns their results or exceptions."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_bad_inputs_fail_their_request_alone_in_one_line(triton, served):
    import tritonclient.http as http
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    from trtvit_native.data import preprocess_encoded

    good = _encoded(Image.new("RGB", (90, 70), (30, 160, 220)), "JPEG")
    bad = {
        "garbage bytes": (b"\x00not an image\xff" * 8,
                          "112 bytes that are not an image Pillow can decode (JPEG, PNG, BMP...)"),
        "empty string": (b"", "empty input: 0 bytes"),
        "1-pixel image": (_encoded(Image.new("RGB", (1, 1)), "PNG"),
                          "image of 1x1 pixels is smaller than 16 pixels on a side (min_side in settings.json)"),
        "decompression bomb": (_png_header_only(30000, 30000),
                               "image of 30000x30000 = 900,000,000 pixels is over the limit of 89,478,485 "
                               "(max_pixels in settings.json)"),
    }
    sent = [good] + [v[0] for v in bad.values()] + [good]
    client = triton.http()
    inferences, executions = _stats(client, "a_preprocess")

    def send(payload, datatype="BYTES"):
        def call():  # an HTTP client per thread: tritonclient.http's are not shared between threads
            with triton.http() as own:
                if datatype == "BYTES":
                    return _infer(own, http, "a_preprocess", [payload], "images")
                data = http.InferInput("image_bytes", [1, 1], datatype)
                data.set_data_from_numpy(np.zeros((1, 1), np.float32))
                return own.infer("a_preprocess", [data])
        return call

    results = _concurrently([send(p) for p in sent] + [send(None, "FP32")])
    expected = preprocess_encoded(good, IMAGE_SIZE).numpy()
    for result in (results[0], results[len(sent) - 1]):
        assert not isinstance(result, Exception), result
        assert np.abs(result[0] - expected).max() == 0.0
    wanted = [text for _, text in bad.values()] + ["inference input 'image_bytes' data-type is 'FP32', but model "
                                                   "'a_preprocess' expects 'BYTES'"]
    for what, error, text in zip(list(bad) + ["wrong datatype"], results[1:len(sent) - 1] + results[-1:], wanted):
        assert isinstance(error, InferenceServerException), (what, error)
        message = error.message()
        assert text in message and "\n" not in message.strip() and "Traceback" not in message, (what, message)
    after = _stats(client, "a_preprocess", inferences + len(sent))
    assert after[0] - inferences == len(sent)  # the wrong datatype never reached the model
    assert after[1] - executions < len(sent), after[1] - executions  # dynamic batching: they shared executions
    assert client.is_server_live() and client.is_model_ready("a_preprocess")
    assert np.abs(_infer(client, http, "a_preprocess", [good], "images")[0] - expected).max() == 0.0
    client.close()


def test_default_runner_refuses_a_tensorrt_rtx_engine_naming_both_ways_out(tmp_path, capsys, served, triton):
    engine = served["engine"]
    assert "(tensorrt_rtx)" in json.loads(Path(str(engine) + ".json").read_text())["backend"]
    repo = tmp_path / "models"
    assert main(["export-triton", str(engine), "--repository", str(repo), "--name", "rtx"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"trtvit: error: {engine} is a TensorRT-RTX engine"), err
    assert "build it with full TensorRT" in err[0] and "or export it with --runner python" in err[0]
    assert not repo.exists() or not list(repo.iterdir())
    # ENGINE.json's backend decides: the same plan said to be full TensorRT's is exported as a
    # tensorrt_plan model. The server validates its config and stops where it needs the
    # TensorRT backend, which this build of tritonserver (the Python backend only) lacks.
    full = tmp_path / "full.engine"
    full.write_bytes(engine.read_bytes())
    meta = json.loads(Path(str(engine) + ".json").read_text())
    Path(str(full) + ".json").write_text(json.dumps({**meta, "backend": "TensorRT 10.13.3.9 (tensorrt)"}))
    export_triton(str(full), str(triton.repository), name="full")
    config = parse_config(triton.repository / "full" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and not config.backend
    with triton.http() as client:
        with pytest.raises(Exception) as failed:
            client.load_model("full")
        assert "unable to find backend library for backend 'tensorrt'" in str(failed.value), str(failed.value)
        client.unload_model("full")


def test_python_runner_repository_loads_in_the_server_up_to_the_gpu(tmp_path, capsys, served, triton):
    import shutil

    assert main(["export-triton", str(served["engine"]), "--repository", str(triton.repository), "--name", "py",
                 "--runner", "python"]) == 0
    capsys.readouterr()
    folder = triton.repository / "py"
    config = parse_config(folder / "config.pbtxt")
    assert config.backend == "python" and not config.platform and config.instance_group[0].kind == 1  # KIND_GPU
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [("logits", [3], "labels.txt")]
    assert "numpy<2" in (folder / "requirements.txt").read_text()
    assert (folder / "1" / "model.plan").read_bytes() == served["engine"].read_bytes()
    # The same folder with a CPU instance: model.py runs, imports trtvit_native and stops
    # where the engine needs a GPU.
    shutil.copytree(folder, triton.repository / "py_cpu")
    cpu = triton.repository / "py_cpu" / "config.pbtxt"
    cpu.write_text(cpu.read_text().replace('name: "py"', 'name: "py_cpu"').replace("KIND_GPU", "KIND_CPU"))
    with triton.http() as client:
        for model, expected in (("py", "instance group py_0 of model py has kind KIND_GPU but no GPUs are available"),
                                ("py_cpu", "py_cpu: cannot run the engine on GPU 0: running an engine needs a CUDA "
                                           "GPU")):
            with pytest.raises(Exception) as failed:
                client.load_model(model)
            assert expected in str(failed.value), str(failed.value)
            client.unload_model(model)
        assert client.is_server_live()


def test_pipeline_serves_the_networks_logits_and_the_references_labels(triton, served, labelled_weights):
    """Image bytes -> a_preprocess -> a -> logits and top-k labels, through the ensemble.
    The engine model is the exported one on a CPU instance with EngineRunner replaced by
    trtvit_native.interpret on the network the engine was built from (tests/triton_server.py):
    the TensorRT runtime is the only part substituted."""
    import tritonclient.http as http

    from trtvit_native.data import preprocess_encoded

    cases = _photographs_encoded()
    images = [cases[k] for k in ("RGB JPEG", "grey PNG", "RGBA PNG", "BMP")]
    x = torch.stack([preprocess_encoded(b, IMAGE_SIZE) for b in images])
    built = tv.build_network("trt-vit-a", str(labelled_weights), fp16=False, max_batch=MAX_BATCH,
                             image_size=IMAGE_SIZE, plugins=False)
    model = tv.create_model("trt-vit-a", num_classes=3)
    model.load_state_dict(tv.load_weights(labelled_weights))
    with torch.no_grad():
        network, ref = tv.interpret(built, x).numpy(), model.eval()(x).numpy()
    with triton.http() as client:
        start = _stats(client, "a")[0]
        logits = _infer(client, http, "a_pipeline", images, "logits")
        # fp32 sums in other orders (the stand-in's one thread, its batches): 1.4e-5 measured on
        # logits of magnitude ~3; a bound of 7x that.
        assert np.abs(logits - network).max() <= 1e-4, np.abs(logits - network).max()
        top = _infer(client, http, "a_pipeline", images, "logits", class_count=3)
        inferences, executions = _stats(client, "a", start + 2 * len(images))
    classes = ["cat", "dog", "fox"]
    assert [[entry.decode().split(":", 2)[2] for entry in row] for row in top] == \
        [[classes[j] for j in np.argsort(-row, kind="stable")] for row in ref]
    gaps = np.diff(np.sort(ref, axis=1), axis=1)
    assert gaps.min() > 10 * np.abs(ref - network).max()  # the reference's order is not a near tie

    def single(payload):
        def call():
            with triton.http() as own:
                return _infer(own, http, "a_pipeline", [payload], "logits")
        return call

    results = _concurrently([single(images[i % 4]) for i in range(8)])
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), result
        assert np.abs(result[0] - network[i % 4]).max() <= 1e-4
    with triton.http() as client:
        after = _stats(client, "a", inferences + 8)
    assert after[0] - inferences == 8 and after[1] - executions < 8, (after, inferences, executions)
    assert _tree(triton.repository) == served["tree"]  # serving wrote nothing into the repository


LOAD_IMAGE_SIZE = 32  # the load test's pipeline: trt-vit-a at 32x32, fp32, batches of up to 8
LOAD_MAX_BATCH = 8
# Served logits vs the interpreter's in this process: fp32 sums in other orders (one thread
# in the stand-in, other batch compositions); 1.2e-5 and 1.5e-5 measured over two runs of
# 1,600 responses (logits of magnitude ~3); a bound of 7x that.
LOAD_ATOL = 1e-4


@pytest.fixture(scope="module")
def load_served(triton, tmp_path_factory, labelled_weights):
    """A second pipeline for the load test, ``l_pipeline``: trt-vit-a (3 classes) at 32x32,
    fp32, batch 1..8, exported with --preprocess and --runner python, the engine model's
    TensorRT runtime replaced by the CPU interpreter (one forward of a batch of 8 there:
    about 0.2 s on one core) and a 30 ms queue delay, so that it runs full batches. Returns
    eight 60x44 JPEGs and each one's logits from trtvit_native.interpret in this process."""
    from trtvit_native.data import preprocess_encoded

    _export_stand_in_pipeline(triton, tmp_path_factory.mktemp("load"), labelled_weights, "l", LOAD_IMAGE_SIZE,
                              LOAD_MAX_BATCH, 30000)
    with triton.http() as client:
        client.load_model("l_pipeline")  # and the two models it composes
    payloads = triton_server.load_payloads()
    built = tv.build_network("trt-vit-a", str(labelled_weights), fp16=False, max_batch=LOAD_MAX_BATCH,
                             image_size=LOAD_IMAGE_SIZE, plugins=False)
    with torch.no_grad():
        logits = tv.interpret(built, torch.stack([preprocess_encoded(b, LOAD_IMAGE_SIZE) for b in payloads])).numpy()
    return {"payloads": payloads, "logits": logits}


def test_load_8_clients_200_requests_each_through_the_pipeline_without_a_failure(triton, load_served):
    """A bounded load test on loopback: 8 concurrent HTTP clients x 200 requests through the
    ensemble (l_preprocess -> l, the engine model's TensorRT runtime replaced by the CPU
    interpreter), each client sending its own JPEG. Every response is checked: its logits
    equal that JPEG's logits from the interpreter in this process, so an error, a wrong
    result or a response meant for another request in the same batch is a failure."""
    payloads, logits = load_served["payloads"], load_served["logits"]
    pairs = [np.abs(logits[i] - logits[j]).max() for i in range(8) for j in range(i)]
    assert min(pairs) > 100 * LOAD_ATOL, min(pairs)  # another request's logits would be caught
    with triton.http() as client:
        inferences, executions = _stats(client, "l")
    load = triton_server.run_load(triton, "l_pipeline", payloads, "logits", clients=8, requests=200,
                                  expected=logits, atol=LOAD_ATOL)
    assert len(load["latencies"]) == 1600
    assert load["failures"] == [], (len(load["failures"]), load["failures"][:5])
    with triton.http() as client:
        after = _stats(client, "l", inferences + 1600)
        assert client.is_server_live() and client.is_model_ready("l_pipeline")
    assert after[0] - inferences == 1600 and after[1] - executions < 1600
    lat = np.sort(load["latencies"])
    print(f"8 x 200 pipeline requests: p50 {lat[800] * 1e3:.1f} ms, p99 {lat[1584] * 1e3:.1f} ms, "
          f"{1600 / load['wall']:.1f} requests/s, {load['wall']:.1f} s, {after[1] - executions} executions of the "
          f"engine model, max|difference| {load['max_difference']:.3g}")
