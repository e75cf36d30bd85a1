"""Training and evaluation loops, checkpoints, metrics CSV and curves.

Recipe (the paper's DeiT-style recipe): AdamW with no weight decay for the model's
no_weight_decay() parameters, norms and biases; per-step linear warm-up then cosine decay to
``min_lr``; label smoothing; drop path; gradient-norm clipping; optional EMA of the weights.
The ImageNet augmentations are options (``aug="imagenet"``: random resized crop, flip,
RandAugment, random erasing; ``mixup`` / ``cutmix`` alphas; quadmamba.augment), off by
default: built for ImageNet-scale training, they slow convergence on tiny data sets.

A run directory holds checkpoint.pt (rewritten atomically after every epoch), metrics.csv
(one row per epoch) and curves.png. Resuming restores model, optimizer, scheduler and EMA;
the data order of epoch e depends only on (seed, e) and every epoch seeds torch's RNG
from (seed, e, process), so a resumed run repeats the uninterrupted one exactly (an interrupted
run loses only its current epoch).

Under torchrun the run is data-parallel (quadmamba.distributed): ``batch_size`` is the global
batch, every process trains on its part of it, process 0 writes the files and the log.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from quadmamba.data import (DIGITS, DataSpec, augment, build_datasets, check_aug, check_img_size,
                            datasets_for_spec)
from quadmamba.distributed import (Group, check_global_batch, epoch_batches, global_steps, join, launched_group,
                                   process_device, shard)

CHECKPOINT_FORMAT = "quadmamba-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.csv"
CURVES_NAME = "curves.png"
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s", "seconds")


class CheckpointError(ValueError):
    """A file that is not a usable quadmamba checkpoint, or one that does not fit the request."""


class TrainingError(RuntimeError):
    """Training cannot go on (the loss diverged)."""


class OutputError(ValueError):
    """An output location that cannot be written or would overwrite a previous run."""


@dataclass
class TrainConfig:
    """Every setting of a training run (stored in the checkpoint).

    The defaults are the ``quadmamba train`` defaults: quadmamba_nano on the digits at 32x32.
    """

    model: str = "quadmamba_nano"
    data: str = "digits"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path: Optional[float] = None
    clip_grad: float = 5.0
    ema_decay: float = 0.0
    img_size: int = 32
    in_chans: Optional[int] = None
    device: str = "cpu"
    amp: bool = False
    seed: int = 0
    kernels: str = "fused"
    quad_scan: str = "quadtree"
    val_fraction: float = 0.2
    train_limit: int = 0
    test_limit: int = 0
    workers: int = 0
    aug: str = "basic"
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self):
        check_img_size(self.img_size)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for name, value in (("weight-decay", self.weight_decay), ("warmup-epochs", self.warmup_epochs),
                            ("clip-grad", self.clip_grad)):
            if not 0 <= value < math.inf:
                raise ValueError(f"--{name} must be >= 0, got {value}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.train_limit < 0 or self.test_limit < 0 or self.workers < 0:
            raise ValueError("--train-limit, --test-limit and --workers must be >= 0")
        check_aug(self.aug)
        for name in ("mixup", "cutmix"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise ValueError(f"--{name} is the alpha of a Beta distribution, >= 0 (0: off), "
                                 f"got {getattr(self, name)}")

    def mixing(self, num_classes: int):
        """The batch mixing of the run (quadmamba.augment.MixupCutmix, label smoothing
        included), or None without mixup and cutmix."""
        if self.mixup == 0 and self.cutmix == 0:
            return None
        from quadmamba.augment import MixupCutmix

        return MixupCutmix(num_classes, mixup_alpha=self.mixup, cutmix_alpha=self.cutmix,
                           label_smoothing=self.label_smoothing)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda", "cuda:N" or "auto" (CUDA when available) -> a usable torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return device


def check_kernels(kernels: str) -> None:
    """Fail early, with the fix, when the fused kernels are asked for but the core is not built."""
    from quadmamba._backend import core
    from quadmamba.layers.kernels import KERNELS

    if kernels not in KERNELS:
        raise ValueError(f"--kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "fused":
        try:
            core()
        except ImportError as exc:
            raise ValueError(f"--kernels fused: {str(exc).splitlines()[0]} "
                             "(or pass --kernels reference for the plain-PyTorch ops)") from exc


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    import quadmamba

    check_kernels(cfg.kernels)
    return quadmamba.create_model(cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path,
                                  kernels=cfg.kernels, quad_scan=cfg.quad_scan, in_chans=in_chans)


def model_from_config(config: dict, kernels: Optional[str] = None) -> nn.Module:
    """Rebuild a model from a checkpoint's config dict, optionally on other kernels."""
    from quadmamba import QuadMamba, QuadMambaConfig

    config = dict(config)
    if kernels is not None:
        check_kernels(kernels)
        config["kernels"] = kernels
    else:
        check_kernels(config.get("kernels", "fused"))
    try:
        return QuadMamba(QuadMambaConfig(**config))
    except TypeError as exc:
        raise CheckpointError(f"checkpoint model config is not a QuadMambaConfig: {exc}") from None


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two AdamW groups: decayed weights, and no decay for no_weight_decay() names, norms
    and biases (every parameter with fewer than 2 dimensions)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor at step s: linear from 1/(warmup+1) up to 1 over warmup_steps, then cosine
    from 1 down to min_ratio at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


class ModelEma:
    """Exponential moving average of a model's parameters and floating buffers:
    ema = decay * ema + (1 - decay) * current, after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(self.decay).add_(current[name].detach(), alpha=1.0 - self.decay)
            else:
                value.copy_(current[name])


def _subset(dataset, limit: int):
    if limit and limit < len(dataset):
        return torch.utils.data.Subset(dataset, list(range(limit)))
    return dataset


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------------------
# loops
# ---------------------------------------------------------------------------------------------
def train_one_epoch(model, loader, optimizer, scheduler, cfg: TrainConfig, device: torch.device,
                    ema: Optional[ModelEma], desc: str, transform: Callable[[torch.Tensor], torch.Tensor],
                    group: Group = Group(), mixing=None) -> Dict[str, float]:
    """One pass over ``loader`` (this process's part of each global batch); returns the epoch's
    loss, accuracy (of the images' own labels) and throughput over the whole group.

    ``transform`` acts on each batch of images; ``mixing`` (quadmamba.augment.MixupCutmix)
    then mixes it and gives soft targets, trained with the soft-target cross-entropy (without
    it: cross-entropy with ``cfg.label_smoothing``). Every step sums its loss over the local
    images and scales the sum by world / (images in the global batch): with
    DistributedDataParallel averaging over the processes, the gradient is that of the global
    batch's mean loss, however it was split."""
    from tqdm import tqdm

    from torch.nn.parallel import DistributedDataParallel

    replica = model.module if isinstance(model, DistributedDataParallel) else model
    if mixing is not None:
        from quadmamba.augment import soft_target_cross_entropy
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=None if group.main else True, leave=False, unit="batch")
    for images, labels in bar:
        images = transform(images).to(device)
        labels = labels.to(device)
        targets = None
        if mixing is not None:
            images, targets = mixing(images, labels)
        with _autocast(device, cfg.amp):
            logits = model(images)
        if targets is None:
            loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing, reduction="sum")
        else:
            loss_sum = soft_target_cross_entropy(logits, targets, reduction="sum")
        hits = (logits.argmax(1) == labels).sum()
        stats = torch.stack([loss_sum.detach().double(), hits.double(),
                             torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
        step_loss, step_correct, step_n = group.sum(stats).tolist()
        if not math.isfinite(step_loss):
            raise TrainingError(f"training diverged: loss is {step_loss / step_n} ({desc}); lower --lr")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (group.world / step_n)).backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(replica)
        total_loss += step_loss
        correct += int(step_correct)
        seen += int(step_n)
        rate = seen / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}%", img_s=f"{rate:.0f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-9), "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(model, loader, device: torch.device, num_classes: int, amp: bool = False,
             desc: str = "eval", group: Group = Group()) -> Dict[str, object]:
    """Plain cross-entropy, top-1, top-5 and the confusion matrix (rows: true, cols: predicted),
    summed over the group (each process's loader holding its shard of the images)."""
    from tqdm import tqdm

    model.eval()
    total_loss, top1, top5, seen = 0.0, 0, 0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    k = min(5, num_classes)
    for images, labels in tqdm(loader, desc=desc, disable=None if group.main else True, leave=False, unit="batch"):
        images, labels = images.to(device), labels.to(device)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        pred = logits.argmax(1)
        top1 += int((pred == labels).sum())
        top5 += int((logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum())
        seen += labels.numel()
        confusion += torch.bincount((labels * num_classes + pred).cpu(), minlength=num_classes ** 2).view(
            num_classes, num_classes)
    if group.world > 1:
        sums = group.sum(torch.tensor([total_loss, top1, top5, seen], dtype=torch.float64, device=device)).tolist()
        total_loss, top1, top5, seen = sums[0], int(sums[1]), int(sums[2]), int(sums[3])
        confusion = group.sum(confusion.to(device)).cpu()
    return {"loss": total_loss / max(seen, 1), "top1": top1 / max(seen, 1), "top5": top5 / max(seen, 1),
            "correct": top1, "count": seen, "confusion": confusion}


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, state: dict) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


# What resuming a run reads besides the model: entry -> the type it must have.
_RESUME_ENTRIES = {"optimizer": dict, "scheduler": dict, "epoch": int, "metrics": list}


def load_checkpoint(path: str, resume: bool = False) -> dict:
    """Load and check a checkpoint written by ``quadmamba train`` (tensors only, no code): the
    entries every use reads (model, config, data, train) and, with resume, the training state
    (optimizer, scheduler, epoch, metrics, and ema when the run keeps one)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch raises many types for foreign files; all mean the same here
        raise CheckpointError(f"not a quadmamba checkpoint: {path} ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a quadmamba checkpoint: {path} (no '{CHECKPOINT_FORMAT}' marker)")
    version = state.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; "
                              f"this quadmamba reads integer versions up to {CHECKPOINT_VERSION}")
    missing = [k for k in ("model", "config", "data", "train") if not isinstance(state.get(k), dict)]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {', '.join(repr(k) for k in missing)} entry")
    try:
        spec = DataSpec.from_dict(state["data"])
        train = TrainConfig(**state["train"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has a malformed 'data' or 'train' entry ({exc})") from None
    classes = state["config"].get("num_classes")
    if classes != len(spec.classes):
        raise CheckpointError(f"checkpoint {path} is inconsistent: its model has {classes!r} classes, "
                              f"its data {len(spec.classes)}")
    if resume:
        needed = dict(_RESUME_ENTRIES, **({"ema": dict} if train.ema_decay > 0 else {}))
        bad = [k for k, kind in needed.items() if not isinstance(state.get(k), kind)]
        if bad:
            raise CheckpointError(f"checkpoint {path} cannot resume a run: no usable "
                                  f"{', '.join(repr(k) for k in bad)} entry (eval and visualize still read it)")
    return state


def restore_model(state: dict, kernels: Optional[str] = None, expect_model: Optional[str] = None,
                  use_ema: bool = True) -> nn.Module:
    """The checkpoint's model (its EMA weights when it has them and use_ema), in eval mode."""
    name = state["config"].get("name")
    if expect_model is not None and expect_model != name:
        raise CheckpointError(f"checkpoint holds a {name} model, not {expect_model}")
    model = model_from_config(state["config"], kernels)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"checkpoint weights do not fit its {name} config "
                              f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    return model.eval()


def write_metrics(path: str, rows: List[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row[k] for k in METRIC_COLUMNS})
    _atomic_write(path, write)


def plot_curves(path: str, rows: List[dict], title: str) -> None:
    """Loss and accuracy per epoch, train and held-out: a 1000x400 PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train (smoothed targets)")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], "s-", label="held-out")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in rows], "o-", label="train (augmented)")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in rows], "s-", label="held-out")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # whole epochs
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.25)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _atomic_write(path, lambda tmp: open(tmp, "wb").write(buf.getvalue()))


def require_packages(data: Optional[str], augmenting: bool = False) -> None:
    """Import the optional packages a run needs (tqdm, matplotlib, and scikit-learn for the
    digits or Pillow for a folder or the augmentations of quadmamba.augment) before anything
    is written: a missing one raises ModuleNotFoundError (which the command line turns into
    the install command) and leaves no empty run folder behind."""
    import importlib

    names = ["matplotlib", "tqdm", "sklearn" if data in (None, DIGITS) else "PIL"]
    for name in names + (["PIL"] if augmenting else []):
        importlib.import_module(name)


def check_output(output: str, resume: bool, force: bool) -> str:
    """The checkpoint path of a run in ``output``, without writing anything: refuses to
    overwrite an existing checkpoint unless asked, and to resume where there is none."""
    ckpt = os.path.join(output, CHECKPOINT_NAME)
    if resume:
        if not os.path.isfile(ckpt):
            raise OutputError(f"--resume: no {CHECKPOINT_NAME} in {output}")
    elif os.path.exists(ckpt) and not force:
        raise OutputError(f"{output} already holds a checkpoint; pass --resume to continue it "
                          "or --force to start over")
    if os.path.exists(output) and not os.path.isdir(output):
        raise OutputError(f"cannot write to {output}: it exists and is not a directory")
    return ckpt


def create_output(output: str) -> None:
    """Create the run directory (once the run's settings and data have been checked) and
    make sure it is writable."""
    try:
        os.makedirs(output, exist_ok=True)
        probe = os.path.join(output, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {output}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _fmt_row(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}%"
            f"  test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:6.2f}%  lr {row['lr']:.2e}"
            f"  {row['images_per_s']:7.1f} img/s  {row['seconds']:6.1f} s")


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of torch's RNG for an epoch of one process (Gumbel noise, drop path, augmentation)."""
    return ((seed * 1_000_003 + epoch) * 65_537 + rank) % (2 ** 63)


def run_training(cfg: Optional[TrainConfig], output: str, *, resume: bool = False, force: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Train (or resume) a run in ``output``; returns the final metrics row plus the held-out
    counts. With resume, ``cfg`` is ignored except for ``device`` (the checkpoint's settings rule).
    Launched by torchrun, every process calls this; process 0 writes the files and logs."""
    group = launched_group()
    ckpt_path = check_output(output, resume, force)
    state = None
    if resume:
        state = load_checkpoint(ckpt_path, resume=True)
        stored = TrainConfig(**state["train"])
        if cfg is not None:
            stored.device = cfg.device
        cfg = stored
    device = resolve_device(process_device(cfg.device, group))
    check_kernels(cfg.kernels)
    require_packages(cfg.data, augmenting=cfg.aug != "basic" or cfg.mixup > 0 or cfg.cutmix > 0)
    check_global_batch(cfg.batch_size, group.world)
    torch.manual_seed(cfg.seed)
    train_set, test_set, spec = build_datasets(cfg.data, cfg.img_size, cfg.in_chans, cfg.seed, cfg.val_fraction,
                                               cfg.aug)
    if state is not None and DataSpec.from_dict(state["data"]).classes != spec.classes:
        raise CheckpointError(f"{cfg.data} no longer has the classes the checkpoint was trained on")
    train_set, test_set = _subset(train_set, cfg.train_limit), _subset(test_set, cfg.test_limit)
    join(group, device)
    created = not os.path.exists(output)
    if group.main:
        create_output(output)   # the first write: the settings, packages and data are checked
    group.barrier()
    try:
        return _train(cfg, output, ckpt_path, state, device, train_set, test_set, spec,
                      log if group.main else (lambda line: None), group)
    except BaseException:
        # A run that fails before writing anything (an image that does not decode, say) leaves
        # no empty run directory behind.
        if group.main and created and os.path.isdir(output) and not os.listdir(output):
            os.rmdir(output)
        raise


def _train(cfg: TrainConfig, output: str, ckpt_path: str, state: Optional[dict], device: torch.device,
           train_set, test_set, spec: DataSpec, log: Callable[[str], None], group: Group) -> dict:
    """run_training's epochs, in the created run directory."""
    from torch.nn.parallel import DistributedDataParallel

    num_classes = len(spec.classes)
    model = build_model(cfg, num_classes, spec.in_chans).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = global_steps(len(train_set), cfg.batch_size, group.world)
    total = steps_per_epoch * cfg.epochs
    # The warm-up takes at most half of the run, so that a short run (e.g. one epoch with the
    # default one-epoch warm-up) still decays its learning rate.
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, cfg.min_lr / cfg.lr))
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    rows: List[dict] = []
    start_epoch = 0
    if state is not None:
        if state["config"].get("name") != cfg.model:
            raise CheckpointError(f"checkpoint holds a {state['config'].get('name')} model, not {cfg.model}")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise CheckpointError(f"checkpoint weights do not fit a {cfg.model} model") from None
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
            rows = list(state["metrics"])
            start_epoch = int(state["epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_path}: its training state does not fit the run "
                                  f"({type(exc).__name__}: {exc})") from None
        log(f"resuming {output} after epoch {start_epoch}/{cfg.epochs}")
    else:
        from quadmamba import count_params

        log(f"{cfg.model} ({count_params(model):,} parameters, quad scan {cfg.quad_scan}, kernels {cfg.kernels}) "
            f"on {spec.source}: {len(train_set)} train / {len(test_set)} held-out images, "
            f"{num_classes} classes, {cfg.img_size}x{cfg.img_size}x{spec.in_chans}, device {device}"
            + (f" x {group.world} processes" if group.world > 1 else ""))
    trained = model
    if group.world > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = ema.module if ema is not None else model
    test_part = shard(test_set, group)
    # "basic": shift (and flip) whole batches; "imagenet": each image was augmented on loading
    batch_transform = (lambda x: augment(x, spec)) if cfg.aug == "basic" else (lambda x: x)
    mixing = cfg.mixing(num_classes)
    result = None
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, group.rank))
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        loader = DataLoader(train_set, batch_sampler=epoch_batches(order.tolist(), cfg.batch_size, group),
                            num_workers=cfg.workers)
        stats = train_one_epoch(trained, loader, optimizer, scheduler, cfg, device, ema,
                                desc=f"epoch {epoch + 1}/{cfg.epochs}", transform=batch_transform,
                                group=group, mixing=mixing)
        test_loader = DataLoader(test_part, batch_size=max(-(-cfg.batch_size // group.world), 128),
                                 num_workers=cfg.workers)
        result = evaluate(eval_model, test_loader, device, num_classes, cfg.amp, group=group)
        row = {"epoch": epoch + 1, **stats, "test_loss": result["loss"], "test_acc": result["top1"],
               "seconds": time.perf_counter() - started}
        rows.append(row)
        if group.main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
                "config": asdict(model.config), "data": spec.to_dict(), "train": asdict(cfg),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1, "metrics": rows,
            })
            write_metrics(os.path.join(output, METRICS_NAME), rows)
            plot_curves(os.path.join(output, CURVES_NAME), rows,
                        f"{cfg.model} ({cfg.quad_scan} scan) on {os.path.basename(spec.source)}")
        group.barrier()
        log(_fmt_row(row, cfg.epochs))
    final = dict(rows[-1])
    if result is None:   # resumed a finished run: report its stored result
        log(f"{output} had already finished its {cfg.epochs} epochs")
        final["correct"] = round(final["test_acc"] * len(test_set))
        final["count"] = len(test_set)
    else:
        final["correct"], final["count"] = result["correct"], result["count"]
    final["seconds_total"] = sum(r["seconds"] for r in rows)
    log(f"held-out accuracy: {100 * final['test_acc']:.2f}% ({final['correct']}/{final['count']}) "
        f"after {cfg.epochs} epochs; checkpoint {ckpt_path}")
    return final


def evaluate_checkpoint(path: str, data: Optional[str] = None, *, device: str = "cpu",
                        kernels: Optional[str] = None, batch_size: int = 128, test_limit: int = 0,
                        expect_model: Optional[str] = None) -> dict:
    """Top-1/top-5/confusion of a checkpoint on its held-out split, or on another folder
    (every image of it, or its val/ sub-folder when it has train/ and val/). Launched by
    torchrun, every process scores its shard and every process returns the group's totals."""
    if test_limit < 0:
        raise ValueError(f"--test-limit must be >= 0 (0: every image), got {test_limit}")
    group = launched_group()
    state = load_checkpoint(path)
    spec = DataSpec.from_dict(state["data"])
    dev = resolve_device(process_device(device, group))
    model = restore_model(state, kernels, expect_model).to(dev)
    _, test_set = datasets_for_spec(spec, data)
    test_set = _subset(test_set, test_limit)
    join(group, dev)
    loader = DataLoader(shard(test_set, group), batch_size=batch_size)
    result = evaluate(model, loader, dev, len(spec.classes), group=group)
    result["classes"] = spec.classes
    result["model"] = state["config"].get("name")
    return result


def plot_confusion(path: str, confusion: torch.Tensor, classes: List[str], title: str) -> None:
    """Confusion matrix (rows true, columns predicted, counts): a 700x600 PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(classes)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    im = ax.imshow(confusion.numpy(), cmap="Blues")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.locator = MaxNLocator(integer=True)   # counts
    bar.update_ticks()
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), classes)
    if n <= 20:
        peak = int(confusion.max()) if confusion.numel() else 0
        for i in range(n):
            for j in range(n):
                v = int(confusion[i, j])
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if v > peak / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.subplots_adjust(left=0.12, right=0.92, bottom=0.12, top=0.92)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _atomic_write(path, lambda tmp: open(tmp, "wb").write(buf.getvalue()))


def train_config_fields() -> List[str]:
    return [f.name for f in fields(TrainConfig)]
