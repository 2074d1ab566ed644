"""Safetensors weights: the file format, saving, memory-mapped loading and validation.

A weights file is one flat state dict of the PyTorch reference (BatchNorm running
statistics included), float32 or float16, with ``metadata={"arch": "<variant>", ...}``.
The key names are the reference's module paths and are part of the format; see
``weights/README.md``. Every problem with a file raises :class:`WeightsError` naming it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .model import VARIANTS, VariantConfig, get_config

__all__ = ["WeightsError", "FORMAT_VERSION", "expected_shapes", "save_weights", "load_weights",
           "validate_state_dict"]

FORMAT_VERSION = "trtvit_native/1"
SUPPORTED_DTYPES = (torch.float32, torch.float16)
_IGNORED_SUFFIX = ".num_batches_tracked"
_MAX_LISTED = 12

PathLike = Union[str, "os.PathLike[str]"]


class WeightsError(ValueError):
    """A weights file or state dict that cannot be used as-is; the message says why."""


def _summarize(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    if len(keys) <= _MAX_LISTED:
        return ", ".join(keys)
    return ", ".join(keys[:_MAX_LISTED]) + f", ... ({len(keys) - _MAX_LISTED} more, {len(keys)} in total)"


def expected_shapes(config: Union[str, VariantConfig], num_classes: int = 1000) -> Dict[str, Tuple[int, ...]]:
    """Every key a weights file of this variant holds, with its shape."""
    from .model import TRTViT

    config = get_config(config)
    with torch.device("meta"):
        model = TRTViT(config, num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(_IGNORED_SUFFIX)}


def validate_state_dict(state: Mapping[str, torch.Tensor], config: Union[str, VariantConfig],
                        source: str = "state dict") -> Dict[str, torch.Tensor]:
    """Check keys, shapes, dtypes and values of ``state`` against ``config``.

    Returns the state dict without ``num_batches_tracked`` entries. ``num_classes`` is
    whatever the head in ``state`` says; the head's two tensors must agree with each other.
    """
    config = get_config(config)
    bad_types = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise WeightsError(f"{source}: values must be torch tensors; not tensors: {_summarize(bad_types)}")
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)}
    num_classes = 1000
    head = state.get("head.weight")
    if head is not None and head.dim() == 2 and head.shape[0] >= 1:
        num_classes = int(head.shape[0])
    expected = expected_shapes(config, num_classes)

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_summarize(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_summarize(unexpected)}")
        raise WeightsError(f"{source} does not match variant {config.name!r}: " + "; ".join(parts))

    wrong = [f"{k} (expected {list(shape)}, got {list(state[k].shape)})"
             for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if wrong:
        raise WeightsError(f"{source}: {len(wrong)} tensors have the wrong shape for variant "
                           f"{config.name!r}: {_summarize(wrong)}")

    bad_dtype = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in state.items()
                 if v.dtype not in SUPPORTED_DTYPES]
    if bad_dtype:
        raise WeightsError(f"{source}: unsupported dtype (float32 or float16 expected): {_summarize(bad_dtype)}")

    non_finite = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if non_finite:
        raise WeightsError(f"{source}: non-finite values (NaN or Inf) in {_summarize(non_finite)}")

    negative_var = [k for k, v in state.items() if k.endswith(".running_var") and bool((v < 0).any())]
    if negative_var:
        raise WeightsError(f"{source}: negative BatchNorm running variance in {_summarize(negative_var)}")
    return state


def save_weights(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
                 arch: Union[str, VariantConfig], dtype: Optional[torch.dtype] = None,
                 metadata: Optional[Mapping[str, str]] = None) -> None:
    """Validate and write a weights file (atomically: temp file, then rename).

    ``dtype`` (``torch.float32`` or ``torch.float16``) converts every tensor; by default
    tensors keep their dtype.
    """
    from safetensors.torch import save_file

    config = get_config(arch)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise WeightsError(f"unsupported dtype {dtype}; weights files hold float32 or float16")
    state = validate_state_dict(state, config)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in state.items()}
    meta = {"arch": config.name, "format": FORMAT_VERSION,
            "num_classes": str(int(state["head.weight"].shape[0])),
            "config": json.dumps({"depths": list(config.depths), "widths": list(config.widths),
                                  "stem_width": config.stem_width, "mix_ratio": config.mix_ratio,
                                  "head_dim": config.head_dim, "mlp_ratio": config.mlp_ratio})}
    meta.update(metadata or {})
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_header(path: str) -> dict:
    """Parse the safetensors header ourselves, so a bad file gets a precise message."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(prefix, "little")
            if n <= 0 or n > size - 8 or n > 100 * 2**20:
                raise WeightsError(f"{path}: not a safetensors file or truncated "
                                   f"(header length {n} does not fit in a {size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a directory, not a weights file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise WeightsError(f"{path}: not a safetensors file (entry {key!r} has no data offsets)")
        end = max(end, int(offsets[1]))
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated: tensor data needs {8 + n + end} bytes, file has {size}")
    return header


def load_weights(path: PathLike, arch: Optional[Union[str, VariantConfig]] = None,
                 config: Optional[VariantConfig] = None) -> Dict[str, torch.Tensor]:
    """Load and validate a weights file, memory-mapped: tensors share the file's pages.

    ``arch`` (a variant name or config) must agree with the file's ``arch`` metadata; when
    omitted the metadata decides. ``config`` lets a custom, unregistered config check a
    file. Raises :class:`WeightsError` for every problem.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    header = _read_header(path)
    meta = header.get("__metadata__") or {}
    file_arch = meta.get("arch") if isinstance(meta, dict) else None
    if isinstance(arch, VariantConfig):
        config, arch = arch, arch.name
    if arch is not None and file_arch is not None and arch != file_arch:
        raise WeightsError(f"{path}: arch mismatch: the file holds {file_arch!r} weights, {arch!r} was requested")
    name = arch or file_arch
    if config is None:
        if name is None:
            raise WeightsError(f"{path}: no 'arch' in the file's metadata; pass arch= to say which variant it holds")
        if name not in VARIANTS:
            raise WeightsError(f"{path}: unknown arch {name!r}; known variants: {', '.join(sorted(VARIANTS))}")
        config = VARIANTS[name]
    try:
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a readable safetensors file: {e}") from None
    return validate_state_dict(state, config, source=path)
