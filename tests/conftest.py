"""Shared fixtures: reference models, built networks and images, each made once per session."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

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
def _photographs(size: int) -> torch.Tensor:
    from skimage import data

    images = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1).float().div(255)[None]
        side = min(img.shape[-2:])  # center crop to a square, then resize
        top, left = (img.shape[-2] - side) // 2, (img.shape[-1] - side) // 2
        img = img[..., top:top + side, left:left + side]
        images.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    x = torch.cat(images).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def photographs(batch: int, size: int = 224) -> torch.Tensor:
    """Real photographs shipped with scikit-image, ImageNet-normalized."""
    x = _photographs(size)
    return x[torch.arange(batch) % x.shape[0]]


def random_images(batch: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """I.i.d. Gaussian pixels: the hardest input for the untrained network's numerics."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tmp_weights(tmp_path):
    """A valid trt-vit-a weights file (fp32) and its state dict."""
    state = reference("trt-vit-a").state_dict()
    path = tmp_path / "a.safetensors"
    tv.save_weights(state, path, "trt-vit-a")
    return path, state
