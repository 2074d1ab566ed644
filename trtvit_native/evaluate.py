"""Classification accuracy of the reference, of the built network (CPU interpreter) and of
an engine (GPU) on an ImageFolder tree, and how often they agree.

    trtvit eval trt-vit-a --weights a.safetensors --data val/ [--network | --engine a.engine] [--json]

Every image goes through :func:`trtvit_native.data.eval_transform` (the preprocessing
ENGINE.json describes). The reference runs in fp32; ``--network`` builds the TensorRT
network from the same weights (fp16 by default) and runs it with the CPU interpreter;
``--engine`` runs an engine file on a GPU. For those two the report adds the reference's
top-1, the agreement (fraction of images whose top-1 class is the reference's) and the
largest logit difference.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .data import ImageFolder, eval_transform, load_rgb

__all__ = ["evaluate_model", "evaluate", "batches"]


def batches(folder: ImageFolder, image_size: int, batch_size: int, indices: Optional[List[int]] = None):
    """(images, labels) batches of the evaluation transform, in folder order."""
    order = list(range(len(folder))) if indices is None else indices
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        images = torch.stack([eval_transform(load_rgb(folder.samples[i][0]), image_size) for i in chunk])
        yield images, torch.tensor([folder.samples[i][1] for i in chunk])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, folder: ImageFolder, image_size: int, batch_size: int = 64,
                   device: Any = "cpu", indices: Optional[List[int]] = None) -> Dict[str, float]:
    """Sums over ``indices`` (default all) for one process: images, correct top-1/top-5, loss."""
    was_training = model.training
    model.eval()
    sums = {"images": 0, "top1": 0, "top5": 0, "loss": 0.0}
    for images, labels in batches(folder, image_size, batch_size, indices):
        logits = model(images.to(device)).float().cpu()
        sums["images"] += len(labels)
        sums["top1"] += _accuracy(logits, labels, 1)
        sums["top5"] += _accuracy(logits, labels, 5)
        sums["loss"] += float(F.cross_entropy(logits, labels, reduction="sum"))
    model.train(was_training)
    return sums


def evaluate(variant: str, weights: str, data: str, image_size: Optional[int] = None, network: bool = False,
             engine: Optional[str] = None, fp16: bool = True, batch_size: int = 32) -> Dict[str, Any]:
    """Accuracy of the reference and, with ``network`` or ``engine``, of the network/engine,
    with their agreement. Fractions in 0..1."""
    from .model import create_model
    from .network import image_hw
    from .weights import class_names, read_metadata

    if network and engine:
        raise ValueError("choose --network or --engine, not both")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    meta = read_metadata(weights)
    if image_size is None:
        image_size = int(meta.get("image_size", 224))
    image_hw(image_size, "--image-size")
    model = _unquantized_reference(variant, weights)
    folder = ImageFolder.read(data)
    if model.num_classes != len(folder.classes):
        raise ValueError(f"{weights} has {model.num_classes} classes, {data} has {len(folder.classes)}")
    names = class_names(weights)
    if names is not None and names != folder.classes:
        raise ValueError(f"the classes of {data} ({', '.join(folder.classes)}) are not those {weights} was "
                         f"trained on ({', '.join(names)})")
    runner: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    label = "reference (PyTorch fp32)"
    if network:
        from .interpreter import interpret
        from .network import build_network

        built = build_network(variant, weights, fp16=fp16, max_batch=batch_size, image_size=image_size)
        runner = lambda x: interpret(built, x)  # noqa: E731
        label = f"network ({'fp16' if fp16 else 'fp32'}, CPU interpreter)"
    elif engine:
        from .runtime import EngineRunner

        eng = EngineRunner(engine)
        if eng.image_shape[-1] != image_size:
            raise ValueError(f"engine {engine} takes {eng.image_shape[-1]}x{eng.image_shape[-1]} images, not "
                             f"{image_size}")
        batch_size = min(batch_size, eng.batch_range[1])
        runner = lambda x: eng(x)  # noqa: E731  (CPU tensors in and out; copied through pinned buffers)
        label = f"engine {engine}"
    predicted: List[torch.Tensor] = []  # the runner's top-1 per batch, for quantized_fields
    if runner is not None:
        runner = _recording(runner, predicted)
    totals = {"images": 0, "top1": 0, "top5": 0, "ref_top1": 0, "ref_top5": 0, "agree": 0}
    max_diff, seconds = 0.0, 0.0  # seconds: of the model measured (the runner, else the reference)
    with torch.no_grad():
        for images, labels in batches(folder, image_size, batch_size):
            start = time.perf_counter()
            ref = model(images)
            if runner is None:
                seconds += time.perf_counter() - start
            totals["images"] += len(labels)
            totals["ref_top1"] += _accuracy(ref, labels, 1)
            totals["ref_top5"] += _accuracy(ref, labels, 5)
            if runner is None:
                continue
            start = time.perf_counter()
            out = runner(images)
            seconds += time.perf_counter() - start
            totals["top1"] += _accuracy(out, labels, 1)
            totals["top5"] += _accuracy(out, labels, 5)
            totals["agree"] += int((out.argmax(1) == ref.argmax(1)).sum())
            max_diff = max(max_diff, float((out.float() - ref).abs().max()))
    n = totals["images"]
    if runner is None:
        result = {"model": label, "top1": totals["ref_top1"] / n, "top5": totals["ref_top5"] / n}
    else:
        result = {"model": label, "top1": totals["top1"] / n, "top5": totals["top5"] / n,
                  "reference_top1": totals["ref_top1"] / n, "reference_top5": totals["ref_top5"] / n,
                  "agreement": totals["agree"] / n, "max_logit_diff": max_diff}
    result.update(images=n, images_per_second=n / seconds if seconds > 0 else math.inf, variant=variant,
                  weights=weights, data=data, image_size=image_size, classes=len(folder.classes))
    if runner is not None:
        result.update(quantized_fields(variant, weights, folder, image_size, batch_size, predicted))
    return result


def _recording(runner: Callable[[torch.Tensor], torch.Tensor],
               predicted: List[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(images: torch.Tensor) -> torch.Tensor:
        out = runner(images)
        predicted.append(out.argmax(1).cpu())
        return out

    return run


def _unquantized_reference(variant: str, weights: str) -> torch.nn.Module:
    """The fp32 reference with the file's weights; for a quantized file, without its quantizers."""
    from .model import create_model
    from .weights import is_quantized, load_weights

    if is_quantized(weights):
        return create_model(variant, weights={k: v.float() for k, v in load_weights(weights, variant).items()})
    return create_model(variant, weights=weights)


def quantized_fields(variant: str, weights: str, folder: ImageFolder, image_size: int, batch_size: int,
                     predicted: List[torch.Tensor]) -> Dict[str, Any]:
    """For a quantized weights file: the fake-quantized reference's top-1
    (``quantized_reference_top1``) and how often the network's top-1 is that reference's
    (``quantized_reference_agreement``), plus the file's quantization. Empty otherwise.

    ``predicted``: the network's top-1 classes per batch of :func:`batches`. (``top1`` and
    ``agreement`` of :func:`evaluate` are the quantized network's own and its agreement
    with the unquantized fp32 reference.)"""
    from .model import create_model
    from .weights import load_quantization

    quant = load_quantization(weights, variant)
    if quant is None:
        return {}
    fake = create_model(variant, weights=weights)
    n = correct = agree = 0
    with torch.no_grad():
        for (images, labels), top1 in zip(batches(folder, image_size, batch_size), predicted):
            ref = fake(images)
            n += len(labels)
            correct += _accuracy(ref, labels, 1)
            agree += int((top1 == ref.argmax(1)).sum())
    return {"quantized_reference_top1": correct / n, "quantized_reference_agreement": agree / n,
            "quantization": quant.metadata()}
