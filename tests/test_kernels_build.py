"""The CUDA kernel library and the C++ example compile, export the C ABI, and validate
their arguments on the host — all without a GPU."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from trtvit_native import kernels

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
CMAKE = shutil.which("cmake")

pytestmark = pytest.mark.skipif(NVCC is None or CMAKE is None, reason="nvcc and cmake are needed to build the kernels")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia

        for base in nvidia.__path__:
            for candidate in Path(base).glob("cu*/bin/cuobjdump"):
                return str(candidate)
    except ImportError:
        pass
    return None


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmake-build")
    subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(out), "-DCMAKE_CUDA_ARCHITECTURES=80-real;90-real",
                    f"-DCMAKE_CUDA_COMPILER={NVCC}"], check=True, capture_output=True)
    result = subprocess.run([CMAKE, "--build", str(out), "-j", str(os.cpu_count() or 2)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def library(build_dir):
    return kernels.load_kernel_library(build_dir / kernels.LIBRARY_NAME)


def test_library_and_example_are_built(build_dir):
    assert (build_dir / "libtrtvit_kernels.so").is_file()
    assert os.access(build_dir / "examples" / "cpp" / "check_kernels", os.X_OK)


def test_exports_exactly_the_documented_symbols(build_dir):
    out = subprocess.run(["nm", "-D", "--defined-only", str(build_dir / kernels.LIBRARY_NAME)], check=True,
                         capture_output=True, text=True).stdout
    symbols = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
    assert symbols == sorted(kernels.EXPORTED_SYMBOLS)
    header = (ROOT / "plugins" / "trtvit_kernels.h").read_text()
    for symbol in kernels.EXPORTED_SYMBOLS:
        assert f" {symbol}(" in header


def test_installed_library_serves_a_find_package_project(build_dir, tmp_path):
    prefix = tmp_path / "prefix"
    result = subprocess.run([CMAKE, "--install", str(build_dir), "--prefix", str(prefix)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    libs = list(prefix.glob("lib*/libtrtvit_kernels.so"))
    assert len(libs) == 1 and (prefix / "include" / "trtvit_kernels.h").is_file()
    assert list(prefix.glob("lib*/cmake/trtvit_kernels/trtvit_kernelsConfig.cmake"))
    # examples/find_package: find_package(trtvit_kernels) and link trtvit::kernels; its
    # calls are host-only, so the program runs here.
    app = tmp_path / "app"
    for cmd in ([CMAKE, "-S", str(ROOT / "examples" / "find_package"), "-B", str(app),
                 f"-DCMAKE_PREFIX_PATH={prefix}", f"-DCUDAToolkit_ROOT={Path(NVCC).resolve().parent.parent}"],
                [CMAKE, "--build", str(app)]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = subprocess.run([str(app / "kernel_limits")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "libtrtvit_kernels 1.0.0" in run.stdout and "head_dim 32: up to 256 tokens" in run.stdout


def test_no_cuda_runtime_dependency(build_dir):
    out = subprocess.run(["ldd", str(build_dir / kernels.LIBRARY_NAME)], capture_output=True, text=True).stdout
    assert "libcudart" not in out  # the runtime is linked statically: only the driver is needed


def test_contains_sm80_and_sm90_code(build_dir):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    listing = subprocess.run([tool, "--list-elf", str(build_dir / kernels.LIBRARY_NAME)], capture_output=True,
                             text=True).stdout
    assert "sm_80.cubin" in listing and "sm_90.cubin" in listing


def test_host_queries_need_no_gpu(library):
    assert library.version() == 10000
    assert library.attention_max_tokens(32) == kernels.attention_max_tokens(32) == 256
    assert library.attention_max_tokens(64) == kernels.attention_max_tokens(64) == 128
    assert library.attention_max_tokens(48) == kernels.attention_max_tokens(48) == 0
    assert library.status_string(0) == "ok"
    assert "invalid argument" in library.status_string(1)
    assert "unsupported" in library.status_string(2)
    assert library.status_string(99) == "unknown status"


def test_attention_support_query(library):
    """Invalid and too-large sizes are answered without a device, as the launch answers them;
    every other size asks the device (kernel image, shared memory): where there is none, a
    CUDA error, named by last_cuda_error()."""
    OK, UNSUPPORTED, INVALID = kernels.OK, kernels.UNSUPPORTED, kernels.INVALID_ARGUMENT
    assert library.attention_supported(257, 32, kernels.FLOAT16) == UNSUPPORTED
    assert library.attention_supported(129, 64, kernels.FLOAT32) == UNSUPPORTED
    assert library.attention_supported(10, 48, kernels.FLOAT32) == UNSUPPORTED
    assert library.attention_supported(0, 32, kernels.FLOAT32) == INVALID
    assert library.attention_supported(10, 0, kernels.FLOAT32) == INVALID  # as trtvit_attention says
    assert library.attention_supported(10, 32, 7) == INVALID
    for tokens, head_dim, dtype in [(49, 32, kernels.FLOAT32), (256, 32, kernels.FLOAT16), (128, 64, kernels.FLOAT16),
                                    (256, 32, kernels.FLOAT32)]:
        status = library.attention_supported(tokens, head_dim, dtype)
        if _has_gpu():
            assert status in (OK, UNSUPPORTED)
        else:
            assert status == kernels.CUDA_ERROR
            code, name, description = library.last_cuda_error()
            assert code != 0 and name.startswith("cudaError") and description
            assert library.describe(status) == f"CUDA runtime error: {name}: {description}"


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


FAKE = 0x1000  # a non-null, 16-byte aligned address the launchers must never touch


@pytest.mark.parametrize("call, status", [
    (lambda L: L.layernorm_raw(0, FAKE, FAKE, FAKE, 4, 64, 1e-5, 0, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_raw(FAKE, FAKE, FAKE, FAKE, 0, 64, 1e-5, 0, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_raw(FAKE, FAKE, FAKE, FAKE, 4, -1, 1e-5, 0, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_raw(FAKE, FAKE, FAKE, FAKE, 4, 64, -1.0, 0, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_raw(FAKE, FAKE, FAKE, FAKE, 4, 64, 1e-5, 7, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_raw(FAKE, FAKE, FAKE, FAKE, 4, 4097, 1e-5, 0, 0), kernels.UNSUPPORTED),
    (lambda L: L.layernorm_residual_raw(FAKE, 0, FAKE, FAKE, FAKE, FAKE, 4, 64, 1e-5, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(0, FAKE, 1, 49, 32, 32, 0.17, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 0, 49, 32, 32, 0.17, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 49, 32, 32, 0.0, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE + 2, FAKE, 1, 49, 32, 32, 0.17, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 257, 32, 32, 0.17, 1, 0), kernels.UNSUPPORTED),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 129, 32, 64, 0.17, 1, 0), kernels.UNSUPPORTED),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 49, 32, 48, 0.17, 1, 0), kernels.UNSUPPORTED),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 49, 32, 0, 0.17, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 49, 0, 32, 0.17, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 0, 32, 32, 0.17, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 49, 32, 32, float("inf"), 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 49, 32, 32, float("nan"), 0, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 1, 49, 32, 32, 0.17, 2, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE + 8, 1, 49, 32, 32, 0.17, 0, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.attention_raw(FAKE, FAKE, 1 << 20, 49, 1 << 12, 32, 0.17, 1, 0), kernels.UNSUPPORTED),
    (lambda L: L.layernorm_residual_raw(FAKE, FAKE, FAKE, FAKE, 0, FAKE, 4, 64, 1e-5, 0, 0),
     kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_residual_raw(FAKE, FAKE, FAKE, FAKE, FAKE, FAKE, 4, 5000, 1e-5, 1, 0),
     kernels.UNSUPPORTED),
    (lambda L: L.layernorm_raw(FAKE, FAKE, FAKE, FAKE, 4, 64, float("nan"), 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_raw(FAKE + 1, FAKE, FAKE, FAKE, 4, 64, 1e-5, 1, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_raw(FAKE, FAKE, FAKE, FAKE + 2, 4, 64, 1e-5, 0, 0), kernels.INVALID_ARGUMENT),
    (lambda L: L.layernorm_residual_raw(FAKE, FAKE + 2, FAKE, FAKE, FAKE, FAKE, 4, 64, 1e-5, 0, 0),
     kernels.INVALID_ARGUMENT),
])
def test_launchers_reject_bad_arguments_before_touching_the_gpu(library, call, status):
    assert call(library) == status
    with pytest.raises(kernels.KernelError, match=library.status_string(status).split(" ")[0]):
        library.check("launcher", status)


def test_raising_launchers(library):
    with pytest.raises(kernels.KernelError, match=r"trtvit_attention: unsupported .*\(status 2\)") as info:
        library.attention(FAKE, FAKE, 1, 257, 32, 32, 0.17, kernels.FLOAT16)
    assert info.value.status == kernels.UNSUPPORTED
    with pytest.raises(kernels.KernelError, match="trtvit_layernorm: invalid argument"):
        library.layernorm(FAKE, FAKE, FAKE, FAKE, -1, 64, 1e-5, kernels.FLOAT32)
    with pytest.raises(kernels.KernelError, match="trtvit_layernorm_residual: invalid argument"):
        library.layernorm_residual(FAKE, FAKE, FAKE, 0, FAKE, FAKE, 4, 64, 1e-5, kernels.FLOAT32)


def test_counts_beyond_a_c_int_are_refused_not_wrapped(library):
    """2^31 rows would wrap to a negative (or, at 2^32 + 4, a small valid) count in ctypes."""
    for rows in (2 ** 31, 2 ** 32 + 4):
        with pytest.raises(ValueError, match=rf"trtvit_layernorm: rows = {rows} does not fit the C ABI's int"):
            library.layernorm_raw(FAKE, FAKE, FAKE, FAKE, rows, 64, 1e-5, kernels.FLOAT32, 0)
        with pytest.raises(ValueError, match=rf"trtvit_layernorm_residual: rows = {rows} does not fit"):
            library.layernorm_residual(FAKE, FAKE, FAKE, FAKE, FAKE, FAKE, rows, 64, 1e-5, kernels.FLOAT32)
    with pytest.raises(ValueError, match=r"trtvit_attention: batch = 4294967297 does not fit"):
        library.attention(FAKE, FAKE, 2 ** 32 + 1, 49, 32, 32, 0.17, kernels.FLOAT16)


def test_launches_report_their_own_status():
    """Every kernel goes through launch() (cudaLaunchKernel's own return value), never the
    thread's last error, which an earlier unrelated failure may hold."""
    root = Path(__file__).resolve().parent.parent / "plugins"
    sources = {p.name: p.read_text() for p in root.glob("*.cu")}
    assert not any("<<<" in text for text in sources.values())
    assert "cudaLaunchKernel(" in (root / "common.cuh").read_text()
    assert not any("cudaGetLastError() ==" in text for text in sources.values())
    assert sum(text.count("return launch(") for text in sources.values()) == 4


def test_example_runs_or_reports_no_gpu(build_dir):
    result = subprocess.run([str(build_dir / "examples" / "cpp" / "check_kernels")], capture_output=True, text=True,
                            timeout=600)
    if result.returncode == 2:
        assert "no CUDA device" in result.stderr
    else:
        assert result.returncode == 0 and "all checks passed" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("compiler, flags", [("cc", ["-x", "c", "-std=c99"]), ("c++", ["-x", "c++", "-std=c++17"])])
def test_header_compiles_as_c_and_cpp(build_dir, tmp_path, compiler, flags):
    exe = shutil.which(compiler)
    if exe is None:
        pytest.skip(f"no {compiler}")
    # The toolkit's include folder, as CMake found it.
    found = re.search(r'CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES "([^";]+)',
                      next(build_dir.glob("CMakeFiles/*/CMakeCUDACompiler.cmake")).read_text())
    assert found, "CMake recorded no CUDA include folder"
    cuda_include = found.group(1)
    source = tmp_path / "use_header.c"
    source.write_text('#include "trtvit_kernels.h"\n'
                      'int main(void) { return trtvit_attention_max_tokens(32) == 256 ? 0 : 1; }\n')
    subprocess.run([exe, *flags, "-Wall", "-Wextra", "-Werror", "-fsyntax-only", f"-I{ROOT / 'plugins'}",
                    f"-I{cuda_include}", str(source)], check=True)


def test_missing_library_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TRTVIT_KERNELS_LIB", str(tmp_path / "nope.so"))
    assert kernels.find_kernel_library() is None
    with pytest.raises(kernels.KernelLibraryError,
                       match=r"libtrtvit_kernels.so not found \(\$TRTVIT_KERNELS_LIB=.*nope.so is not a file\); "
                             r"build it with `cmake -S . -B build"):
        kernels.load_kernel_library()
    monkeypatch.delenv("TRTVIT_KERNELS_LIB")
    monkeypatch.setattr(kernels, "_candidates", lambda: (tmp_path / "a.so", tmp_path / "b.so"))
    assert kernels.find_kernel_library() is None
    with pytest.raises(kernels.KernelLibraryError, match="libtrtvit_kernels.so not found.*cmake -S . -B build"):
        kernels.load_kernel_library()
    with pytest.raises(kernels.KernelLibraryError, match="does not exist"):
        kernels.load_kernel_library(tmp_path / "missing.so")
    libm = Path("/lib/x86_64-linux-gnu/libm.so.6")
    if not libm.exists():
        pytest.skip("no libm to stand in for a foreign library")
    with pytest.raises(kernels.KernelLibraryError, match="is not the trtvit kernel library: missing trtvit_attention"):
        kernels.load_kernel_library(libm)


@pytest.mark.parametrize("arch", ["75", "90"])
@pytest.mark.parametrize("source", ["attention.cu", "layernorm.cu"])
def test_kernels_compile_without_register_spills(source, arch, tmp_path):
    # sm_75 takes the Turing path of the fp16 attention (two m16n8k8 products per
    # m16n8k16); sm_90 is the main target. A spill or stack frame would put per-thread
    # data in local memory: a performance bug in these register-resident kernels. One
    # known exception: the element-wise (unvectorized) residual LayerNorm for d > 2048
    # (128 values of a row per lane, plus the residual's) spills a little; TRT-ViT's
    # widths all take the vectorized kernels.
    result = subprocess.run([NVCC, "-std=c++17", "-O3", "-c", str(ROOT / "plugins" / source), "-I",
                             str(ROOT / "plugins"), "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                             "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    entries = re.findall(r"Compiling entry function '(\w+)'", result.stderr)
    usage = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert entries and len(usage) == len(entries), result.stderr[-4000:]
    for entry, counts in zip(entries, usage):
        if re.search(r"layernorm_kernelI\w+Li128ELi1ELb1E", entry):
            assert all(int(c) <= 128 for c in counts), f"{entry} on sm_{arch}: {counts}"
            continue
        assert counts == ("0", "0", "0"), f"{entry} on sm_{arch}: stack/spill stores/spill loads {counts}"
