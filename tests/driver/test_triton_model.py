"""The Triton Python-backend model of ``export-triton --runner python`` on the driver: two
instances on two devices, a dynamic batch with requests that fail on their own, one host
copy per batch, no spinning wait, and ``finalize``. Triton's ``triton_python_backend_utils``
(a module of the stub process) is stood in for by the few names the model uses."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

import trtvit_native as tv
from trtvit_native.triton import export_triton


class _Tensor:
    """pb_utils.Tensor: it keeps a reference to the array; Triton copies the data into
    shared memory after execute() returns (python_backend's PbTensor)."""

    def __init__(self, name, array):
        self.name, self._array = name, array

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors, error


class _Error:
    def __init__(self, message):
        self.message = message


def _pb_utils():
    m = ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.TritonError = _Tensor, _Response, _Error
    m.get_input_tensor_by_name = lambda request, name: request.inputs[name]
    return m


@pytest.fixture
def model_py(plans, tmp_path, monkeypatch):
    """(the model module of an exported repository, the built network behind its plan)."""
    built = tv.build_network("trt-vit-a", tv.create_model("trt-vit-a").state_dict(), fp16=False, max_batch=4,
                             image_size=32)
    plan = b"trt-vit-a interpreted plan"
    plans[plan] = built
    engine = tmp_path / "a.engine"
    engine.write_bytes(plan)
    (tmp_path / "a.engine.json").write_text(json.dumps(built.metadata(plan)))
    export_triton(str(engine), str(tmp_path / "repo"), name="a", runner="python")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
    spec = importlib.util.spec_from_file_location("trtvit_model", tmp_path / "repo" / "a" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, built, (tmp_path / "repo" / "a" / "requirements.txt").read_text()


def _request(x):
    return SimpleNamespace(inputs={"images": _Tensor("images", x)})


def test_two_instances_on_two_devices_answer_each_request_alone(model_py, driver):
    module, built, requirements = model_py
    backend = tv.get_backend()
    assert f"{backend.name.replace('_', '-')}=={backend.version}" in requirements.split()
    rng = np.random.default_rng(0)
    pinned = driver.live_pinned()
    instances = []
    for device in (0, 1):
        m = module.TritonPythonModel()
        m.initialize({"model_instance_device_id": str(device), "model_name": "a"})
        assert m.runner.device == device
        instances.append(m)
    spinning = driver.event_syncs(False)
    for m in instances:
        batches = [rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (2, 1, 2, 5)]
        requests = [_request(x) for x in batches]
        requests.insert(1, _request(batches[0].astype(np.float64)))  # a request of the wrong dtype
        requests.append(_request(rng.standard_normal((1, 3, 48, 48)).astype(np.float32)))  # a size it has not
        seen = []
        runner = m.runner

        class Recording:  # the runner, noting whether each batch is its pinned input buffer
            def __getattr__(self, name):
                return getattr(runner, name)

            def __call__(self, images, **kwargs):
                seen.append("images" in runner._staging and images.ctypes.data == runner._staging["images"][0].ptr)
                return runner(images, **kwargs)

        m.runner = Recording()
        m.runner.context.fail_next = "transient failure"  # the first batch fails once: its requests run alone
        responses = m.execute(requests)
        for r in responses:  # what Triton does once execute() has returned
            for t in r.output_tensors or ():
                t._array = np.array(t._array)
        errors = {i: r.error.message for i, r in enumerate(responses) if r.error is not None}
        assert set(errors) == {1, 4, 5}
        assert errors[1] == "images must be FP32, got float64"
        assert errors[4].startswith("batch size 5 is outside the engine's profile")
        assert errors[5].startswith("images are 48x48; the engine was built for 32x32")
        for i, x in ((0, batches[0]), (2, batches[1]), (3, batches[2])):
            (logits,) = responses[i].output_tensors
            want = tv.interpret(built, torch.from_numpy(x)).numpy()
            assert logits.name == "logits" and np.array_equal(logits.as_numpy(), want), i
        assert seen and all(seen)  # every batch was gathered straight into the pinned input buffer
        m.runner = runner
    assert driver.event_syncs(False) == spinning  # every wait for results sleeps
    assert driver.live_pinned() == pinned + 4  # each instance's pinned input and output buffers
    for m in instances:
        m.finalize()
        assert m.runner is None
    assert driver.live_pinned() == pinned  # finalize released them
