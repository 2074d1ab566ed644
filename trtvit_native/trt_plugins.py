"""What only full TensorRT has: plugin layers for the fused CUDA kernels.

TensorRT-RTX has no plugin layers, so everything that touches them is kept here. The
rest of the package asks :func:`unavailable_reason` whether plugins can be used.
"""

from __future__ import annotations

from typing import Any, Optional

from .backend import Backend

__all__ = ["unavailable_reason", "define_network_with_plugins"]


def unavailable_reason(backend: Backend) -> Optional[str]:
    """None when the fused plugins can be used with ``backend``, else why not."""
    if not backend.has_plugin_layers:
        return f"{backend.label} has no plugin layers"
    return "the fused LayerNorm/attention plugins are not available in this version of trtvit_native"


def define_network_with_plugins(net: Any, config: Any, image_size: int) -> None:
    raise NotImplementedError(unavailable_reason(net))
