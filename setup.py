"""trtvit_native: TRT-ViT TensorRT engines built with the network API.

``pip install .`` also builds the CUDA kernel library (``plugins/``, via CMake) when
``nvcc`` and ``cmake`` are found, and ships it as ``trtvit_native/lib/libtrtvit_kernels.so``.
Environment: ``TRTVIT_BUILD_KERNELS=0`` skips that build; ``TRTVIT_CUDA_ARCHITECTURES``
(e.g. ``"80-real;90-real"``) overrides the default architecture list.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIB_NAME = "libtrtvit_kernels.so"


def _say(msg: str) -> None:
    print(f"trtvit_native: {msg}", file=sys.stderr, flush=True)


def build_kernel_library(package_dir: Path) -> None:
    """Build the kernel library with CMake and copy it into ``package_dir/lib``."""
    if os.environ.get("TRTVIT_BUILD_KERNELS", "1") == "0":
        _say("TRTVIT_BUILD_KERNELS=0: not building the CUDA kernel library")
        return
    if not (ROOT / "CMakeLists.txt").exists():
        _say("no CMakeLists.txt: the CUDA kernel library is not part of this source tree")
        return
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    cmake = shutil.which("cmake")
    if nvcc is None or cmake is None:
        missing = " and ".join(n for n, p in (("nvcc", nvcc), ("cmake", cmake)) if p is None)
        _say(f"{missing} not found: the CUDA kernel library is NOT built; the package works without it "
             f"(native TensorRT layers), build it later with cmake -S . -B build && cmake --build build")
        return
    build_dir = ROOT / "build" / "kernels"
    args = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            "-DTRTVIT_BUILD_EXAMPLES=OFF", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    archs = os.environ.get("TRTVIT_CUDA_ARCHITECTURES")
    if archs:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
    _say(f"building the CUDA kernel library ({archs or 'default architectures'})")
    try:
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "trtvit_kernels", "-j",
                        str(os.cpu_count() or 2)], check=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"trtvit_native: building the CUDA kernel library failed ({e}); "
                         f"set TRTVIT_BUILD_KERNELS=0 to install without it") from None
    built = next(build_dir.rglob(LIB_NAME), None)
    if built is None:
        raise SystemExit(f"trtvit_native: CMake finished but {LIB_NAME} was not produced")
    (package_dir / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, package_dir / "lib" / LIB_NAME)
    shutil.copy2(ROOT / "plugins" / "trtvit_kernels.h", package_dir / "lib" / "trtvit_kernels.h")
    _say(f"kernel library installed as {package_dir / 'lib' / LIB_NAME}")


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            build_kernel_library(ROOT / "trtvit_native")
        else:
            build_kernel_library(Path(self.build_lib) / "trtvit_native")


# torch is an extra, not a requirement: building from a weights file, exporting to Triton
# and running engines need none of it. Install the build that fits the machine first (on
# a CPU-only machine its CPU build) and the "torch" extra then leaves it as it is.
TORCH_REQUIRES = ["torch>=2.1"]
# training needs torch >= 2.3 (torch.amp.GradScaler(device)); counting by torchmetrics
TRAIN_REQUIRES = ["torch>=2.3", "kornia>=0.7", "torchmetrics>=1.0", "tqdm>=4.60", "matplotlib>=3.5", "Pillow>=9"]
# EngineRunner and the kernel launchers without torch: arrays, devices, streams, events and
# memory through cuda.core, host arrays as numpy (TensorRT itself: the "rtx" extra, or
# NVIDIA's tensorrt wheel). One extra per CUDA major: cuda-bindings 13 needs a CUDA 13 driver
# (>= 580) and is refused by a CUDA 12 one, so nothing unpinned picks the major.
CUDA_CORE = "cuda-core>=1.2,<2"
RUNTIME_REQUIRES = {
    "runtime-cu12": ["cuda-python>=12.9,<13", CUDA_CORE, "numpy>=1.22"],
    "runtime-cu13": ["cuda-python>=13,<14", CUDA_CORE, "numpy>=1.22"],
}

# trtvit quantize and quantized references: NVIDIA ModelOpt (it needs torch>=2.8, met by the torch
# already installed; ModelOpt 0.47 imports requests and huggingface_hub without declaring them)
QUANT_REQUIRES = ["nvidia-modelopt~=0.47.0", "requests", "huggingface_hub"] + TRAIN_REQUIRES

setup(
    name="trtvit_native",
    version="0.1.0",
    description="TRT-ViT TensorRT engines built layer by layer with the TensorRT network API, "
                "with fused CUDA LayerNorm and attention plugins",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["trtvit_native", "trtvit_native.*"]),
    package_data={"trtvit_native": ["lib/*.so", "lib/*.h"]},
    install_requires=["numpy>=1.22", "safetensors>=0.4"],
    extras_require={
        # the PyTorch reference: seeded weights, parity checks, the CPU interpreter, training
        "torch": TORCH_REQUIRES,
        **RUNTIME_REQUIRES,
        "rtx": ["tensorrt-rtx>=1.2"],
        # trtvit train / eval: augmentation (kornia) and metrics (torchmetrics), both pure torch;
        # progress bars, curves, image decoding
        "train": TRAIN_REQUIRES,
        # every extra the tests use: the runtime suite runs cuda.core on the CPU-backed driver, the
        # quantization suite ModelOpt, and its placement test ModelOpt's ONNX quantizer (onnxruntime)
        "test": ["pytest>=7", "scikit-image>=0.21", "scikit-learn>=1.0", "nvidia-cuda-cuobjdump",
                 "tritonclient[http,grpc]>=2.40", "protobuf>=3.20", "onnx>=1.14"] + TRAIN_REQUIRES
        + RUNTIME_REQUIRES["runtime-cu13"] + QUANT_REQUIRES + ["nvidia-modelopt[onnx]~=0.47.0"],
        "bench": ["onnx>=1.14"],
        "quant": QUANT_REQUIRES,
    },
    entry_points={"console_scripts": ["trtvit=trtvit_native.cli:main"]},
    cmdclass={"build_py": BuildPyWithKernels},
)
