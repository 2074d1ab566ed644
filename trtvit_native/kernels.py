"""ctypes access to ``libtrtvit_kernels.so``, the fused CUDA kernels of ``plugins/``.

The library is found (in this order) at ``$TRTVIT_KERNELS_LIB``, inside the package
(``trtvit_native/lib/``, where ``pip install`` puts it when nvcc is present), or in the
CMake build folders ``build/`` and ``build/kernels/`` of a source checkout. Nothing is
loaded at import time, and importing needs neither torch nor a GPU.

:class:`KernelLibrary` offers three layers: host-only queries (no GPU needed); ``*_raw``
launchers that take device pointers as ints and a CUDA stream handle (int, 0 for the
legacy default stream) and return the C status code; and the same launchers without the
suffix, raising :class:`KernelError` on a non-zero status. :func:`layernorm` and
:func:`attention` are checked wrappers taking numpy, CuPy and torch arrays, or any array with
``__cuda_array_interface__`` or DLPack, and answering in the same kind (see
:mod:`trtvit_native.arrays`).
"""

from __future__ import annotations

import ctypes
import math
import operator
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    from .arrays import ArrayView

__all__ = ["LIBRARY_NAME", "KernelLibraryError", "KernelError", "KernelLibrary", "find_kernel_library",
           "load_kernel_library", "attention_max_tokens", "layernorm", "attention", "EXPORTED_SYMBOLS"]

LIBRARY_NAME = "libtrtvit_kernels.so"
# Status codes and dtype codes of plugins/trtvit_kernels.h.
OK, INVALID_ARGUMENT, UNSUPPORTED, CUDA_ERROR = 0, 1, 2, 3
FLOAT32, FLOAT16 = 0, 1
_DTYPE_CODES = {np.dtype(np.float32): FLOAT32, np.dtype(np.float16): FLOAT16}
LAYERNORM_MAX_D = 4096
# Mirrors trtvit_attention_max_tokens() (checked against the library by the tests), so
# shapes can be validated where the library is not present.
_ATTENTION_MAX_TOKENS = {32: 256, 64: 128}
# The C functions the library exports, and nothing else.
EXPORTED_SYMBOLS = ("trtvit_attention", "trtvit_attention_max_tokens", "trtvit_attention_supported",
                    "trtvit_kernels_version", "trtvit_last_cuda_error", "trtvit_layernorm", "trtvit_layernorm_residual",
                    "trtvit_status_string")

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
            "trtvit_last_cuda_error": ([ctypes.POINTER(ctypes.c_char_p)] * 2, i),
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

    def last_cuda_error(self) -> Tuple[int, str, str]:
        """The CUDA error behind this thread's last launcher or size-query call: (cudaError_t
        value, name, description); (0, "cudaSuccess", ...) when that call met none. The library
        links the CUDA runtime statically, so its errors never reach the caller's runtime."""
        name, description = ctypes.c_char_p(), ctypes.c_char_p()
        code = self._lib.trtvit_last_cuda_error(ctypes.byref(name), ctypes.byref(description))
        return code, (name.value or b"").decode(), (description.value or b"").decode()

    def describe(self, status: int) -> str:
        """The library's description of ``status`` returned by this thread's last call, with the
        CUDA error behind it where there is one (``...: cudaErrorNoKernelImageForDevice: no
        kernel image is available for execution on the device``)."""
        text = self.status_string(status)
        if status != OK:
            code, name, description = self.last_cuda_error()
            if code != 0:
                text += f": {name}: {description}"
        return text

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
            raise KernelError(function, status, self.describe(status))


C_INT_MAX = 2 ** 31 - 1


def _check_c_ints(function: str, **counts: int) -> None:
    """Every count an integer (any type with ``__index__``: int, numpy integers) that fits a C int."""
    for name, value in counts.items():
        try:
            if isinstance(value, (bool, np.bool_)):
                raise TypeError
            number = operator.index(value)
        except TypeError:
            raise ValueError(f"{function}: {name} = {value!r} is not an integer") from None
        if not -C_INT_MAX - 1 <= number <= C_INT_MAX:
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
# Array launchers: numpy, CuPy, torch, __cuda_array_interface__ and DLPack arrays
# --------------------------------------------------------------------------------------


def _run_stream(stream: Optional[int], first: Any) -> int:
    """The stream a launch runs on, chosen before any array is viewed (each view orders it
    after that array's producer): ``stream`` when given, else torch's or CuPy's current
    stream for a torch or CuPy first argument, else the legacy default stream."""
    from .arrays import LEGACY_STREAM, consumer_stream

    if stream is not None:
        return stream
    current = consumer_stream(first)
    return LEGACY_STREAM if current is None else current


def _stream_device(stream: int) -> Optional[int]:
    """The device of a stream handle (None: the legacy stream, the current device's)."""
    from .arrays import LEGACY_STREAM, CudaError

    if stream == LEGACY_STREAM:
        return None
    from cuda.bindings import driver

    err, dev = driver.cuStreamGetDevice(driver.CUstream(stream))
    if int(err) != 0:
        raise CudaError(f"cuStreamGetDevice of stream {stream:#x} failed: {err}")
    return int(dev)


def _views(what: str, stream: Optional[int], **named: Any) -> Tuple[Dict[str, "ArrayView"], int]:
    """Views of the array arguments, made for the run stream (returned with them), checked
    to share one place, dtype (float32 or float16) and device, device arrays C-contiguous;
    ValueError naming the argument otherwise."""
    from .arrays import ArrayError, view_array

    from .arrays import array_device, core, cuda_errors, device_scope, foreign_stream_context

    named = {n: a for n, a in named.items() if a is not None}
    run = _run_stream(stream, next(iter(named.values())))
    try:
        with cuda_errors():
            devices = {n: array_device(a) for n, a in named.items()}
            placed = {d for d in devices.values() if d is not None}
            if len(placed) > 1:
                raise ValueError(f"{what}: the arrays are on several devices ("
                                 + ", ".join(f"{n} on cuda:{d}" for n, d in devices.items() if d is not None) + ")")
            device = placed.pop() if placed else _stream_device(run)
            # Viewed in the arrays' device context: a view orders the run stream after the
            # array's producer with an event, which CUDA records only in its stream's context.
            with device_scope(device):
                foreign = foreign_stream_context(run, int(core().Device().device_id))
                if foreign is not None:
                    raise ValueError(f"{what}: {foreign}")
                views = {n: view_array(a, n, run) for n, a in named.items()}
    except ArrayError as e:
        raise ValueError(f"{what}: {e}") from None
    first = next(iter(views.values()))
    if first.dtype not in _DTYPE_CODES:
        raise ValueError(f"{what}: dtype {first.dtype.name} of {first.name} is not supported (float32 or float16)")
    for v in views.values():
        if v.on_device != first.on_device:
            place = lambda w: "device" if w.on_device else "host"  # noqa: E731
            raise ValueError(f"{what}: {v.name} is in {place(v)} memory and {first.name} in {place(first)} memory; "
                             f"pass all arrays in one place")
        if v.dtype != first.dtype:
            raise ValueError(f"{what}: {v.name} has dtype {v.dtype.name}, {first.name} {first.dtype.name}")
        if v.on_device and not v.contiguous:
            raise ValueError(f"{what}: {v.name} must be contiguous")
        if v.on_device and v.device != first.device:
            raise ValueError(f"{what}: {v.name} is on cuda:{v.device}, {first.name} on cuda:{first.device}")
    return views, run


def _launch(what: str, views: Dict[str, "ArrayView"], out_shapes: Sequence[Tuple[int, ...]],
            launch: Callable[[Dict[str, int], List[int], int], None], run: int) -> List[Any]:
    """Run ``launch(input pointers, output pointers, stream)`` on the arrays of ``views`` on
    stream ``run`` and return the outputs, new arrays of the first input's kind.

    Device outputs are allocated for ``run`` (a :class:`~trtvit_native.arrays.DeviceArray`
    names it as the stream of its pending writes; torch's allocator is told of it where it
    is not torch's current stream). Host arrays are copied to the GPU and back (the call
    waits for the results).
    """
    from . import arrays

    first = next(iter(views.values()))
    dtype = first.dtype
    if first.on_device:
        with arrays.device_scope(first.device):
            for v in views.values():
                if v.kind == "torch":
                    arrays.record_torch_stream(v.keep, run)
            outs = [arrays.empty_device(first.kind, shape, dtype, first.device, run) for shape in out_shapes]
            launch({n: v.ptr for n, v in views.items()}, [p for _, p in outs], run)
        return [o for o, _ in outs]

    with arrays.device_scope(_stream_device(run)) as dev:
        device = int(dev.device_id)
        inputs = {n: arrays.DeviceArray.from_host(v.host, device, run) for n, v in views.items()}
        outs = [arrays.DeviceArray(shape, dtype, device, run) for shape in out_shapes]
        launch({n: a.ptr for n, a in inputs.items()}, [o.ptr for o in outs], run)
        return [arrays.host_result(first.kind, o.copy_to_host(run)) for o in outs]


def _stream(stream: Any) -> Optional[int]:
    from .arrays import ArrayError, stream_handle

    try:
        return None if stream is None else stream_handle(stream)
    except ArrayError as e:
        raise ValueError(str(e)) from None


def layernorm(x: Any, weight: Any, bias: Any, eps: float = 1e-5, residual: Any = None,
              library: Optional[KernelLibrary] = None, stream: Any = None) -> Any:
    """LayerNorm over the last axis of ``x`` (float32 or float16; any array kind of
    :mod:`trtvit_native.arrays`, device arrays contiguous).

    Returns ``LN(x)``; with ``residual`` returns ``(x + residual, LN(x + residual))``, the
    sum rounded to the dtype and the LayerNorm taken of that rounded sum. Results are of
    ``x``'s kind. ``stream`` when given, else torch's current stream for a torch ``x``,
    CuPy's for a CuPy ``x``, else the legacy default stream; every argument is ordered after
    its producer on that stream. Host arrays are copied in and out.
    """
    handle = _stream(stream)
    views, run_stream = _views("layernorm", handle, x=x, weight=weight, bias=bias, residual=residual)
    vx = views["x"]
    if len(vx.shape) < 1 or vx.shape[-1] == 0:
        raise ValueError(f"layernorm: x needs a non-empty last axis, got shape {vx.shape}")
    d = vx.shape[-1]
    sizes = [math.prod(views[n].shape) for n in ("weight", "bias")]
    if sizes != [d, d]:
        raise ValueError(f"layernorm: weight and bias need {d} values, got {sizes[0]} and {sizes[1]}")
    if residual is not None and views["residual"].shape != vx.shape:
        raise ValueError(f"layernorm: residual shape {views['residual'].shape} differs from x {vx.shape}")
    dtype = _DTYPE_CODES[vx.dtype]
    rows = math.prod(vx.shape) // d
    lib = library or load_kernel_library()

    def run(ptr: Dict[str, int], out: List[int], s: int) -> None:
        if rows == 0:
            return
        if residual is None:
            lib.layernorm(ptr["x"], ptr["weight"], ptr["bias"], out[0], rows, d, eps, dtype, s)
        else:
            lib.layernorm_residual(ptr["x"], ptr["residual"], ptr["weight"], ptr["bias"], out[0], out[1], rows, d,
                                   eps, dtype, s)

    outs = _launch("layernorm", views, [vx.shape] * (1 if residual is None else 2), run, run_stream)
    return outs[0] if residual is None else (outs[0], outs[1])


def attention(qkv: Any, heads: int, head_dim: int = 32, scale: Optional[float] = None,
              library: Optional[KernelLibrary] = None, stream: Any = None) -> Any:
    """Fused attention of a packed (B, N, 3 * heads * head_dim) array -> (B, N, heads * head_dim).

    The last axis is laid out (3, heads, head_dim): q, k, v, then heads, as the output of
    one ``Linear(d, 3d)``. ``scale`` defaults to ``head_dim ** -0.5``. Array kinds and
    streams as :func:`layernorm`.
    """
    handle = _stream(stream)
    if heads <= 0 or head_dim <= 0:
        raise ValueError(f"attention: heads and head_dim must be positive, got {heads} and {head_dim}")
    views, run_stream = _views("attention", handle, qkv=qkv)
    view = views["qkv"]
    if len(view.shape) != 3 or view.shape[2] != 3 * heads * head_dim:
        raise ValueError(f"attention: qkv must have shape (B, N, {3 * heads * head_dim}) for {heads} heads of "
                         f"{head_dim}, got {view.shape}")
    b, n, _ = view.shape
    dtype = _DTYPE_CODES[view.dtype]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    lib = library or load_kernel_library()

    def run(ptr: Dict[str, int], out: List[int], s: int) -> None:
        if b * n:
            lib.attention(ptr["qkv"], out[0], b, n, heads, head_dim, scale, dtype, s)

    return _launch("attention", views, [(b, n, heads * head_dim)], run, run_stream)[0]
