"""Train and fine-tune TRT-ViT on an ImageFolder tree.

    trtvit train trt-vit-a --data train/ --val val/ --epochs 30 -o a.safetensors
    trtvit train trt-vit-a --data mine/ --init a.safetensors --freeze stem,stages.0 -o mine.safetensors
    trtvit train trt-vit-a --resume RUN_DIR                      # continue a stopped run
    torchrun --nproc_per_node 4 -m trtvit_native train trt-vit-a --data train/ -o a.safetensors

Recipe: AdamW (weight decay on weight matrices and kernels only), linear warmup then
cosine decay per optimizer step, label smoothing, gradient clipping; the classifier head
starts at zero when it is new (from scratch, or re-created for other classes), so
training starts from uniform predictions (loss ln(classes)). Each training image is a
random-resized crop of the whole decoded image (kornia, in the DataLoader's workers) and
goes to the device as uint8; there it is normalized and, as asked, gets RandAugment or
TrivialAugment, random erasing, and MixUp or CutMix (soft targets, label smoothing
applied on top). ``--ema DECAY`` keeps an exponential moving average of the weights and
buffers (``torch.optim.swa_utils.AveragedModel``, with timm's decay warmup:
:func:`ema_decay`), which is then what is validated and saved. Evaluation is resize + center crop (:mod:`trtvit_native.data`); both normalize as
ENGINE.json says. Mixed precision on CUDA (bf16 on compute capability 8.0 and newer,
else fp16 with a gradient scaler), channels_last on CUDA; fp32 on a CPU unless
``--amp bf16`` (much slower on CPUs without bf16 units).

Under torchrun every process trains on its shard of each epoch's permutation with
DistributedDataParallel (gloo on CPU, nccl on CUDA); ``--batch-size`` is the global batch
of one optimizer step (``--accum-steps`` splits it into that many backward passes).
Before validation every process takes process 0's BatchNorm statistics, so the score is
that of the weights saved; the counts are summed over the processes. Process 0 writes
the run directory:

    last.safetensors, best.safetensors   weights (the EMA's with --ema) after the last / best epoch
    state.safetensors, state.json        optimizer, scheduler, RNG, EMA states, epoch, config (no pickle)
    metrics.jsonl, curves.png            one line per epoch (per-class val recall too); curves
    confusion.png                        the validation confusion matrix of the best epoch

Each epoch's data order and augmentation are drawn from generators seeded by (seed,
epoch, image) in the workers and (seed, epoch, rank) on the device, so on the CPU a run
resumed after any epoch ends bit for bit as the uninterrupted run would (on CUDA up to
its non-deterministic kernels). A run resumes only with the number of processes it was
started with.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .data import ImageFolder, TrainImages, check_same_classes, collate_skipping
from .variants import get_config
from .weights import check_output_path, write_atomically

__all__ = ["TrainConfig", "train", "TrainError", "pick_amp", "BatchAugment", "make_ema", "ema_decay", "read_run"]

STATE_FORMAT = "trtvit-train-state/1"


class TrainError(ValueError):
    """A training request that cannot be carried out; the message names the problem."""


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in state.json; ``--resume`` restores it).

    Defaults: from scratch lr 1e-3 with 1 warmup epoch; fine-tuning (``init``) lr 2e-4
    without warmup. Both: AdamW weight decay 0.05, label smoothing 0.1, gradient clipping
    at norm 1.0, random crops covering 50-100 % of the image's area with aspect ratios
    3/4..4/3 (milder than the 8 % of ImageNet recipes, which pay off only over long
    schedules: pass 0.08 there), flips with probability 0.5; no EMA, RandAugment, erasing
    or mixing unless asked.
    """

    variant: str
    data: str
    output: str
    val: Optional[str] = None
    epochs: Optional[int] = None  # 30
    batch_size: int = 64
    lr: Optional[float] = None
    weight_decay: float = 0.05
    warmup_epochs: Optional[float] = None
    image_size: Optional[int] = None  # the size of the ``init`` weights, else 224
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
    ema: Optional[float] = None
    randaug: Optional[Tuple[int, int]] = None
    trivialaug: bool = False
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    accum_steps: int = 1

    def __post_init__(self) -> None:
        # Which settings were given (not defaulted): a resumed run takes only --epochs from
        # the command line; the start line says where the image size came from.
        self._epochs_given = self.epochs is not None
        if self.epochs is None:
            self.epochs = 30
        from .weights import WeightsError, resolve_image_size

        try:
            self.image_size, self._image_size_source = resolve_image_size(self.init, self.image_size)
        except WeightsError as e:
            raise TrainError(f"--init: {e}") from None
        self.freeze = tuple(self.freeze)
        if self.randaug is not None:
            self.randaug = tuple(self.randaug)
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
            (self.ema is None or 0 < self.ema < 1, f"--ema must be a decay in (0, 1), e.g. 0.999, got {self.ema}"),
            (self.randaug is None or (len(self.randaug) == 2 and self.randaug[0] >= 1 and 0 < self.randaug[1] < 30),
             f"--randaug must be N,M with N >= 1 operations and magnitude 0 < M < 30 (kornia's scale), got "
             f"{self.randaug}"),
            (not (self.randaug and self.trivialaug), "--randaug and --trivialaug exclude each other"),
            (0 <= self.random_erasing <= 1, f"--random-erasing must be a probability in [0, 1], got "
                                            f"{self.random_erasing}"),
            (self.mixup >= 0, f"--mixup must be a Beta(alpha, alpha) alpha >= 0, got {self.mixup}"),
            (self.cutmix >= 0, f"--cutmix must be a Beta(alpha, alpha) alpha >= 0, got {self.cutmix}"),
            (self.accum_steps >= 1, f"--accum-steps must be at least 1, got {self.accum_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)


# --------------------------------------------------------------------------------------
# Small helpers: processes, files, precision
# --------------------------------------------------------------------------------------


def _check_torch() -> None:
    """torch.amp.GradScaler(device) and AveragedModel's multi_avg_fn need torch 2.3."""
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if found is None or tuple(int(v) for v in found.groups()) < (2, 3):
        raise TrainError(f"trtvit train needs torch >= 2.3 (torch.amp.GradScaler(device)); this is torch "
                         f"{torch.__version__}")


def pick_amp(requested: str, device: torch.device) -> str:
    """``--amp auto``: off on a CPU; bf16 on GPUs with native bf16 (compute capability 8.0,
    Ampere, and newer), fp16 before (T4, V100: ``torch.cuda.is_bf16_supported()`` counts
    their slow emulation)."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


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


def _all_paths(paths: Sequence[str], dist_: _Dist) -> List[str]:
    """The union of every process's ``paths``, sorted."""
    if dist_.world == 1:
        return sorted(set(paths))
    import torch.distributed as dist

    everyone: List[Any] = [None] * dist_.world
    dist.all_gather_object(everyone, sorted(set(paths)))
    return sorted({p for part in everyone for p in part})


def _take_buffers_of_rank0(modules: Sequence[torch.nn.Module], dist_: _Dist) -> None:
    """Every process's buffers (BatchNorm statistics, drifted by its own batches) become
    process 0's, so that what each evaluates is what process 0 saves."""
    if dist_.world == 1:
        return
    import torch.distributed as dist

    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


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
    ``config.init`` (a resumed run starts from its own last weights instead). A new head
    (from scratch, or re-created for other classes) starts at zero, as timm's does: every
    class gets the same logit, the first loss is ln(classes), and the seeded weights of
    ``create_model`` stay what the parity tests use."""
    from .model import create_model
    from .weights import WeightsError, class_names, load_weights

    model = create_model(config.variant, num_classes=len(classes), seed=config.seed)
    new_head = True
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
        else:
            new_head = False
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    if new_head:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
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
# EMA and batch augmentation
# --------------------------------------------------------------------------------------


def ema_decay(decay: float, updates: int, warmup_power: Optional[float] = 0.75) -> float:
    """The decay of the EMA's update after ``updates`` earlier ones: timm's warmup
    (``ModelEmaV3``), ``min(decay, 1 - (1 + updates) ** -warmup_power)``, so that early
    averages follow the model instead of staying the random initialization (with a fixed
    0.999, 300 steps leave 0.999**300 = 74 % of it). Power 3/4 is timm's choice for short
    schedules (the decay reaches 0.99 after 463 updates, 0.999 after 10,000); None: no
    warmup."""
    if warmup_power is None:
        return decay
    return min(decay, 1.0 - (1.0 + updates) ** -warmup_power)


def make_ema(model: torch.nn.Module, decay: float,
             warmup_power: Optional[float] = 0.75) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers: the first
    ``update_parameters(model)`` copies the model, the k-th after it makes ema =
    d * ema + (1 - d) * model with d = :func:`ema_decay` (decay, k) (the warmup is
    counted by ``n_averaged``, which a resumed run restores)."""
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def update(ema_params: List[torch.Tensor], params: List[torch.Tensor], updates: torch.Tensor) -> None:
        d = ema_decay(decay, int(updates), warmup_power)
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:  # integer buffers (BatchNorm's batch count)
            for e, p in zip(ema_params, params):
                e.copy_(e * d + p * (1 - d))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


class BatchAugment:
    """What a training batch gets on the device: uint8 (B, 3, S, S) and labels in; the
    network input and the targets out. RandAugment ``(n, m)`` or TrivialAugment (kornia's
    policies, drawn per batch), normalization, random erasing with probability
    ``erasing`` (mean-colored), then MixUp and/or CutMix with Beta(alpha, alpha) (one of
    the two per batch, at random, when both are given): the targets become class
    probabilities, ``weight_a`` of the image's own class and ``weight_b`` of its partner's
    (they sum to 1; the loss's label smoothing applies on top). Without mixing the
    targets are the labels."""

    def __init__(self, classes: int, randaug: Optional[Tuple[int, int]] = None, trivialaug: bool = False,
                 erasing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
        import kornia.augmentation as K
        from kornia.augmentation.auto import RandAugment, TrivialAugment

        self.classes, self.mixup, self.cutmix = classes, mixup, cutmix
        self.policy = RandAugment(*randaug) if randaug else TrivialAugment() if trivialaug else None
        self.erase = K.RandomErasing(p=erasing) if erasing > 0 else None
        self._cutmix = K.RandomCutMixV2(beta=cutmix, use_correct_lambda=True, data_keys=["input", "class"]) \
            if cutmix > 0 else None
        self.last_mix: Optional[Dict[str, torch.Tensor]] = None  # partner index and weights of the last batch

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """MixUp or CutMix of a normalized batch: (images, class probabilities)."""
        import kornia.augmentation as K

        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or bool(torch.rand(()) < 0.5))
        if use_cutmix:
            images, mixed = self._cutmix(images, labels)
            mixed = mixed[0]  # (B, 3): own label, partner's label, weight of the own label (the kept area)
            weight_a = mixed[:, 2]
        else:
            lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
            images, mixed = K.RandomMixUpV2(lambda_val=(lam, lam), data_keys=["input", "class"])(images, labels)
            weight_a = 1 - mixed[:, 2]  # kornia: (1 - lam) * own + lam * partner
        partner = mixed[:, 1].long()
        weight_a = weight_a.to(images.dtype)
        weight_b = 1 - weight_a
        targets = (weight_a[:, None] * torch.nn.functional.one_hot(labels, self.classes).to(images.dtype)
                   + weight_b[:, None] * torch.nn.functional.one_hot(partner, self.classes).to(images.dtype))
        self.last_mix = {"partner_label": partner, "weight_a": weight_a, "weight_b": weight_b,
                         "kind": "cutmix" if use_cutmix else "mixup"}
        return images, targets

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        from .model import imagenet_normalize

        x = images.float() / 255.0
        if self.policy is not None:
            x = self.policy(x).clamp(0, 1)
        x = imagenet_normalize(x)
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup > 0 or self.cutmix > 0:
            return self.mix(x, labels)
        return x, labels


# --------------------------------------------------------------------------------------
# Resume state: safetensors for tensors, JSON for the rest
# --------------------------------------------------------------------------------------


def _save_state(run_dir: str, epoch: int, config: TrainConfig, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: Any, best: Optional[float], metrics: List[dict], folder: ImageFolder, world: int,
                model: torch.nn.Module, ema: Optional[torch.nn.Module]) -> None:
    opt = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optimizer.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    if ema is not None:  # last.safetensors holds the EMA: the trained weights are kept here
        tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
        tensors["ema.n_averaged"] = ema.n_averaged
    _save_tensors(tensors, os.path.join(run_dir, "state.safetensors"))
    state = {"format": STATE_FORMAT, "variant": config.variant, "epochs_done": epoch,
             "config": dataclasses.asdict(config), "classes": folder.classes, "data": folder.fingerprint(),
             "world_size": world, "optimizer_param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
             "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
             "best_score": best, "metrics": metrics,
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


def _load_state(run_dir: str, state: Dict[str, Any], model: torch.nn.Module, ema: Optional[torch.nn.Module],
                optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
    from safetensors.torch import load_file

    from .weights import load_weights

    tensors = load_file(os.path.join(run_dir, "state.safetensors"))
    last = {k: v.float() for k, v in load_weights(os.path.join(run_dir, "last.safetensors"),
                                                  arch=state["variant"]).items()}
    if ema is not None:
        ema.module.load_state_dict(last)
        ema.n_averaged.copy_(tensors["ema.n_averaged"])
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    else:
        model.load_state_dict(last)
    per_param: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    # The schedule's lambda is this run's (recomputed when --epochs extends the run): the
    # rate of the next step is the new schedule's, not the one the saved state holds.
    rates = [base * lr_lambda(scheduler.last_epoch) for base, lr_lambda in zip(scheduler.base_lrs,
                                                                              scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _check_resume(resume: str, state: Dict[str, Any], config: TrainConfig, world: int) -> TrainConfig:
    """The run's saved settings, after checking that what the command line gives agrees."""
    if state["variant"] != config.variant:
        raise TrainError(f"--resume {resume} is a run of {state['variant']}, not {config.variant}")
    saved = dict(state["config"])
    saved["freeze"] = tuple(saved["freeze"])
    for flag, key in (("--data", "data"), ("-o", "output")):
        given = getattr(config, key)
        if given and os.path.abspath(given) != os.path.abspath(saved[key]):
            raise TrainError(f"--resume {resume}: {flag} {given} is not the run's {flag} {saved[key]} (a resumed run "
                             f"keeps its settings: leave {flag} out or give the same)")
    started = int(state.get("world_size", 1))
    if started != world:
        raise TrainError(f"--resume {resume}: the run was started with {started} process(es), this is {world}; "
                         f"the global batch, the steps per epoch and the data shards would change (resume it with "
                         f"{started})")
    for key, value in getattr(config, "_given", {}).items():  # settings given on the command line
        kept = saved.get(key)
        kept = tuple(kept) if isinstance(kept, list) else kept
        if key not in ("data", "output", "epochs", "workers", "run_dir") and value != kept:
            flag = "--" + key.replace("_", "-")
            raise TrainError(f"--resume {resume}: {flag} {value} is not the run's {flag} {kept} (a resumed run keeps "
                             f"its settings; --epochs can extend it: leave {flag} out or give the same)")
    done, end = int(state["epochs_done"]), int(saved["epochs"])
    epochs = config.epochs if getattr(config, "_epochs_given", False) else end
    if epochs < end:
        raise TrainError(f"--resume {resume}: --epochs {epochs} is fewer than the run's {end} (a run can be "
                         f"extended, not shortened: give --epochs {end} or more, or leave it out)")
    if epochs == done:
        raise TrainError(f"--resume {resume}: nothing to do: the run finished all its {done} epochs (give a "
                         f"larger --epochs to extend it)")
    resumed = TrainConfig(**{**saved, "epochs": epochs, "workers": config.workers, "run_dir": resume})
    resumed._image_size_source = f"{resumed.image_size}x{resumed.image_size} (the run's)"
    resumed._extended_from = end if epochs > end else None
    return resumed


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


def _link_atomically(source: str, target: str) -> None:
    """``target`` becomes a hard link to ``source`` (a copy where the file system has no
    hard links). ``source`` is later replaced by a rename, which leaves ``target`` intact."""
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as f:
            write_atomically(target, f.read())
        return
    os.replace(tmp, target)


def _plot(metrics: List[dict], path: str) -> None:
    import matplotlib

    from .evaluate import figure_png

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
    write_atomically(path, figure_png(fig))


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class _EpochShard(torch.utils.data.Sampler):
    """This process's share of each epoch's permutation, as ``(epoch, index)`` keys for
    :class:`TrainImages`; :meth:`set_epoch` before each epoch (the DataLoader and its
    persistent workers are built once)."""

    def __init__(self, n: int, seed: int, rank: int, world: int, per_epoch: int):
        self.n, self.seed, self.rank, self.world, self.per_epoch, self.epoch = n, seed, rank, world, per_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000003 + self.epoch))
        mine = order[self.rank::self.world][:self.per_epoch].tolist()
        return iter([(self.epoch, i) for i in mine])


def train(config: TrainConfig, resume: Optional[str] = None, stop_after: Optional[int] = None,
          progress: bool = True) -> Dict[str, Any]:
    """Run (or, with ``resume``, continue) a training run. Returns the last epoch's metrics
    plus ``output``, ``run_dir`` and ``skipped`` (images that could not be decoded).
    ``stop_after``: stop after that many epochs in total (resumable), e.g. to split a run
    over time-limited jobs."""
    from tqdm import tqdm

    from .evaluate import class_report, eval_loader, evaluate_model, plot_confusion

    _check_torch()
    dist_ = _setup_processes()
    say = (lambda msg: print(f"trtvit train: {msg}", file=sys.stderr, flush=True)) if dist_.main else (lambda m: None)
    state = None
    if resume is not None:
        state = read_run(resume)
        config = _check_resume(resume, state, config, dist_.world)
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
        check_output_path(config.output)
        if os.path.exists(config.run_dir) and not os.path.isdir(config.run_dir):
            raise TrainError(f"run directory {config.run_dir} is a file")
        if state is None and os.path.exists(os.path.join(config.run_dir, "state.json")):
            raise TrainError(f"run directory {config.run_dir} already holds a run: continue it with --resume "
                             f"{config.run_dir} or choose another --run-dir")
    per_rank = len(folder) // dist_.world
    micro = min(max(2, config.batch_size // (dist_.world * config.accum_steps)), per_rank)
    steps = per_rank // (micro * config.accum_steps)
    if steps < 1 or micro < 2:
        raise TrainError(f"{config.data} has {len(folder)} images: too few for {dist_.world} process(es) with "
                         f"--accum-steps {config.accum_steps}")
    if dist_.main:
        os.makedirs(config.run_dir, exist_ok=True)

    device = dist_.device
    cuda = device.type == "cuda"
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    frozen_modules = [m for n, m in model.named_modules() if any(_under(n, f) for f in config.freeze)]
    model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    ema = make_ema(model, config.ema) if config.ema else None
    train_model = model
    if dist_.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # 1x1 convolutions on 1x1 maps (stage 4 at small images) give weight gradients with
        # other strides than DDP's buckets: a copy per step, not an error
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, steps))
    amp = pick_amp(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    augment = BatchAugment(len(folder.classes), config.randaug, config.trivialaug, config.random_erasing,
                           config.mixup, config.cutmix)
    dataset = TrainImages(folder, config.image_size, scale=(config.min_crop_scale, 1.0), hflip=config.hflip,
                          seed=config.seed)
    sampler = _EpochShard(len(folder), config.seed, dist_.rank, dist_.world, steps * config.accum_steps * micro)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=config.workers,
                                         collate_fn=collate_skipping, pin_memory=cuda,
                                         persistent_workers=config.workers > 0)
    val_loader = None
    if val is not None:
        val_loader = eval_loader(val, config.image_size, micro * 2, range(dist_.rank, len(val), dist_.world),
                                 config.workers, pin_memory=cuda)
    eval_model = ema.module if ema is not None else model

    metrics: List[dict] = []
    best: Optional[float] = None
    start_epoch = 0
    if state is not None:
        _load_state(config.run_dir, state, model, ema, optimizer, scheduler, scaler)
        metrics, start_epoch = state["metrics"], state["epochs_done"]
        best = state.get("best_score", state.get("best_val_top1"))  # the latter: runs of earlier versions
        extended = getattr(config, "_extended_from", None)
        say(f"resuming {config.run_dir} after epoch {start_epoch} of {config.epochs}"
            + (f": extended from {extended} epochs, the learning-rate schedule recomputed for the new end"
               if extended else ""))
    if dist_.main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        extras = [f"EMA {config.ema}" if ema is not None else "",
                  f"accumulating {config.accum_steps} batches of {micro * dist_.world}" if config.accum_steps > 1
                  else ""]
        say(f"{config.variant}: {len(folder)} training images in {len(folder.classes)} classes"
            f"{f', {len(val)} validation images' if val else ''}; {trainable:,d} trainable parameters"
            f"{f' ({len(frozen)} tensors frozen)' if frozen else ''}; {dist_.world} process(es) on {device}, "
            f"{'fp32' if amp == 'off' else amp}; batch {micro * config.accum_steps * dist_.world}, {steps} steps per "
            f"epoch{''.join(f'; {e}' for e in extras if e)}")
        say(f"image size {config._image_size_source}")
    skipped = set(folder.skipped) | set(val.skipped if val is not None else ())

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        torch.manual_seed(config.seed * 1000003 + epoch * 1009 + dist_.rank)  # the device's augmentation draws
        train_model.train()
        for m in frozen_modules:  # frozen BatchNorms keep their statistics
            m.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n: one sync per epoch
        first_loss = None
        lr_used = scheduler.get_last_lr()[0]
        lr_first: Optional[float] = None
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not (progress and dist_.main), file=sys.stderr)
        optimizer.zero_grad(set_to_none=True)
        for i, (images, labels, bad) in enumerate(bar):
            skipped.update(bad)
            last_micro = (i + 1) % config.accum_steps == 0
            if len(labels) < 2:  # undecodable images left fewer than BatchNorm needs
                if dist_.world > 1:
                    raise TrainError(f"a batch of process {dist_.rank} holds {len(labels)} decodable image(s) "
                                     f"(BatchNorm needs 2): remove the undecodable images {sorted(bad)}")
            else:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with torch.no_grad():
                    x, targets = augment(images, labels)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                sync = contextlib.nullcontext() if last_micro or dist_.world == 1 else train_model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        logits = train_model(x)
                    loss = criterion(logits.float(), targets)
                    scaler.scale(loss / config.accum_steps).backward()
                hard = targets if targets.dim() == 1 else targets.argmax(1)
                n = len(labels)
                sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == hard).sum().double(),
                                     torch.tensor(float(n), dtype=torch.float64, device=device)])
                if epoch == 0 and i == 0:
                    first_loss = float(loss.detach())
            if last_micro:
                lr_used = optimizer.param_groups[0]["lr"]  # the rate this step uses (before scheduler.step)
                lr_first = lr_used if lr_first is None else lr_first
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
            if progress and dist_.main and i % 20 == 19:  # a host sync every 20 batches, for the bar only
                loss_sum, _, seen = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", lr=f"{lr_used:.2e}",
                                img_s=f"{seen * dist_.world / (time.perf_counter() - t0):.1f}")
        bar.close()
        loss_sum, correct, seen = _all_sum(sums.tolist(), dist_)
        train_seconds = time.perf_counter() - t0
        line: Dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "lr": lr_used, "lr_first": lr_first,
                                "train_top1": correct / seen, "images_per_second": seen / train_seconds}
        if first_loss is not None:
            line["first_step_loss"] = first_loss
        _take_buffers_of_rank0([model] + ([ema.module] if ema is not None else []), dist_)
        v = None
        if val_loader is not None:
            v = evaluate_model(eval_model, val, config.image_size, device=device, loader=val_loader,
                               channels_last=cuda)
            skipped.update(v["skipped"])
            line.update(val_top1=v["top1"], val_top5=v["top5"], val_loss=v["loss"],
                        val_recall=[c["recall"] for c in class_report(v["confusion"], val.classes)])
        all_skipped = _all_paths(sorted(skipped), dist_)
        line["skipped_images"] = len(all_skipped)
        line["seconds"] = time.perf_counter() - t0
        metrics.append(line)
        score = line.get("val_top1", -line["train_loss"])
        improved = best is None or score > best
        if improved:
            best = score
        if dist_.main:
            last = os.path.join(config.run_dir, "last.safetensors")
            _save_weights(eval_model, last, config, folder, epoch + 1, line.get("val_top1"))
            if improved:  # the same bytes: one more name for them, not one more copy
                _link_atomically(last, os.path.join(config.run_dir, "best.safetensors"))
            if improved and v is not None:
                write_atomically(os.path.join(config.run_dir, "confusion.png"), plot_confusion(
                    v["confusion"], val.classes, f"epoch {epoch + 1}: val top-1 {100 * v['top1']:.2f} %"))
            _save_state(config.run_dir, epoch + 1, config, optimizer, scheduler, scaler, best, metrics, folder,
                        dist_.world, model, ema)
            write_atomically(os.path.join(config.run_dir, "metrics.jsonl"),
                             "".join(json.dumps(m) + "\n" for m in metrics).encode())
            _plot(metrics, os.path.join(config.run_dir, "curves.png"))
            val_text = f", val top-1 {100 * line['val_top1']:.2f} %" if "val_top1" in line else ""
            first_text = (f", first step loss {first_loss:.4f} (ln {len(folder.classes)} = "
                          f"{math.log(len(folder.classes)):.4f})" if first_loss is not None else "")
            say(f"epoch {epoch + 1}/{config.epochs}: loss {line['train_loss']:.4f}{first_text}, lr {line['lr']:.2e}, "
                f"train top-1 {100 * line['train_top1']:.2f} %{val_text}, {line['images_per_second']:.1f} "
                f"images/s, {line['seconds']:.1f} s")
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < config.epochs:
            say(f"stopped after epoch {epoch + 1}; continue with --resume {config.run_dir}")
            break
    finished = bool(metrics) and metrics[-1]["epoch"] == config.epochs
    all_skipped = _all_paths(sorted(skipped), dist_)
    if all_skipped:
        say(f"skipped {len(all_skipped)} unreadable image(s): {', '.join(all_skipped[:5])}"
            f"{' ...' if len(all_skipped) > 5 else ''}")
    if dist_.main and finished:
        source = "best.safetensors" if val is not None else "last.safetensors"
        with open(os.path.join(config.run_dir, source), "rb") as f:
            write_atomically(config.output, f.read())
        say(f"wrote {config.output} ({source.split('.')[0]} epoch{' by val top-1' if val is not None else ''}"
            f"{', EMA weights' if ema is not None else ''})")
    if dist_.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {**(metrics[-1] if metrics else {}), "output": config.output if finished else None,
            "run_dir": config.run_dir, "finished": finished, "skipped": all_skipped}


# --------------------------------------------------------------------------------------
# Command line (``trtvit train``; ``torchrun -m trtvit_native train`` for several processes)
# --------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data, output = args.data, args.output
    if args.resume is None:
        missing = [flag for flag, value in (("--data", data), ("-o/--output", output)) if not value]
        if missing:
            raise TrainError(f"{' and '.join(missing)} required (a resumed run, --resume, keeps its own)")
    else:  # given ones are checked against the run's; missing ones are the run's
        saved = read_run(args.resume).get("config", {})
        data, output = data or saved.get("data", ""), output or saved.get("output", "")
    config = TrainConfig(
        variant=args.variant, data=data, output=output, val=args.val, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        image_size=args.image_size, label_smoothing=args.label_smoothing, init=args.init,
        freeze=tuple(f for f in args.freeze.split(",") if f), workers=args.workers, seed=args.seed,
        run_dir=args.resume or args.run_dir, clip_grad=args.clip_grad, min_crop_scale=args.min_crop_scale,
        hflip=args.hflip, amp=args.amp, ema=args.ema, randaug=args.randaug, trivialaug=args.trivialaug,
        random_erasing=args.random_erasing, mixup=args.mixup, cutmix=args.cutmix, accum_steps=args.accum_steps)
    if args.resume is not None:  # what the command line gives beyond the defaults: checked against the run's
        config._given = {key: getattr(config, key) for key in getattr(args, "given", ()) if hasattr(config, key)}
    return config


def run_from_args(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    train(config_from_args(args), resume=args.resume, stop_after=args.stop_after, progress=not args.quiet)
    return 0
