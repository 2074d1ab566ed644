"""Images in, network input out: the one preprocessing definition, and ImageFolder trees.

``PREPROCESSING`` is what the network expects, written into every engine's ENGINE.json;
:func:`eval_transform` implements it (resize the shorter side to ``S / crop_pct``, center
crop ``S``, RGB scaled to [0, 1], ImageNet mean and std) for evaluation and serving, and
training draws its random crops from the same decoded images and normalizes the same way
(:func:`normalize`). torchvision is not used: it does not import beside the CPU build of
torch this project is tested with, so decoding is Pillow's and the resizing torch's own
antialiased interpolation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .variants import CROP_PCT, PREPROCESSING

__all__ = ["PREPROCESSING", "IMAGE_EXTENSIONS", "DataError", "ImageFolder", "load_rgb", "eval_transform", "normalize",
           "resize_and_center_crop", "preprocess_encoded", "write_digits", "TrainImages", "EvalImages",
           "collate_skipping", "random_resized_crop_box"]

# torchvision's ImageFolder extensions (matched case-insensitively)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """A data folder or image that cannot be used; the message names it."""


class SkippedImageWarning(UserWarning):
    """An image file left out of a data set because it cannot be read; the message names
    the file and why (``trtvit`` prints it as one line)."""


def _unreadable_reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can decode"
    text = str(e).split(":")[0].strip() if str(e) else ""
    return text or type(e).__name__


def load_rgb(path: Union[PathLike, bytes]) -> torch.Tensor:
    """Decode an image (a file, or its encoded bytes) to a uint8 RGB tensor (3, H, W).
    Grayscale, palette, RGBA (alpha dropped) and CMYK images are converted to RGB; 16-bit
    grayscale is scaled to 8 bits (Pillow's own conversion clips it at 255)."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    what = f"{len(path)} bytes of encoded image" if isinstance(path, (bytes, bytearray)) else f"image {path}"
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path) as img:
            if img.mode.startswith("I;16"):
                grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
                array = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot decode {what}: {e}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_and_center_crop(image: torch.Tensor, size: Union[int, Sequence[int]],
                           crop_pct: float = CROP_PCT) -> torch.Tensor:
    """uint8 or float (3, H, W) -> float32 (3, h, w) for ``size`` S or (h, w), in the input's
    value range: resized (bilinear, antialiased) to cover round(h / crop_pct) x
    round(w / crop_pct) — for a square S, the shorter side to round(S / crop_pct) — then
    center-cropped."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise DataError(f"expected an RGB image (3, H, W), got shape {tuple(image.shape)}")
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    h, w = image.shape[-2:]
    ch, cw = round(th / crop_pct), round(tw / crop_pct)
    scale = max(ch / h, cw / w)
    nh, nw = max(ch, round(h * scale)), max(cw, round(w * scale))
    x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[:, top:top + th, left:left + tw]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 (float, (..., 3, H, W)) -> the network input: /255, then
    :func:`trtvit_native.model.imagenet_normalize`."""
    from .model import imagenet_normalize

    return imagenet_normalize(images.float() / 255.0)


def eval_transform(image: torch.Tensor, size: Union[int, Sequence[int]]) -> torch.Tensor:
    """A decoded uint8 RGB image (3, H, W) -> the network input (3, S, S) or (3, h, w), as
    ``PREPROCESSING`` says."""
    return normalize(resize_and_center_crop(image, size).clamp(0, 255))


def preprocess_encoded(data: bytes, size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, BMP...) -> the network input: decode, then
    :func:`eval_transform`. What a serving pipeline runs per request."""
    return eval_transform(load_rgb(bytes(data)), size)


@dataclass
class ImageFolder:
    """An ImageFolder tree as torchvision scans it: one sub-folder per class (names sorted,
    symlinked folders followed), image files with ``IMAGE_EXTENSIONS`` at any depth.

    Reading the tree opens each file's header only (Pillow identifies the format without
    decoding the pixels): a file that is no image is skipped with a warning naming it
    (``skipped`` lists them). An image whose pixels turn out undecodable later (a truncated
    JPEG) is skipped when it is loaded: :class:`TrainImages` and :class:`EvalImages` with
    :func:`collate_skipping` leave it out of its batch and report its path. A tree where
    every image is bad, with no class folder, or with a class folder that holds no usable
    image is an error.
    """

    root: Path
    classes: List[str]
    samples: List[Tuple[str, int]]
    skipped: List[str] = field(default_factory=list)

    @classmethod
    def read(cls, root: PathLike, min_classes: int = 1, check_images: bool = True) -> "ImageFolder":
        from PIL import Image

        root = Path(root)
        if not root.exists():
            raise DataError(f"data folder {root} does not exist")
        if root.is_file():
            raise DataError(f"{root} is a file, not a data folder (an ImageFolder tree, one sub-folder per class); "
                            f"to classify image files: trtvit predict WEIGHTS {root}")
        if not root.is_dir():
            raise DataError(f"data folder {root} is not a directory")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"data folder {root} has no class sub-folders (expected one folder per class)")
        if len(classes) < min_classes:
            raise DataError(f"data folder {root} has {len(classes)} class ({classes[0]}); training needs at least "
                            f"{min_classes}")
        samples, skipped = [], []
        for label, name in enumerate(classes):
            files = [os.path.join(d, f) for d, _, names in sorted(os.walk(root / name, followlinks=True))
                     for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS)]
            for path in files:
                if check_images:
                    try:
                        with Image.open(path):  # the header only
                            pass
                    except Exception as e:  # Pillow raises many kinds for a bad file
                        skipped.append(path)
                        warnings.warn(f"skipped {path}: {_unreadable_reason(e)}", SkippedImageWarning,
                                      stacklevel=2)
                        continue
                samples.append((path, label))
        if not samples:
            raise DataError(f"data folder {root} holds no readable image ({len(skipped)} unreadable; extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        counts = [0] * len(classes)
        for _, label in samples:
            counts[label] += 1
        empty = [c for c, n in zip(classes, counts) if n == 0]
        if empty:
            raise DataError(f"data folder {root}: class folder(s) {', '.join(empty)} hold no readable image")
        return cls(root, classes, samples, skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def counts(self) -> Dict[str, int]:
        out = {c: 0 for c in self.classes}
        for _, label in self.samples:
            out[self.classes[label]] += 1
        return out

    def fingerprint(self) -> Dict[str, object]:
        """Counts per class and a SHA-256 of the relative paths and sizes of every image."""
        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{os.path.relpath(path, self.root)}\0{os.path.getsize(path)}\0{label}\n".encode())
        return {"images": len(self.samples), "counts": self.counts(), "sha256": h.hexdigest()}

    def fingerprint_json(self) -> str:
        return json.dumps(self.fingerprint(), sort_keys=True)


class EvalImages(torch.utils.data.Dataset):
    """Evaluation samples of an ImageFolder: ``(image, label, path)`` with the image decoded,
    resized and center-cropped as ``PREPROCESSING`` says (float32 in 0..255, not yet
    normalized: :func:`normalize` runs on the device), ``path`` ``None``; an undecodable
    image gives ``(None, label, path)`` for :func:`collate_skipping` to drop."""

    def __init__(self, folder: ImageFolder, size: Union[int, Sequence[int]], indices: Optional[Sequence[int]] = None):
        self.folder, self.size = folder, size
        self.indices = list(range(len(folder))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        path, label = self.folder.samples[self.indices[i]]
        try:
            return resize_and_center_crop(load_rgb(path), self.size).clamp(0, 255), label, None
        except DataError:
            return None, label, path


def random_resized_crop_box(height: int, width: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                            generator: torch.Generator) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a fraction ``scale`` of the image's area with an
    aspect ratio (w / h) drawn log-uniformly from ``ratio``; torchvision's
    ``RandomResizedCrop.get_params``: ten tries, then the largest center crop within
    ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainImages(torch.utils.data.Dataset):
    """Training samples: ``(epoch, index)`` -> ``(image, label, path)``, the image a uint8
    (3, S, S) random-resized crop of the whole decoded image (area ``scale``, aspect
    ``ratio``: :func:`random_resized_crop_box`, resized bilinear with antialiasing like
    the evaluation transform), flipped horizontally with probability ``hflip``. Each
    sample's draws come from a generator seeded by (seed, epoch, index), so they do not
    depend on the number of DataLoader workers or processes, and a resumed run draws what
    the uninterrupted one did. An undecodable image gives ``(None, label, path)``.

    The crop is drawn here, per image, rather than by kornia's ``RandomResizedCrop`` on
    the batch: images of different sizes make no batch, and kornia's per-call overhead
    on single images (about 28 ms against 1 ms for the decoding, measured on the digits)
    would make it the bottleneck of the input pipeline."""

    def __init__(self, folder: ImageFolder, size: int, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, seed: int = 0):
        self.folder, self.size, self.seed = folder, size, seed
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, i = key
        path, label = self.folder.samples[i]
        try:
            image = load_rgb(path)
        except DataError:
            return None, label, path
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % (2 ** 63))
        top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], self.scale, self.ratio, g)
        crop = image[None, :, top:top + h, left:left + w].float()
        out = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
        if float(torch.rand((), generator=g)) < self.hflip:
            out = out.flip(-1)
        return out.clamp_(0, 255).add_(0.5).to(torch.uint8), label, None  # rounded


def collate_skipping(batch: Sequence[tuple]) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """DataLoader collate for :class:`TrainImages` / :class:`EvalImages`: the decodable
    images stacked, their labels, and the paths of the images that could not be decoded."""
    good = [(image, label) for image, label, path in batch if path is None]
    skipped = [path for _, _, path in batch if path is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), skipped


def check_same_classes(train: Sequence[str], val: Sequence[str], val_root: PathLike) -> None:
    if list(train) != list(val):
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        raise DataError(f"--val {val_root} has other classes than --data: only in --data {only_train or '-'}, "
                        f"only in --val {only_val or '-'}")


def write_digits(root: PathLike, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Tuple[Path, Path]:
    """scikit-learn's handwritten digits (1,797 labelled 8x8 images, classes 0-9) written as
    two ImageFolder trees of RGB PNGs upscaled to ``size`` x ``size``: ``root/train`` and
    ``root/val`` (a stratified ``val_fraction`` split). A real labelled data set that ships
    inside a package: for trying training, fine-tuning and evaluation end to end."""
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("write_digits() needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in ("train", "val"):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for k, i in enumerate(idx):
            gray = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(gray, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(root / ("val" if k < n_val else "train") / str(c) / f"{i:04d}.png")
    return root / "train", root / "val"
