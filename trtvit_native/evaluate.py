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

import io
import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .data import EvalImages, ImageFolder, collate_skipping, normalize

__all__ = ["evaluate_model", "evaluate", "predict", "batches", "eval_loader", "class_report", "plot_confusion"]


def eval_loader(folder: ImageFolder, image_size: int, batch_size: int, indices: Optional[Sequence[int]] = None,
                workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches ``(images, labels, skipped_paths)`` of the evaluation transform in folder
    order (images float 0..255, normalized by the caller on its device), decoded in
    ``workers`` DataLoader processes; undecodable images are left out and named."""
    return torch.utils.data.DataLoader(EvalImages(folder, image_size, indices), batch_size=batch_size,
                                       num_workers=workers, collate_fn=collate_skipping, pin_memory=pin_memory,
                                       persistent_workers=workers > 0)


def batches(folder: ImageFolder, image_size: int, batch_size: int, indices: Optional[List[int]] = None,
            workers: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(network input, labels) batches of the evaluation transform, in folder order;
    undecodable images are left out."""
    for images, labels, _ in eval_loader(folder, image_size, batch_size, indices, workers):
        if len(labels):
            yield normalize(images), labels


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


class _Counts:
    """Top-1 (through the confusion matrix), top-5 and loss sums of one model's logits,
    counted by torchmetrics; under torch.distributed, :meth:`compute` sums them over
    every process."""

    def __init__(self, classes: int, device: Any = "cpu"):
        from torchmetrics import MetricCollection, SumMetric
        from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

        self.classes = classes
        self.metrics = MetricCollection({
            "confusion": MulticlassConfusionMatrix(classes),
            "top5": MulticlassAccuracy(classes, top_k=min(5, classes), average="micro"),
            "loss": SumMetric()}).to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        self.metrics["confusion"].update(logits.argmax(1), labels)
        self.metrics["top5"].update(logits, labels)
        self.metrics["loss"].update(F.cross_entropy(logits, labels, reduction="sum"))

    def compute(self) -> Dict[str, Any]:
        """``images``, ``top1``, ``top5``, ``loss`` (mean) and ``confusion`` (classes x
        classes, rows the true classes, int64 on the CPU)."""
        confusion = self.metrics["confusion"].compute().long().cpu()
        n = int(confusion.sum())
        return {"images": n, "top1": int(confusion.trace()) / max(n, 1), "top5": float(self.metrics["top5"].compute()),
                "loss": float(self.metrics["loss"].compute()) / max(n, 1), "confusion": confusion}


def class_report(confusion: torch.Tensor, classes: Sequence[str]) -> List[Dict[str, Any]]:
    """Per class, in label order: its ``label``, ``images`` (true instances), ``recall``
    (its top-1) and ``precision`` (None where nothing was predicted as it)."""
    confusion = torch.as_tensor(confusion).long()
    true, predicted, hits = confusion.sum(1).tolist(), confusion.sum(0).tolist(), confusion.diagonal().tolist()
    return [{"label": name, "images": true[c],
             "recall": hits[c] / true[c] if true[c] else None,
             "precision": hits[c] / predicted[c] if predicted[c] else None}
            for c, name in enumerate(classes)]


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], title: str = "") -> bytes:
    """The confusion matrix (rows true, columns predicted, each row as fractions of its
    class) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.as_tensor(confusion).double()
    rows = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(3 + 0.5 * n, 24), min(2.5 + 0.5 * n, 24)))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90 if n > 10 else 0)
    ax.set_yticklabels(classes)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    return figure_png(fig)


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (laid out, 80 dpi), closed afterwards."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=80)
    finally:
        plt.close(fig)
    return png.getvalue()


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, folder: ImageFolder, image_size: int, batch_size: int = 64,
                   device: Any = "cpu", indices: Optional[List[int]] = None, workers: int = 0,
                   loader: Optional[torch.utils.data.DataLoader] = None,
                   channels_last: bool = False) -> Dict[str, Any]:
    """Top-1, top-5, mean loss and the confusion matrix of ``model`` on ``indices`` (default
    all) of ``folder``, or on the batches of ``loader`` (from :func:`eval_loader`); under
    torch.distributed, summed over the processes (each passing its own shard). Also
    ``skipped``: this process's undecodable images."""
    was_training = model.training
    model.eval()
    counts = _Counts(len(folder.classes), device)
    skipped: List[str] = []
    if loader is None:
        loader = eval_loader(folder, image_size, batch_size, indices, workers)
    for images, labels, bad in loader:
        skipped += bad
        if not len(labels):
            continue
        images = normalize(images.to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        counts.update(model(images), labels.to(device, non_blocking=True))
    model.train(was_training)
    return {**counts.compute(), "skipped": skipped}


def evaluate(variant: str, weights: str, data: str, image_size: Optional[int] = None, network: bool = False,
             engine: Optional[str] = None, fp16: bool = True, batch_size: int = 32, workers: int = 0,
             confusion_png: Optional[str] = None, per_image: bool = False) -> Dict[str, Any]:
    """Accuracy of the reference and, with ``network`` or ``engine``, of the network/engine,
    with their agreement. Fractions in 0..1. ``per_class`` and ``confusion`` (rows: true
    classes in label order) are those of the model measured (the network or engine when
    given, else the reference); ``confusion_png`` also draws the matrix there.
    ``per_image`` adds ``predictions``: per decoded image, in folder order, ``{"image",
    "label", "predicted", "probability"}`` of the model measured (what :func:`predict`
    gives as its first class)."""
    from .model import create_model
    from .network import image_hw
    from .weights import class_names, load_quantization, resolve_image_size

    if network and engine:
        raise ValueError("choose --network or --engine, not both")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if confusion_png is not None:
        from .weights import check_output_path

        check_output_path(confusion_png)
    image_size, size_line = resolve_image_size(weights, image_size)
    image_hw(image_size, "--image-size")
    from .weights import resolve_config

    config = resolve_config(variant, weights)  # a name, a JSON config, or the custom variant the file holds
    variant = config.name
    model = _unquantized_reference(config, weights)
    folder = ImageFolder.read(data)
    if model.num_classes != len(folder.classes):
        raise ValueError(f"{weights} has {model.num_classes} classes, {data} has {len(folder.classes)}")
    names = class_names(weights)
    if names is not None and names != folder.classes:
        raise ValueError(f"the classes of {data} ({', '.join(folder.classes)}) are not those {weights} was "
                         f"trained on ({', '.join(names)})")
    runner, label, batch_size = _runner(config, weights, network, engine, fp16, batch_size, image_size)
    # A quantized file's network is also compared with the fake-quantized reference (the
    # reference ``model`` above is the unquantized fp32 one).
    quant = load_quantization(weights, config) if runner is not None else None
    fake = create_model(config, weights=weights) if quant is not None else None
    totals = {"images": 0, "top1": 0, "top5": 0, "ref_top1": 0, "ref_top5": 0, "agree": 0, "fake_top1": 0,
              "fake_agree": 0}
    max_diff, seconds = 0.0, 0.0  # seconds: of the model measured (the runner, else the reference)
    counts = _Counts(len(folder.classes))  # of the model measured
    skipped: List[str] = []
    predictions: List[Dict[str, Any]] = []
    position = 0  # the loader goes through the folder's samples in order
    with torch.no_grad():
        for images, labels, bad in eval_loader(folder, image_size, batch_size, workers=workers):
            skipped += bad
            chunk = folder.samples[position:position + len(labels) + len(bad)]
            position += len(chunk)
            if not len(labels):
                continue
            images = normalize(images)
            start = time.perf_counter()
            ref = model(images)
            if runner is None:
                seconds += time.perf_counter() - start
                counts.update(ref, labels)
            totals["images"] += len(labels)
            totals["ref_top1"] += _accuracy(ref, labels, 1)
            totals["ref_top5"] += _accuracy(ref, labels, 5)
            paths = [path for path, _ in chunk if path not in bad]
            if runner is None:
                if per_image:
                    predictions += _image_rows(paths, labels, ref, folder.classes)
                continue
            start = time.perf_counter()
            out = runner(images)
            seconds += time.perf_counter() - start
            counts.update(out, labels)
            if per_image:
                predictions += _image_rows(paths, labels, out, folder.classes)
            totals["top1"] += _accuracy(out, labels, 1)
            totals["top5"] += _accuracy(out, labels, 5)
            totals["agree"] += int((out.argmax(1) == ref.argmax(1)).sum())
            if fake is not None:
                fake_out = fake(images)
                totals["fake_top1"] += _accuracy(fake_out, labels, 1)
                totals["fake_agree"] += int((out.argmax(1) == fake_out.argmax(1)).sum())
            max_diff = max(max_diff, float((out.float() - ref).abs().max()))
    n = totals["images"]
    if n == 0:
        raise ValueError(f"{data}: none of its {len(folder)} images could be decoded")
    if runner is None:
        result = {"model": label, "top1": totals["ref_top1"] / n, "top5": totals["ref_top5"] / n}
    else:
        result = {"model": label, "top1": totals["top1"] / n, "top5": totals["top5"] / n,
                  "reference_top1": totals["ref_top1"] / n, "reference_top5": totals["ref_top5"] / n,
                  "agreement": totals["agree"] / n, "max_logit_diff": max_diff}
    measured = counts.compute()
    result["top1"] = measured["top1"]  # the confusion matrix's diagonal over the count
    result.update(images=n, images_per_second=n / seconds if seconds > 0 else math.inf, variant=variant,
                  weights=weights, data=data, image_size=image_size, image_size_source=size_line,
                  classes=len(folder.classes),
                  per_class=class_report(measured["confusion"], folder.classes),
                  confusion=measured["confusion"].tolist(), skipped=skipped)
    if per_image:
        result["predictions"] = predictions
    if fake is not None:  # a quantized weights file: the fake-quantized reference too
        result.update(quantized_reference_top1=totals["fake_top1"] / n,
                      quantized_reference_agreement=totals["fake_agree"] / n, quantization=quant.metadata())
    if confusion_png is not None:
        from .weights import write_atomically

        write_atomically(confusion_png, plot_confusion(measured["confusion"], folder.classes,
                                                       f"{variant} on {data}: top-1 {100 * measured['top1']:.2f} %"))
    return result



def _image_rows(paths: Sequence[str], labels: torch.Tensor, logits: torch.Tensor,
                classes: Sequence[str]) -> List[Dict[str, Any]]:
    probability, predicted = logits.float().softmax(dim=1).max(dim=1)
    return [{"image": path, "label": classes[t], "predicted": classes[c], "probability": q}
            for path, t, c, q in zip(paths, labels.tolist(), predicted.tolist(), probability.tolist())]


def _runner(variant: str, weights: str, network: bool, engine: Optional[str], fp16: bool, batch_size: int,
            image_size: int) -> Tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], str, int]:
    """What runs besides the reference: the network built from ``weights`` on the CPU
    interpreter, an engine on the GPU, or nothing. Returns it, its label and the batch
    size it takes."""
    if network and engine:
        raise ValueError("choose --network or --engine, not both")
    if network:
        from .interpreter import interpret
        from .network import build_network

        built = build_network(variant, weights, fp16=fp16, max_batch=batch_size, image_size=image_size)
        return (lambda x: interpret(built, x)), f"network ({'fp16' if fp16 else 'fp32'}, CPU interpreter)", batch_size
    if engine:
        from .runtime import EngineRunner

        eng = EngineRunner(engine)
        low, high = tuple(eng.min_shape[-2:]), tuple(eng.max_shape[-2:])
        if not (low[0] <= image_size <= high[0] and low[1] <= image_size <= high[1]):
            takes = "x".join(map(str, low)) if low == high else f"{'x'.join(map(str, low))}..{'x'.join(map(str, high))}"
            raise ValueError(f"engine {engine} takes {takes} images, not {image_size}x{image_size} (--image-size)")
        # CPU tensors in and out; copied through pinned buffers
        return (lambda x: eng(x)), f"engine {engine}", min(batch_size, eng.batch_range[1])
    return None, "reference (PyTorch fp32)", batch_size


def predict(weights: str, images: Sequence[str], network: bool = False, engine: Optional[str] = None,
            fp16: bool = True, top: Optional[int] = None, image_size: Optional[int] = None,
            batch_size: int = 32) -> Dict[str, Any]:
    """The ``top`` classes (5, or all when there are fewer) of each image file with their probabilities (softmax of the
    logits), by the reference model of ``weights`` or, with ``network`` / ``engine``, by the
    TensorRT network on the CPU interpreter / an engine on the GPU. Every image goes
    through the one preprocessing definition (:func:`trtvit_native.data.eval_transform`)
    at the size the weights were trained at unless ``image_size`` says otherwise.

    Returns ``{"model", "variant", "image_size", "image_size_source", "predictions"}``, with
    ``predictions`` one ``{"image", "top": [{"label", "index", "probability"}, ...]}`` per
    file, in the order given."""
    import os

    from .data import DataError, eval_transform, load_rgb
    from .network import image_hw
    from .weights import resolve_image_size

    if not images:
        raise ValueError("give at least one image file")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    for path in images:
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory: give image files (trtvit eval takes a folder)")
        if not os.path.isfile(path):
            raise ValueError(f"image file {path} does not exist")
    image_size, size_line = resolve_image_size(weights, image_size)
    image_hw(image_size, "--image-size")
    # the reference eval uses: for a quantized file, the unquantized one (the network or
    # engine built from the file runs quantized)
    model = _unquantized_reference(None, weights)
    variant = model.config.name
    labels = model.labels or [str(i) for i in range(model.num_classes)]
    top = min(5, model.num_classes) if top is None else top
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= model.num_classes:
        raise ValueError(f"--top must be in 1..{model.num_classes} (the classes of {weights}), got {top!r}")
    inputs = []
    for path in images:  # every file decoded before any is classified: a bad one is named, nothing printed
        try:
            inputs.append(eval_transform(load_rgb(path), image_size))
        except DataError as e:
            raise ValueError(str(e)) from None
    runner, label, batch_size = _runner(variant, weights, network, engine, fp16, batch_size, image_size)
    run = runner or model
    predictions = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            logits = run(torch.stack(inputs[start:start + batch_size])).float()
            if logits.shape[-1] != model.num_classes:
                raise ValueError(f"{label} gives {logits.shape[-1]} classes, {weights} names {model.num_classes}: "
                                 f"not the engine built from these weights")
            probabilities = logits.softmax(dim=1)
            values, indices = probabilities.topk(top, dim=1)
            for i, (p, k) in enumerate(zip(values.tolist(), indices.tolist())):
                predictions.append({"image": images[start + i], "top": [
                    {"label": labels[c], "index": c, "probability": q} for q, c in zip(p, k)]})
    return {"model": label, "variant": variant,
            "weights": weights, "image_size": image_size, "image_size_source": size_line,
            "predictions": predictions}


def _unquantized_reference(variant: Optional[str], weights: str) -> torch.nn.Module:
    """The fp32 reference with the file's weights; for a quantized file, without its quantizers."""
    from .model import create_model
    from .weights import is_quantized, load_weights

    if is_quantized(weights):
        from .weights import class_names, read_metadata, trained_image_size

        variant = variant or read_metadata(weights).get("arch")
        model = create_model(variant, weights={k: v.float() for k, v in load_weights(weights, variant).items()})
        model.labels, model.image_size = class_names(weights), trained_image_size(weights)
        return model
    return create_model(variant, weights=weights)

