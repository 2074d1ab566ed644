"""Safetensors weights: the file format, saving, memory-mapped loading and validation.

A weights file is one flat state dict of the PyTorch reference (BatchNorm running
statistics included), float32 or float16, with ``metadata={"arch": "<variant>", ...}``.
The key names are the reference's module paths and are part of the format; see
``weights/README.md``. Every problem with a file raises :class:`WeightsError` naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from .variants import ARCHITECTURE_FIELDS, VARIANTS, VariantConfig, config_from_json, expected_shapes, get_config

if TYPE_CHECKING:  # torch is needed only by the functions that return torch tensors
    import torch

__all__ = ["WeightsError", "FORMAT_VERSION", "read_metadata", "class_names", "trained_image_size",
           "resolve_image_size", "looks_like_engine", "not_an_engine", "write_atomically", "check_output_path", "expected_shapes", "save_weights", "load_weights", "load_arrays",
           "validate_arrays", "validate_state_dict", "Quantization", "QUANT_PRECISIONS", "QUANT_METHODS",
           "quantizer_sites", "load_quantization", "is_quantized"]

FORMAT_VERSION = "trtvit_native/1"
_IGNORED_SUFFIX = ".num_batches_tracked"
_MAX_LISTED = 12
# safetensors dtype codes -> the names used in messages; only F32 and F16 are accepted.
_FILE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                "U8": "uint8", "BOOL": "bool"}
_SUPPORTED = {"float32": np.float32, "float16": np.float16}

PathLike = Union[str, "os.PathLike[str]"]


class WeightsError(ValueError):
    """A weights file or state dict that cannot be used as-is; the message says why."""


def _summarize(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    if len(keys) <= _MAX_LISTED:
        return ", ".join(keys)
    return ", ".join(keys[:_MAX_LISTED]) + f", ... ({len(keys) - _MAX_LISTED} more, {len(keys)} in total)"


def _check_layout(entries: Mapping[str, Tuple[Tuple[int, ...], str]], config: VariantConfig, source: str) -> None:
    """Keys, shapes and dtypes, from (shape, dtype name) per key; values are checked later."""
    num_classes = 1000
    head = entries.get("head.weight")
    if head is not None and len(head[0]) == 2 and head[0][0] >= 1:
        num_classes = int(head[0][0])
    expected = expected_shapes(config, num_classes)

    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_summarize(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_summarize(unexpected)}")
        raise WeightsError(f"{source} does not match variant {config.name!r}: " + "; ".join(parts))

    wrong = [f"{k} (expected {list(shape)}, got {list(entries[k][0])})"
             for k, shape in expected.items() if tuple(entries[k][0]) != shape]
    if wrong:
        raise WeightsError(f"{source}: {len(wrong)} tensors have the wrong shape for variant "
                           f"{config.name!r}: {_summarize(wrong)}")

    bad_dtype = [f"{k} ({dtype})" for k, (_, dtype) in entries.items() if dtype not in _SUPPORTED]
    if bad_dtype:
        raise WeightsError(f"{source}: unsupported dtype (float32 or float16 expected): {_summarize(bad_dtype)}")


def _check_values(arrays: Mapping[str, np.ndarray], source: str) -> None:
    non_finite = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    if non_finite:
        raise WeightsError(f"{source}: non-finite values (NaN or Inf) in {_summarize(non_finite)}")
    negative_var = [k for k, v in arrays.items() if k.endswith(".running_var") and (v < 0).any()]
    if negative_var:
        raise WeightsError(f"{source}: negative BatchNorm running variance in {_summarize(negative_var)}")


def _dtype_name(value: Any) -> str:
    return str(value.dtype).replace("torch.", "")


def validate_arrays(state: Mapping[str, Any], config: Union[str, VariantConfig],
                    source: str = "state dict") -> Dict[str, np.ndarray]:
    """Check a state dict (torch tensors or numpy arrays) and return it as numpy arrays.

    Arrays share memory with the tensors where the dtype allows. ``num_batches_tracked``
    entries are dropped; ``num_classes`` is whatever the head says.
    """
    config = get_config(config)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{source}: a state dict (mapping of names to tensors) is required, "
                           f"got {type(state).__name__}")
    bad_types = [k for k, v in state.items() if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
    if bad_types:
        raise WeightsError(f"{source}: values must be tensors or arrays; not tensors: {_summarize(bad_types)}")
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)}
    _check_layout({k: (tuple(v.shape), _dtype_name(v)) for k, v in state.items()}, config, source)
    arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in state.items()}
    _check_values(arrays, source)
    return arrays


def validate_state_dict(state: Mapping[str, "torch.Tensor"], config: Union[str, VariantConfig],
                        source: str = "state dict") -> Dict[str, "torch.Tensor"]:
    """Check a torch state dict against ``config``; returns it without ``num_batches_tracked``."""
    import torch

    bad_types = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise WeightsError(f"{source}: values must be torch tensors; not tensors: {_summarize(bad_types)}")
    validate_arrays(state, config, source)
    return {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)}


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The permissions a new file gets under the process umask (0o666 & ~umask): what files
    written through a temporary file and a rename get, rather than the temp file's 0600."""
    return 0o666 & ~current_umask()


def write_atomically(path: PathLike, data: bytes) -> None:
    """Write ``path`` through a temporary file in its directory and a rename, with the usual
    permissions. An error names ``path`` and leaves neither a partial ``path`` nor the
    temporary file."""
    import tempfile

    path = os.fspath(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".trtvit-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, new_file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def check_output_path(path: PathLike) -> None:
    """Fail before any work when ``path`` cannot become a file: a directory, a missing or
    non-directory parent, or a place this process cannot write. Errors name ``path``
    (as ValueError: the command line prints it as its one-line error)."""
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory; give the engine file's name")
    directory = os.path.dirname(os.path.abspath(path))
    ancestor = directory
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"output {path}: {ancestor} is a file, not a directory")
    if ancestor != directory:
        raise ValueError(f"output {path}: output directory {directory} does not exist")
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".trtvit-", suffix=".tmp", dir=directory)
    except OSError as e:
        raise ValueError(f"output {path}: cannot write to {directory} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"output {path} exists and is not a regular file")


def read_engine_json(path: PathLike, error: type = ValueError) -> Dict[str, Any]:
    """The JSON object in ``path`` (ENGINE.json, the metadata ``trtvit build`` writes beside an
    engine); ``error`` naming the file when it is not valid JSON or not an object. What it
    must contain is for each reader to check."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise error(f"{path} is not engine metadata written by trtvit build (not a JSON object)")
    return meta


def save_weights(model_or_state_dict: Union["torch.nn.Module", Mapping[str, "torch.Tensor"]], path: PathLike,
                 arch: Union[str, VariantConfig], dtype: Optional["torch.dtype"] = None,
                 metadata: Optional[Mapping[str, str]] = None) -> None:
    """Validate and write a weights file (atomically: temp file, then rename).

    ``dtype`` (``torch.float32`` or ``torch.float16``) converts every tensor; by default
    tensors keep their dtype.
    """
    import torch
    from safetensors.torch import save_file

    config = get_config(arch)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) \
        else dict(model_or_state_dict)
    if dtype is not None and dtype not in (torch.float32, torch.float16):
        raise WeightsError(f"unsupported dtype {dtype}; weights files hold float32 or float16")
    state = validate_state_dict(state, config)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in state.items()}
    meta = {"arch": config.name, "format": FORMAT_VERSION,
            "num_classes": str(int(state["head.weight"].shape[0])),
            "config": json.dumps(config.architecture())}
    meta.update(metadata or {})
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def looks_like_engine(prefix: bytes) -> bool:
    """Whether a file's first bytes are a serialized TensorRT engine's: full TensorRT's and
    TensorRT-RTX's plans begin with a four-byte tag ending in ``trt`` (``ftrt``, ``vtrt``)."""
    return len(prefix) >= 4 and prefix[1:4] == b"trt" and prefix[:1].isalpha()


def _not_weights(path: str, prefix: bytes) -> Optional[str]:
    """What a file that is not safetensors is, when its first bytes tell, as a message."""
    if looks_like_engine(prefix):
        sidecar = f"; {path}.json names the weights it was built from (weights_file)" \
            if os.path.isfile(path + ".json") else ""
        return (f"{path} is a TensorRT engine (a serialized plan), not a safetensors weights file: give the "
                f"weights file{sidecar}")
    if prefix[:1] in (b"{", b"["):
        return f"{path} is a JSON file, not a safetensors weights file"
    return None


def not_an_engine(path: PathLike) -> Optional[str]:
    """Why the file ``path`` is not a TensorRT engine, when its first bytes tell (a weights
    file, a JSON file), as a message; None otherwise."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(9)
    except OSError:
        return None
    if looks_like_engine(prefix):
        return None
    if len(prefix) == 9 and prefix[8:9] == b"{":
        try:  # a readable header names the variant for the command to suggest
            arch = read_metadata(path).get("arch")
        except WeightsError:
            arch = None
        build = f"trtvit build {arch or 'VARIANT'} --weights {path} -o ENGINE"
        return f"{path} is a safetensors weights file, not a TensorRT engine: build the engine from it ({build})"
    if prefix[:1] in (b"{", b"["):
        return f"{path} is a JSON file, not a TensorRT engine (an engine's metadata is ENGINE.json beside it)"
    return None


def _read_header(path: str) -> Tuple[dict, int]:
    """Parse the safetensors header ourselves, so a bad file gets a precise message."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(9)
            n = int.from_bytes(prefix[:8], "little")
            if len(prefix) < 9 or n <= 0 or n > size - 8 or n > 100 * 2**20 or prefix[8:9] != b"{":
                # not the header length and JSON object of a safetensors file: say what it is, when known
                other = _not_weights(path, prefix)
                if other is not None:
                    raise WeightsError(other)
            f.seek(8)
            if len(prefix) < 8:
                raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
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
    return header, 8 + n


def load_arrays(path: PathLike, arch: Optional[Union[str, VariantConfig]] = None,
                config: Optional[VariantConfig] = None) -> Dict[str, np.ndarray]:
    """Load and validate a weights file as numpy arrays memory-mapped from the file.

    ``arch`` (a variant name or config) must agree with the file's ``arch`` metadata; when
    omitted the metadata decides. ``config`` lets a custom, unregistered config check a
    file. Raises :class:`WeightsError` for every problem. Needs no torch.
    """
    path = os.fspath(path)
    header, data_start = _read_header(path)
    meta = header.pop("__metadata__", None) or {}
    file_arch = meta.get("arch") if isinstance(meta, dict) else None
    if isinstance(arch, VariantConfig):
        config, arch = arch, arch.name
    if arch is not None and file_arch is not None and arch != file_arch:
        raise WeightsError(f"{path}: arch mismatch: the file holds {file_arch!r} weights, {arch!r} was requested")
    name = arch or file_arch
    if config is None:
        if name is None:
            raise WeightsError(f"{path}: no 'arch' in the file's metadata; pass arch= to say which variant it holds")
        config = VARIANTS.get(name) or _recorded_config(meta, path)
        if config is None:
            raise WeightsError(f"{path}: unknown arch {name!r}; known variants: {', '.join(sorted(VARIANTS))}")
    _check_architecture(meta, config, path)
    quantized = isinstance(meta, dict) and _QUANT_KEY in meta
    entries = {k: (tuple(info.get("shape", ())), _FILE_DTYPES.get(info.get("dtype"), str(info.get("dtype"))))
               for k, info in header.items() if not k.endswith(_IGNORED_SUFFIX)
               and not (quantized and k.endswith(AMAX_SUFFIX))}
    _check_layout(entries, config, path)
    # One copy-on-write mapping of the file; every array is a view into it.
    mapping = np.memmap(path, dtype=np.uint8, mode="c")
    arrays = {}
    for key, (shape, dtype) in entries.items():
        begin, end = header[key]["data_offsets"]
        itemsize = np.dtype(_SUPPORTED[dtype]).itemsize
        if end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise WeightsError(f"{path}: entry {key!r} has {end - begin} bytes of data, its shape {list(shape)} "
                               f"and dtype {dtype} need {int(np.prod(shape)) * itemsize}")
        arrays[key] = mapping[data_start + begin:data_start + end].view(_SUPPORTED[dtype]).reshape(shape)
    _check_values(arrays, path)
    if quantized:  # every amax entry is checked whenever the file is read
        _quantization_from(header, meta, mapping, data_start, config, path, arrays)
    return arrays


def _recorded_architecture(meta: Mapping[str, str], path: str) -> Optional[Dict[str, Any]]:
    """The architecture a file records (its ``config`` metadata), or None (older files)."""
    raw = meta.get("config") if isinstance(meta, dict) else None
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError:
        raise WeightsError(f"{path}: metadata 'config' is not JSON") from None
    if not isinstance(fields, dict):
        raise WeightsError(f"{path}: metadata 'config' is not a JSON object of architecture fields")
    return fields


def _recorded_config(meta: Mapping[str, str], path: str) -> Optional[VariantConfig]:
    """The config of a custom (unregistered) variant, from the architecture its file records."""
    fields = _recorded_architecture(meta, path)
    if fields is None or not isinstance(meta.get("arch"), str):
        return None
    try:
        return config_from_json({"name": meta["arch"], **fields}, f"{path}: metadata 'config'")
    except ValueError as e:
        raise WeightsError(str(e)) from None


def _check_architecture(meta: Mapping[str, str], config: VariantConfig, path: str) -> None:
    """The file's recorded architecture must be ``config``'s: at mix_ratio 0.5, MixBlockA, B
    and C have the same keys and shapes, so only the record tells them apart. Fields a
    file does not record (files written before they existed) are not compared."""
    recorded = _recorded_architecture(meta, path)
    if recorded is None:
        return
    expected = config.architecture()
    differ = [f"{f} {recorded[f]!r} (the variant has {expected[f]!r})" for f in ARCHITECTURE_FIELDS
              if f in recorded and recorded[f] != expected[f]]
    if differ:
        raise WeightsError(f"{path}: architecture mismatch with {config.name!r}: the file records "
                           + ", ".join(differ))


def config_of_file(path: PathLike) -> VariantConfig:
    """The config of the variant a weights file holds: a registered one by its ``arch``, or
    the architecture the file records (a custom variant, e.g. from a JSON config)."""
    path = os.fspath(path)
    meta = read_metadata(path)
    name = meta.get("arch")
    if name is None:
        raise WeightsError(f"{path}: no 'arch' in the file's metadata; give the variant name")
    config = VARIANTS.get(name) or _recorded_config(meta, path)
    if config is None:
        raise WeightsError(f"{path}: unknown arch {name!r} and no recorded architecture; known variants: "
                           f"{', '.join(sorted(VARIANTS))}")
    return config


def resolve_config(variant: Union[None, str, "os.PathLike[str]", VariantConfig],
                   weights: Any = None) -> VariantConfig:
    """The config a command or function works with: ``variant`` (a config, a registered
    name or a JSON config file), or, where ``variant`` is None or names the custom variant
    a weights file ``weights`` holds, the architecture that file records."""
    if isinstance(variant, VariantConfig):
        return variant
    is_file = isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights)
    if variant is None:
        if not is_file:
            raise WeightsError("a variant name (or JSON config) is needed, or a weights file whose metadata names it")
        return config_of_file(weights)
    if isinstance(variant, str) and variant not in VARIANTS and not variant.endswith(".json") and is_file \
            and read_metadata(weights).get("arch") == variant:
        return config_of_file(weights)
    return get_config(variant)


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The ``__metadata__`` of a weights file (variant, class names, training record...)."""
    header, _ = _read_header(os.fspath(path))
    meta = header.get("__metadata__") or {}
    return dict(meta) if isinstance(meta, dict) else {}


def trained_image_size(path: PathLike) -> Optional[int]:
    """The image size a weights file was trained (or calibrated) at, from its ``image_size``
    metadata; None when it records none (seeded or converted weights)."""
    raw = read_metadata(path).get("image_size")
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise WeightsError(f"{path}: metadata 'image_size' is {raw!r}, not a whole number of pixels") from None


def _size_text(size: Any) -> str:
    return f"{size[0]}x{size[1]}" if isinstance(size, (tuple, list)) else f"{size}x{size}"


def resolve_image_size(weights: Optional[PathLike], given: Any, flag: str = "--image-size",
                       default: int = 224) -> Tuple[Any, str]:
    """The image size a command uses, and one line saying where it came from.

    ``given`` (an int or (H, W), from ``flag``) wins; else the size ``weights`` records
    (:func:`trained_image_size`); else ``default``. A given size that differs from the
    trained one is honoured, and the line says so."""
    if given is not None:
        try:  # only for the note: a file that cannot be read is the caller's to report
            trained = trained_image_size(weights) if weights is not None else None
        except WeightsError:
            trained = None
        note = ""
        if trained is not None and _size_text(given) != _size_text(trained):
            note = f"; the weights were trained at {_size_text(trained)}"
        return given, f"{_size_text(given)} ({flag}{note})"
    trained = trained_image_size(weights) if weights is not None else None
    if trained is not None:
        return trained, f"{_size_text(trained)} (the size {os.path.basename(os.fspath(weights))} was trained at)"
    why = "; the weights record no training size" if weights is not None else ""
    return default, f"{_size_text(default)} (default{why})"


def class_names(path: PathLike) -> Optional[List[str]]:
    """The class names a weights file records (``classes``, JSON list in output order), or None."""
    raw = read_metadata(path).get("classes")
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        raise WeightsError(f"{path}: metadata 'classes' is not a JSON list") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WeightsError(f"{path}: metadata 'classes' is not a JSON list of names")
    return names


def load_weights(path: PathLike, arch: Optional[Union[str, VariantConfig]] = None,
                 config: Optional[VariantConfig] = None) -> Dict[str, "torch.Tensor"]:
    """Load and validate a weights file as torch tensors memory-mapped from the file.

    See :func:`load_arrays` for ``arch`` and ``config``. Raises :class:`WeightsError`.
    """
    import torch

    return {k: torch.from_numpy(v) for k, v in load_arrays(path, arch, config).items()}


# --------------------------------------------------------------------------------------
# Quantized weights files: the weights plus the amax of every enabled quantizer
# --------------------------------------------------------------------------------------

QUANT_PRECISIONS = ("int8", "fp8")
QUANT_METHODS = ("max", "entropy", "percentile", "mse")
# Histogram calibration of FP8 ranges: ModelOpt 0.47 computes entropy and mse only for
# integer formats (it fails with a TypeError after the whole calibration pass).
FP8_METHODS = ("max", "percentile")
CONV_PRECISIONS = ("none", "int8")  # what an fp8 file does with the convolutions
FP8_WEIGHT_SCALES = ("per-tensor", "per-channel")
QUANT_FORMAT = "trtvit-quantized/3"
# Older formats still read: /2 for int8 files (an fp8 file of /2 lacks the attention's
# quantizers, which /3 added).
_INT8_FORMATS = ("trtvit-quantized/2",)
AMAX_SUFFIX = ".amax"
_QUANT_KEY = "quantization"
# The largest quantized magnitude: int8 [-128, 127] is scaled so amax maps to 127
# (ModelOpt's and TensorRT's convention); fp8 E4M3's largest finite value is 448.
QUANT_BOUNDS = {"int8": 127.0, "fp8": 448.0}
# The quantizers of an fp8 file's attention (ModelOpt's names for them): the scaled query,
# the key and the value entering the two products, and the softmax probabilities.
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")
# The probabilities lie in [0, 1] whatever the data: their amax is 1, not calibrated, as
# ModelOpt's FP8 ONNX exporter fixes their scale at 1/448. 1/448 is no fp16 number, and an
# fp16 network's quantize layer takes its scale in fp16, so the amax written is the one
# whose scale is the fp16 number just above 1/448 (the rule of every activation amax,
# :func:`trtvit_native.quantization.fp16_exact_amax`): 1.0006103515625, which a probability
# of 1 dequantizes to (code 448). Files must carry exactly this value.
SOFTMAX_AMAX = 1.0006103515625


def is_activation_quantizer(name: str) -> bool:
    """A quantizer of a tensor computed at run time (not of a weight)."""
    return not name.endswith(".weight_quantizer")


@dataclass(frozen=True)
class Site:
    """One quantizer of a quantized file: its amax shape (``()`` per tensor, ``(C,)`` per
    output channel) and the precision it quantizes to."""

    shape: Tuple[int, ...]
    precision: str


@dataclass(frozen=True)
class Quantization:
    """What a quantized weights file adds to the weights: the precision, how it was
    calibrated, and ``amax`` per quantizer path (``stem.conv.input_quantizer``: shape (),
    per tensor; ``stem.conv.weight_quantizer``: (out_channels,), per output channel).
    A quantizer's scale is ``amax / bound`` (127 for int8, 448 for fp8).

    ``precision`` is the file's: ``int8`` quantizes convolutions and GEMMs to int8; ``fp8``
    quantizes the GEMMs (the Transformer's linear layers, its LayerNorm inputs and residual
    adds, and the attention's two products) to fp8 and the convolutions as
    ``conv_precision`` says (``none``: left in floating point; ``int8``).
    :meth:`precision_of` gives each quantizer's. ``format``: the file's format version."""

    precision: str
    method: str
    images: int
    keep: Tuple[str, ...]
    modelopt: str
    amax: Dict[str, np.ndarray]
    conv_precision: str = "int8"
    fp8_weights: str = "per-tensor"
    format: str = QUANT_FORMAT

    def precision_of(self, quantizer: str) -> str:
        """``int8`` or ``fp8``: what ``quantizer`` quantizes to."""
        return self.precision if _gemm_group(quantizer.rsplit(".", 1)[0]) else self.conv_precision

    def bound_of(self, quantizer: str) -> float:
        return QUANT_BOUNDS[self.precision_of(quantizer)]

    def scale(self, quantizer: str) -> np.ndarray:
        """The quantizer's scale (float32): ``amax / bound``."""
        return (np.asarray(self.amax[quantizer], dtype=np.float32) / np.float32(self.bound_of(quantizer))
                ).astype(np.float32)

    @property
    def attention_modules(self) -> Tuple[str, ...]:
        """The attention modules the file quantizes (fp8 files: their four quantizers)."""
        return tuple(sorted(q[:-len(".q_bmm_quantizer")] for q in self.amax if q.endswith(".q_bmm_quantizer")))

    def precisions(self) -> Tuple[str, ...]:
        """The precisions the file quantizes to, e.g. ``("int8", "fp8")`` for a mixed file."""
        return tuple(p for p in QUANT_PRECISIONS if any(self.precision_of(q) == p for q in self.amax))

    def metadata(self) -> Dict[str, Any]:
        return {"format": self.format, "precision": self.precision, "conv_precision": self.conv_precision,
                "fp8_weights": self.fp8_weights, "method": self.method, "images": self.images,
                "keep": list(self.keep), "modelopt": self.modelopt}

    def describe(self) -> str:
        kept = f", keeping {','.join(self.keep)} unquantized" if self.keep else ""
        what = self.precision if self.precision == "int8" else \
            f"fp8 GEMMs{' and attention' if self.attention_modules else ''}, " \
            f"{'int8' if self.conv_precision == 'int8' else 'floating-point'} convolutions"
        return f"{what} ({self.method} calibration on {self.images} images{kept})"


def _gemm_group(module: str) -> bool:
    """Whether a module belongs to the GEMM part (inside a Transformer), which ``fp8``
    quantizes; the rest is the convolution part."""
    return ".transformer." in module + "."


def quantizable_modules(config: Union[str, VariantConfig], num_classes: int = 1000) -> Dict[str, str]:
    """The reference's modules that are quantized, with their kind: every convolution
    (``conv``), the Transformers' linear layers (``linear``) and LayerNorms (``norm``), the
    stem's max pooling (``pool``), every residual add (``add``, its residual operand) and
    the Transformers' attention (``attention``: its two products; fp8 files only). BatchNorm is left alone (folded into its convolution), and so is the classifier
    ``head``, the output layer, as ModelOpt's ONNX quantizer leaves it."""
    config = get_config(config)
    kinds = {4: "conv", 2: "linear", 1: "norm"}
    modules = {k[:-len(".weight")]: kinds[len(shape)] for k, shape in expected_shapes(config, num_classes).items()
               if k.endswith(".weight") and not k.endswith(".bn.weight") and k != "head.weight"}
    modules["stem.pool"] = "pool"
    for path, kind, _, cout, _ in config.blocks():
        if kind == "bottleneck":
            modules[f"{path}.add"] = "add"
        else:  # mix and Transformer blocks
            modules[f"{path}.transformer.attn_residual"] = modules[f"{path}.transformer.mlp_residual"] = "add"
            modules[f"{path}.transformer.attn"] = "attention"
            if kind == "mixblock" and 2 * config.mix_dim_of(cout) == cout:  # the mix block's local residual
                modules[f"{path}.local_add"] = "add"
            modules[f"{path}.add"] = "add"
    return modules


def _kept(module: str, keep: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in keep)


def check_keep(config: Union[str, VariantConfig], keep: Iterable[str], precision: str = "int8",
               conv_precision: str = "int8") -> Tuple[str, ...]:
    """Module prefixes to leave unquantized; each must name at least one module the recipe
    (``precision``, ``conv_precision``) quantizes."""
    modules = {q.rsplit(".", 1)[0] for q in quantizer_sites(config, (), 1000, precision, conv_precision)}
    keep = tuple(p.strip().rstrip(".") for p in keep if p.strip())
    for p in keep:
        if not any(_kept(m, [p]) for m in modules):
            quantized = any(_kept(m, [p]) for m in quantizable_modules(config))
            raise WeightsError(f"--keep {p!r} names no module of {get_config(config).name} that "
                               f"{'this recipe (--precision ' + precision + ') quantizes' if quantized else 'is quantized'}"
                               f" (modules are e.g. stem.conv, stages.3.1.transformer, stages.0.0.conv1, "
                               f"stages.0.1.add)")
    return keep


def quantizer_sites(config: Union[str, VariantConfig], keep: Iterable[str] = (), num_classes: int = 1000,
                    precision: str = "int8", conv_precision: str = "int8",
                    fp8_weights: str = "per-tensor") -> Dict[str, Site]:
    """Every enabled quantizer of a variant (path -> :class:`Site`): the input of each
    quantized module, per tensor, and the weight of each convolution and linear layer,
    per output channel (fp8 weights per tensor unless ``fp8_weights="per-channel"``), and of
    an fp8 file the attention's operands (:data:`ATTENTION_QUANTIZERS`, per tensor); none
    inside the ``keep`` prefixes, none of the convolution part where ``precision`` is fp8
    and ``conv_precision`` is ``none``.

    The attention's products stay in floating point in int8 files: int8 codes are uniform
    (a step of amax / 127), so softmax probabilities, most of them far below their amax of
    1, would keep a few significant bits at best; fp8 codes are relative (3 mantissa bits
    at every magnitude), and FP8 attention is what TensorRT fuses (README, "Quantize")."""
    shapes = expected_shapes(config, num_classes)
    sites: Dict[str, Site] = {}
    for module, kind in quantizable_modules(config, num_classes).items():
        site_precision = precision if _gemm_group(module) else ("int8" if precision == "int8" else conv_precision)
        if _kept(module, keep) or site_precision == "none":
            continue
        if kind == "attention":
            if site_precision == "fp8":
                sites.update({f"{module}.{q}": Site((), "fp8") for q in ATTENTION_QUANTIZERS})
            continue
        sites[f"{module}.input_quantizer"] = Site((), site_precision)
        if kind in ("conv", "linear"):
            per_channel = site_precision == "int8" or fp8_weights == "per-channel"
            sites[f"{module}.weight_quantizer"] = Site((shapes[f"{module}.weight"][0],) if per_channel else (),
                                                       site_precision)
    return sites


def is_quantized(path: PathLike) -> bool:
    """Whether a weights file carries quantization (amax values)."""
    return _QUANT_KEY in read_metadata(path)


def _parse_quant_meta(raw: Any, path: str) -> Dict[str, Any]:
    try:
        info = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        raise WeightsError(f"{path}: metadata {_QUANT_KEY!r} is not JSON") from None
    if not isinstance(info, dict):
        raise WeightsError(f"{path}: metadata {_QUANT_KEY!r} is not a JSON object")
    fmt = info.get("format", "trtvit-quantized/1")
    if fmt != QUANT_FORMAT and not (fmt in _INT8_FORMATS and info.get("precision") == "int8"):
        if fmt not in _INT8_FORMATS + ("trtvit-quantized/1",):
            raise WeightsError(f"{path}: quantization format {fmt!r} is not one this version reads ({QUANT_FORMAT!r}"
                               f"): written by a newer trtvit_native, or not by trtvit quantize")
        since = "the attention products of fp8 files are" if fmt in _INT8_FORMATS else \
            "residual adds and pooling are"
        raise WeightsError(f"{path}: quantization format {fmt!r}, this version reads {QUANT_FORMAT!r} ({since} "
                           f"quantized since): quantize the unquantized weights again with trtvit quantize")
    if info.get("precision") not in QUANT_PRECISIONS:
        raise WeightsError(f"{path}: quantized to precision {info.get('precision')!r}, which this version does not "
                           f"carry ({', '.join(QUANT_PRECISIONS)})")
    if info.get("method") not in QUANT_METHODS:
        raise WeightsError(f"{path}: unknown calibration method {info.get('method')!r} ({', '.join(QUANT_METHODS)})")
    conv = info.get("conv_precision")
    if conv not in (("int8",) if info["precision"] == "int8" else CONV_PRECISIONS):
        raise WeightsError(f"{path}: conv_precision {conv!r} is not one of "
                           f"{'int8' if info['precision'] == 'int8' else ', '.join(CONV_PRECISIONS)} for a "
                           f"{info['precision']} file")
    if info.get("fp8_weights") not in FP8_WEIGHT_SCALES:
        raise WeightsError(f"{path}: fp8_weights {info.get('fp8_weights')!r} is not one of "
                           f"{', '.join(FP8_WEIGHT_SCALES)}")
    keep = info.get("keep", [])
    if not (isinstance(keep, list) and all(isinstance(k, str) for k in keep)):
        raise WeightsError(f"{path}: metadata {_QUANT_KEY!r}: 'keep' is not a list of module prefixes")
    return info


def check_amax(amax: Mapping[str, np.ndarray], where: str) -> None:
    """Every amax finite and positive (and the softmax quantizers' :data:`SOFTMAX_AMAX`),
    or a WeightsError naming the quantizers."""
    bad = {"not finite": [q for q, v in amax.items() if not np.isfinite(v).all()]}
    bad["zero"] = [q for q, v in amax.items() if q not in bad["not finite"] and (v == 0).any()]
    bad["negative"] = [q for q, v in amax.items() if q not in bad["not finite"] and (v < 0).any()]
    bad[f"other than {SOFTMAX_AMAX!r} (the probabilities' fixed range)"] = [
        q for q, v in amax.items() if q.endswith(".softmax_quantizer") and float(np.asarray(v).reshape(-1)[0]) !=
        SOFTMAX_AMAX and q not in bad["not finite"]]
    for problem, names in bad.items():
        if names:
            raise WeightsError(f"{where}: amax {problem} in {_summarize(q + AMAX_SUFFIX for q in names)}")


def _quantization_from(header: dict, meta: Mapping[str, str], mapping: np.ndarray, data_start: int,
                       config: VariantConfig, path: str, arrays: Mapping[str, np.ndarray]) -> Quantization:
    info = _parse_quant_meta(meta.get(_QUANT_KEY), path)
    keep = tuple(info.get("keep", []))
    sites = quantizer_sites(config, keep, int(arrays["head.weight"].shape[0]), info["precision"],
                            info["conv_precision"], info["fp8_weights"])
    found = {k[:-len(AMAX_SUFFIX)]: k for k in header if k.endswith(AMAX_SUFFIX)}
    unknown = sorted(set(found) - set(sites))
    if unknown:
        modules = set(quantizable_modules(config)) | {k.rsplit(".", 1)[0] for k in expected_shapes(config)}
        kept = [q for q in unknown if q.rsplit(".", 1)[0] in modules]
        what = "of a module left unquantized or a quantizer that does not exist" if kept else \
            "for a module that does not exist"
        raise WeightsError(f"{path}: amax {what}: {_summarize(q + AMAX_SUFFIX for q in unknown)}")
    missing = sorted(set(sites) - set(found))
    if missing:
        raise WeightsError(f"{path}: amax missing for {len(missing)} quantizers: "
                           f"{_summarize(q + AMAX_SUFFIX for q in missing)}")
    amax: Dict[str, np.ndarray] = {}
    for q, key in found.items():
        entry = header[key]
        dtype = _FILE_DTYPES.get(entry.get("dtype"), str(entry.get("dtype")))
        shape, want = tuple(entry.get("shape", ())), sites[q].shape
        if dtype != "float32":
            raise WeightsError(f"{path}: {key} is {dtype}, amax values are float32")
        if shape != want and not (want == () and shape == (1,)):
            raise WeightsError(f"{path}: {key} has shape {list(shape)}, expected {list(want)}")
        begin, end = entry["data_offsets"]
        if end - begin != 4 * int(np.prod(shape, dtype=np.int64)):
            raise WeightsError(f"{path}: entry {key!r} has {end - begin} bytes of data for shape {list(shape)}")
        amax[q] = mapping[data_start + begin:data_start + end].view(np.float32).reshape(want)
    check_amax(amax, path)
    return Quantization(info["precision"], info["method"], int(info.get("images", 0)), keep,
                        str(info.get("modelopt", "")), amax, info["conv_precision"], info["fp8_weights"],
                        info["format"])


def load_quantization(path: PathLike, arch: Optional[Union[str, VariantConfig]] = None,
                      precision: Optional[str] = None) -> Optional[Quantization]:
    """The quantization a weights file carries (validated with the weights), or None for an
    unquantized file. ``precision`` (``int8``/``fp8``), when given, must be the file's."""
    path = os.fspath(path)
    arrays = load_arrays(path, arch)
    header, data_start = _read_header(path)
    meta = header.pop("__metadata__", None) or {}
    if _QUANT_KEY not in meta:
        if precision is not None:
            raise WeightsError(f"{path} is not quantized: it carries no {precision} amax values (trtvit quantize "
                               f"makes a quantized file)")
        return None
    config = resolve_config(arch, path)
    mapping = np.memmap(path, dtype=np.uint8, mode="c")
    q = _quantization_from(header, meta, mapping, data_start, config, path, arrays)
    if precision is not None and precision != q.precision:
        raise WeightsError(f"{path} carries {q.precision} quantization, not {precision}")
    return q
