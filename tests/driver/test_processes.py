"""What only a fresh process on the driver shows: the contexts a runner leaves per device,
and what CUDA says with no device visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent

# A runner on device 1, built, used and closed on a thread that never had a context; then
# what the driver saw: how often each device's context was made current.
DEVICE_1_FROM_A_BARE_THREAD = r"""
import json, sys, threading
import numpy as np
sys.path.insert(0, sys.argv[1])
import trtvit_native as tv
from trtvit_native import arrays, runtime
from cpu_driver import Driver, InterpretedTensorRT
from types import SimpleNamespace

driver = Driver()
built = tv.build_network("trt-vit-a", tv.create_model("trt-vit-a").state_dict(), fp16=False, max_batch=2,
                         image_size=32)
real = tv.get_backend()
backend = SimpleNamespace(trt=InterpretedTensorRT(real.trt, driver, {b"a": built}), label="interpreted")
runtime.get_backend = lambda name=None: backend
images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
result = {}

def work():
    from cuda.bindings import driver as cu
    runner = tv.EngineRunner(b"a", device=1)
    host = runner(images)
    device = runner(arrays.DeviceArray.from_host(images, 1)).copy_to_host()
    runner.close()
    result["same"] = bool(np.array_equal(host, device))
    result["current_after"] = int(cu.cuCtxGetCurrent()[1])

t = threading.Thread(target=work)
t.start()
t.join()
result["made_current"] = [driver.contexts_made_current(d) for d in (0, 1)]
result["created"] = [driver.contexts_created(d) for d in (0, 1)]
result["violations"] = driver.violations()
print(json.dumps(result))
"""


def _python(script, *args, env=None):
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env=env or dict(os.environ))


def test_a_device_1_runner_used_from_a_bare_thread_leaves_no_context_on_device_0():
    proc = _python(DEVICE_1_FROM_A_BARE_THREAD, str(TESTS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same"] and not result["violations"]
    assert result["created"][0] == 0 and result["made_current"][0] == 0  # device 0 never touched
    assert result["created"][1] == 1 and result["made_current"][1] > 0
    assert result["current_after"] == 0  # the thread is left as it was: no context


NO_DEVICE = r"""
import trtvit_native as tv
from trtvit_native import arrays
print("reason:", arrays.no_device_reason())
try:
    tv.EngineRunner(b"plan")
except tv.EngineError as e:
    print("error:", e)
"""


def test_with_no_device_visible_the_runner_says_why():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = _python(NO_DEVICE, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "reason: the driver gives no device (CUDA_ERROR_NO_DEVICE" in proc.stdout
    assert "CUDA_VISIBLE_DEVICES is ''" in proc.stdout
    assert "error: running an engine needs a CUDA GPU, and CUDA sees none (the driver gives no device" in proc.stdout
    env["CUDA_VISIBLE_DEVICES"] = "1"
    proc = _python("from trtvit_native import arrays; print(arrays.device_count(), arrays.device_name(0))", env=env)
    assert proc.stdout.split() == ["1", "CPU-backed", "CUDA", "device", "1", "(cuda:0)"], proc.stderr[-2000:]
