"""ctypes access to ``libtrtvit_kernels.so``, the fused CUDA kernels of ``plugins/``.

The library is found (in this order) at ``$TRTVIT_KERNELS_LIB``, inside the package
(``trtvit_native/lib/``, where ``pip install`` puts it when nvcc is present), or in the
CMake build folders ``build/`` and ``build/kernels/`` of a source checkout. Nothing is
loaded at import time, and importing needs neither torch nor a GPU.

:class:`KernelLibrary` offers three layers: host-only queries (no GPU needed); ``*_raw``
launchers that take device pointers as ints and a CUDA stream handle (int, 0 for the
legacy default stream) and return the C status code; and the same launchers without the
suffix, raising :class:`KernelError` on a non-zero status. :func:`layernorm` and
:func:`attention` are checked wrappers for CUDA torch tensors.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

if TYPE_CHECKING:
    import torch

__all__ = ["LIBRARY_NAME", "KernelLibraryError", "KernelError", "KernelLibrary", "find_kernel_library",
           "load_kernel_library", "attention_max_tokens", "layernorm", "attention", "EXPORTED_SYMBOLS"]

LIBRARY_NAME = "libtrtvit_kernels.so"
# Status codes and dtype codes of plugins/trtvit_kernels.h.
OK, INVALID_ARGUMENT, UNSUPPORTED, CUDA_ERROR = 0, 1, 2, 3
FLOAT32, FLOAT16 = 0, 1
LAYERNORM_MAX_D = 4096
# Mirrors trtvit_attention_max_tokens() (checked against the library by the tests), so
# shapes can be validated where the library is not present.
_ATTENTION_MAX_TOKENS = {32: 256, 64: 128}
# The C functions the library exports, and nothing else.
EXPORTED_SYMBOLS = ("trtvit_attention", "trtvit_attention_max_tokens", "trtvit_attention_supported",
                    "trtvit_kernels_version", "trtvit_layernorm", "trtvit_layernorm_residual", "trtvit_status_string")

_ROOT = Path(__file__).resolve().parent


class KernelLibraryError(RuntimeError):
    """The kernel library is missing or is not the library this package expects."""


class KernelError(RuntimeError):
    """A launcher returned an error status; the message carries the library's description."""

    def __init__(self, function: str, status: int, description: str):
        super().__init__(f"{function}: {description} (status {status})")
        self.function = function
        self.status = status


def attention_max_tokens(head_dim: int) -> int:
    """Largest token count of the fused attention kernel for ``head_dim`` (0: unsupported)."""
    return _ATTENTION_MAX_TOKENS.get(int(head_dim), 0)


def _candidates() -> Tuple[Path, ...]:
    return (_ROOT / "lib" / LIBRARY_NAME, _ROOT.parent / "build" / LIBRARY_NAME,
            _ROOT.parent / "build" / "kernels" / LIBRARY_NAME)


def find_kernel_library() -> Optional[Path]:
    """Where the kernel library is, or None.

    ``$TRTVIT_KERNELS_LIB`` when set (None if it names no file), else the package's
    ``lib/`` folder, else ``build/`` and ``build/kernels/`` at the root of a source checkout.
    """
    env = os.environ.get("TRTVIT_KERNELS_LIB")
    if env:
        return Path(env) if Path(env).is_file() else None
    for candidate in _candidates():
        if candidate.is_file():
            return candidate
    return None


class KernelLibrary:
    """The loaded library with typed entry points (see ``plugins/trtvit_kernels.h``)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        try:
            self._lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise KernelLibraryError(f"cannot load the kernel library {self.path}: {e}") from None
        missing = [s for s in EXPORTED_SYMBOLS if not hasattr(self._lib, s)]
        if missing:
            raise KernelLibraryError(f"{self.path} is not the trtvit kernel library: missing {', '.join(missing)}")
        vp, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        signatures = {
            "trtvit_status_string": ([i], ctypes.c_char_p),
            "trtvit_kernels_version": ([], i),
            "trtvit_attention_max_tokens": ([i], i),
            "trtvit_attention_supported": ([i, i, i], i),
            "trtvit_layernorm": ([vp, vp, vp, vp, i, i, f, i, vp], i),
            "trtvit_layernorm_residual": ([vp, vp, vp, vp, vp, vp, i, i, f, i, vp], i),
            "trtvit_attention": ([vp, vp, i, i, i, i, f, i, vp], i),
        }
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = argtypes, restype

    def __repr__(self) -> str:
        return f"KernelLibrary({str(self.path)!r}, version {self.version()})"

    # --- host-only queries: no CUDA call, no GPU needed ---
    def status_string(self, status: int) -> str:
        """The library's description of a status code."""
        return self._lib.trtvit_status_string(int(status)).decode()

    def version(self) -> int:
        """major * 10000 + minor * 100 + patch."""
        return self._lib.trtvit_kernels_version()

    def attention_max_tokens(self, head_dim: int) -> int:
        """Largest token count of the attention kernel for ``head_dim`` (0: unsupported)."""
        return self._lib.trtvit_attention_max_tokens(int(head_dim))

    def attention_supported(self, tokens: int, head_dim: int, dtype: int) -> int:
        """Status of running ``tokens`` tokens in ``dtype`` on the current device (OK,
        UNSUPPORTED, ...); queries the device only for fp32 above 48 KB of shared memory."""
        _check_c_ints("trtvit_attention_supported", tokens=tokens, head_dim=head_dim, dtype=dtype)
        return self._lib.trtvit_attention_supported(tokens, head_dim, dtype)

    # --- raw launchers: device pointers and stream as ints; return the status code ---
    # Counts are C ints in the ABI: every one is checked here, so a count of 2^31 or more
    # is an error naming it, never a value ctypes wraps around.
    def layernorm_raw(self, x: int, gamma: int, beta: int, y: int, rows: int, d: int, eps: float, dtype: int,
                      stream: int) -> int:
        _check_c_ints("trtvit_layernorm", rows=rows, d=d, dtype=dtype)
        return self._lib.trtvit_layernorm(x, gamma, beta, y, rows, d, eps, dtype, stream)

    def layernorm_residual_raw(self, x: int, residual: int, gamma: int, beta: int, sum_out: int, y: int, rows: int,
                               d: int, eps: float, dtype: int, stream: int) -> int:
        _check_c_ints("trtvit_layernorm_residual", rows=rows, d=d, dtype=dtype)
        return self._lib.trtvit_layernorm_residual(x, residual, gamma, beta, sum_out, y, rows, d, eps, dtype, stream)

    def attention_raw(self, qkv: int, out: int, batch: int, tokens: int, heads: int, head_dim: int, scale: float,
                      dtype: int, stream: int) -> int:
        _check_c_ints("trtvit_attention", batch=batch, tokens=tokens, heads=heads, head_dim=head_dim, dtype=dtype)
        return self._lib.trtvit_attention(qkv, out, batch, tokens, heads, head_dim, scale, dtype, stream)

    # --- the same launchers, raising KernelError on a non-zero status ---
    def layernorm(self, x: int, gamma: int, beta: int, y: int, rows: int, d: int, eps: float, dtype: int,
                  stream: int = 0) -> None:
        """y = LN(x) over rows x d (device pointers); see trtvit_layernorm in the header."""
        self.check("trtvit_layernorm", self.layernorm_raw(x, gamma, beta, y, rows, d, eps, dtype, stream))

    def layernorm_residual(self, x: int, residual: int, gamma: int, beta: int, sum_out: int, y: int, rows: int,
                           d: int, eps: float, dtype: int, stream: int = 0) -> None:
        """sum_out = x + residual, y = LN(sum_out) (device pointers); see trtvit_layernorm_residual."""
        self.check("trtvit_layernorm_residual",
                   self.layernorm_residual_raw(x, residual, gamma, beta, sum_out, y, rows, d, eps, dtype, stream))

    def attention(self, qkv: int, out: int, batch: int, tokens: int, heads: int, head_dim: int, scale: float,
                  dtype: int, stream: int = 0) -> None:
        """Attention of a packed (batch, tokens, 3, heads, head_dim) buffer; see trtvit_attention."""
        self.check("trtvit_attention",
                   self.attention_raw(qkv, out, batch, tokens, heads, head_dim, scale, dtype, stream))

    def check(self, function: str, status: int) -> None:
        """Raise :class:`KernelError` for a non-zero ``status`` returned by ``function``."""
        if status != OK:
            raise KernelError(function, status, self.status_string(status))


C_INT_MAX = 2 ** 31 - 1


def _check_c_ints(function: str, **counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or not -C_INT_MAX - 1 <= value <= C_INT_MAX:
            raise ValueError(f"{function}: {name} = {value!r} does not fit the C ABI's int (at most {C_INT_MAX}); "
                             f"split the work into calls of fewer {name}")


_loaded: Dict[Path, KernelLibrary] = {}


def load_kernel_library(path: Union[None, str, Path] = None) -> KernelLibrary:
    """Load (once per path) the library at ``path``, or wherever :func:`find_kernel_library` finds it.

    Raises :class:`KernelLibraryError` naming what is wrong: no library found, a path that
    does not exist, a file that cannot be loaded, or a library without the trtvit functions.
    """
    if path is None:
        env = os.environ.get("TRTVIT_KERNELS_LIB")
        path = find_kernel_library()
        if path is None:
            where = (f"$TRTVIT_KERNELS_LIB={env} is not a file" if env else
                     f"looked at $TRTVIT_KERNELS_LIB, {_ROOT / 'lib'}, and build/ and build/kernels/ of a source "
                     f"checkout")
            raise KernelLibraryError(
                f"{LIBRARY_NAME} not found ({where}); build it with `cmake -S . -B build && cmake --build build -j` "
                f"(needs nvcc and CMake >= 3.24), or reinstall the package where nvcc is available")
    path = Path(path).resolve()
    if not path.is_file():
        raise KernelLibraryError(f"kernel library {path} does not exist")
    if path not in _loaded:
        _loaded[path] = KernelLibrary(path)
    return _loaded[path]


# --------------------------------------------------------------------------------------
# torch wrappers
# --------------------------------------------------------------------------------------


def _dtype_code(t: "torch.Tensor", what: str) -> int:
    import torch

    if t.dtype == torch.float32:
        return FLOAT32
    if t.dtype == torch.float16:
        return FLOAT16
    raise ValueError(f"{what}: dtype {t.dtype} is not supported (float32 or float16)")


def _check_cuda(what: str, **tensors: "torch.Tensor") -> None:
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if not t.is_cuda:
            raise ValueError(f"{what}: {name} must be a CUDA tensor, got device {t.device}")
        if t.device != first.device:
            raise ValueError(f"{what}: {name} is on {t.device}, not {first.device} like the others")
        if t.dtype != first.dtype:
            raise ValueError(f"{what}: {name} has dtype {t.dtype}, the others {first.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous")


def layernorm(x: "torch.Tensor", weight: "torch.Tensor", bias: "torch.Tensor", eps: float = 1e-5,
              residual: Optional["torch.Tensor"] = None,
              library: Optional[KernelLibrary] = None) -> Union["torch.Tensor", Tuple["torch.Tensor", "torch.Tensor"]]:
    """LayerNorm over the last axis of a CUDA tensor (float32 or float16, contiguous).

    Returns ``LN(x)``; with ``residual`` returns ``(x + residual, LN(x + residual))``, the
    sum rounded to the dtype and the LayerNorm taken of that rounded sum. Runs on the
    current torch stream of the tensors' device.
    """
    import torch

    lib = library or load_kernel_library()
    tensors = {"x": x, "weight": weight, "bias": bias}
    if residual is not None:
        tensors["residual"] = residual
    _check_cuda("layernorm", **tensors)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"layernorm: x needs a non-empty last axis, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if weight.numel() != d or bias.numel() != d:
        raise ValueError(f"layernorm: weight and bias need {d} values, got {weight.numel()} and {bias.numel()}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layernorm: residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    dtype = _dtype_code(x, "layernorm")
    rows = x.numel() // d
    y = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    if rows > 0:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        with torch.cuda.device(x.device):
            if residual is None:
                lib.layernorm(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), rows, d, eps, dtype,
                              stream)
            else:
                lib.layernorm_residual(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                       total.data_ptr(), y.data_ptr(), rows, d, eps, dtype, stream)
    return y if total is None else (total, y)


def attention(qkv: "torch.Tensor", heads: int, head_dim: int = 32, scale: Optional[float] = None,
              library: Optional[KernelLibrary] = None) -> "torch.Tensor":
    """Fused attention of a packed (B, N, 3 * heads * head_dim) CUDA tensor -> (B, N, heads * head_dim).

    The last axis is laid out (3, heads, head_dim): q, k, v, then heads, as the output of
    one ``Linear(d, 3d)``. ``scale`` defaults to ``head_dim ** -0.5``. Runs on the current
    torch stream of the tensor's device.
    """
    import torch

    lib = library or load_kernel_library()
    _check_cuda("attention", qkv=qkv)
    if heads <= 0 or head_dim <= 0:
        raise ValueError(f"attention: heads and head_dim must be positive, got {heads} and {head_dim}")
    if qkv.dim() != 3 or qkv.shape[2] != 3 * heads * head_dim:
        raise ValueError(f"attention: qkv must have shape (B, N, {3 * heads * head_dim}) for {heads} heads of "
                         f"{head_dim}, got {tuple(qkv.shape)}")
    b, n, _ = qkv.shape
    dtype = _dtype_code(qkv, "attention")
    out = torch.empty(b, n, heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    if b * n == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else float(scale)
    stream = torch.cuda.current_stream(qkv.device).cuda_stream
    with torch.cuda.device(qkv.device):
        lib.attention(qkv.data_ptr(), out.data_ptr(), b, n, heads, head_dim, scale, dtype, stream)
    return out
