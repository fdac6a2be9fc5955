"""One function per job kind: takes a resolved `JobConfig`, returns a run record (a dict).

Jobs know nothing of Ray, MLflow or Snakemake: `execution.py` runs them as Ray
tasks and `tracking.py` logs what they return. A job writes its outputs under
`cfg.output_dir` atomically and resumes from its checkpoint if one is there.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Optional

import torch

from . import __version__
from .config import JobConfig, ModelConfig, to_dict
from .data import BatchAugment, DatasetBundle, load_dataset, normalize
from .engine import (
    Checkpoint,
    classification_loss,
    epoch_seed,
    fit,
    pick_device,
    pick_precision,
    predict,
    seed_everything,
    top1,
)
from .models import VARIANTS, count_params, create_model

OnEpoch = Optional[Callable[[int, dict], None]]


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


def build_augment(cfg: JobConfig) -> BatchAugment:
    """The dataset's supervised augmentation (train.augment)."""
    a = cfg.train.augment
    return BatchAugment(crop_scale=tuple(a.crop_scale) if a.crop_scale else None, flip=a.flip,
                        color_jitter=a.color_jitter, grayscale_p=0.0, pad_crop=a.pad_crop)


def make_transforms(cfg: JobConfig, data: DatasetBundle, device: torch.device):
    """(train_transform(x, gen), eval_transform(x)): batched augmentation + normalisation on the device."""
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    aug = build_augment(cfg)

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
    model = create_model(**kw)
    if cfg.init_from:  # fine-tuning: every weight but the new head comes from the encoder
        load_encoder_into(model, cfg.init_from)
    model = model.to(device)
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


def load_encoder(path: str) -> tuple[torch.nn.Module, dict, dict]:
    """(encoder, its create_model kwargs, the pre-training config) from an encoder.pt."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"encoder checkpoint {path} is missing; run its pre-training job first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        encoder = create_model(**state["model_kwargs"])
        encoder.load_state_dict(state["model"])
    except Exception as e:
        raise RuntimeError(f"encoder checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); "
                           "delete it and re-run its pre-training job") from e
    return encoder, state["model_kwargs"], state.get("config", {})


def load_encoder_into(model: torch.nn.Module, path: str) -> None:
    """Copy a pre-trained encoder's weights into `model`; only the classifier head may differ."""
    encoder, kw, _ = load_encoder(path)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    bad = [k for k in missing if not k.startswith("head")] + list(unexpected)
    if bad:
        raise ValueError(f"encoder {path} ({kw}) does not fit this model: mismatched weights {bad[:5]}")


def encoder_kwargs(cfg: JobConfig, data: DatasetBundle) -> dict:
    return model_kwargs(cfg.model, data, "attention") | {"num_classes": 0}  # pooled features out


def pretrain(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Pre-train an encoder with `cfg.pretext` (the pretext question's first job)."""
    from .objectives import build_pretext

    t0 = time.perf_counter()
    device, precision = setup(cfg)
    data = load_data(cfg, device)
    kw = encoder_kwargs(cfg, data)
    encoder = create_model(**kw)
    extra = cfg.pretext.objective_kwargs()
    if cfg.pretext.name == "supervised":
        extra = dict(num_classes=data.num_classes, label_smoothing=cfg.train.label_smoothing,
                     augment=build_augment(cfg))  # the same augmentation as training from scratch
    objective = build_pretext(cfg.pretext.name, encoder, data.mean, data.std, **extra).to(device)
    tc = cfg.train
    steps_per_epoch = len(data.train) // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {tc.batch_size} exceeds the {len(data.train)} training images; lower it")
    result = fit(
        objective, lambda x, y: objective(x, y), epoch_batches(data.train, tc.batch_size, cfg.seed), steps_per_epoch,
        tc, precision, Checkpoint(os.path.join(cfg.output_dir, "checkpoint.pt")), cfg.seed, on_epoch=on_epoch,
        params=objective.trainable_parameters(), after_step=objective.after_step, meta={"config": to_dict(cfg)},
    )
    path = os.path.join(cfg.output_dir, "encoder.pt")
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"model": encoder.state_dict(), "model_kwargs": kw, "config": to_dict(cfg)}, tmp)
    os.replace(tmp, path)
    return base_record(cfg) | {
        "pretext": cfg.pretext.name, "params_m": count_params(encoder) / 1e6, "epochs": tc.epochs,
        "final_loss": result.history[-1]["train_loss"], "device": str(device), "train_s": result.train_s,
        "resumed_from_epoch": result.resumed_from_epoch, "wall_s": time.perf_counter() - t0,
        "history": result.history,
    }


def _features(encoder, data: DatasetBundle, cfg: JobConfig, device, eval_transform) -> dict:
    """Pooled encoder features and labels of every split (unshuffled, so `extra` labels align)."""
    from .analysis.probes import extract

    encoder.eval()
    bs = cfg.train.eval_batch_size
    splits = {"train": data.train, "val": data.val, "test": data.test, **data.extra_tests}
    return {name: extract(encoder, split.batches(bs), device, eval_transform) for name, split in splits.items()}


def evaluate_encoder(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Evaluate a pre-trained encoder: linear_probe, knn (frozen) or finetune (all weights)."""
    from .analysis.probes import fit_linear_probe, knn_accuracy, shape_bias

    name = cfg.eval.name
    if name == "finetune":
        return train_classifier(cfg, on_epoch) | {"eval": name, "pretext": cfg.pretext.name}
    if name not in ("linear_probe", "knn"):
        raise ValueError(f"unknown eval {name!r}; choose linear_probe, finetune or knn")
    t0 = time.perf_counter()
    device, precision = setup(cfg)
    data = load_data(cfg, device)
    encoder, _, _ = load_encoder(cfg.init_from)
    encoder = encoder.to(device)
    _, eval_transform = make_transforms(cfg, data, device)
    feats = _features(encoder, data, cfg, device, eval_transform)
    (tx, ty), k = feats["train"], data.num_classes
    out: dict = {}
    if name == "knn":
        for split in ("val", "test"):
            out[f"top1_{split}"] = knn_accuracy(tx, ty, *feats[split], k, cfg.eval.knn_k, cfg.eval.knn_temperature)
    else:
        predict = fit_linear_probe(tx, ty, k, cfg.eval.probe_weight_decay)
        for split, (x, y) in feats.items():
            if split != "train":
                out[f"top1_{split}"] = 100.0 * (predict(x).argmax(-1) == y).float().mean().item()
        extra = getattr(data.train, "extra", {})
        if "y_texture" in extra and "y_shape" in extra:  # shapes: which cue do the features carry?
            for cue in ("shape", "texture"):
                probe = fit_linear_probe(tx, extra[f"y_{cue}"].cpu(), k, cfg.eval.probe_weight_decay)
                out[f"top1_{cue}_probe"] = 100.0 * (probe(feats["test"][0]).argmax(-1)
                                                    == data.test.extra[f"y_{cue}"].cpu()).float().mean().item()
            if "cue_conflict" in feats:
                # a probe trained where shape i always wore texture i, then shown conflicting cues
                aligned = (extra["y_shape"] == extra["y_texture"]).cpu()
                probe = fit_linear_probe(tx[aligned], extra["y_shape"].cpu()[aligned], k, cfg.eval.probe_weight_decay)
                cc = data.extra_tests["cue_conflict"].extra
                pred = probe(feats["cue_conflict"][0]).argmax(-1)
                out |= shape_bias(pred, cc["y_shape"].cpu(), cc["y_texture"].cpu())
    return base_record(cfg) | {"eval": name, "pretext": cfg.pretext.name, "device": str(device),
                               "wall_s": time.perf_counter() - t0, "history": [], **out}


def analyse_encoder(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Layer-wise analyses of a pre-trained encoder on a fixed evaluation batch (+ per-layer probes).

    Writes `representation.parquet` (long: layer, head, metric, value) beside the record.
    """
    import polars as pl

    from .analysis import layerwise_analysis, layerwise_features
    from .analysis.probes import fit_linear_probe

    t0 = time.perf_counter()
    device, _ = setup(cfg)
    data = load_data(cfg, device)
    encoder, _, _ = load_encoder(cfg.init_from)
    encoder = encoder.to(device).eval()
    _, eval_transform = make_transforms(cfg, data, device)
    n = cfg.eval.analysis_images
    x_fixed = eval_transform(next(iter(data.test.batches(n)))[0].to(device))  # the same images for every run
    rows = []
    for entry in layerwise_analysis(encoder, x_fixed):
        layer = entry["layer"]
        for metric in ("attention_distance", "nmi"):
            if entry[metric] is not None:
                rows += [(layer, h, metric, float(v)) for h, v in enumerate(entry[metric].tolist())]
        for metric in ("token_cosine", "fourier_hf"):
            rows.append((layer, -1, metric, float(entry[metric])))
    # linear-probe accuracy of each layer's mean-pooled tokens
    bs = cfg.train.eval_batch_size

    def layer_feats(split):
        per_layer, labels = None, []
        with torch.no_grad():
            for xb, yb in split.batches(bs):
                f = [t.float().cpu() for t in layerwise_features(encoder, eval_transform(xb.to(device)))]
                per_layer = [a + [b] for a, b in zip(per_layer, f)] if per_layer else [[b] for b in f]
                labels.append(yb.cpu())
        return [torch.cat(p) for p in per_layer], torch.cat(labels)

    (tr, ty), (te, ey) = layer_feats(data.train), layer_feats(data.test)
    for layer, (a, b) in enumerate(zip(tr, te)):
        probe = fit_linear_probe(a, ty, data.num_classes, cfg.eval.probe_weight_decay)
        rows.append((layer, -1, "layer_probe_top1", 100.0 * (probe(b).argmax(-1) == ey).float().mean().item()))
    table = pl.DataFrame(rows, schema=["layer", "head", "metric", "value"], orient="row")
    path = os.path.join(cfg.output_dir, "representation.parquet")
    os.makedirs(cfg.output_dir, exist_ok=True)
    table.write_parquet(path + ".tmp")
    os.replace(path + ".tmp", path)
    per_layer = table.group_by(["layer", "metric"]).agg(pl.col("value").mean()).sort(["metric", "layer"])
    return base_record(cfg) | {"pretext": cfg.pretext.name, "analysis_path": path, "wall_s": time.perf_counter() - t0,
                               "n_images": int(x_fixed.shape[0]), "layers": per_layer.to_dicts(), "history": []}


def noop(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Trains nothing: measures the orchestration around a job (bench/)."""
    if on_epoch is not None:
        on_epoch(1, {"epoch": 1})
    return base_record(cfg) | {"history": [{"epoch": 1}], "top1_test": 0.0}


JOBS: dict[str, Callable[[JobConfig, OnEpoch], dict]] = {
    "train_classifier": train_classifier,
    "pretrain": pretrain,
    "evaluate_encoder": evaluate_encoder,
    "analyse_encoder": analyse_encoder,
    "noop": noop,
}


def run(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    if cfg.job not in JOBS:
        raise ValueError(f"unknown job {cfg.job!r}; choose one of {sorted(JOBS)}")
    return JOBS[cfg.job](cfg, on_epoch)
