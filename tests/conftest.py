"""Shared fixtures: reference models, built networks and images, each made once per session."""

from __future__ import annotations

import functools

import pytest
import torch

import trtvit_native as tv



@functools.lru_cache(maxsize=None)
def reference(variant: str) -> torch.nn.Module:
    """The seeded (untrained) reference model of a variant."""
    return tv.create_model(variant)


@functools.lru_cache(maxsize=None)
def network(variant: str, fp16: bool, max_batch: int = 4) -> tv.BuiltNetwork:
    """The TensorRT network of a variant with the reference's weights."""
    return tv.build_network(variant, reference(variant).state_dict(), fp16=fp16, max_batch=max_batch)


@functools.lru_cache(maxsize=None)
def _photographs(batch: int, size: int) -> torch.Tensor:
    return tv.photographs(batch, size)


def photographs(batch: int, size: int = 224) -> torch.Tensor:
    """Real photographs shipped with scikit-image, ImageNet-normalized."""
    return _photographs(batch, size).clone()


def random_images(batch: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """I.i.d. Gaussian pixels: the hardest input for the untrained network's numerics."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.fixture
def tmp_weights(tmp_path):
    """A valid trt-vit-a weights file (fp32) and its state dict."""
    state = reference("trt-vit-a").state_dict()
    path = tmp_path / "a.safetensors"
    tv.save_weights(state, path, "trt-vit-a")
    return path, state
