"""The kernel library's host code against a CUDA runtime in host memory (tests/mock_cudart.cpp).

The real ``attention.cu``, ``layernorm.cu`` and ``status.cu`` are compiled with ``-cudart none``
and linked against the mock, which simulates devices with their own opt-in shared-memory
limits and kernel images, enforces a kernel's MaxDynamicSharedMemorySize at launch, and
can hold a call to force a thread interleaving. The C++ example links the same mock and
has its kernels executed on the host. No GPU is needed: only nvcc.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest

from trtvit_native import kernels, trt_plugins

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is needed to compile the kernel library's host code")

FAKE = 0x1000  # a 16-byte aligned address; the mock never touches memory unless told to execute
F32, F16 = kernels.FLOAT32, kernels.FLOAT16
# Opt-in shared memory per block (bytes) of sm_75 (T4), sm_80 (A100), sm_86, sm_89 and sm_90 (H100).
LIMITS = {"sm_75": 65536, "sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
# Only the host code is under test: the device code is compiled to PTX of one architecture
# without optimization (cicc -O0), which nvcc needs for its kernel registration code.
DEVICE_FLAGS = ["-gencode", "arch=compute_80,code=compute_80", "-Xcicc", "-O0"]


def _run(cmd: Sequence[str]) -> None:
    result = subprocess.run(list(cmd), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


@pytest.fixture(scope="session")
def mock_build(tmp_path_factory) -> Path:
    """libcudart_mock.so, libtrtvit_kernels.so built from plugins/ against it, and the C++
    example linked to both; the three .cu files compile in parallel."""
    out = tmp_path_factory.mktemp("mock-cuda")
    compiles = [subprocess.Popen([NVCC, "-std=c++17", "-c", "-cudart", "none", "-DTRTVIT_BUILDING",
                                  "-Xcompiler", "-fPIC,-fvisibility=hidden", *DEVICE_FLAGS, f"-I{PLUGINS}",
                                  str(PLUGINS / f"{name}.cu"), "-o", str(out / f"{name}.o")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for name in ("attention", "layernorm", "status")]
    _run([NVCC, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-cudart", "none",
          str(ROOT / "tests" / "mock_cudart.cpp"), "-o", str(out / "libcudart_mock.so")])
    for p in compiles:
        log = p.communicate()[0]
        assert p.returncode == 0, log[-4000:]
    link = ["-L", str(out), "-Xlinker", f"-rpath,{out}", "-cudart", "none"]
    _run([NVCC, "-shared", *(str(out / f"{n}.o") for n in ("attention", "layernorm", "status")), "-lcudart_mock",
          *link, "-Xlinker", "--no-undefined", "-o", str(out / kernels.LIBRARY_NAME)])
    _run([NVCC, "-std=c++17", "-O2", f"-I{PLUGINS}", str(ROOT / "examples" / "cpp" / "check_kernels.cpp"),
          "-ltrtvit_kernels", "-lcudart_mock", *link, "-o", str(out / "check_kernels")])
    return out


class Mock:
    """The mock runtime's control functions."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.trtvit_mock_set_devices.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                                     ctypes.POINTER(ctypes.c_int)]

    def devices(self, limits: Sequence[int], images: Optional[Sequence[int]] = None) -> None:
        arr = (ctypes.c_int * max(len(limits), 1))(*limits)
        img = None if images is None else (ctypes.c_int * len(images))(*images)
        self.lib.trtvit_mock_set_devices(len(limits), arr, img)

    def set_device(self, device: int) -> None:
        assert self.lib.cudaSetDevice(device) == 0

    def __getattr__(self, name: str):
        return getattr(self.lib, f"trtvit_mock_{name}")


@pytest.fixture
def mock(mock_build) -> Mock:
    return Mock(mock_build / "libcudart_mock.so")


@pytest.fixture
def lib(mock_build, mock, tmp_path) -> kernels.KernelLibrary:
    """A private copy of the library: its once-guards and thread-local state start empty."""
    copy = tmp_path / kernels.LIBRARY_NAME
    shutil.copy(mock_build / kernels.LIBRARY_NAME, copy)
    return kernels.KernelLibrary(copy)


def simt_shared_bytes(tokens: int, head_dim: int) -> int:
    """Dynamic shared memory of the fp32 attention kernel (attention.cu)."""
    n4 = (tokens + 3) // 4 * 4
    rows = 2 if head_dim == 32 else 1
    return 4 * (2 * n4 * head_dim + 4 * rows * (head_dim + n4))


def attention(lib: kernels.KernelLibrary, tokens: int, head_dim: int = 32, dtype: int = F32) -> int:
    return lib.attention_raw(FAKE, FAKE, 1, tokens, 1, head_dim, 0.17, dtype, 0)


def test_two_threads_with_different_sizes_share_the_kernel_attribute(lib, mock):
    """N = 224 and N = 170 fp32 run the same kernel (8 keys per lane), both above 48 KB. The
    mock holds N = 224's attribute call until N = 170 (another thread) has launched: with the
    attribute set per call to the call's size, N = 224 then launches with more than the
    attribute N = 170 left and fails; set once to the kernel's largest size, both run."""
    assert simt_shared_bytes(170, 32) > 48 * 1024 and simt_shared_bytes(224, 32) > simt_shared_bytes(170, 32)
    mock.devices([LIMITS["sm_90"]])
    mock.hold_next_attribute(1000)
    status = {}

    def run(tokens: int) -> None:
        status[tokens] = attention(lib, tokens)

    first = threading.Thread(target=run, args=(224,))
    first.start()
    deadline = time.monotonic() + 10
    while not mock.holding() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert mock.holding(), "N = 224 never reached cudaFuncSetAttribute"
    second = threading.Thread(target=run, args=(170,))
    second.start()
    second.join()
    first.join()
    assert status == {224: kernels.OK, 170: kernels.OK}, {n: lib.status_string(s) for n, s in status.items()}
    assert mock.launches() == 2


def test_attribute_is_set_once_per_device_to_the_kernels_largest_size(lib, mock):
    mock.devices([LIMITS["sm_90"], LIMITS["sm_75"]])
    assert attention(lib, 170) == kernels.OK
    assert (mock.attribute_calls(), mock.last_attribute_value()) == (1, simt_shared_bytes(256, 32))
    assert attention(lib, 224) == attention(lib, 200) == kernels.OK
    assert mock.attribute_calls() == 1
    mock.set_device(1)  # the attribute belongs to a device: set again, capped by its limit
    assert attention(lib, 224) == kernels.OK
    assert (mock.attribute_calls(), mock.last_attribute_value()) == (2, LIMITS["sm_75"])
    assert attention(lib, 225) == kernels.UNSUPPORTED
    assert attention(lib, 120, 64) == kernels.OK and attention(lib, 121, 64) == kernels.UNSUPPORTED
    assert mock.launches() == 5


def test_a_failed_launch_names_the_cuda_error_per_thread(lib, mock):
    mock.devices([LIMITS["sm_90"]], images=[0])
    with pytest.raises(kernels.KernelError, match=r"^trtvit_attention: CUDA runtime error: "
                                                  r"cudaErrorNoKernelImageForDevice: no kernel image is available"):
        lib.attention(FAKE, FAKE, 1, 49, 1, 32, 0.17, F16)
    code, name, _ = lib.last_cuda_error()
    assert (code, name) == (209, "cudaErrorNoKernelImageForDevice")
    seen = []
    other = threading.Thread(target=lambda: seen.append(lib.last_cuda_error()[1]))
    other.start()
    other.join()
    assert seen == ["cudaSuccess"]  # kept per thread
    with pytest.raises(kernels.KernelError, match="trtvit_layernorm_residual: CUDA runtime error: cudaErrorNoKernel"):
        lib.layernorm_residual(FAKE, FAKE, FAKE, FAKE, FAKE, FAKE, 4, 64, 1e-5, F32)
    assert lib.layernorm_raw(FAKE, FAKE, FAKE, FAKE, 0, 64, 1e-5, F32, 0) == kernels.INVALID_ARGUMENT
    assert lib.last_cuda_error()[0] == 0  # each call starts afresh
    assert lib.describe(kernels.INVALID_ARGUMENT) == lib.status_string(kernels.INVALID_ARGUMENT)
    assert mock.launches() == 0


def test_query_refuses_a_device_without_a_kernel_image(lib, mock, monkeypatch):
    mock.devices([LIMITS["sm_90"], LIMITS["sm_90"]], images=[1, 0])
    assert lib.attention_supported(256, 32, F32) == lib.attention_supported(49, 64, F16) == kernels.OK
    mock.set_device(1)
    for tokens, head_dim, dtype in [(49, 32, F16), (49, 32, F32), (256, 32, F32), (128, 64, F16), (100, 64, F32)]:
        assert lib.attention_supported(tokens, head_dim, dtype) == kernels.UNSUPPORTED
        assert lib.last_cuda_error()[1] == "cudaErrorNoKernelImageForDevice"
    monkeypatch.setattr(kernels, "load_kernel_library", lambda *args: lib)
    with pytest.raises(trt_plugins.PluginError, match=r"Attention: 49 tokens of head_dim 32 in fp16 cannot run on "
                                                      r"this GPU: unsupported .*: cudaErrorNoKernelImageForDevice"):
        trt_plugins.check_device_support(49, 32, F16)
    mock.devices([])  # no device: a CUDA error, reported as one
    assert lib.attention_supported(49, 32, F16) == kernels.CUDA_ERROR
    assert lib.describe(kernels.CUDA_ERROR).startswith("CUDA runtime error: cudaErrorNoDevice")
    with pytest.raises(trt_plugins.PluginError, match=r"Attention: 49 tokens of head_dim 32 in fp16: cannot ask "
                                                      r"the GPU whether it runs them: CUDA runtime error: "
                                                      r"cudaErrorNoDevice"):
        trt_plugins.check_device_support(49, 32, F16)


def test_query_and_launch_agree_on_every_device(lib, mock):
    """The size query's answer is the launch's, over token counts, head_dims (valid,
    unsupported, invalid), dtypes and the shared-memory limits of sm_75 to sm_90."""
    mock.devices(list(LIMITS.values()))
    tokens = [-1, 0, 1, 49, 64, 65, 88, 89, 120, 121, 128, 129, 164, 165, 196, 224, 225, 256, 257]
    head_dims, dtypes = [-1, 0, 16, 32, 48, 64], [F32, F16, 5]
    unsupported = {}
    for device, arch in enumerate(LIMITS):
        mock.set_device(device)
        for n in tokens:
            for hd in head_dims:
                for dt in dtypes:
                    query, launch = lib.attention_supported(n, hd, dt), attention(lib, n, hd, dt)
                    assert query == launch, f"{arch} N={n} head_dim={hd} dtype={dt}: query {query}, launch {launch}"
        unsupported[arch] = sum(attention(lib, n, hd, F32) == kernels.UNSUPPORTED for n in range(1, 257)
                                for hd in (32, 64))
    # beyond the token maximum (128 for head_dim 64), and on Turing beyond N = 224 / 120
    assert unsupported == {"sm_75": 128 + 32 + 8, "sm_80": 128, "sm_86": 128, "sm_89": 128, "sm_90": 128}


def test_numpy_integers_are_accepted(lib, mock):
    mock.devices([LIMITS["sm_90"]])
    assert lib.attention_supported(np.int64(49), np.int32(32), np.int64(F16)) == kernels.OK
    assert lib.attention_raw(FAKE, FAKE, np.int64(2), np.int64(49), np.uint16(3), np.int64(32), np.float32(0.17),
                             np.int8(F16), 0) == kernels.OK
    lib.layernorm(FAKE, FAKE, FAKE, FAKE, np.int32(4), np.int64(64), 1e-5, np.int64(F32))
    with pytest.raises(ValueError, match=r"trtvit_attention_supported: tokens = 49.0 is not an integer"):
        lib.attention_supported(49.0, 32, F16)
    with pytest.raises(ValueError, match=r"trtvit_layernorm: rows = np.int64\(2147483648\) does not fit|"
                                         r"trtvit_layernorm: rows = 2147483648 does not fit"):
        lib.layernorm_raw(FAKE, FAKE, FAKE, FAKE, np.int64(2 ** 31), 64, 1e-5, F32, 0)
    with pytest.raises(ValueError, match="trtvit_attention: dtype = True is not an integer"):
        lib.attention_raw(FAKE, FAKE, 1, 49, 1, 32, 0.17, True, 0)


@pytest.mark.parametrize("limit, skipped", [(LIMITS["sm_75"], 2), (LIMITS["sm_90"], 0)])
def test_cpp_example_skips_what_the_device_cannot_run(mock_build, limit, skipped):
    """On a T4-class 64 KB limit the example's fp32 attention at N = 256 / head_dim 32 and
    N = 128 / head_dim 64 is beyond the device: skipped with the reason, exit status 0. The
    mock executes the kernels on the host, so every other check compares real results."""
    env = dict(os.environ, TRTVIT_MOCK_OPTIN=str(limit), TRTVIT_MOCK_EXECUTE="1")
    result = subprocess.run([str(mock_build / "check_kernels")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skips = [line for line in result.stdout.splitlines() if "SKIP" in line]
    assert len(skips) == skipped, result.stdout
    for line, what in zip(skips, ["attention fp32 B 1 N 256 heads 2 head_dim 32",
                                  "attention fp32 B 1 N 128 heads 2 head_dim 64"]):
        assert line.startswith(what) and line.endswith(
            f"SKIP: this device cannot run it: needs more shared memory than its opt-in limit of {limit} bytes")
    assert result.stdout.count("PASS") == 39 - skipped  # 34 kernel checks and 5 refused calls, less the skipped
    assert "FAIL" not in result.stdout and "all checks passed" in result.stdout


def test_cpp_example_names_a_missing_kernel_image(mock_build):
    env = dict(os.environ, TRTVIT_MOCK_NO_IMAGE="1", TRTVIT_MOCK_EXECUTE="1")
    result = subprocess.run([str(mock_build / "check_kernels")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "layernorm failed: CUDA runtime error: cudaErrorNoKernelImageForDevice: no kernel image" in result.stdout
    assert "14 attention checks skipped" in result.stdout


LAUNCH_SNIPPET = """
#include "common.cuh"
__global__ void kernel(const float* x, int n) {}
int run(const void* p) {
#ifdef UNCONVERTED
    return trtvit::launch(kernel, dim3(1), dim3(32), 0, nullptr, p, 1);  // const void* -> const float*: refused
#else
    return trtvit::launch(kernel, dim3(1), dim3(32), 0, nullptr, static_cast<const float*>(p), 1.0);
#endif
}
"""


def test_launch_converts_arguments_as_a_triple_chevron_launch(tmp_path):
    """launch() takes what kernel<<<...>>>(args) takes (implicit conversions: a double for an
    int), and refuses what it refuses (a const void* for a const float*)."""
    source = tmp_path / "launch.cu"
    source.write_text(LAUNCH_SNIPPET)
    converted, unconverted = (subprocess.Popen([NVCC, "-std=c++17", "-c", *DEVICE_FLAGS, f"-I{PLUGINS}", *define,
                                                str(source), "-o", str(tmp_path / f"launch{len(define)}.o")],
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                              for define in ([], ["-DUNCONVERTED"]))
    log = converted.communicate()[0]
    assert converted.returncode == 0, log[-2000:]
    log = unconverted.communicate()[0]
    assert unconverted.returncode != 0 and "no instance of function template" in log and "launch" in log, log[-2000:]


def test_kernel_build_tests_run_without_torch(tmp_path):
    """tests/test_kernels_build.py and the shared conftest import without torch (the tests
    that need no CMake build are run; the others need the same imports)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch fails\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "tests" / "test_kernels_build.py"), "-k",
                             "missing_library or report_their_own_status"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


# --- on a GPU: the same host code with the real runtime (benchmarks/gpu_checks.sh, host_gpu) ---


def _cuda_torch():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is needed for the device buffers of the GPU tests")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")
    return torch


@pytest.mark.gpu
def test_two_threads_run_fp32_attention_of_different_sizes_on_the_gpu():
    """N = 224 and N = 170 (one kernel, both above 48 KB of shared memory) from two threads on
    their own streams, 200 launches each: every launch succeeds and both results match the
    reference (where the device's limit allows N = 224 at all)."""
    torch = _cuda_torch()
    lib = kernels.load_kernel_library()
    heads, head_dim, scale = 4, 32, 32 ** -0.5
    sizes = [n for n in (224, 170) if lib.attention_supported(n, head_dim, F32) == kernels.OK]
    if len(sizes) < 2:
        pytest.skip(f"this GPU runs fp32 attention of only {sizes} of N = 224, 170 at head_dim 32")
    inputs = {n: torch.randn(2, n, 3 * heads * head_dim, device="cuda",
                             generator=torch.Generator("cuda").manual_seed(n)) for n in sizes}
    outputs = {n: torch.empty(2, n, heads * head_dim, device="cuda") for n in sizes}
    torch.cuda.synchronize()
    statuses = {}
    start = threading.Barrier(len(sizes))

    def run(n: int) -> None:
        stream = torch.cuda.Stream()
        start.wait()
        statuses[n] = {lib.attention_raw(inputs[n].data_ptr(), outputs[n].data_ptr(), 2, n, heads, head_dim, scale,
                                         F32, stream.cuda_stream) for _ in range(200)}
        stream.synchronize()

    threads = [threading.Thread(target=run, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == {n: {kernels.OK} for n in sizes}
    for n in sizes:
        ref = trt_plugins.reference_attention(inputs[n], heads, head_dim, scale)
        assert (outputs[n] - ref).abs().max().item() <= 1e-5


@pytest.mark.gpu
def test_a_library_without_an_image_for_this_gpu_names_it():
    path = os.environ.get("TRTVIT_FOREIGN_ARCH_LIB")
    if not path:
        pytest.skip("TRTVIT_FOREIGN_ARCH_LIB (a kernel library built for another architecture only) is not set; "
                    "benchmarks/gpu_checks.sh builds one")
    torch = _cuda_torch()
    lib = kernels.KernelLibrary(path)
    no_image = r"cudaErrorNoKernelImageForDevice|cudaErrorInvalidDeviceFunction"
    assert lib.attention_supported(49, 32, F16) == kernels.UNSUPPORTED
    assert lib.last_cuda_error()[1] in no_image.split("|")
    qkv = torch.randn(1, 49, 3 * 32, device="cuda", dtype=torch.float16)
    out = torch.empty(1, 49, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(kernels.KernelError, match=rf"trtvit_attention: CUDA runtime error: ({no_image}): "):
        lib.attention(qkv.data_ptr(), out.data_ptr(), 1, 49, 1, 32, 0.17, F16)
