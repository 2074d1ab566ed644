"""The CUDA kernels against torch on the same GPU (``pytest -m gpu``).

Skipped, with the reason, where there is no CUDA GPU or no kernel library. Inputs are
made in the tested dtype; the references are computed by torch in float64 from those same
inputs (so the bounds measure the kernels' error alone), and compared in fp32:
LayerNorm and attention within 1e-5 in fp32 and 2e-3 in fp16. LayerNorm weights are
near 1 and biases near 0, as in trained models, so that fp16 outputs stay below 8, where
the rounding of the output itself is at most 2^-9.
"""

import pytest
import torch

from trtvit_native import kernels
from conftest import CudaArrayOnly, DLPackOnly, StreamInterface, slow_copy

pytestmark = pytest.mark.gpu


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    if kernels.find_kernel_library() is None:
        return "libtrtvit_kernels.so not built (cmake -S . -B build && cmake --build build)"
    return None


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)

DEV = torch.device("cuda")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


def _max_err(got, ref):
    return (got.double() - ref).abs().max().item()


def _ln_params(d, dtype):
    return _randn(d, dtype=dtype, seed=3, scale=0.1) + 1, _randn(d, dtype=dtype, seed=4, scale=0.1)


def _sdpa_reference(qkv, heads, hd, scale=None):
    b, n, _ = qkv.shape
    q, k, v = qkv.double().reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(b, n, heads * hd)


@DTYPES
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows, d", [(1 * 49, 1024), (8 * 49, 1024), (64 * 49, 1024), (8 * 196, 512),
                                     (64 * 196, 512), (37, 1000), (5, 1023), (3, 4096), (7, 24), (2, 1), (3, 33)])
def test_layernorm_matches_torch(rows, d, residual, dtype):
    x = _randn(rows, d, dtype=dtype, seed=1)
    r = _randn(rows, d, dtype=dtype, seed=2)
    w, b = _ln_params(d, dtype)
    if residual:
        total, y = kernels.layernorm(x, w, b, 1e-5, residual=r)
        ref_sum = (x.float() + r.float()).to(dtype)
        assert torch.equal(total, ref_sum)
        source = ref_sum
    else:
        y = kernels.layernorm(x, w, b, 1e-5)
        source = x
    ref = torch.nn.functional.layer_norm(source.double(), (d,), w.double(), b.double(), 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert _max_err(y, ref) <= TOL[dtype]


@DTYPES
def test_layernorm_of_3d_tensors_and_constant_rows(dtype):
    x = _randn(4, 49, 512, dtype=dtype, seed=6)
    x[1, 7] = 0.25  # a constant row normalizes to beta
    w, b = _ln_params(512, dtype)
    y = kernels.layernorm(x, w, b)
    ref = torch.nn.functional.layer_norm(x.double(), (512,), w.double(), b.double(), 1e-5)
    assert _max_err(y, ref) <= TOL[dtype]
    assert torch.equal(y[1, 7], b)


def test_layernorm_misaligned_input_uses_the_scalar_path():
    x = _randn(65 * 1024 + 1, dtype=torch.float16, seed=5)[1:].reshape(65, 1024)  # 2-byte offset
    w, b = torch.ones(1024, device=DEV, dtype=torch.float16), torch.zeros(1024, device=DEV, dtype=torch.float16)
    y = kernels.layernorm(x, w, b)
    ref = torch.nn.functional.layer_norm(x.double(), (1024,), eps=1e-5)
    assert _max_err(y, ref) <= 2e-3




def test_layernorm_runs_on_the_current_stream():
    x = _randn(64 * 49, 1024, dtype=torch.float16, seed=7)
    w, b = _ln_params(1024, torch.float16)
    side = torch.cuda.Stream()
    slow_x = slow_copy(x, side)  # written on `side` late: a kernel on any other stream reads zeros
    with torch.cuda.stream(side):
        y = kernels.layernorm(slow_x, w, b)
    torch.cuda.current_stream().wait_stream(side)  # no device-wide synchronization
    ref = torch.nn.functional.layer_norm(x.double(), (1024,), w.double(), b.double(), 1e-5)
    assert _max_err(y, ref) <= 2e-3


def test_layernorm_errors_are_reported():
    x = _randn(2, 8192, dtype=torch.float32, seed=0)
    w, b = _ln_params(8192, torch.float32)
    with pytest.raises(kernels.KernelError, match="unsupported"):
        kernels.layernorm(x, w, b)
    with pytest.raises(ValueError, match="weight and bias need 8192 values"):
        kernels.layernorm(x, w[:10], b)
    with pytest.raises(ValueError, match="must be contiguous"):
        kernels.layernorm(x.t(), w[:2], b[:2])


@DTYPES
@pytest.mark.parametrize("heads", [16, 32])
@pytest.mark.parametrize("tokens", [49, 196])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_attention_matches_sdpa(batch, tokens, heads, dtype):
    hd = 32
    qkv = _randn(batch, tokens, 3 * heads * hd, dtype=dtype, seed=batch * 1000 + tokens + heads)
    out = kernels.attention(qkv, heads, hd)
    ref = _sdpa_reference(qkv, heads, hd)
    assert out.dtype == dtype and out.shape == ref.shape
    assert _max_err(out, ref) <= TOL[dtype]


@DTYPES
@pytest.mark.parametrize("tokens, heads", [(1, 4), (2, 3), (15, 2), (17, 5), (33, 2), (64, 3), (65, 1), (100, 2),
                                           (128, 2), (129, 2), (255, 1), (256, 2)])
@pytest.mark.parametrize("hd", [32, 64])
def test_attention_odd_sizes_and_head_dim_64(tokens, heads, hd, dtype):
    if tokens > kernels.attention_max_tokens(hd):
        pytest.skip(f"{tokens} tokens exceed the limit for head_dim {hd}")
    qkv = _randn(3, tokens, 3 * heads * hd, dtype=dtype, seed=tokens * 7 + hd)
    out = kernels.attention(qkv, heads, hd, scale=0.11)
    assert _max_err(out, _sdpa_reference(qkv, heads, hd, scale=0.11)) <= TOL[dtype]


@DTYPES
def test_attention_with_large_scores(dtype):
    # Peaked softmax rows (q and k scaled by 3: scores spread over tens of units) keep
    # their accuracy; v stays ~N(0, 1).
    qkv = _randn(8, 49, 3 * 32 * 32, dtype=dtype, seed=11)
    qkv[..., : 2 * 32 * 32] *= 3
    out = kernels.attention(qkv, 32, 32)
    assert _max_err(out, _sdpa_reference(qkv, 32, 32)) <= 3 * TOL[dtype]


def test_attention_runs_on_the_current_stream():
    qkv = _randn(64, 49, 3 * 1024, dtype=torch.float16, seed=12)
    side = torch.cuda.Stream()
    slow_qkv = slow_copy(qkv, side)
    with torch.cuda.stream(side):
        out = kernels.attention(slow_qkv, 32)
    torch.cuda.current_stream().wait_stream(side)
    assert _max_err(out, _sdpa_reference(qkv, 32, 32)) <= 2e-3


def test_attention_errors_are_reported():
    too_many = kernels.attention_max_tokens(32) + 1
    with pytest.raises(kernels.KernelError, match="unsupported"):
        kernels.attention(_randn(1, too_many, 96, dtype=torch.float16, seed=0), 1, 32)
    with pytest.raises(kernels.KernelError, match="unsupported"):
        kernels.attention(_randn(1, 8, 144, dtype=torch.float16, seed=0), 1, 48)
    with pytest.raises(kernels.KernelError, match="unsupported"):
        kernels.attention(_randn(1, 129, 192 * 2, dtype=torch.float32, seed=0), 2, 64)
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, N, 96\)"):
        kernels.attention(_randn(1, 8, 95, dtype=torch.float16, seed=0), 1, 32)
    with pytest.raises(ValueError, match="qkv has dtype bfloat16, which has no numpy equivalent"):
        kernels.attention(_randn(1, 8, 96, dtype=torch.bfloat16, seed=0), 1, 32)


# --- the launchers with every array kind (numpy, CuPy, CUDA array interface, DLPack) ---


def _needs_cuda_python():
    import importlib.util

    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.core") is None:
        pytest.skip("cuda.core is not installed (pip install 'trtvit_native[runtime-cu13]', or runtime-cu12)")


def test_launchers_wait_for_every_inputs_producer():
    _needs_cuda_python()
    from trtvit_native.arrays import DeviceArray, view_array

    x = _randn(64, 512, dtype=torch.float32, seed=31)
    w, b = _ln_params(512, torch.float32)
    ref = torch.nn.functional.layer_norm(x.double(), (512,), w.double(), b.double(), 1e-5)
    side = torch.cuda.Stream()
    # A torch tensor first, the weight from a slow producer behind the array interface.
    y = kernels.layernorm(x, StreamInterface(slow_copy(w, side), side), b)
    assert _max_err(y, ref) <= TOL[torch.float32]
    # Array-interface arrays only: the legacy stream, after each producer; the result names its stream.
    current = torch.cuda.current_stream()
    out = kernels.layernorm(StreamInterface(slow_copy(x, side), side), StreamInterface(w, current), DLPackOnly(b))
    assert isinstance(out, DeviceArray) and out.__cuda_array_interface__["stream"] == 1
    view_array(out, "y", torch.cuda.current_stream().cuda_stream)  # orders the current stream after it
    assert _max_err(torch.as_tensor(out, device=DEV), ref) <= TOL[torch.float32]


def test_launchers_take_host_arrays_and_answer_in_kind():
    _needs_cuda_python()
    import numpy as np

    x = _randn(64, 512, dtype=torch.float32, seed=21)
    r = _randn(64, 512, dtype=torch.float32, seed=22)
    w, b = _ln_params(512, torch.float32)
    total, want = kernels.layernorm(x, w, b, residual=r)
    got = kernels.layernorm(x.cpu().numpy(), w.cpu().numpy(), b.cpu().numpy(), residual=r.cpu().numpy())
    assert all(isinstance(g, np.ndarray) for g in got)
    assert np.array_equal(got[0], total.cpu().numpy()) and np.array_equal(got[1], want.cpu().numpy())
    cpu = kernels.layernorm(x.cpu(), w.cpu(), b.cpu())  # CPU torch tensors: copied, answered as CPU tensors
    assert isinstance(cpu, torch.Tensor) and cpu.device.type == "cpu"
    assert torch.equal(cpu, kernels.layernorm(x, w, b).cpu())
    qkv = _randn(2, 49, 3 * 64, dtype=torch.float16, seed=23)
    out = kernels.attention(qkv.cpu().numpy(), 2)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    assert np.array_equal(out, kernels.attention(qkv, 2).cpu().numpy())
    with pytest.raises(ValueError, match="x is in host memory and .* device memory|weight is in device memory"):
        kernels.layernorm(x.cpu().numpy(), w, b)


def test_launchers_take_cuda_array_interface_and_dlpack_arrays():
    _needs_cuda_python()
    from trtvit_native.arrays import DeviceArray

    qkv = _randn(4, 49, 3 * 128, dtype=torch.float16, seed=24)
    want = kernels.attention(qkv, 4)
    torch.cuda.synchronize()
    for wrapped in (CudaArrayOnly(qkv), DLPackOnly(qkv)):
        out = kernels.attention(wrapped, 4)
        assert isinstance(out, DeviceArray) and out.shape == tuple(want.shape)
        torch.cuda.synchronize()
        assert torch.equal(torch.as_tensor(out, device=DEV), want)
    x = _randn(7, 24, dtype=torch.float32, seed=25)
    w, b = _ln_params(24, torch.float32)
    y = kernels.layernorm(CudaArrayOnly(x), CudaArrayOnly(w), CudaArrayOnly(b))
    torch.cuda.synchronize()
    assert torch.equal(torch.as_tensor(y, device=DEV), kernels.layernorm(x, w, b))


def test_launchers_refuse_host_memory_behind_a_cuda_array_interface():
    _needs_cuda_python()
    import numpy as np

    host = np.zeros((1, 8, 96), np.float16)

    class HostPointer:
        __cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str,
                                    "data": (host.ctypes.data, False), "version": 3}

    with pytest.raises(ValueError, match="qkv cannot be used as an array"):
        kernels.attention(HostPointer(), 1)


def test_launchers_take_cupy_arrays_and_streams():
    _needs_cuda_python()
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    import cuda.core

    qkv_t = _randn(8, 49, 3 * 256, dtype=torch.float16, seed=26)
    want = kernels.attention(qkv_t, 8)
    torch.cuda.synchronize()
    qkv = cupy.asarray(qkv_t)
    out = kernels.attention(qkv, 8)
    assert isinstance(out, cupy.ndarray)
    assert torch.equal(torch.as_tensor(out, device=DEV), want)
    with cupy.cuda.Stream(non_blocking=True) as side:  # CuPy's current stream is the one used
        out = kernels.attention(qkv, 8)
        side.synchronize()
    assert torch.equal(torch.as_tensor(out, device=DEV), want)
    stream = cuda.core.Device().create_stream()
    try:
        for given in (stream, int(stream.handle), stream.handle, cupy.cuda.ExternalStream(int(stream.handle))):
            out = kernels.attention(qkv, 8, stream=given)
            stream.sync()
            assert torch.equal(torch.as_tensor(out, device=DEV), want)
    finally:
        stream.close()


def test_library_matches_its_python_mirror():
    lib = kernels.load_kernel_library()
    for hd in (16, 32, 48, 64, 128):
        assert lib.attention_max_tokens(hd) == kernels.attention_max_tokens(hd)


def test_cpp_example_passes(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("nvcc") is None:
        pytest.skip("cmake and nvcc are needed to build the C++ example")
    root = Path(__file__).resolve().parent.parent
    major, minor = torch.cuda.get_device_capability()
    subprocess.run([cmake, "-S", str(root), "-B", str(tmp_path), f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}-real"],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(tmp_path), "-j"], check=True, capture_output=True)
    result = subprocess.run([str(tmp_path / "examples" / "cpp" / "check_kernels")], capture_output=True, text=True)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


# --- the IPluginV3 plugins' enqueue, called as TensorRT calls it ---------------------

def _plugin_class(which):
    """(trt module, plugin class); skips where no TensorRT Python module is installed."""
    import trtvit_native as tv
    from trtvit_native import trt_plugins as tp

    try:
        trt = tv.get_backend().trt
    except tv.BackendError as e:
        pytest.skip(f"the plugin classes need a TensorRT module: {e}")
    return trt, tp.plugin_classes(trt)[which][0]


def _plugin_desc(trt, tensor):
    d = trt.PluginTensorDesc()
    d.dims = trt.Dims(list(tensor.shape))
    d.type = trt.DataType.HALF if tensor.dtype == torch.float16 else trt.DataType.FLOAT
    d.format = trt.TensorFormat.LINEAR
    return d


@DTYPES
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layernorm_plugin_enqueue(residual, dtype):
    from trtvit_native import trt_plugins as tp

    trt, plugin_cls = _plugin_class(tp.LAYERNORM)
    plugin = plugin_cls({"eps": 1e-5, "residual": int(residual)})
    x, r = _randn(8, 49, 1024, dtype=dtype, seed=21), _randn(8, 49, 1024, dtype=dtype, seed=22)
    w, b = _ln_params(1024, dtype)
    inputs = [x, r, w, b] if residual else [x, w, b]
    outputs = [torch.empty_like(x) for _ in range(2 if residual else 1)]
    stream = torch.cuda.current_stream()
    plugin.enqueue([_plugin_desc(trt, t) for t in inputs], [_plugin_desc(trt, t) for t in outputs],
                   [t.data_ptr() for t in inputs], [t.data_ptr() for t in outputs], 0, stream.cuda_stream)
    source = (x.float() + r.float()).to(dtype) if residual else x
    ref = torch.nn.functional.layer_norm(source.double(), (1024,), w.double(), b.double(), 1e-5)
    assert _max_err(outputs[0], ref) <= TOL[dtype]
    if residual:
        assert torch.equal(outputs[1], source)


@DTYPES
def test_attention_plugin_enqueue(dtype):
    from trtvit_native import trt_plugins as tp

    trt, plugin_cls = _plugin_class(tp.ATTENTION)
    plugin = plugin_cls({"heads": 32, "head_dim": 32, "scale": 32 ** -0.5})
    qkv = _randn(8, 49, 3 * 1024, dtype=dtype, seed=23)
    out = torch.empty(8, 49, 1024, dtype=dtype, device=DEV)
    plugin.enqueue([_plugin_desc(trt, qkv)], [_plugin_desc(trt, out)], [qkv.data_ptr()], [out.data_ptr()], 0,
                   torch.cuda.current_stream().cuda_stream)
    assert _max_err(out, _sdpa_reference(qkv, 32, 32)) <= TOL[dtype]


def test_attention_plugin_enqueue_reports_kernel_errors():
    from trtvit_native import trt_plugins as tp

    trt, plugin_cls = _plugin_class(tp.ATTENTION)
    plugin = plugin_cls({"heads": 1, "head_dim": 32, "scale": 0.125})
    qkv = _randn(1, 300, 96, dtype=torch.float16, seed=0)
    out = torch.empty(1, 300, 32, dtype=torch.float16, device=DEV)
    with pytest.raises(RuntimeError, match="trtvit::Attention: kernel launch failed: .*unsupported"):
        plugin.enqueue([_plugin_desc(trt, qkv)], [_plugin_desc(trt, out)], [qkv.data_ptr()], [out.data_ptr()], 0,
                       torch.cuda.current_stream().cuda_stream)
