"""Which TensorRT the package builds with.

Full TensorRT (``import tensorrt``) when importable, else TensorRT for RTX
(``import tensorrt_rtx``, ``pip install tensorrt-rtx``), whose builder runs without a GPU.
Both share the network-definition API used here; what only full TensorRT has (plugin
layers) lives in :mod:`trtvit_native.trt_plugins`. ``TRTVIT_BACKEND=tensorrt|tensorrt_rtx``
forces one.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional, Tuple

__all__ = ["Backend", "get_backend", "BackendError", "CollectingLogger"]

_CANDIDATES = ("tensorrt", "tensorrt_rtx")


class BackendError(RuntimeError):
    """No usable TensorRT module, or a requested feature the backend lacks."""


@dataclass(frozen=True)
class Backend:
    name: str  # "tensorrt" or "tensorrt_rtx"
    trt: ModuleType
    version: str

    @property
    def has_plugin_layers(self) -> bool:
        return hasattr(self.trt.INetworkDefinition, "add_plugin_v3")

    @property
    def has_attention_layer(self) -> bool:
        """The fused attention layer IAttention (``INetworkDefinition.add_attention``)."""
        return hasattr(self.trt.INetworkDefinition, "add_attention")

    @property
    def label(self) -> str:
        human = "TensorRT-RTX" if self.name == "tensorrt_rtx" else "TensorRT"
        return f"{human} {self.version} ({self.name})"


_cache: dict = {}


def get_backend(name: Optional[str] = None) -> Backend:
    """Import and describe the TensorRT module to build with (cached)."""
    name = name or os.environ.get("TRTVIT_BACKEND") or None
    if name is not None and name not in _CANDIDATES:
        raise BackendError(f"unknown TensorRT backend {name!r}; choose one of {', '.join(_CANDIDATES)}")
    key = name or "auto"
    if key in _cache:
        return _cache[key]
    errors = []
    for candidate in ([name] if name else _CANDIDATES):
        try:
            module = importlib.import_module(candidate)
        except ImportError as e:  # also covers a wheel whose native libraries are missing
            errors.append(f"{candidate}: {e}")
            continue
        backend = Backend(candidate, module, getattr(module, "__version__", "unknown"))
        _cache[key] = backend
        return backend
    raise BackendError("no TensorRT Python module could be imported (" + "; ".join(errors) + "). "
                       "Install full TensorRT, or TensorRT-RTX with `pip install tensorrt-rtx`.")


class CollectingLogger:
    """A TensorRT logger that keeps errors and warnings so failures can be reported."""

    def __new__(cls, trt: ModuleType, verbose: bool = False):
        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: List[Tuple[str, str]] = []

            def log(self, severity, msg):  # noqa: D401 - TensorRT callback
                level = str(severity).split(".")[-1]
                if severity <= trt.ILogger.Severity.WARNING or verbose:
                    self.messages.append((level, msg))

            def errors(self) -> List[str]:
                return [m for lvl, m in self.messages if lvl in ("ERROR", "INTERNAL_ERROR")]

        return _Logger()
