"""The training loop: precision, optimiser, schedule, checkpoint/resume, non-finite guard.

Objective-agnostic: `fit` takes a `loss_fn(x, y) -> (loss, logs)` that owns the
model call, so supervised, self-supervised and attention-transfer training share
one loop. Randomness (shuffle, augmentation, drop-path) is re-seeded from
(seed, epoch) at every epoch, so a run resumed from its checkpoint after epoch e
continues exactly as the uninterrupted run would on CPU.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay as timm_param_groups_layer_decay
from timm.optim import param_groups_weight_decay
from torch import nn

from . import distributed as dist
from .config import TrainConfig
from .io import atomic_path


progress_log = logging.getLogger("vitablate.progress")  # one line per epoch; the job's log file shows it
log = logging.getLogger("vitablate.engine")  # under the job's log (submit.job_log), as every vitablate.* logger


def format_duration(seconds: float) -> str:
    """4000 -> '1:06:40' (hours grow past 24 rather than turning into days)."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(metrics: dict, epochs: int) -> str:
    """'epoch 3/25 loss 0.8120 top1_val 91.20 312 img/s eta 0:00:41' from one epoch's metrics."""
    val = f" top1_val {metrics['top1_val']:.2f}" if "top1_val" in metrics else ""
    return (f"epoch {metrics['epoch']}/{epochs} loss {metrics['train_loss']:.4f}{val} lr {metrics['lr']:.2e} "
            f"{metrics['images_per_s']:.0f} img/s eta {format_duration(metrics['eta_s'])}")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full or read-only disk); the message names the path."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class Precision:
    device: torch.device
    dtype: Optional[torch.dtype]  # autocast dtype, None = plain float32

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def pick_precision(device: torch.device, precision: str) -> Precision:
    """auto: bf16 autocast on CUDA, float32 on CPU."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"execution.precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return Precision(device, None)
    return Precision(device, torch.bfloat16)


def seed_everything(seed: int) -> None:
    """torch's global generators, and Python's and NumPy's: timm's Mixup/CutMix draw from NumPy, its
    RandomErasing from Python's `random` and torch (timm/data/mixup.py, timm/data/random_erasing.py). Seeding
    the host generators draws nothing from torch's, so a run without those options draws what it always did."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters every submodule lists in its `no_weight_decay()` (timm's ViT: position
    embedding, CLS/register tokens; the pretext objectives: their mask tokens), prefixed by where the
    submodule sits, so a ViT inside a wrapper (an objective, an attention-transfer student) keeps them."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


def _layer_decay_encoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, module) of the one ViT in `model` whose parameters train: the model itself, an objective's
    encoder (MoCo, SimMIM, MAE, hybrid), or an attention-transfer student (its teacher is frozen)."""
    found = [(name, m) for name, m in model.named_modules()
             if hasattr(m, "patch_embed") and isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList))
             and any(p.requires_grad for p in m.parameters())]
    outermost: list[tuple[str, nn.Module]] = []
    for name, m in sorted(found, key=lambda t: t[0].count(".") if t[0] else -1):
        if not any(o == "" or name.startswith(f"{o}.") for o, _ in outermost):
            outermost.append((name, m))
    found = outermost
    if len(found) != 1:
        where = [n or "<model>" for n, _ in found]
        raise ValueError(
            f"train.layer_decay needs exactly one ViT whose blocks train, found {len(found)} ({where}); this job "
            "trains no encoder (a linear probe?) or several: set train.layer_decay: null in its recipe")
    return found[0]


class _LayerGrouping:
    """What timm's param_groups_layer_decay reads of a model (named_parameters, group_matcher), with the layer ids
    of MAE's util/lr_decay.py get_layer_id_for_vit (SimMIM optimizer.py get_vit_layer and attention-transfer
    util/lr_decay.py likewise) on the encoder at `prefix`: cls/register tokens, position embedding, patch
    embedding -> 0; block i -> i + 1; everything else (final norm, fc_norm, head, and a wrapper's projector,
    predictor, decoder, mask token) -> depth + 1, whose scale is layer_decay^0 = 1. timm's own ViT matcher would
    put the final `norm` with the last block instead."""

    _STEM = ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre")

    def __init__(self, model: nn.Module, prefix: str, depth: int) -> None:
        self.model, self.prefix, self.depth = model, f"{prefix}." if prefix else "", depth

    def layer_id(self, name: str) -> int:
        if not name.startswith(self.prefix):
            return self.depth + 1
        rest = name[len(self.prefix):]
        if rest.split(".")[0] in self._STEM:
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
        return self.depth + 1

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False):
        return lambda name: (self.layer_id(name),)


def param_groups_layer_decay(model: nn.Module, weight_decay: float, decay_all: bool, layer_decay: float) -> list[dict]:
    """Parameter groups with an `lr_scale` each (layer-wise lr decay, MAE util/lr_decay.py param_groups_lrd),
    built by timm's param_groups_layer_decay over `_LayerGrouping`'s layer ids: scale layer_decay^(depth + 1 - id).
    Weight decay as `param_groups`: none on 1-D parameters and the named tokens/embeddings, or on every
    parameter with `decay_all`."""
    prefix, encoder = _layer_decay_encoder(model)
    grouping = _LayerGrouping(model, prefix, len(encoder.blocks))
    groups = timm_param_groups_layer_decay(
        grouping, weight_decay, no_weight_decay_list=() if decay_all else sorted(no_weight_decay_names(model)),
        weight_decay_exclude_1d=not decay_all, layer_decay=layer_decay)
    # timm renumbers the ids it sees; each parameter must still get layer_decay^(depth + 1 - its id)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        want = layer_decay ** (grouping.depth + 1 - grouping.layer_id(name))
        if p.requires_grad and not math.isclose(scale_of[id(p)], want, rel_tol=1e-12):
            raise RuntimeError(f"layer-wise lr decay gave {name} the scale {scale_of[id(p)]}, not {want}")
    return groups


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False,
                 layer_decay: Optional[float] = None) -> list[dict]:
    """The optimiser's parameter groups for every training path (objectives, wrappers, classifiers).

    No weight decay on 1-D parameters (biases, norms) and on the named tokens and position embeddings
    (`no_weight_decay_names`), as MAE (main_pretrain.py, main_finetune.py via timm's
    param_groups_weight_decay / lr_decay.py), SimMIM (optimizer.py, get_pretrain_param_groups), DeiT and
    attention-transfer (models_dual_vit.py, DualVisionTransformer.no_weight_decay) do; frozen parameters
    are left out. `decay_all`: one group, every parameter decayed (MoCo v3: main_moco.py builds AdamW on
    model.parameters()). `layer_decay` (not None): the groups of `param_groups_layer_decay`, each with an
    `lr_scale` that `fit` multiplies into the scheduled rate.
    """
    if layer_decay is not None:
        return param_groups_layer_decay(model, weight_decay, decay_all, layer_decay)
    if decay_all:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios, as MAE's linear probe uses it (facebookresearch/mae:
    util/lars.py): for a parameter with more than one dimension, the gradient plus weight decay is scaled by
    trust_coefficient * |w| / |g + wd w| (1 where either norm is 0); 1-D parameters take the plain update.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm))
                    update = update * ratio
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])


OPTIMIZERS = ("adamw", "sgd", "lars")


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer over `param_groups(model)`: AdamW (fused on GPU), SGD with momentum 0.9, or LARS."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_all, cfg.layer_decay)
    if cfg.optimizer == "adamw":
        fused = device.type == "cuda"  # one kernel for the whole update on GPU
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr)
    raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float, warmup_lr: float = 0.0,
          milestones: Optional[list[int]] = None, gamma: float = 0.1) -> float:
    """The rate of optimiser step `step` (0-based): linear warm-up from `warmup_lr` to `lr` over `warmup_steps`
    (timm's schedulers and SimMIM lr_scheduler.py: warmup_lr_init + t (lr - warmup_lr_init) / warmup_t; vitablate
    counts step + 1 so the first step does not train at warmup_lr), then either cosine decay to `min_lr` at
    `total_steps` (MAE util/lr_sched.py) or, with `milestones` (steps), lr x gamma^(milestones passed) (SimMIM
    lr_scheduler.py MultiStepLRScheduler: bisect_right(milestones, t))."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * (step + 1) / warmup_steps
    if milestones is not None:
        return lr * gamma ** bisect.bisect_right(milestones, step)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """step -> the scheduled rate of cfg (before any layer's lr_scale)."""
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    milestones = None
    if cfg.lr_schedule == "step":  # SimMIM lr_scheduler.py: milestones = epoch x iterations per epoch
        milestones = [int(e * steps_per_epoch) for e in cfg.lr_step_epochs]
    return lambda step: lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr, cfg.warmup_lr, milestones,
                              cfg.lr_step_gamma)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group trains at `lr`, times its `lr_scale` where it has one (layer-wise decay; MAE
    util/lr_sched.py adjust_learning_rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def accum_changes_objective(model: nn.Module, accum_steps: int, batch_size: int) -> str:
    """Why gradient accumulation over `accum_steps` micro-batches is not the update of one batch of `batch_size`
    for this model ("" where it is): a contrastive objective draws its negatives from each micro-batch (MoCo v3
    main_moco.py: the keys of the whole, all-gathered batch) and a BatchNorm in training mode normalises each
    micro-batch (MoCo's projector and predictor, the reference linear probe's BatchNorm, main_linprobe.py)."""
    if accum_steps <= 1:
        return ""
    micro = batch_size // accum_steps
    modes = {m: m.training for m in model.modules()}
    model.train()  # which BatchNorms fit() trains in training mode (a linear probe keeps its encoder in eval)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m, mode in modes.items():
        m.training = mode
    reasons = []
    if any(getattr(m, "in_batch_negatives", False) for m in model.modules()):
        reasons.append(f"the contrastive negatives come from each micro-batch of {micro} images (per worker), "
                       f"not from the batch of {batch_size}")
    if norms:
        reasons.append(f"{len(norms)} BatchNorm layer(s) normalise each micro-batch of {micro} images (per worker), "
                       f"not the batch of {batch_size}")
    return "; ".join(reasons)


def classification_loss(model: nn.Module, label_smoothing: float, mixup: Optional[Callable] = None) -> Callable:
    """Cross-entropy with label smoothing; with `mixup` (a timm.data.Mixup, which folds the label smoothing into
    its soft targets) the batch is mixed on the device and the loss is timm's SoftTargetCrossEntropy, as DeiT's
    main.py and MAE's main_finetune.py train (timm/data/mixup.py draws lam from NumPy, seeded per epoch)."""
    if mixup is None:
        def loss_fn(x: torch.Tensor, y: torch.Tensor):
            logits = model(x)
            return F.cross_entropy(logits, y, label_smoothing=label_smoothing), {}

        return loss_fn
    from timm.loss import SoftTargetCrossEntropy

    soft_ce = SoftTargetCrossEntropy()

    def mixed_loss_fn(x: torch.Tensor, y: torch.Tensor):
        x, target = mixup(x, y)  # in place on this micro-batch; target (N, K) sums to 1 per row
        return soft_ce(model(x), target), {}

    return mixed_loss_fn


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, precision: Precision,
            transform: Optional[Callable] = None, gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels over a split: (N, K) float32, (N,) int64, on CPU.

    gather: `batches` is this worker's shard of the split; return every worker's rows (all ranks).
    """
    probs, labels = [], []
    for x, y in batches:
        x = x.to(precision.device, non_blocking=True)
        if transform is not None:
            x = transform(x)
        with precision.autocast():
            logits = forward(x)
        probs.append(logits.float().softmax(-1).cpu())
        labels.append(y.cpu())
    if gather:
        k = probs[0].shape[-1] if probs else 0
        probs = [dist.gather_rows(torch.cat(probs) if probs else torch.zeros(0, k))]
        labels = [dist.gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64))]
    return torch.cat(probs), torch.cat(labels)


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent correct."""
    return 100.0 * (probs.argmax(-1) == labels).float().mean().item()


@dataclass
class Checkpoint:
    """Where a job keeps its last finished epoch; written atomically."""

    path: str

    def save(self, state: dict) -> None:
        """Write atomically; a disk that is full or read-only fails naming the path, and leaves no temp file."""
        folder = os.path.dirname(self.path) or "."
        try:
            os.makedirs(folder, exist_ok=True)
            # room for another copy of the last checkpoint (the new one replaces it only once it is whole)
            need = os.path.getsize(self.path) if os.path.exists(self.path) else 0
            free = shutil.disk_usage(folder).free
            if free < need + 2**20:
                raise OSError(errno.ENOSPC, f"{free / 2**20:.0f} MB free, a checkpoint needs {need / 2**20:.0f} MB")
            with atomic_path(self.path) as tmp:  # a reader sees the old or the new file, never half of one
                torch.save(state, tmp)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            raise CheckpointWriteError(
                f"cannot write checkpoint {os.path.abspath(self.path)} ({e}); results_dir must be writable and have "
                "room: free space or fix the mount, then re-run (the job resumes from its last checkpoint)") from e

    def load(self) -> Optional[dict]:
        if not os.path.exists(self.path):
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise RuntimeError(
                f"checkpoint {self.path} cannot be read ({type(e).__name__}: {e}); "
                "delete it to start the job from scratch"
            ) from e


def _same_job(saved: dict, current: dict) -> bool:
    """Whether a checkpoint's meta describes the job now running (resources may differ on a retry)."""
    def strip(meta: dict) -> dict:
        cfg = dict(meta.get("config") or {})
        cfg.pop("execution", None)
        return {**meta, "config": cfg}

    return strip(saved) == strip(current)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    resumed_from_epoch: int = 0  # epochs already done when this process started
    train_s: float = 0.0
    accum_changes_objective: str = ""  # why accumulation is not the whole batch's update ("" where it is)


def fit(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]],
    train_batches: Callable[[int], Iterable],
    steps_per_epoch: int,
    cfg: TrainConfig,
    precision: Precision,
    checkpoint: Checkpoint,
    seed: int,
    transform: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
    evaluate: Optional[Callable[[], dict]] = None,
    on_epoch: Optional[Callable[[int, dict], None]] = None,
    extra_state: Optional[dict[str, nn.Module]] = None,
    meta: Optional[dict] = None,
    after_step: Optional[Callable[[int, int], None]] = None,
    micro_batches: bool = False,
) -> FitResult:
    """Train `model` for cfg.epochs with cfg.optimizer (AdamW by default) and warm-up + cosine, resuming if a
    checkpoint exists.

    train_batches(epoch) -> iterable of (x, y) for that epoch (shuffled from (seed, epoch)).
    transform(x, generator) -> x: batched augmentation and normalisation on the device.
    evaluate() -> metrics dict, run after each epoch (e.g. val top-1).
    on_epoch(epoch, metrics) is called after each epoch, before its checkpoint (progress, MLflow).
    extra_state: other modules whose state the checkpoint must carry (heads, EMA encoders).
    meta: saved in the checkpoint as is (the resolved config, so a resume can check it).
    after_step(step, total_steps): called after each optimiser step (e.g. MoCo's EMA update).
    micro_batches: train_batches yields micro-batches, cfg.accum_steps of them per optimiser step
    (default: one (x, y) per step, cut into accum_steps micro-batches here).

    Several workers (a torch.distributed process group, see vitablate.distributed): train_batches
    yields this rank's share of each step; gradients are all-reduced through DDP once per step;
    metrics and the non-finite flag are summed over ranks; rank 0 alone writes the checkpoint and
    calls on_epoch, and every rank resumes from the state rank 0 read.
    """
    device = precision.device
    optimizer = build_optimizer(model, cfg, device)  # every parameter of `model` that requires grad
    modules = {"model": model, **(extra_state or {})}
    result = FitResult()
    start_epoch = 0
    state = dist.broadcast_object(checkpoint.load() if dist.is_main() else None)
    if state is not None and not _same_job(state.get("meta", {}), meta or {}):
        # a checkpoint of another config (the job's settings changed since): never resume it
        log.warning(f"[vitablate] warning: {checkpoint.path} belongs to a different config; training from scratch")
        state = None
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        result.history = state["history"]
        result.resumed_from_epoch = start_epoch
    accum = cfg.accum_steps
    if accum < 1 or cfg.batch_size % accum:
        raise ValueError(f"train.accum_steps {accum} must be >= 1 and divide train.batch_size {cfg.batch_size}; "
                         "pick a divisor (batch_size / accum_steps images go through the model at once)")
    result.accum_changes_objective = accum_changes_objective(model, accum, cfg.batch_size)
    if result.accum_changes_objective and dist.is_main():
        log.warning(f"[vitablate] warning: train.accum_steps {accum} changes the objective: "
                    f"{result.accum_changes_objective}; a larger micro-batch (fewer accum_steps, more GPUs via "
                    "execution.workers) is closer to the reference")
    step_loss, sync = dist.wrap_loss(model, loss_fn, device)  # DDP with several workers
    total_steps = cfg.epochs * steps_per_epoch
    lr_of_step = schedule(cfg, steps_per_epoch)
    last_lr = optimizer.param_groups[0]["lr"]  # the scheduled rate (the top layer's under layer decay)
    # non-finite check: every step on CPU (cheap), every 25 on GPU (a host sync each time)
    check_every = 1 if device.type == "cpu" else 25
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        es = epoch_seed(seed, epoch) + 7919 * dist.rank()  # each worker draws its own augmentations
        seed_everything(es)  # drop-path and any other global randomness
        gen = torch.Generator(device=device).manual_seed(es) if transform is not None else None
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        n_images, step = 0, epoch * steps_per_epoch
        logs_sum: dict[str, torch.Tensor] = {}

        def prepare(x, y):  # onto the device, augmented there
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            return (transform(x, gen) if transform is not None else x), y

        for i, micro in enumerate(_steps(train_batches(epoch), accum, micro_batches, prepare)):
            last_lr = lr_of_step(step)
            set_lr(optimizer, last_lr)  # each group's lr_scale (layer-wise decay) times the schedule
            optimizer.zero_grad(set_to_none=True)
            step_images = sum(ym.shape[0] for _, ym in micro)
            # gradient accumulation: the mean loss over the batch, one micro-batch's share at a time
            for j, (xm, ym) in enumerate(micro):
                with precision.autocast(), sync(j == len(micro) - 1):
                    loss, logs = step_loss(xm, ym)
                if (i + 1) % check_every == 0 and dist.any_rank(not torch.isfinite(loss).item(), device):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}; the last good checkpoint "
                        f"({checkpoint.path}, epoch {epoch}) is kept. Lower train.lr (now {cfg.lr}) or set "
                        "train.grad_clip, then re-run to resume."
                    )
                with sync(j == len(micro) - 1):
                    (loss * (xm.shape[0] / step_images) if accum > 1 else loss).backward()
                loss_sum += loss.detach().float() * xm.shape[0]
                for k, v in logs.items():  # device tensors: no host sync per step
                    logs_sum[k] = logs_sum.get(k, 0.0) + torch.as_tensor(v, device=device).float() * xm.shape[0]
            if cfg.grad_clip:  # only where a recipe asks (SimMIM: 5.0); MAE, MoCo v3, DeiT clip nothing
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step(step, total_steps)
            n_images += step_images
            step += 1
        # every worker's share: sums over ranks (identity with one worker)
        totals = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(n_images), device=device),
                                                  *logs_sum.values()]))
        loss_sum, n_images = totals[0], int(totals[1].item())
        logs_sum = dict(zip(logs_sum, totals[2:]))
        train_loss = (loss_sum / max(1, n_images)).item()
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(
                f"mean training loss is {train_loss} in epoch {epoch + 1}; the last good checkpoint "
                f"({checkpoint.path}, epoch {epoch}) is kept. Lower train.lr (now {cfg.lr}) or set "
                "train.grad_clip, then re-run to resume."
            )
        dt = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "lr": last_lr,
                   "images_per_s": n_images / dt, "epoch_s": dt}
        metrics.update({k: (v / max(1, n_images)).item() for k, v in logs_sum.items()})
        if evaluate is not None:
            metrics.update(evaluate())
        # time left: the mean wall time of this process's epochs (evaluation and checkpoints included)
        done_here = epoch + 1 - start_epoch
        metrics["eta_s"] = (time.perf_counter() - t_start) / done_here * (cfg.epochs - epoch - 1)
        if dist.is_main():
            progress_log.info(progress_line(metrics, cfg.epochs))
        result.history.append(metrics)
        if not dist.is_main():
            continue  # rank 0 alone reports the epoch and writes the checkpoint
        # the epoch's metrics first: a job that dies before the checkpoint re-runs the epoch and logs it again
        # (a reader keeps a step's last value), one that dies after it has logged it already
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
        checkpoint.save({
            "modules": {name: m.state_dict() for name, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "history": result.history,
            "meta": meta or {},
        })
    result.train_s = time.perf_counter() - t_start
    return result


def _steps(batches: Iterable, accum: int, micro_batches: bool, prepare: Callable):
    """Lists of prepared (x, y) micro-batches on the device, one list per optimiser step."""
    if not micro_batches:  # one batch per step, augmented whole, then cut
        for x, y in batches:
            x, y = prepare(x, y)
            yield list(zip(x.chunk(accum), y.chunk(accum)))
        return
    group = []
    for x, y in batches:  # micro-batches, each augmented as it arrives
        group.append(prepare(x, y))
        if len(group) == accum:
            yield group
            group = []
