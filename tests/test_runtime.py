"""The runtime's checks that need no GPU: the engine's input contract, every array and
stream kind it accepts, the errors it gives (no CUDA device, wrong dtype or shape, batch
outside the profile, host memory where device memory is needed), and that none of it
imports torch.

``EngineIO.check_call`` is the first thing ``EngineRunner.__call__`` does: the tests
below exercise the runner's own checks, on the contract of a real built network.
"""

import subprocess
import sys

import numpy as np
import pytest

from trtvit_native import arrays
from trtvit_native.arrays import ArrayError, stream_handle, view_array
from trtvit_native.runtime import EngineError, EngineIO, EngineRunner, check_input_shape
from conftest import network

# Device arrays are viewed by cuda.core, which asks the driver where a pointer lives: the
# checks of device arrays run on the CPU-backed driver, in tests/driver/test_arrays.py.
DEVICE_PTR = 0x7F0000000000  # what no driver call reaches: DLPack and array-interface refusals

MIN, MAX = (1, 3, 224, 224), (32, 3, 224, 224)


def _gpu_present() -> bool:
    try:
        return arrays.no_device_reason() is None
    except arrays.CudaUnavailable:
        return False


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (7, 3, 224, 224), (32, 3, 224, 224)])
def test_shapes_inside_the_profile_pass(shape):
    check_input_shape(shape, MIN, MAX)


@pytest.mark.parametrize("shape, message", [
    ((33, 3, 224, 224), r"batch size 33 is outside the engine's profile: it accepts 1\.\.32 images"),
    ((0, 3, 224, 224), r"batch size 0 is outside"),
    ((2, 1, 224, 224), r"images has 1 channels; the engine takes 3"),
    ((2, 3, 256, 256), r"images are 256x256; the engine was built for 224x224 images"),
    ((2, 3, 224, 192), r"images are 224x192"),
    ((3, 224, 224), r"images must have 4 dimensions \(batch, channels, height, width\), got shape \(3, 224, 224\)"),
])
def test_shapes_outside_the_profile_name_the_axis(shape, message):
    with pytest.raises(EngineError, match=message):
        check_input_shape(shape, MIN, MAX)


def test_missing_and_empty_engines_are_named(tmp_path):
    with pytest.raises(EngineError, match="engine file .*nothing.engine does not exist"):
        EngineRunner(tmp_path / "nothing.engine")
    with pytest.raises(EngineError, match=r"the engine is empty \(0 bytes\)"):
        EngineRunner(b"")
    with pytest.raises(EngineError, match="engine must be the serialized plan .* got list"):
        EngineRunner([1, 2])
    with pytest.raises(EngineError, match="is a directory, not an engine file"):
        EngineRunner(tmp_path)


@pytest.mark.skipif(_gpu_present(), reason="checks the error given where CUDA sees no GPU")
def test_without_a_gpu_the_error_says_why():
    with pytest.raises(EngineError, match=r"running an engine needs a CUDA GPU, and CUDA sees none "
                                          r"\(no NVIDIA driver found \(DynamicLibNotFoundError: "):
        EngineRunner(b"\x00" * 16)


# --------------------------------------------------------------------------------------
# The input contract of a real network, and the runner's checks against it
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def io():
    built = network("trt-vit-a", True, 4)
    contract = EngineIO.from_metadata(built.metadata(b"plan"))
    lo, opt, hi = (tuple(s) for s in built.profile.get_shape("images"))  # the range TensorRT was given
    assert (contract.min_shape, contract.opt_shape, contract.max_shape) == (lo, opt, hi)
    return contract


def test_several_outputs_take_no_out():
    built = network("trt-vit-a", True, 4)
    meta = built.metadata(b"plan")
    meta["outputs"] = [dict(meta["outputs"][0], name=n) for n in ("stage1", "stage2")]
    contract = EngineIO.from_metadata(meta)
    with pytest.raises(EngineError, match="out= is for engines with one output; this one has stage1, stage2"):
        contract.check_call(np.zeros((1, 3, 224, 224), np.float32), out=np.empty(1, np.float32))


# --------------------------------------------------------------------------------------
# Array kinds: DLPack, the CUDA array interface, streams
# --------------------------------------------------------------------------------------


class Exporter:
    """Hands out ``array``'s DLPack capsules, claiming device ``device`` (3: kDLCUDAHost,
    memory the GPU can reach, so cuda.core reads it without a driver call), and records the
    arguments it was asked with and the capsules it gave."""

    def __init__(self, array, device=(3, 0)):
        self.array, self.device, self.requests, self.capsules = array, device, [], []

    def __dlpack__(self, **kwargs):
        self.requests.append(kwargs)
        self.capsules.append(self.array.__dlpack__(**{k: v for k, v in kwargs.items() if k != "stream"}))
        return self.capsules[-1]

    def __dlpack_device__(self):
        return self.device


def test_dlpack_is_read_by_cuda_core_with_versioned_capsules_and_read_only_flags():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    array.flags.writeable = False
    exporter = Exporter(array)
    view = view_array(exporter, "x", 5)
    assert view.on_device and view.kind == "cuda" and view.ptr == array.ctypes.data and view.shape == (3, 4)
    assert view.readonly  # the versioned capsule's flag, read by cuda.core
    assert exporter.requests == [{"stream": 5, "max_version": exporter.requests[0]["max_version"]}]
    assert exporter.requests[0]["max_version"] >= (1, 0)
    assert "used_dltensor_versioned" in repr(exporter.capsules[0])  # consumed, as the protocol asks
    assert not view_array(Exporter(np.zeros((2, 2), np.float32)), "x", 5).readonly
    strided = view_array(Exporter(np.zeros((4, 6), np.float16)[:, ::2]), "x", 5)
    assert strided.shape == (4, 3) and not strided.contiguous
    with pytest.raises(ArrayError, match=r"x cannot be used as an array \(BufferError: device not supported\)"):
        view_array(Exporter(array, (14, 0)), "x", 5)


def test_the_array_interface_mask_version_and_stream_0_are_refused():
    def interface(**extra):
        return type("Interface", (), {"__cuda_array_interface__": dict(
            {"shape": (2,), "typestr": "<f4", "data": (DEVICE_PTR, False), "version": 3}, **extra)})()

    with pytest.raises(ArrayError, match=r"x cannot be used as an array \(BufferError: mask is not supported\)"):
        view_array(interface(mask=interface()), "x", 5)
    with pytest.raises(ArrayError, match=r"BufferError: only CUDA Array Interface v3 or above is supported"):
        view_array(interface(version=2), "x", 5)
    with pytest.raises(ArrayError, match=r"x: its __cuda_array_interface__ gives stream 0, which the interface "):
        view_array(interface(stream=0), "x", 5)


def test_stream_handles_of_every_kind():
    from cuda.bindings import driver, runtime

    class TorchLike:
        cuda_stream = 11

    class CudaStreamProtocol:
        def __cuda_stream__(self):
            return (0, 13)

    from cuda.core import Stream

    assert stream_handle(0) == arrays.LEGACY_STREAM and stream_handle(17) == 17  # the legacy stream, explicitly
    assert stream_handle(Stream.from_handle(21)) == 21
    assert stream_handle(runtime.cudaStream_t(5)) == 5 and stream_handle(driver.CUstream(9)) == 9
    assert stream_handle(TorchLike()) == 11 and stream_handle(CudaStreamProtocol()) == 13
    for bad, message in ((True, "got True"), (-1, "non-negative"), ("s", "got str"), (1.5, "got float")):
        with pytest.raises(ArrayError, match=message):
            stream_handle(bad)


# --------------------------------------------------------------------------------------
# No torch
# --------------------------------------------------------------------------------------


def _run_without_torch(script: str) -> subprocess.CompletedProcess:
    prelude = "import sys\nsys.modules['torch'] = None  # any import of torch now raises ImportError\n"
    return subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=300)


def test_runner_construction_and_checks_import_no_torch():
    built = network("trt-vit-a", True, 4)
    meta = built.metadata(b"plan")
    script = (
        "import numpy as np\n"
        "import trtvit_native as tv\n"
        "from trtvit_native.runtime import EngineIO\n"
        "try:\n"
        "    tv.EngineRunner(b'not an engine')\n"
        "except tv.EngineError as e:\n"
        "    print('EngineError:', e)\n"
        f"io = EngineIO.from_metadata({meta!r})\n"
        "view, _ = io.check_call(np.zeros((2, 3, 224, 224), np.float32))\n"
        "print('checked', view.shape)\n"
        "from trtvit_native import kernels\n"
        "try:\n"
        "    kernels.attention(np.zeros((1, 8, 96), np.float16), 1)\n"
        "except Exception as e:\n"
        "    print('kernels:', type(e).__name__, e)\n"
        "assert sys.modules.get('torch') is None\n"
    )
    proc = _run_without_torch(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checked (2, 3, 224, 224)" in proc.stdout
    if not _gpu_present():
        assert "EngineError: running an engine needs a CUDA GPU" in proc.stdout


def test_without_cuda_python_the_error_names_the_extra():
    proc = _run_without_torch(
        "sys.modules['cuda'] = None\n"
        "import trtvit_native as tv\n"
        "try:\n"
        "    tv.EngineRunner(b'x')\n"
        "except tv.EngineError as e:\n"
        "    print(e)\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "needs cuda.core" in proc.stdout and "pip install 'trtvit_native[runtime-cu13]'" in proc.stdout
