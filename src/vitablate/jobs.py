"""One function per job kind: takes a resolved `JobConfig`, returns a run record (a dict).

Jobs know nothing of Ray, MLflow or Snakemake: `execution.py` runs them as Ray
tasks and `tracking.py` logs what they return. A job writes its outputs under
`cfg.output_dir` atomically and resumes from its checkpoint if one is there.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable, Optional

import torch

from . import __version__
from .config import JobConfig, ModelConfig, to_dict
from .data import BatchAugment, DatasetBundle, load_dataset, normalize
from .engine import (
    Checkpoint, classification_loss, epoch_seed, fit, pick_device, pick_precision, predict, seed_everything, top1,
)
from .models import VARIANTS, count_params, create_model

OnEpoch = Optional[Callable[[int, dict], None]]


def write_json(path: str, obj: dict) -> None:
    """Atomic JSON write: a reader never sees half a record."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def model_kwargs(m: ModelConfig, data: DatasetBundle, mixer: str) -> dict:
    """create_model arguments: the variant's sizes, overridden by explicit fields, fitted to the data."""
    if m.variant is not None and m.variant not in VARIANTS:
        raise ValueError(f"unknown model.variant {m.variant!r}; choose one of {sorted(VARIANTS)}")
    kw = dict(VARIANTS.get(m.variant, {}))
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(m, key) is not None:
            kw[key] = getattr(m, key)
    kw.setdefault("img_size", data.img_size)
    missing = [k for k in ("patch_size", "embed_dim", "depth", "num_heads") if k not in kw]
    if missing:
        raise ValueError(f"model config lacks {missing}: set model.variant or give those keys")
    if kw["img_size"] != data.img_size:
        raise ValueError(
            f"model img_size {kw['img_size']} differs from the data's {data.img_size}; "
            "set model.img_size to the size the data should be resized to"
        )
    return dict(kw, mixer=mixer, in_chans=data.in_chans, num_classes=data.num_classes,
                mlp_ratio=m.mlp_ratio, global_pool=m.global_pool, drop_path_rate=m.drop_path_rate)


def setup(cfg: JobConfig) -> tuple[torch.device, object]:
    torch.set_num_threads(max(1, int(cfg.execution.num_cpus)))
    seed_everything(cfg.seed)
    device = pick_device(cfg.execution.num_gpus)
    return device, pick_precision(device, cfg.execution.precision)


def load_data(cfg: JobConfig, device: torch.device) -> DatasetBundle:
    d = cfg.data
    bundle = load_dataset(d.name, root=d.root, img_size=cfg.model.img_size, label_by=d.label_by,
                          extra_test_dirs=d.extra_test_dirs or None)
    if cfg.execution.data_on_device and device.type == "cuda":
        for name in ("train", "val", "test"):
            split = getattr(bundle, name)
            if hasattr(split, "to"):
                setattr(bundle, name, split.to(device))
    return bundle


def make_transforms(cfg: JobConfig, data: DatasetBundle, device: torch.device):
    """(train_transform(x, gen), eval_transform(x)): batched augmentation + normalisation on the device."""
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    a = cfg.train.augment
    aug = BatchAugment(crop_scale=tuple(a.crop_scale) if a.crop_scale else None, flip=a.flip,
                       color_jitter=a.color_jitter, grayscale_p=0.0, pad_crop=a.pad_crop)

    def eval_transform(x: torch.Tensor) -> torch.Tensor:
        return normalize(x, mean, std)

    def train_transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return normalize(aug(x, generator=gen), mean, std)

    return train_transform, eval_transform


def epoch_batches(split, batch_size: int, seed: int):
    """train_batches(epoch) for `fit`: a fresh shuffle drawn from (seed, epoch)."""

    def batches(epoch: int):
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        return split.batches(batch_size, shuffle=True, generator=gen, drop_last=True)

    return batches


def evaluate_splits(forward, data: DatasetBundle, batch_size: int, precision, transform) -> dict:
    """Top-1 on test and on every extra test set (cue-conflict, shifted sets)."""
    out = {"top1_test": top1(*predict(forward, data.test.batches(batch_size), precision, transform))}
    for name, split in data.extra_tests.items():
        out[f"top1_{name}"] = top1(*predict(forward, split.batches(batch_size), precision, transform))
    return out


def base_record(cfg: JobConfig) -> dict:
    return {
        "question": cfg.question, "job": cfg.job, "dataset": cfg.data.name, "mixer": cfg.mixer,
        "seed": cfg.seed, "model": cfg.model.variant or "custom", "vitablate_version": __version__,
        "host": socket.gethostname(), "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "config": to_dict(cfg),
    }


def train_classifier(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Supervised training from scratch (the architecture question's job)."""
    t0 = time.perf_counter()
    device, precision = setup(cfg)
    data = load_data(cfg, device)
    kw = model_kwargs(cfg.model, data, cfg.mixer)
    model = create_model(**kw).to(device)
    forward = torch.compile(model) if cfg.execution.compile else model
    train_transform, eval_transform = make_transforms(cfg, data, device)
    tc = cfg.train
    steps_per_epoch = len(data.train) // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {tc.batch_size} exceeds the {len(data.train)} training images; lower it")

    def evaluate() -> dict:
        model.eval()
        return {"top1_val": top1(*predict(forward, data.val.batches(tc.eval_batch_size), precision, eval_transform))}

    result = fit(
        model, classification_loss(forward, tc.label_smoothing), epoch_batches(data.train, tc.batch_size, cfg.seed),
        steps_per_epoch, tc, precision, Checkpoint(os.path.join(cfg.output_dir, "checkpoint.pt")), cfg.seed,
        transform=train_transform, evaluate=evaluate, on_epoch=on_epoch, meta={"config": to_dict(cfg), "model": kw},
    )
    model.eval()
    final = evaluate() | evaluate_splits(forward, data, tc.eval_batch_size, precision, eval_transform)
    torch.save({"model": model.state_dict(), "model_kwargs": kw, "config": to_dict(cfg)},
               os.path.join(cfg.output_dir, "model.pt"))
    return base_record(cfg) | {
        "params_m": count_params(model) / 1e6, "epochs": tc.epochs, "device": str(device),
        "precision": str(precision.dtype or "float32"), "resumed_from_epoch": result.resumed_from_epoch,
        "train_s": result.train_s, "wall_s": time.perf_counter() - t0, "history": result.history, **final,
    }


def noop(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Trains nothing: measures the orchestration around a job (bench/)."""
    if on_epoch is not None:
        on_epoch(1, {"epoch": 1})
    return base_record(cfg) | {"history": [{"epoch": 1}], "top1_test": 0.0}


JOBS: dict[str, Callable[[JobConfig, OnEpoch], dict]] = {
    "train_classifier": train_classifier,
    "noop": noop,
}


def run(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    if cfg.job not in JOBS:
        raise ValueError(f"unknown job {cfg.job!r}; choose one of {sorted(JOBS)}")
    return JOBS[cfg.job](cfg, on_epoch)
