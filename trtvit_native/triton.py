"""Triton Inference Server model repositories for engines built by ``trtvit build``.

    trtvit export-triton a.engine --repository models/ [--name NAME] [--version N]
                         [--instances N] [--max-queue-delay-us N] [--preprocess] [--force]

writes ``models/NAME/config.pbtxt`` (platform ``tensorrt_plan``: the engine's tensors with
dims after the batch dimension, -1 where dynamic; ``max_batch_size`` the profile's
largest batch; dynamic batching; GPU instances; ``label_filename`` where ENGINE.json
names classes) and ``models/NAME/VERSION/model.plan`` (the engine's bytes, checked against
ENGINE.json's SHA-256). With ``--preprocess`` also ``NAME_preprocess``, a Python-backend
model that turns encoded images into the engine's input with
:func:`trtvit_native.data.preprocess_encoded`, and ``NAME_pipeline``, an ensemble from
image bytes to the engine's outputs; top-k class labels come from Triton's classification
extension (request ``logits`` with ``class_count``) and the labels file.

Every model folder is written into a temporary folder beside it and renamed into place,
so a failure leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

from .weights import current_umask, read_engine_json

__all__ = ["TritonExportError", "export_triton", "read_engine_metadata"]


class TritonExportError(ValueError):
    """An engine or repository that cannot be exported to; the message names it."""


def read_engine_metadata(engine: str) -> Dict[str, Any]:
    """ENGINE.json (``ENGINE.json`` = ``<engine>.json``) of an engine file, checked."""
    if os.path.isdir(engine):
        raise TritonExportError(f"{engine} is a directory, not an engine file")
    if not os.path.isfile(engine):
        raise TritonExportError(f"engine file {engine} does not exist")
    sidecar = engine + ".json"
    if not os.path.isfile(sidecar):
        raise TritonExportError(f"{sidecar} does not exist: export-triton needs the metadata trtvit build writes "
                                f"beside the engine")
    meta = read_engine_json(sidecar, TritonExportError)
    if meta.get("format") != "trtvit-engine-metadata/1":
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
                  labels: bool) -> str:
    """config.pbtxt of the TensorRT-plan model."""
    inp = meta["input"]
    inputs = [f'  {{\n    name: "{inp["name"]}"\n    data_type: {_TYPES[inp["dtype"]]}\n    dims: {_dims(inp["shape"])}\n  }}']
    outputs = []
    for out in _outputs(meta):
        label = '\n    label_filename: "labels.txt"' if labels and out["name"] == "logits" else ""
        outputs.append(f'  {{\n    name: "{out["name"]}"\n    data_type: {_TYPES[out["dtype"]]}\n'
                       f'    dims: {_dims(out["shape"])}{label}\n  }}')
    batch = meta["batch"]
    return (f'name: "{name}"\nplatform: "tensorrt_plan"\nmax_batch_size: {int(batch["max"])}\n'
            f"input {_tensor_block(inputs)}\noutput {_tensor_block(outputs)}\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}\n"
            f"instance_group [\n  {{\n    count: {int(instances)}\n    kind: KIND_GPU\n  }}\n]\n")


def preprocess_config(name: str, meta: Dict[str, Any], instances: int) -> str:
    inp = meta["input"]
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {int(meta["batch"]["max"])}\n'
            f'input [\n  {{\n    name: "image_bytes"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  }}\n]\n'
            f'output [\n  {{\n    name: "{inp["name"]}"\n    data_type: TYPE_FP32\n    dims: {_dims(_opt_shape(meta))}\n'
            f'  }}\n]\ninstance_group [\n  {{\n    count: {int(instances)}\n    kind: KIND_CPU\n  }}\n]\n')


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


PYTHON_MODEL = '''"""Triton Python-backend model written by trtvit export-triton: encoded images in, the
engine's input out, with trtvit_native.data.preprocess_encoded (the package's one
preprocessing definition). Needs trtvit_native (and torch) in the Python backend's
environment."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from trtvit_native.data import preprocess_encoded

SETTINGS = json.load(open(os.path.join(os.path.dirname(__file__), "settings.json")))


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "image_bytes").as_numpy()
            images = np.stack([preprocess_encoded(bytes(item[0]), SETTINGS["image_size"]).numpy()
                               for item in data]).astype(np.float32)
            out = pb_utils.Tensor(SETTINGS["input_name"], images)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
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


def export_triton(engine: str, repository: str, name: Optional[str] = None, version: int = 1, instances: int = 1,
                  max_queue_delay_us: int = 100, preprocess: bool = False, force: bool = False) -> List[str]:
    """Write a Triton model repository entry for ``engine``; returns the model folders written."""
    meta = read_engine_metadata(engine)
    if meta["plugins"]:
        raise TritonExportError(f"{engine} holds the trtvit plugins, which are Python classes: Triton's TensorRT "
                                f"backend cannot load it. Build it with --plugins off")
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
    engine_files = {"config.pbtxt": engine_config(name, meta, instances, max_queue_delay_us, bool(labels)).encode(),
                    f"{version}/model.plan": plan}
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
        settings = {"image_size": [h, w], "input_name": meta["input"]["name"],
                    "preprocessing": meta["input"].get("preprocessing")}
        written.append(_write_model(repository, f"{name}_preprocess", {
            "config.pbtxt": preprocess_config(f"{name}_preprocess", meta, instances).encode(),
            "1/model.py": PYTHON_MODEL.encode(),
            "1/settings.json": (json.dumps(settings, indent=1) + "\n").encode()}, force))
        pipeline = {"config.pbtxt": pipeline_config(name, name, meta, bool(labels)).encode(), "1/.keep": b""}
        if labels:
            pipeline["labels.txt"] = engine_files["labels.txt"]
        written.append(_write_model(repository, f"{name}_pipeline", pipeline, force))
    return written
