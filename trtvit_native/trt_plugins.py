"""The fused CUDA LayerNorm and attention kernels as TensorRT IPluginV3 plugins.

Everything that needs plugin layers — which full TensorRT has and TensorRT-RTX does not —
lives in this module:

* ``LayerNorm`` (namespace ``trtvit``, version ``1``): inputs ``x`` (rows..., d),
  [``residual``], ``gamma``, ``beta``; fields ``eps`` and ``residual``. Without residual it
  outputs ``LN(x)``; with it, outputs ``LN(x + r)`` and ``s = x + r`` (the pre-norm
  Transformer's attention residual and its norm2 in one pass).
* ``Attention`` (namespace ``trtvit``, version ``1``): input the packed qkv projection
  (B, N, 3*heads*head_dim), laid out (3, heads, head_dim); output (B, N, heads*head_dim);
  fields ``heads``, ``head_dim``, ``scale``.

``enqueue`` calls the C launchers of ``libtrtvit_kernels.so`` (see ``plugins/``) through
ctypes on TensorRT's stream. The plugin classes derive from the backend module's
interface classes, so they are made per TensorRT module by :func:`plugin_classes`.
The CPU interpreter executes plugin layers with :func:`reference_layer_norm` and
:func:`reference_attention`, the torch definitions of what the kernels compute.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .backend import Backend

if TYPE_CHECKING:
    import torch

__all__ = ["NAMESPACE", "VERSION", "LAYERNORM", "ATTENTION", "PluginError", "unavailable_reason", "plugin_classes",
           "register_plugins", "add_layer_norm", "add_attention", "reference_layer_norm", "reference_attention",
           "interpret_plugin_layer", "plugin_layer_fields"]

NAMESPACE = "trtvit"
VERSION = "1"
LAYERNORM = "LayerNorm"
ATTENTION = "Attention"


class PluginError(ValueError):
    """Bad plugin fields, shapes or formats; the message names the plugin and the problem."""


def unavailable_reason(backend: Backend) -> Optional[str]:
    """None when the fused plugins can be used with ``backend``, else why not."""
    if not backend.has_plugin_layers:
        return f"{backend.label} has no plugin layers"
    from .kernels import find_kernel_library

    if find_kernel_library() is None:
        return ("the CUDA kernel library libtrtvit_kernels.so was not found (build it with "
                "`cmake -S . -B build && cmake --build build`, or reinstall with nvcc present, "
                "or point TRTVIT_KERNELS_LIB at it)")
    return None


# --------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------

_FIELD_SPECS = {
    LAYERNORM: {"eps": np.float32, "residual": np.int32},
    ATTENTION: {"heads": np.int32, "head_dim": np.int32, "scale": np.float32},
}


def _parse_fields(plugin: str, fields: Dict[str, Any]) -> Dict[str, Any]:
    """Validate plugin fields (from a PluginFieldCollection or keyword arguments)."""
    spec = _FIELD_SPECS[plugin]
    unknown = sorted(set(fields) - set(spec))
    missing = sorted(set(spec) - set(fields))
    if unknown or missing:
        raise PluginError(f"{NAMESPACE}::{plugin}: " + "; ".join(
            p for p in (f"unknown fields {unknown}" if unknown else "",
                        f"missing fields {missing}" if missing else "") if p))
    values = {}
    for name, dtype in spec.items():
        arr = np.asarray(fields[name]).reshape(-1)
        if arr.size != 1:
            raise PluginError(f"{NAMESPACE}::{plugin}: field {name!r} must hold one value, got {arr.size}")
        values[name] = float(arr[0]) if dtype is np.float32 else int(arr[0])
    if plugin == LAYERNORM:
        if not values["eps"] > 0:
            raise PluginError(f"{NAMESPACE}::{LAYERNORM}: eps must be positive, got {values['eps']}")
        if values["residual"] not in (0, 1):
            raise PluginError(f"{NAMESPACE}::{LAYERNORM}: residual must be 0 or 1, got {values['residual']}")
    else:
        if values["heads"] < 1:
            raise PluginError(f"{NAMESPACE}::{ATTENTION}: heads must be positive, got {values['heads']}")
        if values["head_dim"] not in (32, 64):
            raise PluginError(f"{NAMESPACE}::{ATTENTION}: head_dim {values['head_dim']} is not supported "
                              f"(the kernel handles 32 and 64)")
        if not values["scale"] > 0:
            raise PluginError(f"{NAMESPACE}::{ATTENTION}: scale must be positive, got {values['scale']}")
    return values


def _collection_to_dict(fc: Any) -> Dict[str, Any]:
    return {fc[i].name: np.array(fc[i].data, copy=True) for i in range(len(fc))}


def _field_collection(trt: ModuleType, plugin: str, values: Dict[str, Any]) -> Tuple[Any, List[np.ndarray]]:
    """A PluginFieldCollection of ``values`` and the arrays it points into (keep them alive)."""
    kinds = {np.float32: trt.PluginFieldType.FLOAT32, np.int32: trt.PluginFieldType.INT32}
    arrays = {k: np.array([v], dtype=_FIELD_SPECS[plugin][k]) for k, v in values.items()}
    fields = [trt.PluginField(k, a, kinds[a.dtype.type]) for k, a in arrays.items()]
    return trt.PluginFieldCollection(fields), list(arrays.values())


# --------------------------------------------------------------------------------------
# Plugin classes, made per TensorRT module
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def plugin_classes(trt: ModuleType) -> Dict[str, Tuple[type, type]]:
    """{plugin name: (plugin class, creator class)} built on ``trt``'s interface classes."""

    def volume(dims: Sequence[int]) -> int:
        return int(np.prod([int(d) for d in dims], dtype=np.int64))

    def check_status(plugin: str, status: int) -> None:
        if status != 0:
            from .kernels import load_kernel_library

            raise RuntimeError(f"{NAMESPACE}::{plugin}: kernel launch failed: "
                               f"{load_kernel_library().describe(status)}")

    class _Base(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        name = ""

        def __init__(self, fields: Dict[str, Any], phase: Any = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.fields = _parse_fields(self.name, fields)
            self.plugin_namespace = NAMESPACE
            self.plugin_name = self.name
            self.plugin_version = VERSION
            self.phase = phase
            self._serialized: List[np.ndarray] = []  # keeps field buffers alive for TensorRT

        # --- IPluginV3 / core ---
        def get_capability_interface(self, capability: Any) -> Any:
            return self

        def clone(self) -> Any:
            return type(self)(dict(self.fields), self.phase)

        def get_fields_to_serialize(self) -> Any:
            collection, self._serialized = _field_collection(trt, self.name, self.fields)
            return collection

        # --- build ---
        def get_output_data_types(self, input_types: Sequence[Any]) -> List[Any]:
            return [input_types[0]] * self.num_outputs

        def supports_format_combination(self, pos: int, in_out: Sequence[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in (trt.DataType.FLOAT, trt.DataType.HALF)
            return desc.type == in_out[0].desc.type

        def configure_plugin(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
            pass

        def get_workspace_size(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
            return 0

        def get_valid_tactics(self) -> List[int]:
            return []

        # --- runtime ---
        def set_tactic(self, tactic: int) -> None:
            pass

        def on_shape_change(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
            self.check_shapes([tuple(int(d) for d in t.dims) for t in inputs])

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def dtype_code(self, dtype: Any) -> int:
            if dtype == trt.DataType.FLOAT:
                return 0
            if dtype == trt.DataType.HALF:
                return 1
            raise PluginError(f"{NAMESPACE}::{self.name}: unsupported data type {dtype} (float32 or float16)")

    class LayerNormPlugin(_Base):
        name = LAYERNORM

        def __init__(self, fields: Dict[str, Any], phase: Any = None):
            super().__init__(fields, phase)
            self.num_outputs = 2 if self.fields["residual"] else 1

        @property
        def num_inputs(self) -> int:
            return 4 if self.fields["residual"] else 3

        def get_output_shapes(self, inputs: Sequence[Any], shape_inputs: Sequence[Any], expr_builder: Any) -> List[Any]:
            return [trt.DimsExprs(inputs[0]) for _ in range(self.num_outputs)]

        def check_shapes(self, shapes: Sequence[Tuple[int, ...]]) -> None:
            if len(shapes) != self.num_inputs:
                raise PluginError(f"{NAMESPACE}::{LAYERNORM}: expected {self.num_inputs} inputs "
                                  f"(x{', residual' if self.fields['residual'] else ''}, gamma, beta), got {len(shapes)}")
            x = shapes[0]
            d = x[-1]
            if self.fields["residual"] and shapes[1] != x:
                raise PluginError(f"{NAMESPACE}::{LAYERNORM}: residual shape {shapes[1]} differs from input {x}")
            for label, shape in zip(("gamma", "beta"), shapes[-2:]):
                if volume(shape) != d:
                    raise PluginError(f"{NAMESPACE}::{LAYERNORM}: {label} has {volume(shape)} values, "
                                      f"the normalized axis has {d}")

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
            from .kernels import load_kernel_library

            lib = load_kernel_library()
            dims = tuple(input_desc[0].dims)
            d, rows = int(dims[-1]), volume(dims[:-1])
            dtype = self.dtype_code(input_desc[0].type)
            eps = self.fields["eps"]
            if self.fields["residual"]:
                x, r, gamma, beta = inputs
                status = lib.layernorm_residual_raw(x, r, gamma, beta, outputs[1], outputs[0], rows, d, eps, dtype,
                                                    stream)
            else:
                x, gamma, beta = inputs
                status = lib.layernorm_raw(x, gamma, beta, outputs[0], rows, d, eps, dtype, stream)
            check_status(LAYERNORM, status)

    class AttentionPlugin(_Base):
        name = ATTENTION

        def __init__(self, fields: Dict[str, Any], phase: Any = None):
            super().__init__(fields, phase)
            self.num_outputs = 1

        @property
        def width(self) -> int:
            return self.fields["heads"] * self.fields["head_dim"]

        def get_output_shapes(self, inputs: Sequence[Any], shape_inputs: Sequence[Any], expr_builder: Any) -> List[Any]:
            out = trt.DimsExprs(inputs[0])
            out[len(out) - 1] = expr_builder.constant(self.width)
            return [out]

        def check_shapes(self, shapes: Sequence[Tuple[int, ...]]) -> None:
            from .kernels import attention_max_tokens

            if len(shapes) != 1 or len(shapes[0]) != 3:
                raise PluginError(f"{NAMESPACE}::{ATTENTION}: expected one (B, N, 3*heads*head_dim) input, got {shapes}")
            _, n, width = shapes[0]
            if width != 3 * self.width:
                raise PluginError(f"{NAMESPACE}::{ATTENTION}: qkv width {width} != 3 * heads {self.fields['heads']} "
                                  f"* head_dim {self.fields['head_dim']}")
            limit = attention_max_tokens(self.fields["head_dim"])
            if n > limit:
                raise PluginError(f"{NAMESPACE}::{ATTENTION}: {n} tokens exceed the kernel's maximum of {limit} "
                                  f"for head_dim {self.fields['head_dim']}")

        def configure_plugin(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
            """At build time, on the GPU the engine is built for: refuse the largest token
            count of the profile where the kernel cannot run it there (fp32 above the
            device's shared-memory limit), rather than fail in enqueue later."""
            desc = inputs[0]
            dims = [int(d) for d in (desc.max if desc.max is not None and len(desc.max) else desc.desc.dims)]
            if len(dims) == 3 and dims[1] > 0:
                check_device_support(dims[1], self.fields["head_dim"], self.dtype_code(desc.desc.type))

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
            from .kernels import load_kernel_library

            b, n, _ = (int(v) for v in input_desc[0].dims)
            status = load_kernel_library().attention_raw(inputs[0], outputs[0], b, n, self.fields["heads"],
                                                         self.fields["head_dim"], self.fields["scale"],
                                                         self.dtype_code(input_desc[0].type), stream)
            check_status(ATTENTION, status)

    def make_creator(plugin_cls: type) -> type:
        class Creator(trt.IPluginCreatorV3One):
            def __init__(self):
                trt.IPluginCreatorV3One.__init__(self)
                self.name = plugin_cls.name
                self.plugin_namespace = NAMESPACE
                self.plugin_version = VERSION
                self.field_names, self._defaults = _field_collection(
                    trt, plugin_cls.name, {k: 0 for k in _FIELD_SPECS[plugin_cls.name]})

            def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
                return plugin_cls(_collection_to_dict(fc), phase)

        Creator.__name__ = f"{plugin_cls.__name__}Creator"
        return Creator

    return {LAYERNORM: (LayerNormPlugin, make_creator(LayerNormPlugin)),
            ATTENTION: (AttentionPlugin, make_creator(AttentionPlugin))}


_registered: Dict[int, List[Any]] = {}


def register_plugins(trt: ModuleType) -> List[Any]:
    """Register both plugin creators with ``trt``'s plugin registry (once per module)."""
    if id(trt) not in _registered:
        registry = trt.get_plugin_registry()
        creators = []
        for name, (_, creator_cls) in plugin_classes(trt).items():
            creator = creator_cls()
            if registry.get_creator(name, VERSION, NAMESPACE) is None and not registry.register_creator(creator,
                                                                                                      NAMESPACE):
                raise RuntimeError(f"TensorRT refused to register the {NAMESPACE}::{name} plugin creator")
            creators.append(creator)
        _registered[id(trt)] = creators  # creators must outlive the registry's use of them
    return _registered[id(trt)]


def _create(trt: ModuleType, name: str, layer_name: str, **fields: Any) -> Any:
    register_plugins(trt)
    creator = trt.get_plugin_registry().get_creator(name, VERSION, NAMESPACE)
    fc, _keep = _field_collection(trt, name, fields)
    return creator.create_plugin(layer_name, fc, trt.TensorRTPhase.BUILD)


# --------------------------------------------------------------------------------------
# Network construction (called by trtvit_native.network when plugins are in use)
# --------------------------------------------------------------------------------------


def add_layer_norm(net: Any, x: Any, name: str, residual: Any = None, sum_name: Optional[str] = None,
                   eps: float = 1e-5) -> Tuple[Any, Optional[Any]]:
    """LayerNorm plugin layer ``name``; returns (LN output, residual sum or None)."""
    trt = net.trt
    d = net.state[f"{name}.weight"].shape[0]
    gamma = net.constant(f"{name}.weight", net.state[f"{name}.weight"].reshape(d))
    beta = net.constant(f"{name}.bias", net.state[f"{name}.bias"].reshape(d))
    plugin = _create(trt, LAYERNORM, name, eps=eps, residual=int(residual is not None))
    inputs = [x] + ([residual] if residual is not None else []) + [gamma, beta]
    layer = net.network.add_plugin_v3(inputs, [], plugin)
    y = net.named(layer, name)
    total = None
    if residual is not None:
        total = layer.get_output(1)
        total.name = sum_name or f"{name}.sum"
    return y, total


def add_attention(net: Any, qkv: Any, name: str, heads: int, head_dim: int) -> Any:
    """Fused attention plugin layer ``name`` on the packed qkv projection."""
    plugin = _create(net.trt, ATTENTION, name, heads=heads, head_dim=head_dim, scale=head_dim ** -0.5)
    layer = net.network.add_plugin_v3([qkv], [], plugin)
    return net.named(layer, name)


# --------------------------------------------------------------------------------------
# Torch references: what the kernels compute, used by the CPU interpreter and GPU tests
# --------------------------------------------------------------------------------------


def reference_layer_norm(x: "torch.Tensor", gamma: "torch.Tensor", beta: "torch.Tensor", eps: float,
                         residual: Optional["torch.Tensor"] = None) -> Tuple["torch.Tensor", Optional["torch.Tensor"]]:
    """LN over the last axis with fp32 statistics, in x's dtype; with ``residual``, LN of
    the sum rounded to x's dtype (the sum is stored, then normalized), and the sum."""
    import torch

    total = None
    if residual is not None:
        total = (x.float() + residual.float()).to(x.dtype)
        x = total
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * gamma.float().reshape(-1) + beta.float().reshape(-1)
    return y.to(x.dtype), total


def reference_attention(qkv: "torch.Tensor", heads: int, head_dim: int, scale: float) -> "torch.Tensor":
    """softmax(Q K^T * scale) V from packed (B, N, 3*heads*head_dim); fp32 math, x's dtype out."""
    b, n, _ = qkv.shape
    parts = qkv.float().reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = parts[0], parts[1], parts[2]
    probs = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return (probs @ v).transpose(1, 2).reshape(b, n, heads * head_dim).to(qkv.dtype)


def check_device_support(tokens: int, head_dim: int, dtype: int) -> None:
    """Refuse an attention size the kernel cannot run on the current GPU (dtype: the kernel
    library's FLOAT32 / FLOAT16 code): shared memory beyond the device's opt-in limit, no
    kernel image for the device, or a device that cannot be asked (the CUDA error named)."""
    from .kernels import CUDA_ERROR, FLOAT16, OK, load_kernel_library

    lib = load_kernel_library()
    status = lib.attention_supported(tokens, head_dim, dtype)
    if status == OK:
        return
    precision = "fp16" if dtype == FLOAT16 else "fp32"
    what = f"{NAMESPACE}::{ATTENTION}: {tokens} tokens of head_dim {head_dim} in {precision}"
    if status == CUDA_ERROR:
        raise PluginError(f"{what}: cannot ask the GPU whether it runs them: {lib.describe(status)}")
    raise PluginError(f"{what} cannot run on this GPU: {lib.describe(status)} (fp32 attention beyond 48 KB of "
                      f"shared memory needs the device's opt-in limit: N <= 224 / 120 on Turing; a kernel library "
                      f"built for other architectures has no kernel image for it)")


def plugin_layer_fields(trt: ModuleType, layer: Any) -> Tuple[str, Dict[str, Any]]:
    """The plugin a network layer (IPluginV3Layer) holds: its name and validated fields, read
    from the plugin object TensorRT keeps (the fields it serializes into the engine)."""
    plugin = layer.get_plugin()
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    name, namespace, version = core.plugin_name, core.plugin_namespace, core.plugin_version
    if namespace != NAMESPACE or name not in _FIELD_SPECS or version != VERSION:
        raise PluginError(f"plugin {namespace}::{name} version {version} is not one of this project's plugins "
                          f"({', '.join(f'{NAMESPACE}::{n} version {VERSION}' for n in _FIELD_SPECS)})")
    runtime = plugin.get_capability_interface(trt.PluginCapabilityType.RUNTIME)
    return name, _parse_fields(name, _collection_to_dict(runtime.get_fields_to_serialize()))


def interpret_plugin_layer(kind: str, fields: Dict[str, Any], inputs: List["torch.Tensor"]) -> List["torch.Tensor"]:
    """Execute a plugin layer on CPU; returns its outputs in order."""
    if kind == LAYERNORM:
        if fields["residual"]:
            x, r, gamma, beta = inputs
            y, total = reference_layer_norm(x, gamma, beta, fields["eps"], residual=r)
            return [y, total]
        x, gamma, beta = inputs
        return [reference_layer_norm(x, gamma, beta, fields["eps"])[0]]
    if kind == ATTENTION:
        return [reference_attention(inputs[0], fields["heads"], fields["head_dim"], fields["scale"])]
    raise PluginError(f"unknown plugin {kind!r}")
