#!/usr/bin/env bash
# Every GPU check of the project in one run, for the GPU of this machine:
#
#   bash benchmarks/gpu_checks.sh [OUTDIR]        # default OUTDIR: gpu-results/
#
#   1. the kernel library and the C++ example, built for this GPU (CMake, or nvcc alone
#      where CMake is missing), and the example run;
#   2. pytest -m gpu (kernels against torch with every array kind, the plugins' enqueue,
#      engines against the reference, the runtime with every array and stream kind);
#   3. host_gpu: the kernel library's host code on the device (tests/test_kernels_host.py
#      -m gpu): fp32 attention of two sizes from two threads at once, and a library built
#      for another architecture refusing this GPU with cudaErrorNoKernelImageForDevice;
#      runtime_streams runs the runtime's stream-ordering tests alone (slow producers on side
#      streams, one runner on two streams, out= still read by its producer);
#   4. benchmarks/kernels.py (kernel speed against torch and the copy bandwidth);
#   5. benchmarks/engine_gpu.py (trt-vit-c engines: load, parity, speed), where a
#      TensorRT module is importable.
#   6. benchmarks/triton_cpu.py --gpu (a --runner python repository served by
#      tritonserver 2.51 from the nvidia-pytriton wheel, EngineRunner on the GPU);
#   7. quantized engines (needs the quant extra): trt-vit-c int8, fp8 (GEMMs) and int8+fp8
#      against fp16, each engine's per-layer precisions from IEngineInspector
#      (benchmarks/inspect_quantized.py: fails where a quantized conv/GEMM runs in fp16 or a
#      standalone Q/DQ kernel remains), `trtvit run --check` of each,
#      latency and throughput at batch 1 and 32 (target: fp8 >= 1.5x fp16 images/s at
#      batch 32 on an H100), and the digits-trained trt-vit-a int8/fp8 engines' top-1
#      agreement on the GPU (trtvit eval --engine);
#   8. design_space: `trtvit profile --blocks` (the paper's Table 1: BottleNeck, Transformer,
#      MixBlockA/B/C alone at 56², 28², 14², 7², fp16, TensorRT latency, TeraParams and
#      TeraFLOPS) and `trtvit profile` of trt-vit-a, trt-vit-c, resnet50 and mixnet-v, at
#      batch 1 and 8, as JSON (design_space_*.json).
#
# TRTVIT_GPU_STEPS="cpp_example kernels" runs only the named steps of build, cpp_example,
# pytest_gpu, host_gpu, runtime_streams, kernels, engine, triton, quantized and design_space (the build runs whenever a
# later step needs it), for
# machines that limit how long one command may take.
# TRTVIT_WHEELS=DIR installs every wheel in DIR first (pip --no-deps), for machines
# without network access (the TensorRT-RTX wheels, for instance).
#
# Each step's output goes to OUTDIR/<step>.txt (and .json / .xml where the tool writes
# one); OUTDIR/summary.txt lists every step's exit status. A failing step does not stop
# the later ones; the script exits non-zero when any step failed.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-gpu-results}" && cd "${1:-gpu-results}" && pwd)
py=${PYTHON:-python3}
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"
failed=0

steps=${TRTVIT_GPU_STEPS:-build cpp_example pytest_gpu host_gpu runtime_streams kernels engine triton quantized design_space}
wanted() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  case "$name" in
    wheels) ;;
    build) [ "$steps" = engine ] && return 0 ;;  # every other step uses the kernel library
    *) wanted "$name" || return 0 ;;
  esac
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" | tee -a "$summary"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

if [ -n "${TRTVIT_WHEELS:-}" ]; then
  step wheels 600 bash -c "'$py' -m pip install --no-deps --no-index '${TRTVIT_WHEELS}'/*.whl"
fi

{
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  nvcc --version | tail -n 2
  "$py" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  "$py" -c "import trtvit_native as tv; print(tv.get_backend().label)" 2>&1 | tail -n 1
  "$py" -c "import cuda.bindings as b, cuda.core as c; print('cuda-bindings', b.__version__, '| cuda.core', c.__version__)" \
    2> /dev/null ||
    echo "cuda.core not installed: the runtime's and the array launchers' GPU tests skip (see TRTVIT_WHEELS)"
  "$py" -c "import cupy; print('CuPy', cupy.__version__)" 2> /dev/null || echo "CuPy not installed"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

cc=$("$py" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2> /dev/null) || {
  echo "no CUDA GPU visible to torch: nothing to check" | tee -a "$summary"; exit 2; }

build_with_nvcc() {
  mkdir -p build/examples/cpp
  nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC,-fvisibility=hidden -DTRTVIT_BUILDING -cudart static \
    -gencode "arch=compute_$cc,code=sm_$cc" -Iplugins plugins/layernorm.cu plugins/attention.cu plugins/status.cu \
    -o build/libtrtvit_kernels.so &&
  nvcc -O2 -std=c++17 -Iplugins examples/cpp/check_kernels.cpp -Lbuild -ltrtvit_kernels -cudart static \
    -Xlinker "-rpath,$root/build" -o build/examples/cpp/check_kernels
}

quantized_engines() {  # PYTHON WORKDIR: int8 / fp8 trt-vit-c against fp16, digits agreement on the GPU
  local py=$1 work=$2 p
  mkdir -p "$work" && cd "$work" || return 1
  "$py" -c "import trtvit_native as tv; tv.save_weights(tv.create_model('trt-vit-c'), 'c.safetensors', 'trt-vit-c')
from trtvit_native.data import write_digits; write_digits('digits')" || return 1
  trtvit build trt-vit-c --weights c.safetensors --fp16 --no-parity -o c-fp16.engine || return 1
  local rc=0
  for p in int8 fp8 int8-fp8; do
    local recipe="--precision $p"
    [ "$p" = int8-fp8 ] && recipe="--precision fp8 --conv-precision int8"
    trtvit quantize trt-vit-c --weights c.safetensors --calib digits/train --images 64 $recipe --quiet \
      -o c-$p.safetensors && trtvit build trt-vit-c --weights c-$p.safetensors --fp16 --no-parity -o c-$p.engine ||
      return 1
    # the inspector's per-layer JSON; fails where a quantized conv/GEMM runs in fp16 or a Q/DQ stays unfused
    "$py" "$root/benchmarks/inspect_quantized.py" c-$p.engine c-$p.safetensors --json c-$p.layers.json || rc=1
  done
  for p in fp16 int8 fp8 int8-fp8; do trtvit run c-$p.engine --batch 1 --batch 32 --iterations 200 || return 1; done
  for p in int8 fp8 int8-fp8; do trtvit run c-$p.engine --check || rc=1; done
  "$py" "$root/benchmarks/quantize_digits.py" --workdir digits-run || return 1
  for p in int8 fp8 int8-fp8; do
    trtvit build trt-vit-a --weights digits-run/trt-vit-a-digits-$p.safetensors --fp16 --image-size 32 --no-parity \
      -o a-$p.engine && trtvit eval trt-vit-a --weights digits-run/trt-vit-a-digits-$p.safetensors \
      --data digits-run/digits/val --engine a-$p.engine --json || return 1
  done
  return $rc
}

if command -v cmake > /dev/null; then
  step build 600 bash -c "cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES=${cc}-real && cmake --build build -j"
else
  export cc root
  step build 600 bash -c "$(declare -f build_with_nvcc); build_with_nvcc"
fi
export TRTVIT_KERNELS_LIB="$root/build/libtrtvit_kernels.so"

step cpp_example 120 ./build/examples/cpp/check_kernels
step pytest_gpu 900 "$py" -m pytest -m gpu -v -rs -p no:cacheprovider --junitxml="$out/pytest_gpu.xml" \
  tests/test_kernels_gpu.py tests/test_engine_gpu.py tests/test_runtime_gpu.py
# A library with code for another architecture only (no PTX): no kernel image for this GPU.
foreign=$([ "$cc" = 75 ] && echo 80 || echo 75)
step host_gpu 900 bash -c "mkdir -p build/foreign && nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC,-fvisibility=hidden \
  -DTRTVIT_BUILDING -cudart static -gencode arch=compute_$foreign,code=sm_$foreign -Iplugins plugins/layernorm.cu \
  plugins/attention.cu plugins/status.cu -o build/foreign/libtrtvit_kernels.so &&
  TRTVIT_FOREIGN_ARCH_LIB=build/foreign/libtrtvit_kernels.so '$py' -m pytest -m gpu -v -rs -p no:cacheprovider \
  --junitxml='$out/host_gpu.xml' tests/test_kernels_host.py"
step runtime_streams 600 "$py" -m pytest -m gpu -v -rs -p no:cacheprovider \
  tests/test_runtime_gpu.py tests/test_kernels_gpu.py -k "slow or producer or stream or context or midway or thread"
step kernels 600 "$py" benchmarks/kernels.py --json "$out/kernels.json"
if "$py" -c "import trtvit_native as tv; tv.get_backend()" > /dev/null 2>&1; then
  step engine 900 "$py" benchmarks/engine_gpu.py --json "$out/engine.json"
  step triton 600 "$py" benchmarks/triton_cpu.py --gpu --requests 50 --pipeline-requests 50
  export root
  step quantized 1800 bash -c "$(declare -f quantized_engines); quantized_engines '$py' '$out/quantized'"
  # the paper's Table 1 on this GPU (each block kind alone, fp16) and every preset's blocks, batch 1 and 8
  step design_space 1200 bash -c "for b in 1 8; do '$py' -m trtvit_native profile --blocks --batch \$b --json \
    > '$out/design_space_blocks_b'\$b.json || exit 1; for v in trt-vit-a trt-vit-c resnet50 mixnet-v; do \
    '$py' -m trtvit_native profile \$v --batch \$b --json > '$out/design_space_'\$v'_b'\$b.json || exit 1; done; done; \
    '$py' -m trtvit_native profile --blocks"
else
  echo "engine         skipped: no TensorRT Python module (tensorrt or tensorrt_rtx)" | tee -a "$summary"
fi
exit "$failed"
