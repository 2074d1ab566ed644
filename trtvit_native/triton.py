"""Triton Inference Server model repositories for engines built by ``trtvit build``.

    trtvit export-triton a.engine --repository models/ [--name NAME] [--version N]
                         [--instances N] [--max-queue-delay-us N] [--preprocess]
                         [--runner tensorrt|python] [--force]

writes ``models/NAME/config.pbtxt`` (the engine's tensors with dims after the batch
dimension, -1 where dynamic; ``max_batch_size`` the profile's largest batch; dynamic
batching; GPU instances; ``label_filename`` where ENGINE.json names classes) and
``models/NAME/VERSION/model.plan`` (the engine's bytes, checked against ENGINE.json's
SHA-256). ``--runner tensorrt`` (platform ``tensorrt_plan``) is for engines built with full
TensorRT, the TensorRT of Triton's TensorRT backend; ``--runner python`` adds a
Python-backend ``model.py`` that runs the plan with :class:`trtvit_native.EngineRunner`,
for TensorRT-RTX engines. With ``--preprocess`` also ``NAME_preprocess``, a Python-backend
model that turns encoded images into the engine's input with
:func:`trtvit_native.data.preprocess_encoded` (one-line errors per request, dynamic
batching), and ``NAME_pipeline``, an ensemble from image bytes to the engine's outputs;
top-k class labels come from Triton's classification extension (request ``logits`` with
``class_count``) and the labels file. Each Python model's folder holds the
``requirements.txt`` of the Python backend's environment.

Every model folder is written into a temporary folder beside it and renamed into place,
so a failure leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from .weights import current_umask, not_an_engine, read_engine_json

__all__ = ["TritonExportError", "export_triton", "read_engine_metadata", "make_stub_environment"]


class TritonExportError(ValueError):
    """An engine or repository that cannot be exported to; the message names it."""


def read_engine_metadata(engine: str) -> Dict[str, Any]:
    """ENGINE.json (``ENGINE.json`` = ``<engine>.json``) of an engine file, checked."""
    if os.path.isdir(engine):
        raise TritonExportError(f"{engine} is a directory, not an engine file")
    if not os.path.isfile(engine):
        raise TritonExportError(f"engine file {engine} does not exist")
    other = not_an_engine(engine)
    if other is not None:
        raise TritonExportError(other)
    sidecar = engine + ".json"
    if not os.path.isfile(sidecar):
        raise TritonExportError(f"{sidecar} does not exist: export-triton needs the metadata trtvit build writes "
                                f"beside the engine")
    meta = read_engine_json(sidecar, TritonExportError)
    if meta.get("format") not in ("trtvit-engine-metadata/1", "trtvit-engine-metadata/2"):
        raise TritonExportError(f"{sidecar} is not engine metadata written by trtvit build "
                                f"(format {meta.get('format')!r})")
    for key in ("input", "batch", "sha256", "plugins"):
        if key not in meta:
            raise TritonExportError(f"{sidecar} has no {key!r}: not engine metadata written by this version of "
                                    f"trtvit build")
    return meta


def _outputs(meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    if "outputs" in meta:
        return meta["outputs"]
    return [meta["output"]]  # engines written before several outputs existed


def _dims(shape: List[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in shape[1:]) + " ]"


_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32"}


def _tensor_block(entries: List[str]) -> str:
    return "[\n" + ",\n".join(entries) + "\n]"


def engine_config(name: str, meta: Dict[str, Any], instances: int, max_queue_delay_us: int,
                  labels: bool, runner: str = "tensorrt") -> str:
    """config.pbtxt of the engine model: platform ``tensorrt_plan`` (Triton's TensorRT
    backend), or the Python backend running :class:`trtvit_native.EngineRunner` for
    ``runner="python"``; the same inputs, outputs and labels either way."""
    inp = meta["input"]
    inputs = [f'  {{\n    name: "{inp["name"]}"\n    data_type: {_TYPES[inp["dtype"]]}\n    dims: {_dims(inp["shape"])}\n  }}']
    outputs = []
    for out in _outputs(meta):
        label = '\n    label_filename: "labels.txt"' if labels and out["name"] == "logits" else ""
        outputs.append(f'  {{\n    name: "{out["name"]}"\n    data_type: {_TYPES[out["dtype"]]}\n'
                       f'    dims: {_dims(out["shape"])}{label}\n  }}')
    batch = meta["batch"]
    how = 'platform: "tensorrt_plan"' if runner == "tensorrt" else 'backend: "python"'
    return (f'name: "{name}"\n{how}\nmax_batch_size: {int(batch["max"])}\n'
            f"input {_tensor_block(inputs)}\noutput {_tensor_block(outputs)}\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}\n"
            f"instance_group [\n  {{\n    count: {int(instances)}\n    kind: KIND_GPU\n  }}\n]\n")


def preprocess_config(name: str, meta: Dict[str, Any], instances: int, max_queue_delay_us: int) -> str:
    inp = meta["input"]
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {int(meta["batch"]["max"])}\n'
            f'input [\n  {{\n    name: "image_bytes"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  }}\n]\n'
            f'output [\n  {{\n    name: "{inp["name"]}"\n    data_type: TYPE_FP32\n    dims: {_dims(_opt_shape(meta))}\n'
            f'  }}\n]\ndynamic_batching {{\n  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}\n'
            f'instance_group [\n  {{\n    count: {int(instances)}\n    kind: KIND_CPU\n  }}\n]\n')


def _opt_shape(meta: Dict[str, Any]) -> List[int]:
    """The input shape at the engine's optimization size (what preprocessing produces)."""
    h, w = meta.get("image_size", {}).get("opt") or meta["input"]["shape"][2:]
    return [-1, 3, int(h), int(w)]


def pipeline_config(name: str, engine_name: str, meta: Dict[str, Any], labels: bool) -> str:
    """The ensemble: image bytes -> NAME_preprocess -> the engine. Top-k labels come from
    Triton's classification extension: request ``logits`` with ``class_count`` k and the
    response holds "score:index:label" strings read from the labels file."""
    outs = [o["name"] for o in _outputs(meta)]
    out_entries = []
    for o in _outputs(meta):
        label = '\n    label_filename: "labels.txt"' if labels and o["name"] == "logits" else ""
        out_entries.append(f'  {{\n    name: "{o["name"]}"\n    data_type: TYPE_FP32\n    dims: {_dims(o["shape"])}'
                           f'{label}\n  }}')
    out_map = "\n".join(f'      output_map {{\n        key: "{o}"\n        value: "{o}"\n      }}' for o in outs)
    steps = [f'    {{\n      model_name: "{name}_preprocess"\n      model_version: -1\n'
             f'      input_map {{\n        key: "image_bytes"\n        value: "image_bytes"\n      }}\n'
             f'      output_map {{\n        key: "{meta["input"]["name"]}"\n        value: "preprocessed"\n      }}\n    }}',
             f'    {{\n      model_name: "{engine_name}"\n      model_version: -1\n'
             f'      input_map {{\n        key: "{meta["input"]["name"]}"\n        value: "preprocessed"\n      }}\n'
             f'{out_map}\n    }}']
    return (f'name: "{name}_pipeline"\nplatform: "ensemble"\nmax_batch_size: {int(meta["batch"]["max"])}\n'
            f'input [\n  {{\n    name: "image_bytes"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  }}\n]\n'
            f"output {_tensor_block(out_entries)}\n"
            f"ensemble_scheduling {{\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


# The Python backend of Triton 2.51 (and others of its age) reads BYTES tensors with numpy 1
# semantics: with numpy 2 in the stub's environment the first request kills the stub.
PREPROCESS_REQUIREMENTS = """# The Triton Python backend's environment (the first python3 on tritonserver's PATH)
numpy<2      # Triton 2.51's Python backend fails on numpy 2: "Stub process ... is not healthy"
Pillow
torch
trtvit_native
"""

ENGINE_REQUIREMENTS = """# The Triton Python backend's environment (the first python3 on tritonserver's PATH)
numpy<2      # Triton 2.51's Python backend fails on numpy 2: "Stub process ... is not healthy"
trtvit_native[runtime-cu13]   # runtime-cu12 on a CUDA 12 driver (< 580)
{tensorrt}   # the TensorRT that built model.plan: an engine runs only on the version that built it
"""

_PIP_NAMES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx"}


def engine_requirements(meta: Dict[str, Any], sidecar: str) -> str:
    """requirements.txt of the ``--runner python`` model: numpy < 2, the runtime, and the
    TensorRT module and version that built the engine (from ENGINE.json's ``backend``)."""
    module = engine_backend(meta, sidecar)
    label = str(meta.get("backend", ""))
    words = label.split()
    version = next((w for w in words if w[:1].isdigit()), None)
    return ENGINE_REQUIREMENTS.format(tensorrt=_PIP_NAMES[module] + (f"=={version}" if version else ""))

# Both Python models set sys.dont_write_bytecode before importing anything from the
# repository. model.py itself is compiled by the stub before it runs: an environment that
# must not write __pycache__ beside it sets the flag at start-up (a .pth file, see the
# README), which the stub honours where it ignores PYTHONDONTWRITEBYTECODE.
PREPROCESS_MODEL = '''"""Triton Python-backend model written by trtvit export-triton: encoded images in, the
engine's input out, with trtvit_native.data.preprocess_encoded (the package's one
preprocessing definition). Each request is answered on its own: an image that cannot be
used fails its request with a one-line error and the other requests of the batch go on.
The Python environment is in requirements.txt beside this folder."""

import sys

sys.dont_write_bytecode = True

import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from trtvit_native.data import preprocess_encoded  # noqa: E402

Image.MAX_IMAGE_PIXELS = None  # max_pixels below is the limit, checked before decoding

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "settings.json")) as _f:
    SETTINGS = json.load(_f)


class ImageRefused(ValueError):
    pass


def check_header(data):
    """Refuse what should not be decoded, from the header alone."""
    if not isinstance(data, bytes):
        raise ImageRefused(f"expected encoded image bytes, got {type(data).__name__}")
    if not data:
        raise ImageRefused("empty input: 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except UnidentifiedImageError:
        raise ImageRefused(f"{len(data)} bytes that are not an image Pillow can decode (JPEG, PNG, BMP...)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageRefused(f"cannot read the image header: {e}") from None
    if width * height > SETTINGS["max_pixels"]:
        raise ImageRefused(f"image of {width}x{height} = {width * height:,d} pixels is over the limit of "
                           f"{SETTINGS['max_pixels']:,d} (max_pixels in settings.json)")
    if min(width, height) < SETTINGS["min_side"]:
        raise ImageRefused(f"image of {width}x{height} pixels is smaller than {SETTINGS['min_side']} pixels on a side "
                           f"(min_side in settings.json)")


def preprocess_one(data):
    check_header(data)
    try:
        return preprocess_encoded(data, SETTINGS["image_size"]).numpy()
    except Exception as e:  # one line naming the problem, never the stub's traceback
        raise ImageRefused(" ".join(str(e).split()) or type(e).__name__) from None


def preprocess_request(request):
    tensor = pb_utils.get_input_tensor_by_name(request, "image_bytes")
    data = tensor.as_numpy()
    if data.dtype != np.object_:
        raise ImageRefused(f"image_bytes must be BYTES, got {data.dtype}")
    items = data.reshape(len(data), -1)
    if items.shape[1] != 1:
        raise ImageRefused(f"image_bytes must hold one encoded image per batch entry, got shape {list(data.shape)}")
    images = []
    for i, item in enumerate(items[:, 0]):
        try:
            images.append(preprocess_one(item))
        except ImageRefused as e:
            where = f"image {i} of {len(items)}: " if len(items) > 1 else ""
            raise ImageRefused(where + str(e)) from None
    return pb_utils.Tensor(SETTINGS["input_name"], np.stack(images).astype(np.float32))


class TritonPythonModel:
    def initialize(self, args):
        import torch

        # One thread per instance: Triton runs instances side by side (instance_group count),
        # and torch's own intra-op threads only contend with them.
        torch.set_num_threads(1)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=[preprocess_request(request)]))
            except ImageRefused as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
'''

ENGINE_MODEL = '''"""Triton Python-backend model written by trtvit export-triton --runner python: runs
model.plan with trtvit_native.EngineRunner on the GPU Triton gives this instance. The
requests of a dynamic batch are run as one batch; a request that cannot be run fails on its
own with a one-line error. The Python environment is in requirements.txt beside this folder."""

import sys

sys.dont_write_bytecode = True

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from trtvit_native import EngineRunner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "settings.json")) as _f:
    SETTINGS = json.load(_f)


class TritonPythonModel:
    def initialize(self, args):
        device = int(args["model_instance_device_id"])
        try:
            self.runner = EngineRunner(os.path.join(HERE, "model.plan"), device=device)
        except Exception as e:
            raise RuntimeError(f"{args['model_name']}: cannot run the engine on GPU {device}: "
                               f"{' '.join(str(e).split())}") from None
        self.max_batch = self.runner.batch_range[1]

    def _run(self, members, inputs, views):
        """Outputs of the requests ``members`` (one image size), run as one batch, gathered
        straight into the runner's pinned input buffer (the one host copy). ``views``: the
        results are views of the runner's pinned outputs, for the last call of an
        execute() only (Triton copies a response's tensors after execute returns, and a
        later call would overwrite them); otherwise copies."""
        rows = sum(len(inputs[i]) for i in members)
        batch = self.runner.host_input((rows,) + inputs[members[0]].shape[1:])
        start = 0
        for i in members:
            batch[start:start + len(inputs[i])] = inputs[i]
            start += len(inputs[i])
        out = self.runner(batch, host_views=views)
        return out if isinstance(out, dict) else {SETTINGS["output_names"][0]: out}

    def execute(self, requests):
        inputs, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            x = pb_utils.get_input_tensor_by_name(request, SETTINGS["input_name"]).as_numpy()
            if x.dtype != np.float32:
                responses[i] = self._error(f"{SETTINGS['input_name']} must be FP32, got {x.dtype}")
            inputs.append(x)
        groups = {}  # the requests of one image size run together, in batches the engine takes
        for i, x in enumerate(inputs):
            if responses[i] is None:
                groups.setdefault(x.shape[1:], []).append(i)
        queue = []
        for members in groups.values():
            batch, rows = [], 0
            for i in members:
                if batch and rows + len(inputs[i]) > self.max_batch:
                    queue.append(batch)
                    batch, rows = [], 0
                batch.append(i)
                rows += len(inputs[i])
            queue.append(batch)
        while queue:
            batch = queue.pop(0)
            try:
                out = self._run(batch, inputs, views=not queue)
            except Exception as e:
                if len(batch) == 1:
                    responses[batch[0]] = self._error(" ".join(str(e).split()))
                else:  # one request's failure is its own: the others run alone
                    queue[:0] = [[i] for i in batch]
                continue
            start = 0
            for i in batch:
                stop = start + len(inputs[i])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(k, out[k][start:stop]) for k in SETTINGS["output_names"]])
                start = stop
        return responses

    @staticmethod
    def _error(message):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))

    def finalize(self):
        """Triton unloads the model: the runner's stream, pinned and device buffers go now."""
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
            self.runner = None
'''


def _write_model(repository: str, name: str, files: Dict[str, bytes], force: bool) -> str:
    """Write ``files`` (relative path -> bytes) as ``repository/name`` atomically."""
    target = os.path.join(repository, name)
    if os.path.exists(target) and not os.path.isdir(target):
        raise TritonExportError(f"{target} exists and is not a directory")
    if os.path.isdir(target) and os.listdir(target) and not force:
        raise TritonExportError(f"model folder {target} exists and is not empty (--force replaces it)")
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=repository)
    try:
        for rel, data in files.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=f".{name}-old-", dir=repository)
            os.rename(target, os.path.join(old, name))
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return target


RUNNERS = ("tensorrt", "python")

# Image limits of the preprocessing model (settings.json beside its model.py): Pillow's own
# decompression-bomb threshold, and the smallest side an image must have.
MAX_PIXELS = 89_478_485
MIN_SIDE = 16


def engine_backend(meta: Dict[str, Any], sidecar: str) -> str:
    """The TensorRT module an engine was built with ("tensorrt" or "tensorrt_rtx"), from
    ENGINE.json's ``backend`` ("TensorRT-RTX 1.7.1.116 (tensorrt_rtx)")."""
    label = str(meta.get("backend", ""))
    module = label[label.rfind("(") + 1:-1] if label.endswith(")") else ""
    if module not in ("tensorrt", "tensorrt_rtx"):
        raise TritonExportError(f"{sidecar} does not say which TensorRT built the engine (backend {label or None!r}); "
                                f"rebuild it with this version of trtvit build")
    return module


def export_triton(engine: str, repository: str, name: Optional[str] = None, version: int = 1, instances: int = 1,
                  max_queue_delay_us: int = 100, preprocess: bool = False, force: bool = False,
                  runner: str = "tensorrt") -> List[str]:
    """Write a Triton model repository entry for ``engine``; returns the model folders written.

    ``runner="tensorrt"`` serves the plan with Triton's TensorRT backend, which is built on
    full TensorRT: a TensorRT-RTX engine is refused. ``runner="python"`` serves it with a
    Python-backend model running :class:`trtvit_native.EngineRunner` (either TensorRT).
    """
    if runner not in RUNNERS:
        raise TritonExportError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")
    meta = read_engine_metadata(engine)
    if meta["plugins"]:
        raise TritonExportError(f"{engine} holds the trtvit plugins, which are Python classes: Triton's TensorRT "
                                f"backend cannot load it. Build it with --plugins off")
    if runner == "tensorrt" and engine_backend(meta, engine + ".json") == "tensorrt_rtx":
        raise TritonExportError(f"{engine} is a TensorRT-RTX engine ({meta['backend']}), which Triton's TensorRT "
                                f"backend (full TensorRT) cannot load: build it with full TensorRT "
                                f"(TRTVIT_BACKEND=tensorrt trtvit build ...), or export it with --runner python")
    name = name or f"{meta.get('variant', 'trtvit')}-{meta.get('precision', 'engine')}"
    if not name or "/" in name or name.startswith("."):
        raise TritonExportError(f"invalid model name {name!r}")
    for value, what in ((version, "--version"), (instances, "--instances")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TritonExportError(f"{what} must be a positive integer, got {value!r}")
    if isinstance(max_queue_delay_us, bool) or not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0:
        raise TritonExportError(f"--max-queue-delay-us must be >= 0, got {max_queue_delay_us!r}")
    with open(engine, "rb") as f:
        plan = f.read()
    digest = hashlib.sha256(plan).hexdigest()
    if digest != meta["sha256"]:
        raise TritonExportError(f"{engine} does not match its metadata: SHA-256 {digest[:16]}..., "
                                f"{engine}.json says {str(meta['sha256'])[:16]}...")
    if os.path.exists(repository) and not os.path.isdir(repository):
        raise TritonExportError(f"repository {repository} is a file, not a directory")
    labels = meta.get("labels")
    engine_files = {"config.pbtxt": engine_config(name, meta, instances, max_queue_delay_us, bool(labels),
                                                  runner).encode(),
                    f"{version}/model.plan": plan}
    if runner == "python":
        settings = {"input_name": meta["input"]["name"], "output_names": [o["name"] for o in _outputs(meta)]}
        engine_files.update({f"{version}/model.py": ENGINE_MODEL.encode(),
                             f"{version}/settings.json": (json.dumps(settings, indent=1) + "\n").encode(),
                             "requirements.txt": engine_requirements(meta, engine + ".json").encode()})
    if labels:
        engine_files["labels.txt"] = ("\n".join(labels) + "\n").encode()
    written = []
    os.makedirs(repository, exist_ok=True)
    if preprocess:
        for other in (f"{name}_preprocess", f"{name}_pipeline"):  # check all before writing any
            path = os.path.join(repository, other)
            if os.path.isdir(path) and os.listdir(path) and not force:
                raise TritonExportError(f"model folder {path} exists and is not empty (--force replaces it)")
    written.append(_write_model(repository, name, engine_files, force))
    if preprocess:
        h, w = _opt_shape(meta)[2:]
        settings = {"image_size": [h, w], "input_name": meta["input"]["name"], "max_pixels": MAX_PIXELS,
                    "min_side": MIN_SIDE, "preprocessing": meta["input"].get("preprocessing")}
        written.append(_write_model(repository, f"{name}_preprocess", {
            "config.pbtxt": preprocess_config(f"{name}_preprocess", meta, instances, max_queue_delay_us).encode(),
            "requirements.txt": PREPROCESS_REQUIREMENTS.encode(),
            "1/model.py": PREPROCESS_MODEL.encode(),
            "1/settings.json": (json.dumps(settings, indent=1) + "\n").encode()}, force))
        pipeline = {"config.pbtxt": pipeline_config(name, name, meta, bool(labels)).encode(), "1/.keep": b""}
        if labels:
            pipeline["labels.txt"] = engine_files["labels.txt"]
        written.append(_write_model(repository, f"{name}_pipeline", pipeline, force))
    return written


def _site_directories() -> List[str]:
    """Every site-packages directory this interpreter imports from: a venv's own, the base
    installation's where the venv sees it, the user's."""
    import site
    import sys
    import sysconfig

    found = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    found += [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    found += [user] if user else []
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in found) if os.path.isdir(p)]


def make_stub_environment(path: str, extra_paths: Sequence[str] = ()) -> Dict[str, Any]:
    """The environment Triton's Python backend runs the models of ``export-triton`` in: a venv
    at ``path`` (its ``bin`` goes first on tritonserver's ``PATH``: the stub runs the first
    ``python3`` there) that imports numpy < 2 first, then ``extra_paths``, then every
    package of *this* interpreter (torch, Pillow, this package; from a venv too).

    Why: the Python backend of Triton 2.51 is built against numpy 1 (numpy 2 kills the stub
    at the first request); ``python -m venv --system-site-packages`` run inside a venv
    reaches only the base installation, not the venv's packages; the stub ignores
    ``PYTHONPATH`` and ``PYTHONDONTWRITEBYTECODE`` (the ``.pth`` sets
    ``sys.dont_write_bytecode``, so nothing writes ``__pycache__`` into the model
    repository). The site directories are added with ``site.addsitedir``, which also runs
    their ``.pth`` files: editable installs work. Returns what was made."""
    import subprocess
    import sys

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise TritonExportError(f"stub environment {path} is a file, not a directory")
    site_dir = os.path.join(path, "lib", f"python{version}", "site-packages")

    def run(cmd: List[str], what: str) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if not ln.startswith("WARNING")]
            raise TritonExportError(f"{what} failed ({' '.join(cmd)}): {' '.join(lines[-2:])}")

    if not os.path.isfile(os.path.join(path, "bin", "python3")):
        run([sys.executable, "-m", "venv", "--without-pip", path], f"creating the venv {path}")
    elif not os.path.isdir(os.path.dirname(site_dir)):
        raise TritonExportError(f"{path} is an environment of another Python (no lib/python{version}): remove it, "
                                f"or give another folder")
    if not os.path.isdir(os.path.join(site_dir, "numpy")):
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site_dir, "numpy<2"],
            f"installing numpy<2 into {site_dir}")
    paths = [os.path.abspath(p) for p in extra_paths] + [p for p in _site_directories() if p != site_dir]
    lines = ["import sys; sys.dont_write_bytecode = True"]
    lines += [f"import site; site.addsitedir({p!r})" for p in paths]
    with open(os.path.join(site_dir, "trtvit-serving.pth"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"path": path, "python": os.path.join(path, "bin", "python3"), "site_packages": site_dir,
            "added": paths, "python_version": version}
