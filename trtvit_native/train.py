"""Train and fine-tune TRT-ViT on an ImageFolder tree.

    trtvit train trt-vit-a --data train/ --val val/ --epochs 30 -o a.safetensors
    trtvit train trt-vit-a --data mine/ --init a.safetensors --freeze stem,stages.0 -o mine.safetensors
    trtvit train trt-vit-a ... --resume RUN_DIR                  # continue a stopped run
    torchrun --nproc_per_node 4 -m trtvit_native.train trt-vit-a --data train/ -o a.safetensors

Recipe: AdamW (weight decay on weight matrices and kernels only), linear warmup then
cosine decay per step, label smoothing, gradient clipping. Training images get kornia's
random-resized crop and horizontal flip on each batch; evaluation is resize + center
crop (:mod:`trtvit_native.data`); both normalize as ENGINE.json says. Mixed precision on
CUDA (bf16 where supported, else fp16 with a gradient scaler); fp32 on a CPU unless
``--amp bf16`` (much slower on CPUs without bf16 units).

Under torchrun every process trains on its shard of each epoch's permutation with
DistributedDataParallel (gloo on CPU, nccl on CUDA); ``--batch-size`` is the global batch.
Process 0 writes the run directory:

    last.safetensors, best.safetensors   weights after the last / best-val-top-1 epoch
    state.safetensors, state.json        optimizer, scheduler, RNG states, epoch, config (no pickle)
    metrics.jsonl, curves.png            one line per epoch; loss and accuracy plotted

Each epoch's data order and augmentation are drawn from generators seeded by (seed,
epoch, rank), so a run resumed after any epoch ends as the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .data import DataError, DecodedImages, ImageFolder, check_same_classes, normalize
from .variants import get_config
from .weights import write_atomically

__all__ = ["TrainConfig", "train", "main", "TrainError"]

STATE_FORMAT = "trtvit-train-state/1"


class TrainError(ValueError):
    """A training request that cannot be carried out; the message names the problem."""


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in state.json; ``--resume`` restores it).

    Defaults: from scratch lr 1e-3 with 1 warmup epoch; fine-tuning (``init``) lr 2e-4
    without warmup. Both: AdamW weight decay 0.05, label smoothing 0.1, gradient clipping
    at norm 1.0, random crops covering 50-100 % of the image (milder than the 8 % of
    ImageNet recipes, which pay off only over long schedules: pass 0.08 there), flips with
    probability 0.5.
    """

    variant: str
    data: str
    output: str
    val: Optional[str] = None
    epochs: int = 30
    batch_size: int = 64
    lr: Optional[float] = None
    weight_decay: float = 0.05
    warmup_epochs: Optional[float] = None
    image_size: int = 224
    label_smoothing: float = 0.1
    init: Optional[str] = None
    freeze: Tuple[str, ...] = ()
    workers: int = 2
    seed: int = 0
    run_dir: Optional[str] = None
    clip_grad: float = 1.0
    min_crop_scale: float = 0.5
    hflip: float = 0.5
    amp: str = "auto"
    min_lr_ratio: float = 0.01

    def __post_init__(self) -> None:
        self.freeze = tuple(self.freeze)
        if self.lr is None:
            self.lr = 2e-4 if self.init else 1e-3
        if self.warmup_epochs is None:
            self.warmup_epochs = 0.0 if self.init else 1.0
        if self.run_dir is None:
            base = self.output[:-len(".safetensors")] if self.output.endswith(".safetensors") else self.output
            self.run_dir = base + ".run"
        checks = [
            (isinstance(self.image_size, int) and self.image_size >= 32 and self.image_size % 32 == 0,
             f"--image-size must be a positive multiple of 32 (the network's stride), got {self.image_size}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (BatchNorm needs 2 images), got "
                                   f"{self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_epochs <= self.epochs, f"--warmup-epochs must be in 0..{self.epochs}, got "
                                                     f"{self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (0 < self.min_crop_scale <= 1, f"--min-crop-scale must be in (0, 1], got {self.min_crop_scale}"),
            (0 <= self.hflip <= 1, f"--hflip must be in [0, 1], got {self.hflip}"),
            (self.amp in ("auto", "off", "fp16", "bf16"), f"--amp must be auto, off, fp16 or bf16, got {self.amp}"),
            (self.clip_grad > 0, f"--clip-grad must be positive, got {self.clip_grad}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)


# --------------------------------------------------------------------------------------
# Small helpers: processes, files
# --------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_processes() -> _Dist:
    """Single process, or DDP from torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("RANK", -1)) == -1:
        return _Dist(0, 1, torch.device("cuda") if cuda else torch.device("cpu"))
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return _Dist(dist.get_rank(), dist.get_world_size(), device)


def _all_sum(values: List[float], dist_: _Dist) -> List[float]:
    if dist_.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dist_.device)
    dist.all_reduce(t)
    return t.tolist()


def _save_tensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save

    write_atomically(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


# --------------------------------------------------------------------------------------
# Model, optimizer, schedule
# --------------------------------------------------------------------------------------


def _under(name: str, prefix: str) -> bool:
    """Whether the module or parameter ``name`` lies under the module path ``prefix``."""
    return name == prefix or name.startswith(prefix + ".")


def _frozen_names(model: torch.nn.Module, prefixes: Sequence[str]) -> List[str]:
    """Parameters under the module prefixes; an unknown prefix is an error."""
    names = [n for n, _ in model.named_parameters()]
    frozen = []
    for prefix in prefixes:
        hit = [n for n in names if _under(n, prefix)]
        if not hit:
            raise TrainError(f"--freeze {prefix!r} matches no parameter (module paths such as stem, stages.0, "
                             f"stages.3.1.transformer, head)")
        frozen += hit
    return sorted(set(frozen))


def _build_model(config: TrainConfig, classes: List[str], say,
                 load_init: bool = True) -> Tuple[torch.nn.Module, List[str]]:
    """The model to train and its frozen parameter names. ``load_init``: start from
    ``config.init`` (a resumed run starts from its own last weights instead)."""
    from .model import create_model
    from .weights import WeightsError, class_names, load_weights

    model = create_model(config.variant, num_classes=len(classes), seed=config.seed)
    if config.init and load_init:
        try:
            state = load_weights(config.init, arch=config.variant)
        except WeightsError as e:
            raise TrainError(f"--init: {e}") from None
        init_classes = class_names(config.init)
        n_init = int(state["head.weight"].shape[0])
        if n_init != len(classes) or (init_classes is not None and init_classes != classes):
            why = (f"{n_init} classes in {config.init}, {len(classes)} in the data" if n_init != len(classes)
                   else f"{config.init} was trained on other classes ({', '.join(init_classes)})")
            say(f"head re-initialized: {why}")
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model, _frozen_names(model, config.freeze)


def _schedule(config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


# --------------------------------------------------------------------------------------
# Resume state: safetensors for tensors, JSON for the rest
# --------------------------------------------------------------------------------------


def _save_state(run_dir: str, epoch: int, config: TrainConfig, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: Any, best: float, metrics: List[dict], folder: ImageFolder) -> None:
    opt = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optimizer.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    _save_tensors(tensors, os.path.join(run_dir, "state.safetensors"))
    state = {"format": STATE_FORMAT, "variant": config.variant, "epochs_done": epoch,
             "config": dataclasses.asdict(config), "classes": folder.classes, "data": folder.fingerprint(),
             "optimizer_param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
             "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
             "best_val_top1": best, "metrics": metrics,
             "data_order": "torch.randperm(n, generator seeded with seed * 1000003 + epoch)"}
    write_atomically(os.path.join(run_dir, "state.json"), (json.dumps(state, indent=1) + "\n").encode())


def read_run(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, "state.json")
    if not os.path.isfile(path):
        raise TrainError(f"--resume {run_dir}: no state.json there (not a run directory of trtvit train)")
    try:
        with open(path) as f:
            state = json.load(f)
    except ValueError as e:
        raise TrainError(f"--resume {run_dir}: state.json is not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"--resume {run_dir}: state.json is not a {STATE_FORMAT} file")
    return state


def _load_state(run_dir: str, state: Dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: Any) -> None:
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(run_dir, "state.safetensors"))
    per_param: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def _save_weights(model: torch.nn.Module, path: str, config: TrainConfig, folder: ImageFolder,
                  epochs_done: int, val_top1: Optional[float]) -> None:
    from .weights import save_weights

    save_weights(model, path, config.variant, metadata={
        "classes": json.dumps(folder.classes), "image_size": str(config.image_size), "source": "trained",
        "data": folder.fingerprint_json(), "epochs": str(epochs_done),
        "val_top1": "" if val_top1 is None else f"{val_top1:.6f}"})


def _plot(metrics: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [m["train_loss"] for m in metrics], marker="o", label="train")
    if metrics[0].get("val_loss") is not None:
        ax1.plot(epochs, [m["val_loss"] for m in metrics], marker="o", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    ax2.plot(epochs, [100 * m["train_top1"] for m in metrics], marker="o", label="train (augmented)")
    if metrics[0].get("val_top1") is not None:
        ax2.plot(epochs, [100 * m["val_top1"] for m in metrics], marker="o", label="val")
    ax2.set(xlabel="epoch", ylabel="top-1 %", title="accuracy")
    ax2.legend()
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=80)
    finally:
        plt.close(fig)
    write_atomically(path, png.getvalue())


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: Optional[str] = None, stop_after: Optional[int] = None,
          progress: bool = True) -> Dict[str, Any]:
    """Run (or, with ``resume``, continue) a training run. Returns the last epoch's metrics
    plus ``output`` and ``run_dir``. ``stop_after``: stop after that many epochs in total
    (resumable), e.g. to split a run over time-limited jobs."""
    import kornia.augmentation as K
    from tqdm import tqdm

    from .evaluate import evaluate_model

    dist_ = _setup_processes()
    say = (lambda msg: print(f"trtvit train: {msg}", file=sys.stderr, flush=True)) if dist_.main else (lambda m: None)
    state = None
    if resume is not None:
        state = read_run(resume)
        if state["variant"] != config.variant:
            raise TrainError(f"--resume {resume} is a run of {state['variant']}, not {config.variant}")
        saved = dict(state["config"])
        saved["freeze"] = tuple(saved["freeze"])
        config = TrainConfig(**{**saved, "workers": config.workers, "run_dir": resume})
    get_config(config.variant)

    # Everything that can be wrong with the request is checked before any file is written.
    folder = ImageFolder.read(config.data, min_classes=2)
    val = ImageFolder.read(config.val) if config.val else None
    if val is not None:
        check_same_classes(folder.classes, val.classes, config.val)
    if state is not None and state["data"] != folder.fingerprint():
        raise TrainError(f"--resume {resume}: the data in {config.data} changed since the run started")
    model, frozen = _build_model(config, folder.classes, say, load_init=state is None)
    if dist_.main:
        from .cli import check_output_path

        check_output_path(config.output)
        if os.path.exists(config.run_dir) and not os.path.isdir(config.run_dir):
            raise TrainError(f"run directory {config.run_dir} is a file")
        if state is None and os.path.exists(os.path.join(config.run_dir, "state.json")):
            raise TrainError(f"run directory {config.run_dir} already holds a run: continue it with --resume "
                             f"{config.run_dir} or choose another --run-dir")
        os.makedirs(config.run_dir, exist_ok=True)

    device = dist_.device
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    frozen_modules = [m for n, m in model.named_modules() if any(_under(n, f) for f in config.freeze)]
    if state is not None:
        from .weights import load_weights

        model.load_state_dict({k: v.float() for k, v in
                               load_weights(os.path.join(config.run_dir, "last.safetensors"),
                                            arch=config.variant).items()}, strict=False)
    model.to(device)
    train_model = model
    if dist_.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # 1x1 convolutions on 1x1 maps (stage 4 at small images) give weight gradients with
        # other strides than DDP's buckets: a copy per step, not an error
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    per_rank = len(folder) // dist_.world
    local_batch = max(2, config.batch_size // dist_.world)
    if per_rank < 2:
        raise TrainError(f"{config.data} has {len(folder)} images: too few for {dist_.world} processes")
    local_batch = min(local_batch, per_rank)
    steps = per_rank // local_batch
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, steps))
    amp = config.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    augment = K.AugmentationSequential(
        K.RandomResizedCrop((config.image_size, config.image_size), scale=(config.min_crop_scale, 1.0)),
        K.RandomHorizontalFlip(p=config.hflip))
    dataset = DecodedImages(folder, config.image_size, crop_pct=1.0)

    metrics: List[dict] = []
    best, start_epoch = -1.0, 0
    if state is not None:
        _load_state(config.run_dir, state, optimizer, scheduler, scaler)
        metrics, best, start_epoch = state["metrics"], state["best_val_top1"], state["epochs_done"]
        say(f"resuming {config.run_dir} after epoch {start_epoch} of {config.epochs}")
    if dist_.main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"{config.variant}: {len(folder)} training images in {len(folder.classes)} classes"
            f"{f', {len(val)} validation images' if val else ''}; {trainable:,d} trainable parameters"
            f"{f' ({len(frozen)} tensors frozen)' if frozen else ''}; {dist_.world} process(es) on {device}, "
            f"{'fp32' if amp == 'off' else amp}; batch {local_batch * dist_.world}, {steps} steps per epoch")
        if folder.skipped:
            say(f"skipped {len(folder.skipped)} unreadable image(s) of {config.data}")

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(config.seed * 1000003 + epoch))
        mine = order[dist_.rank:per_rank * dist_.world:dist_.world][:steps * local_batch].tolist()
        torch.manual_seed(config.seed * 1000003 + epoch * 1009 + dist_.rank)  # augmentation draws
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=local_batch,
                                             shuffle=False, num_workers=config.workers, drop_last=True)
        train_model.train()
        for m in frozen_modules:  # frozen BatchNorms keep their statistics
            m.eval()
        sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not (progress and dist_.main), file=sys.stderr)
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad():
                images = normalize(augment(images))
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = train_model(images)
                loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            n = len(labels)
            sums[0] += float(loss.detach()) * n
            sums[1] += int((logits.argmax(1) == labels).sum())
            sums[2] += n
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            img_s=f"{sums[2] * dist_.world / elapsed:.1f}")
        bar.close()
        loss_sum, correct, seen = _all_sum(sums, dist_)
        train_seconds = time.perf_counter() - t0
        line = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "lr": scheduler.get_last_lr()[0],
                "train_top1": correct / seen, "images_per_second": seen / train_seconds}
        if val is not None:
            shard = list(range(dist_.rank, len(val), dist_.world))
            v = evaluate_model(model, val, config.image_size, local_batch * 2, device, shard)
            v_images, v_top1, v_top5, v_loss = _all_sum([v["images"], v["top1"], v["top5"], v["loss"]], dist_)
            line.update(val_top1=v_top1 / v_images, val_top5=v_top5 / v_images, val_loss=v_loss / v_images)
        line["seconds"] = time.perf_counter() - t0
        metrics.append(line)
        score = line.get("val_top1", -line["train_loss"])
        improved = score > best
        best = max(best, score)
        if dist_.main:
            for name in ("last", "best") if improved else ("last",):
                _save_weights(model, os.path.join(config.run_dir, f"{name}.safetensors"), config, folder, epoch + 1,
                              line.get("val_top1"))
            _save_state(config.run_dir, epoch + 1, config, optimizer, scheduler, scaler, best, metrics, folder)
            write_atomically(os.path.join(config.run_dir, "metrics.jsonl"),
                          "".join(json.dumps(m) + "\n" for m in metrics).encode())
            _plot(metrics, os.path.join(config.run_dir, "curves.png"))
            val_text = f", val top-1 {100 * line['val_top1']:.2f} %" if "val_top1" in line else ""
            say(f"epoch {epoch + 1}/{config.epochs}: loss {line['train_loss']:.4f}, lr {line['lr']:.2e}, "
                f"train top-1 {100 * line['train_top1']:.2f} %{val_text}, {line['images_per_second']:.1f} "
                f"images/s, {line['seconds']:.1f} s")
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < config.epochs:
            say(f"stopped after epoch {epoch + 1}; continue with --resume {config.run_dir}")
            break
    finished = bool(metrics) and metrics[-1]["epoch"] == config.epochs
    if dist_.main and finished:
        source = "best.safetensors" if val is not None else "last.safetensors"
        with open(os.path.join(config.run_dir, source), "rb") as f:
            write_atomically(config.output, f.read())
        say(f"wrote {config.output} ({source.split('.')[0]} epoch{' by val top-1' if val is not None else ''})")
    if dist_.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {**(metrics[-1] if metrics else {}), "output": config.output if finished else None,
            "run_dir": config.run_dir, "finished": finished}


# --------------------------------------------------------------------------------------
# Command line (``trtvit train`` and ``python -m trtvit_native.train`` for torchrun)
# --------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        variant=args.variant, data=args.data, output=args.output, val=args.val, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        image_size=args.image_size, label_smoothing=args.label_smoothing, init=args.init,
        freeze=tuple(f for f in args.freeze.split(",") if f), workers=args.workers, seed=args.seed,
        run_dir=args.resume or args.run_dir, clip_grad=args.clip_grad, min_crop_scale=args.min_crop_scale,
        hflip=args.hflip, amp=args.amp)


def run_from_args(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    train(config_from_args(args), resume=args.resume, stop_after=args.stop_after, progress=not args.quiet)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m trtvit_native.train`` (e.g. under torchrun): the arguments of ``trtvit train``."""
    from .cli import main as cli_main

    return cli_main(["train"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
