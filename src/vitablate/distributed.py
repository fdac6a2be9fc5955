"""Data parallelism through `torch.distributed` only: the training code's view of several workers.

`engine.fit` and `jobs` call these helpers; with no process group initialised (one worker, the
default) every helper is the identity, so single-process runs behave exactly as before.
Who starts the processes and the process group (Ray Train's TorchTrainer, see
`vitablate.train_launch`) is none of this module's business: it never imports Ray.

Conventions: `train.batch_size` is the GLOBAL optimiser batch; each of the W workers takes
batch_size / W images of every step, a contiguous slice of the step's indices in the epoch's
permutation (`shard_slice`), so the W slices together are exactly the 1-worker batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 alone writes checkpoints, records and MLflow."""
    return rank() == 0


def shard() -> tuple[int, int]:
    """(rank, world size) of this process."""
    return rank(), world_size()


def shard_slice(n: int, rank_: int, world: int) -> slice:
    """This rank's contiguous part of n items (n divisible by world)."""
    if n % world:
        raise ValueError(f"{n} items cannot be split evenly over {world} workers")
    per = n // world
    return slice(rank_ * per, (rank_ + 1) * per)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place on a copy (identity with one worker)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a non-finite loss on one worker)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. the checkpoint state rank 0 read)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """(n, ...) per rank -> (W * n, ...) in rank order, no gradient (the gathered copies are constants).

    facebookresearch/moco-v3: moco/builder.py, concat_all_gather.
    """
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (counts may differ by rank: padded to the largest, then trimmed)."""
    if not is_distributed():
        return t
    device = t.device if t.device.type != "cpu" or dist.get_backend() == "gloo" else torch.device("cuda")
    n = torch.tensor([t.shape[0]], device=device)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _LossModule(nn.Module):
    """Holds the module being trained and calls the objective's loss, so that DDP sees the forward."""

    def __init__(self, module: nn.Module, loss_fn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.loss_fn(x, y)


def wrap_loss(module: nn.Module, loss_fn, device: torch.device):
    """(loss_fn to call, context(i_last) for each micro-batch): DDP-wrapped with several workers.

    The loss goes through DistributedDataParallel's forward so its gradient hooks all-reduce
    (mean over workers) during backward; `sync(last)` is DDP's `no_sync` on every micro-batch
    but the last of a step, so gradient accumulation all-reduces once per optimiser step.
    """
    if not is_distributed():
        return loss_fn, lambda last: contextlib.nullcontext()
    ddp = nn.parallel.DistributedDataParallel(
        _LossModule(module, loss_fn), device_ids=[device.index] if device.type == "cuda" else None,
        # no buffer broadcast each forward: BatchNorm heads are synchronised, EMA encoders update the same everywhere
        forward_sync_buffers=False,
        # some objectives leave trainable weights out of the loss (SimMIM's and MAE's encoder never uses its
        # fc_norm); DDP must not wait for their gradients. Costs one walk of the autograd graph per forward.
        find_unused_parameters=True,
    )

    def sync(last: bool):
        return contextlib.nullcontext() if last else ddp.no_sync()

    return ddp, sync


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, on any device.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces the per-feature sums with
    autograd (torch.distributed.nn), so it also works with gloo on CPU (tests, CPU clusters).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn import all_reduce

        n = x.shape[0] * world_size()
        xf = x.float()
        stats = all_reduce(torch.cat([xf.sum(0), (xf * xf).sum(0)]))
        mean, sq = stats.chunk(2)
        mean = mean / n
        var = (sq / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            m = self.momentum if self.momentum is not None else 0.1
            with torch.no_grad():
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(1, n - 1), alpha=m)
                self.num_batches_tracked += 1
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> synchronised BatchNorm (statistics over the global batch) when several workers train.

    facebookresearch/moco-v3: main_moco.py converts the model with convert_sync_batchnorm.
    GPU: torch's SyncBatchNorm; CPU: CrossRankBatchNorm1d (torch's needs a GPU).
    """
    if not is_distributed():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = CrossRankBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            # the same parameters and buffers (a momentum branch's stay frozen, an optimiser's stay valid)
            for key, value in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(new, key, value)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module


def check_batch(batch_size: int, accum_steps: int, workers: Optional[int] = None) -> int:
    """Images per micro-batch on one worker; a clear error when the split is uneven."""
    workers = world_size() if workers is None else workers
    if batch_size % (workers * accum_steps):
        raise ValueError(
            f"train.batch_size {batch_size} must be divisible by execution.workers ({workers}) x train.accum_steps "
            f"({accum_steps}); each worker takes batch_size / workers images per step, in accum_steps micro-batches"
        )
    return batch_size // (workers * accum_steps)
