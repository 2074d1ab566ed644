"""Mutation tests: plant one defect, and the parity check must fail and name where it sits.

The network is built once from the correct weights and interpreted once per precision;
each defect is planted in a copy of the reference (a wrong constant, activation, axis,
dropped term or wiring in one module's forward, or one wrong weight tensor), and the
report must fail with the first divergent layer at the defect or at the next compared
layer. The weights class covers every tensor of one block of each kind (stem, BottleNeck
with and without projection shortcut, MixBlockC, head). A few defects are planted in the
network instead (its LayerNorm and BatchNorm-folding constants).

Defects below fp16's own rounding noise are checked in fp32 only: GELU's tanh
approximation and a LayerNorm or BatchNorm epsilon of 1e-3 instead of 1e-5 move their
layer by 1e-4 to 3e-4 of its magnitude, under fp16's ~1e-3 (README, "Parity").
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import trtvit_native as tv
from trtvit_native.parity import comparable_layers, network_layers, parity_report
from conftest import network, photographs, reference

VARIANT = "trt-vit-a"  # stages.3.1 is its MixBlockC; stages.1.0 and stages.0.1 its two BottleNeck kinds
MIX = "stages.3.1"
T = f"{MIX}.transformer"
PRECISIONS = [pytest.param(False, id="fp32"), pytest.param(True, id="fp16")]


@functools.lru_cache(maxsize=None)
def images() -> torch.Tensor:
    """A photograph and an image-like synthetic image."""
    return torch.cat([photographs(1), tv.synthetic_images(1, seed=3)])


@functools.lru_cache(maxsize=None)
def interpreted(fp16: bool) -> Dict[str, torch.Tensor]:
    built = network(VARIANT, fp16)
    return network_layers(built, images(), comparable_layers(built, reference(VARIANT)))


def check(model: nn.Module, fp16: bool, built: Optional[tv.BuiltNetwork] = None) -> tv.ParityReport:
    if built is None:
        return parity_report(network(VARIANT, fp16), model, images(), network_outputs=interpreted(fp16))
    return parity_report(built, model, images())


# --------------------------------------------------------------------------------------
# Planting a defect in one module's forward
# --------------------------------------------------------------------------------------


class _Substitute(TorchFunctionMode):
    """The ``occurrence``-th call of the torch function named ``name`` is answered by
    ``replacement`` instead."""

    def __init__(self, name: str, replacement: Callable[..., Any], occurrence: int):
        super().__init__()
        self.name, self.replacement, self.occurrence, self.calls = name, replacement, occurrence, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == self.name:
            self.calls += 1
            if self.calls - 1 == self.occurrence:
                return self.replacement(*args, **kwargs)
        return func(*args, **kwargs)


fired: Dict[str, int] = {}


def plant(path: str, name: str, replacement: Callable[..., Any], occurrence: int = 0) -> nn.Module:
    """A copy of the reference whose module ``path`` computes ``replacement`` in place of
    its ``occurrence``-th call of ``name``. The class swap survives the deep copies the
    parity check makes to evaluate the reference in float64 and fp16."""
    model = copy.deepcopy(reference(VARIANT))
    module = model.get_submodule(path)
    base = type(module)

    class Planted(base):
        def forward(self, *args, **kwargs):
            mode = _Substitute(name, replacement, occurrence)
            with mode:
                out = base.forward(self, *args, **kwargs)
            fired[path] = fired.get(path, 0) + (mode.calls > occurrence)
            return out

    module.__class__ = Planted
    return model


def with_module(path: str, new: nn.Module) -> nn.Module:
    model = copy.deepcopy(reference(VARIANT))
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model


def with_attribute(path: str, attribute: str, value: Any) -> nn.Module:
    model = copy.deepcopy(reference(VARIANT))
    setattr(model.get_submodule(path), attribute, value)
    return model


def _qkv_heads_first(x: torch.Tensor, *shape: int) -> torch.Tensor:
    b, n, three, heads, hd = shape
    return x.reshape(b, n, heads, three, hd).transpose(2, 3)


# defect id -> (make the defective reference, the layer that must be named first)
OP_DEFECTS: Dict[str, tuple] = {
    # constants
    "attention scale 1/d": (lambda: with_attribute(f"{T}.attn", "scale", 1 / 32), f"{T}.attn"),
    "stem max-pool window 2": (lambda: plant("stem", "max_pool2d", lambda x, *a, **k: F.max_pool2d(x, 2, 2)),
                               "stem"),
    # axes
    "softmax over the query axis": (lambda: plant(f"{T}.attn", "softmax", lambda x, dim: x.softmax(dim=-2)),
                                    f"{T}.attn"),
    "qkv laid out (heads, 3)": (lambda: plant(f"{T}.attn", "reshape", _qkv_heads_first), f"{T}.attn"),
    "tokens without the transpose": (
        lambda: plant(MIX, "transpose", lambda x, a, b: x.reshape(x.shape[0], x.shape[2], x.shape[1])),
        f"{T}.norm1"),
    "head pools by max": (lambda: plant("", "mean", lambda x, dim: x.amax(dim=dim)), "head"),
    # activations
    "stem ReLU -> GELU": (lambda: with_module("stem.relu", nn.GELU()), "stem.relu"),
    "BottleNeck relu2 dropped": (lambda: with_module("stages.1.0.relu2", nn.Identity()), "stages.1.0.relu2"),
    # (the block's relu1 and relu2 modules make the first two relu calls)
    "BottleNeck output ReLU dropped": (lambda: plant("stages.2.1", "relu", lambda x, *a, **k: x, 2), "stages.2.1"),
    "Transformer GELU -> ReLU": (lambda: with_module(f"{T}.gelu", nn.ReLU()), f"{T}.gelu"),
    "MixBlockC relu1 -> LeakyReLU": (lambda: with_module(f"{MIX}.relu1", nn.LeakyReLU(0.1)), f"{MIX}.relu1"),
    "MixBlockC local ReLU dropped": (lambda: with_module(f"{MIX}.local_relu", nn.Identity()), f"{MIX}.local_relu"),
    # dropped terms and wiring
    "projection shortcut dropped": (lambda: plant("stages.1.0", "add", lambda a, b: a), "stages.1.0.add"),
    "identity shortcut dropped": (lambda: plant("stages.0.1", "add", lambda a, b: a), "stages.0.1.add"),
    "attention residual dropped": (lambda: plant(T, "add", lambda a, b: b, 0), f"{T}.attn_residual"),
    "MLP residual dropped": (lambda: plant(T, "add", lambda a, b: b, 1), T),
    # (the Transformer inside makes the first two additions)
    "MixBlockC local residual dropped": (lambda: plant(MIX, "add", lambda a, b: a, 2), f"{MIX}.local_add"),
    "MixBlockC outer residual dropped": (lambda: plant(MIX, "add", lambda a, b: b, 3), MIX),
    "MixBlockC concat order swapped": (lambda: plant(MIX, "cat", lambda ts, dim: torch.cat(ts[::-1], dim)), MIX),
}

# Below fp16 rounding noise: caught in fp32 only.
FP32_ONLY_DEFECTS: Dict[str, tuple] = {
    "Transformer GELU tanh approximation": (lambda: with_module(f"{T}.gelu", nn.GELU(approximate="tanh")),
                                            f"{T}.gelu"),
    "LayerNorm eps 1e-3 (norm1)": (lambda: with_attribute(f"{T}.norm1", "eps", 1e-3), f"{T}.norm1"),
    "LayerNorm eps 1e-3 (norm2)": (lambda: with_attribute(f"{T}.norm2", "eps", 1e-3), f"{T}.norm2"),
    "BatchNorm eps 1e-3": (lambda: with_attribute("stages.2.1.conv2.bn", "eps", 1e-3), "stages.2.1.conv2"),
}


def _assert_caught(report: tv.ParityReport, expected: str) -> None:
    assert not report.ok, f"defect not caught: {report.summary()}"
    first = report.first_divergence()
    assert first.name == expected, f"first divergent layer {first.name}, expected {expected}\n{report.table()}"
    assert expected in report.summary() and f"first layer outside tolerance: {expected}" in report.table()


@pytest.mark.parametrize("fp16", PRECISIONS)
@pytest.mark.parametrize("defect", list(OP_DEFECTS))
def test_planted_defect_is_caught_and_named(defect, fp16):
    make, expected = OP_DEFECTS[defect]
    fired.clear()
    model = make()
    _assert_caught(check(model, fp16), expected)
    assert all(fired.values()), f"the planted substitution never ran: {fired}"


@pytest.mark.parametrize("defect", list(FP32_ONLY_DEFECTS))
def test_defect_below_fp16_noise_is_caught_in_fp32(defect):
    make, expected = FP32_ONLY_DEFECTS[defect]
    _assert_caught(check(make(), False), expected)


# --------------------------------------------------------------------------------------
# Weights: every tensor of one block of each kind, reversed along its first axis
# (channels, rows or features in the wrong order: a wiring defect that keeps the
# statistics of the tensor), and every bias zeroed.
# --------------------------------------------------------------------------------------

BLOCKS = ("stem.", "stages.0.1.", "stages.1.0.", f"{MIX}.", "head.")


def _owner(key: str) -> str:
    """The compared layer a weight tensor first shows in: its ConvBN, Linear or LayerNorm
    module (the stem's convolution shows in its ReLU: the stem has no ConvBN module)."""
    module = key.rsplit(".", 1)[0]
    if module.endswith((".conv", ".bn")):
        module = module.rsplit(".", 1)[0]
    return "stem.relu" if module == "stem" else module


def _weight_keys():
    return [k for k in reference(VARIANT).state_dict() if k.startswith(BLOCKS) and "num_batches" not in k]


def _with_tensor(key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(reference(VARIANT))
    state = model.state_dict()
    state[key] = change(state[key])
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("fp16", PRECISIONS)
def test_every_tensor_of_every_block_kind_in_the_wrong_order_is_caught(fp16):
    keys = _weight_keys()
    assert len(keys) == 5 + 15 + 20 + 32 + 2
    missed = []
    for key in keys:
        report = check(_with_tensor(key, lambda t: t.flip(0)), fp16)
        first = report.first_divergence()
        if first is None or first.name != _owner(key):
            missed.append(f"{key}: {'not caught' if first is None else 'first divergent layer ' + first.name}")
    assert not missed, "\n".join(missed)


@pytest.mark.parametrize("fp16", PRECISIONS)
def test_every_bias_zeroed_is_caught(fp16):
    keys = [k for k in _weight_keys() if k.endswith(".bias")]
    assert len(keys) == 1 + 3 + 4 + (4 + 6) + 1  # BN betas, Linear and LayerNorm biases, head
    missed = []
    for key in keys:
        first = check(_with_tensor(key, torch.zeros_like), fp16).first_divergence()
        if first is None or first.name != _owner(key):
            missed.append(f"{key}: {'not caught' if first is None else 'first divergent layer ' + first.name}")
    assert not missed, "\n".join(missed)


# --------------------------------------------------------------------------------------
# Defects in the network rather than the reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("constant, value, expected", [
    ("LN_EPS", 1e-3, f"{T}.norm1"),
    ("BN_EPS", 1e-3, "stem.relu"),
])
def test_wrong_constant_in_the_network_is_caught(monkeypatch, constant, value, expected):
    import trtvit_native.network as network_module

    monkeypatch.setattr(network_module, constant, value)
    built = tv.build_network(VARIANT, reference(VARIANT).state_dict(), fp16=False, max_batch=2)
    _assert_caught(check(reference(VARIANT), False, built), expected)


def test_the_correct_reference_passes_against_the_shared_interpretation():
    for fp16 in (False, True):
        report = check(reference(VARIANT), fp16)
        assert report.ok, report.table()
