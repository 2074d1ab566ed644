"""The CUDA kernels against torch on the same GPU (``pytest -m gpu``).

Skipped, with the reason, where there is no CUDA GPU or no kernel library. Inputs are
rounded to the tested dtype; references are computed in fp32 from those same inputs.
"""

import pytest
import torch

from trtvit_native import kernels

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


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows, d", [(1 * 49, 1024), (8 * 49, 1024), (64 * 49, 1024), (8 * 196, 512),
                                     (64 * 196, 512), (37, 1000), (5, 1023), (3, 4096), (7, 24)])
def test_layernorm_matches_torch(rows, d, residual, dtype):
    x = _randn(rows, d, dtype=dtype, seed=1)
    r = _randn(rows, d, dtype=dtype, seed=2)
    w = _randn(d, dtype=dtype, seed=3, scale=0.5) + 1
    b = _randn(d, dtype=dtype, seed=4, scale=0.5)
    if residual:
        total, y = kernels.layernorm(x, w, b, 1e-5, residual=r)
        ref_sum = (x.float() + r.float()).to(dtype)
        assert torch.equal(total, ref_sum)
        source = ref_sum.float()
    else:
        y = kernels.layernorm(x, w, b, 1e-5)
        source = x.float()
    ref = torch.nn.functional.layer_norm(source, (d,), w.float(), b.float(), 1e-5)
    assert y.dtype == dtype
    assert (y.float() - ref).abs().max().item() <= TOL[dtype]


def test_layernorm_misaligned_input_uses_the_scalar_path():
    x = _randn(65 * 1024 + 1, dtype=torch.float16, seed=5)[1:].reshape(65, 1024)  # 2-byte offset
    w, b = torch.ones(1024, device=DEV, dtype=torch.float16), torch.zeros(1024, device=DEV, dtype=torch.float16)
    y = kernels.layernorm(x, w, b)
    ref = torch.nn.functional.layer_norm(x.float(), (1024,), eps=1e-5)
    assert (y.float() - ref).abs().max().item() <= 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("heads", [16, 32])
@pytest.mark.parametrize("tokens", [49, 196])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_attention_matches_sdpa(batch, tokens, heads, dtype):
    hd = 32
    qkv = _randn(batch, tokens, 3 * heads * hd, dtype=dtype, seed=batch * 1000 + tokens + heads)
    out = kernels.attention(qkv, heads, hd)
    q, k, v = qkv.float().reshape(batch, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, heads * hd)
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out.float() - ref).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("tokens, heads", [(1, 4), (33, 2), (64, 3), (65, 1), (129, 2), (256, 2)])
def test_attention_odd_sizes_and_head_dim_64(tokens, heads):
    for hd, limit in ((32, 256), (64, 128)):
        if tokens > limit:
            continue
        qkv = _randn(3, tokens, 3 * heads * hd, dtype=torch.float32, seed=tokens)
        out = kernels.attention(qkv, heads, hd)
        q, k, v = qkv.reshape(3, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, tokens, -1)
        assert (out - ref).abs().max().item() <= 1e-5


def test_attention_errors_are_reported():
    too_many = kernels.attention_max_tokens(32) + 1
    with pytest.raises(kernels.KernelError, match="unsupported"):
        kernels.attention(_randn(1, too_many, 96, dtype=torch.float16, seed=0), 1, 32)
    with pytest.raises(kernels.KernelError, match="unsupported"):
        kernels.attention(_randn(1, 8, 144, dtype=torch.float16, seed=0), 1, 48)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        kernels.attention(torch.zeros(1, 8, 96), 1, 32)
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, N, 96\)"):
        kernels.attention(_randn(1, 8, 95, dtype=torch.float16, seed=0), 1, 32)


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
