"""trtvit_native: TRT-ViT as TensorRT engines built with the network API, no ONNX.

    import trtvit_native
    plan = trtvit_native.build_engine("trt-vit-c", fp16=True)   # serialized engine bytes

Main entry points: :func:`create_model` (PyTorch reference), :func:`save_weights` /
:func:`load_weights` (safetensors), :func:`build_network` / :func:`build_engine`
(TensorRT), :func:`interpret` (CPU execution of the built network),
:func:`parity_report` (layer-by-layer comparison with the reference), :func:`quantize`
(int8 / fp8 calibration with NVIDIA ModelOpt) and
:class:`EngineRunner` (running an engine on a GPU with numpy, CuPy, torch or any CUDA array,
without torch: TensorRT, cuda.core and numpy).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names and the module each lives in. Imported on first use, so that building an
# engine from a weights file never imports torch (it needs only numpy and TensorRT).
_EXPORTS = {
    "Backend": "backend", "BackendError": "backend", "get_backend": "backend",
    "VARIANTS": "variants", "VariantConfig": "variants", "count_macs": "variants", "expected_shapes": "variants",
    "get_config": "variants", "list_variants": "variants", "register_variant": "variants",
    "WeightsError": "weights", "load_arrays": "weights", "load_weights": "weights", "save_weights": "weights",
    "BuildError": "network", "BuiltNetwork": "network", "build_engine": "network", "build_network": "network",
    "TRTViT": "model", "count_parameters": "model", "create_model": "model", "synthetic_images": "model",
    "photographs": "model", "imagenet_normalize": "model",
    "InterpreterError": "interpreter", "interpret": "interpreter",
    "ParityReport": "parity", "parity_report": "parity",
    "EngineError": "runtime", "EngineRunner": "runtime", "EngineIO": "runtime",
    "ArrayError": "arrays", "DeviceArray": "arrays",
    "QuantizeError": "quantization", "quantize": "quantization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trtvit_native' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_plugins_with_full_tensorrt() -> None:
    """Register the trtvit::LayerNorm and trtvit::Attention plugin creators with full
    TensorRT when it is installed, so engines holding these plugins deserialize anywhere
    this package is imported. TensorRT-RTX has no plugin layers: nothing to do there."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return
    try:
        import tensorrt

        from .trt_plugins import register_plugins

        register_plugins(tensorrt)
    except Exception as e:  # a broken TensorRT install must not break the package import
        import warnings

        warnings.warn(f"trtvit_native: could not register the TensorRT plugins: {e}", RuntimeWarning, stacklevel=2)


_register_plugins_with_full_tensorrt()
