"""The training loop: precision, optimiser, schedule, checkpoint/resume, non-finite guard.

Objective-agnostic: `fit` takes a `loss_fn(x, y) -> (loss, logs)` that owns the
model call, so supervised, self-supervised and attention-transfer training share
one loop. Randomness (shuffle, augmentation, drop-path) is re-seeded from
(seed, epoch) at every epoch, so a run resumed from its checkpoint after epoch e
continues exactly as the uninterrupted run would on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .config import TrainConfig


progress_log = logging.getLogger("vitablate.progress")  # one line per epoch; the job's log file shows it


def format_duration(seconds: float) -> str:
    """4000 -> '1:06:40' (hours grow past 24 rather than turning into days)."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(metrics: dict, epochs: int) -> str:
    """'epoch 3/25 loss 0.8120 top1_val 91.20 312 img/s eta 0:00:41' from one epoch's metrics."""
    val = f" top1_val {metrics['top1_val']:.2f}" if "top1_val" in metrics else ""
    return (f"epoch {metrics['epoch']}/{epochs} loss {metrics['train_loss']:.4f}{val} lr {metrics['lr']:.2e} "
            f"{metrics['images_per_s']:.0f} img/s eta {format_duration(metrics['eta_s'])}")


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
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and tokens (1-D or named so)."""
    decay, no_decay = [], []
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith("token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # one kernel for the whole update on GPU
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def classification_loss(model: nn.Module, label_smoothing: float) -> Callable:
    def loss_fn(x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), {}

    return loss_fn


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
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a reader sees the old or the new file, never half of one

    def load(self) -> Optional[dict]:
        if not os.path.exists(self.path):
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=False)
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
    params: Optional[list] = None,
    meta: Optional[dict] = None,
    after_step: Optional[Callable[[int, int], None]] = None,
    micro_batches: bool = False,
) -> FitResult:
    """Train `model` for cfg.epochs with AdamW and warm-up + cosine, resuming if a checkpoint exists.

    train_batches(epoch) -> iterable of (x, y) for that epoch (shuffled from (seed, epoch)).
    transform(x, generator) -> x: batched augmentation and normalisation on the device.
    evaluate() -> metrics dict, run after each epoch (e.g. val top-1).
    on_epoch(epoch, metrics) is called after each epoch's checkpoint (progress, MLflow).
    extra_state: other modules whose state the checkpoint must carry (heads, EMA encoders).
    params: the parameters to optimise (default: all of `model` that require grad).
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
    if params is None:
        optimizer = build_optimizer(model, cfg, device)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                      fused=device.type == "cuda")
    modules = {"model": model, **(extra_state or {})}
    result = FitResult()
    start_epoch = 0
    state = dist.broadcast_object(checkpoint.load() if dist.is_main() else None)
    if state is not None and not _same_job(state.get("meta", {}), meta or {}):
        # a checkpoint of another config (the job's settings changed since): never resume it
        print(f"[vitablate] {checkpoint.path} belongs to a different config; training from scratch", flush=True)
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
    step_loss, sync = dist.wrap_loss(model, loss_fn, device)  # DDP with several workers
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
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
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
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
            if cfg.grad_clip:
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
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
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
            continue  # rank 0 alone writes the checkpoint and reports the epoch
        checkpoint.save({
            "modules": {name: m.state_dict() for name, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "history": result.history,
            "meta": meta or {},
        })
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
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
