"""trtvit_native: TRT-ViT as TensorRT engines built with the network API, no ONNX.

    import trtvit_native
    plan = trtvit_native.build_engine("trt-vit-c", fp16=True)   # serialized engine bytes

Main entry points: :func:`create_model` (PyTorch reference), :func:`save_weights` /
:func:`load_weights` (safetensors), :func:`build_network` / :func:`build_engine`
(TensorRT), :func:`interpret` (CPU execution of the built network) and
:func:`parity_report` (layer-by-layer comparison with the reference).
"""

from .backend import Backend, BackendError, get_backend
from .interpreter import InterpreterError, interpret
from .model import (VARIANTS, TRTViT, VariantConfig, count_macs, count_parameters, create_model, get_config,
                    list_variants, register_variant, synthetic_images)
from .network import BuildError, BuiltNetwork, build_engine, build_network
from .parity import ParityReport, parity_report
from .weights import WeightsError, expected_shapes, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendError", "BuildError", "BuiltNetwork", "InterpreterError", "ParityReport", "TRTViT",
    "VARIANTS", "VariantConfig", "WeightsError", "build_engine", "build_network", "count_macs",
    "count_parameters", "create_model", "expected_shapes", "get_backend", "get_config", "interpret",
    "list_variants", "load_weights", "parity_report", "register_variant", "save_weights", "synthetic_images",
]
