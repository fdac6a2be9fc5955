"""One function per job kind: takes a resolved `JobConfig`, returns a run record (a dict).

Jobs know nothing of Ray, MLflow or Snakemake: `execution.py` runs them as Ray
tasks and `tracking.py` logs what they return. A job writes its outputs under
`cfg.output_dir` atomically and resumes from its checkpoint if one is there.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Callable, Optional

import torch

from . import __version__
from . import distributed as dist
from .config import JobConfig, ModelConfig, to_dict
from .data import BatchAugment, DatasetBundle, load_dataset, normalize, to_unit
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


def load_data(cfg: JobConfig, device: torch.device, train_crop: bool = False) -> DatasetBundle:
    """The job's dataset. `train_crop`: the job trains with train.augment, so an on-disk dataset (imagefolder)
    decodes its random-resized crops and flips from the full-resolution images (the device augmentation then
    skips them: `build_augment`)."""
    d = cfg.data
    extra = {}
    if d.name == "imagefolder":  # the loader decodes the full-resolution images (see data/pipeline.py)
        a = cfg.train.augment
        self_cropping = cfg.job == "pretrain" and cfg.pretext.name != "supervised"
        # "train": random-resized crops and flips of the full image for a job that trains with train.augment;
        # "views": each crop a pretext (MoCo, SimMIM, MAE, hybrid) asks for, from the full image (`pretrain`
        # sets them: objective.take_loader_views); "eval": resize and centre crop for jobs that only read
        # features (probes, k-NN, analysis)
        mode = "train" if train_crop and a.crop_scale else "views" if self_cropping else "eval"
        extra = dict(crop_scale=tuple(a.crop_scale) if a.crop_scale else None, flip=a.flip,
                     micro_batch=dist.check_batch(cfg.train.batch_size, cfg.train.accum_steps),
                     pin_memory=device.type == "cuda", train_mode=mode)
    subsets = {k: v for k, v in dict(n_train=d.n_train, n_val=d.n_val, n_test=d.n_test).items() if v is not None}
    bundle = load_dataset(d.name, root=d.root, img_size=cfg.model.img_size, label_by=d.label_by,
                          extra_test_dirs=d.extra_test_dirs or None, num_workers=d.num_workers, **extra, **subsets)
    if cfg.execution.data_on_device and device.type == "cuda":
        for name in ("train", "val", "test"):
            split = getattr(bundle, name)
            if hasattr(split, "to"):
                setattr(bundle, name, split.to(device))
    return bundle


def build_augment(cfg: JobConfig, data: Optional[DatasetBundle] = None) -> BatchAugment:
    """The dataset's supervised augmentation (train.augment), less the crop and flip an image folder's
    loader already took from the full-resolution image (`load_data(train_crop=True)`)."""
    a = cfg.train.augment
    in_loader = getattr(getattr(data, "train", None), "mode", None) == "train"
    return BatchAugment(crop_scale=tuple(a.crop_scale) if a.crop_scale and not in_loader else None,
                        flip=a.flip and not in_loader, color_jitter=a.color_jitter, grayscale_p=0.0,
                        pad_crop=a.pad_crop)


def make_transforms(cfg: JobConfig, data: DatasetBundle, device: torch.device):
    """(train_transform(x, gen), eval_transform(x)): batched augmentation + normalisation on the device."""
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    aug = build_augment(cfg, data)

    def eval_transform(x: torch.Tensor) -> torch.Tensor:
        return normalize(to_unit(x), mean, std)

    def train_transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return normalize(aug(to_unit(x), generator=gen), mean, std)

    return train_transform, eval_transform


def epoch_batches(split, batch_size: int, seed: int, accum_steps: int = 1):
    """train_batches(epoch) for `fit(micro_batches=True)`: a fresh shuffle drawn from (seed, epoch), the same on
    every worker; this worker's share of each step's `batch_size` images, as accum_steps micro-batches."""
    dist.check_batch(batch_size, accum_steps)

    def batches(epoch: int):
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        return split.batches(batch_size, shuffle=True, generator=gen, drop_last=True,
                             shard=dist.shard() if dist.is_distributed() else None, micro=accum_steps)

    return batches


def sharded_predict(forward, split, batch_size: int, precision, transform):
    """`predict` over a whole split, each worker evaluating its share of every batch (gathered on all ranks)."""
    if not dist.is_distributed():
        return predict(forward, split.batches(batch_size), precision, transform)
    return predict(forward, split.batches(batch_size, shard=dist.shard()), precision, transform, gather=True)


def shifted_sets(cfg: JobConfig, data: DatasetBundle) -> dict:
    """Distribution-shift test sets: the dataset's extra tests (cue-conflict, ImageFolder dirs) and
    the configured corruptions of the test split at the configured severity."""
    from .data import corrupt_split

    sets = dict(data.extra_tests)
    for name in cfg.shift.corruptions:
        if not hasattr(data.test, "x"):
            raise ValueError(f"corruption {name!r} needs an in-memory test split; {cfg.data.name} streams from disk, "
                             "so list its shifted sets under data.extra_test_dirs instead")
        sets[name] = corrupt_split(data.test, name, cfg.shift.severity, seed=0)
    return sets


def evaluate_splits(forward, data: DatasetBundle, batch_size: int, precision, transform, shifted: dict) -> dict:
    """Top-1 on test and, as top1_shift_<name>, on every shifted set (`shifted_sets`)."""
    out = {"top1_test": top1(*sharded_predict(forward, data.test, batch_size, precision, transform))}
    for name, split in shifted.items():
        out[f"top1_shift_{name}"] = top1(*sharded_predict(forward, split, batch_size, precision, transform))
    return out


def save_query_maps(model: torch.nn.Module, forward: Callable, data: DatasetBundle, transform,
                    output_dir: str) -> dict:
    """Centre-query attention of the first test image, as the evaluated model uses it.

    `forward` is what evaluation calls (an AttentionCopy wrapper, say): the student's blocks
    are captured inside it, so a copied layer shows the teacher's map the student really used.
    Writes `attention_maps.npz` (image (H, W, C) in [0, 1]; maps (L, gh, gw), patch keys only,
    rows renormalised, head mean; prefix_mass (L,); query (row, col); patch_size) and returns
    {"attention_maps_path": path}, or {} for a model that does not mix tokens by attention.
    """
    import numpy as np

    from .analysis.maps import centre_query, query_attention
    from .models import capturing
    from .models.mixers import MixingAttention

    blocks = getattr(model, "blocks", None)
    if not blocks or not all(isinstance(getattr(b, "attn", None), MixingAttention) for b in blocks):
        return {}
    x, _ = next(iter(data.test.batches(1)))  # the first test image, unshuffled: the same for every job
    x = to_unit(x)
    grid = tuple(model.patch_embed.grid_size)
    was_training = model.training
    model.eval()
    with torch.no_grad(), capturing(model) as mods:
        forward(transform(x.to(next(model.parameters()).device)))
        maps = [m.last_map for m in mods]
    model.train(was_training)
    attn, prefix = query_attention(maps, grid, model.num_prefix_tokens)
    path = os.path.join(output_dir, "attention_maps.npz")
    os.makedirs(output_dir, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, image=x[0].permute(1, 2, 0).float().cpu().numpy(),
                 maps=attn.reshape(len(maps), *grid).cpu().numpy(), prefix_mass=prefix.cpu().numpy(),
                 query=np.array(centre_query(grid)), patch_size=int(model.patch_embed.patch_size[0]))
    os.replace(path + ".tmp", path)
    return {"attention_maps_path": path}


def base_record(cfg: JobConfig) -> dict:
    return {
        "question": cfg.question, "job": cfg.job, "dataset": cfg.data.name, "mixer": cfg.mixer,
        "seed": cfg.seed, "model": cfg.model.variant or "custom", "vitablate_version": __version__,
        "host": socket.gethostname(), "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "config": to_dict(cfg),
    }


def classifier_job(cfg: JobConfig, on_epoch: OnEpoch, build: Callable) -> dict:
    """Train and evaluate a classifier; `build(model, kw, device)` says how.

    build returns (fit_module, loss_fn or None, eval_forward): the module whose state the
    checkpoint keeps (a wrapper holding a frozen teacher, say), the loss (None: cross-entropy
    of eval_forward) and what evaluation calls. The student `model` is what model.pt keeps.
    """
    t0 = time.perf_counter()
    device, precision = setup(cfg)
    data = load_data(cfg, device, train_crop=True)
    kw = model_kwargs(cfg.model, data, cfg.mixer)
    model = create_model(**kw)
    fit_module, loss_fn, forward = build(model, kw, device)
    eager_forward = forward  # attention capture needs the eager modules
    if cfg.execution.compile:
        forward = torch.compile(forward)
    train_transform, eval_transform = make_transforms(cfg, data, device)
    tc = cfg.train
    steps_per_epoch = len(data.train) // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {tc.batch_size} exceeds the {len(data.train)} training images; lower it")
    if loss_fn is None:
        loss_fn = classification_loss(forward, tc.label_smoothing)

    def evaluate() -> dict:
        fit_module.eval()
        return {"top1_val": top1(*sharded_predict(forward, data.val, tc.eval_batch_size, precision, eval_transform))}

    result = fit(
        fit_module, loss_fn, epoch_batches(data.train, tc.batch_size, cfg.seed, tc.accum_steps), steps_per_epoch, tc,
        precision, Checkpoint(os.path.join(cfg.output_dir, "checkpoint.pt")), cfg.seed, transform=train_transform,
        evaluate=evaluate, on_epoch=on_epoch, meta={"config": to_dict(cfg), "model": kw}, micro_batches=True,
    )
    fit_module.eval()
    final = evaluate() | evaluate_splits(forward, data, tc.eval_batch_size, precision, eval_transform,
                                         shifted_sets(cfg, data))
    maps = {}
    if dist.is_main():  # rank 0 alone writes the job's outputs
        path = os.path.join(cfg.output_dir, "model.pt")
        torch.save({"model": model.state_dict(), "model_kwargs": kw, "config": to_dict(cfg)}, path + ".tmp")
        os.replace(path + ".tmp", path)
        maps = save_query_maps(model, eager_forward, data, eval_transform, cfg.output_dir)
    return base_record(cfg) | maps | {
        "params_m": count_params(model) / 1e6, "epochs": tc.epochs, "device": str(device),
        "precision": str(precision.dtype or "float32"), "resumed_from_epoch": result.resumed_from_epoch,
        "train_s": result.train_s, "wall_s": time.perf_counter() - t0, "history": result.history, **final,
    }


def train_classifier(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Supervised training from scratch, or from a pre-trained encoder when cfg.init_from is set."""

    def build(model, kw, device):
        if cfg.init_from:  # fine-tuning: every weight but the new head comes from the encoder
            load_encoder_into(model, cfg.init_from)
        model.to(device)
        return model, None, model

    return classifier_job(cfg, on_epoch, build)


def load_encoder(path: str) -> tuple[torch.nn.Module, dict, dict]:
    """(model, its create_model kwargs, its job's config) from an encoder.pt or a model.pt."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} is missing; run the job that writes it first (its pre-training "
                                "job for an encoder.pt, its training job for a model.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        encoder = create_model(**state["model_kwargs"])
        encoder.load_state_dict(state["model"])
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); "
                           "delete it and re-run the job that writes it") from e
    return encoder, state["model_kwargs"], state.get("config", {})


def load_encoder_into(model: torch.nn.Module, path: str) -> None:
    """Copy a pre-trained encoder's weights into `model`; only the classifier head may differ."""
    encoder, kw, _ = load_encoder(path)
    load_pretrained(model, encoder.state_dict(), f"encoder {path} ({kw})")


# the final norm a ViT pools through: `norm` (token pooling) or `fc_norm` (average pooling)
_FINAL_NORMS = ("norm.", "fc_norm.")


def load_pretrained(model: torch.nn.Module, state: dict, what: str) -> None:
    """Load a pre-trained ViT's weights into `model` for fine-tuning; only the head and the final norm may
    differ. An encoder pooled otherwise (token-pooled ones end in `norm`, average-pooled ones in `fc_norm`)
    leaves the model's final norm freshly initialised, as MAE's fine-tuning does (facebookresearch/mae:
    main_finetune.py keeps fc_norm new when global_pool is on)."""
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")},
                                                strict=False)
    bad = [k for k in missing if not k.startswith(("head.",) + _FINAL_NORMS)]
    bad += [k for k in unexpected if not k.startswith(_FINAL_NORMS)]
    if bad:
        raise ValueError(f"{what} does not fit this model: mismatched weights {bad[:5]}")


def pretext_id(cfg: JobConfig) -> str:
    """The grid's name for the pretext (hybrid_0.2 carries its lambda)."""
    return cfg.tags.get("pretext", cfg.pretext.name)


def encoder_kwargs(cfg: JobConfig, data: DatasetBundle) -> dict:
    return model_kwargs(cfg.model, data, "attention") | {"num_classes": 0}  # pooled features out


def build_objective(cfg: JobConfig, data: DatasetBundle):
    """(the pretext objective around a new encoder, the encoder's create_model kwargs): the encoder is built
    from the pre-training job's own model settings (pretext.model <- by_pretext.<pretext>.pretrain_model)."""
    from .objectives import build_pretext

    kw = encoder_kwargs(cfg, data)
    extra = cfg.pretext.objective_kwargs()
    if cfg.pretext.name == "supervised":
        extra = dict(num_classes=data.num_classes, label_smoothing=cfg.train.label_smoothing,
                     augment=build_augment(cfg, data))  # the same augmentation as training from scratch
    return build_pretext(cfg.pretext.name, create_model(**kw), data.mean, data.std, **extra), kw


def pretrain_setup(cfg: JobConfig, device: torch.device):
    """(data, objective, encoder kwargs) of a pre-training job. The supervised pretext trains with train.augment
    (crops from the full images); on an image folder the others' loader takes their crops of the full images
    (mode "views": objective.take_loader_views), and their device augmentation no longer crops or flips."""
    data = load_data(cfg, device, train_crop=cfg.pretext.name == "supervised")
    objective, kw = build_objective(cfg, data)
    if getattr(data.train, "mode", None) == "views":
        data.train.views = objective.take_loader_views()
    return data, objective, kw


def pretrain(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Pre-train an encoder with `cfg.pretext` (the pretext question's first job)."""

    t0 = time.perf_counter()
    device, precision = setup(cfg)
    data, objective, kw = pretrain_setup(cfg, device)
    encoder = objective.encoder
    objective = objective.to(device)
    objective = dist.sync_batchnorm(objective, device)  # several workers: heads normalise over the global batch
    tc = cfg.train
    steps_per_epoch = len(data.train) // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {tc.batch_size} exceeds the {len(data.train)} training images; lower it")
    result = fit(
        objective, lambda x, y: objective(x, y), epoch_batches(data.train, tc.batch_size, cfg.seed, tc.accum_steps),
        steps_per_epoch, tc, precision, Checkpoint(os.path.join(cfg.output_dir, "checkpoint.pt")), cfg.seed,
        on_epoch=on_epoch, after_step=objective.after_step, meta={"config": to_dict(cfg)}, micro_batches=True,
        transform=lambda x, gen: to_unit(x),  # uint8 image-folder batches -> [0, 1] on the device
    )
    if dist.is_main():
        path = os.path.join(cfg.output_dir, "encoder.pt")
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save({"model": encoder.state_dict(), "model_kwargs": kw, "config": to_dict(cfg)}, tmp)
        os.replace(tmp, path)
    return base_record(cfg) | {
        "pretext": pretext_id(cfg), "params_m": count_params(encoder) / 1e6, "epochs": tc.epochs,
        "final_loss": result.history[-1]["train_loss"], "device": str(device), "train_s": result.train_s,
        "resumed_from_epoch": result.resumed_from_epoch, "wall_s": time.perf_counter() - t0,
        "history": result.history,
    }


def _features(encoder, data: DatasetBundle, cfg: JobConfig, device, eval_transform) -> dict:
    """Pooled encoder features and labels of every split (unshuffled, so `extra` labels align)."""
    from .analysis.probes import extract

    encoder.eval()
    bs = cfg.train.eval_batch_size
    splits = {"train": data.train, "val": data.val, "test": data.test,
              **{f"shift_{n}": v for n, v in shifted_sets(cfg, data).items()}}
    return {name: extract(encoder, split.batches(bs), device, eval_transform) for name, split in splits.items()}


def evaluate_encoder(cfg: JobConfig, on_epoch: OnEpoch = None, teacher: Optional[str] = None) -> dict:
    """Evaluate a pre-trained encoder: linear_probe, knn (frozen) or finetune (all weights).

    The encoder is cfg.init_from (a pretext encoder.pt) or, for transfer, the teacher spec.
    """
    from .analysis.probes import fit_linear_probe, knn_accuracy, select_linear_probe, shape_bias

    name = cfg.eval.name
    if name == "finetune":
        return train_classifier(cfg, on_epoch) | {"eval": name, "pretext": pretext_id(cfg)}
    if name not in ("linear_probe", "knn"):
        raise ValueError(f"unknown eval {name!r}; choose linear_probe, finetune or knn")
    if cfg.eval.probe not in ("lbfgs", "reference"):
        raise ValueError(f"eval.probe must be lbfgs or reference, got {cfg.eval.probe!r}")
    t0 = time.perf_counter()
    device, precision = setup(cfg)
    reference = name == "linear_probe" and cfg.eval.probe == "reference"
    data = load_data(cfg, device, train_crop=reference)  # the reference probe trains on crops of the full images
    if teacher:
        from .models.teachers import load_teacher

        encoder = load_teacher(teacher, model_kwargs(cfg.model, data, "attention"))
    else:
        encoder, _, _ = load_encoder(cfg.init_from)
    encoder = encoder.to(device)
    if reference:
        return reference_linear_probe(cfg, on_epoch, encoder, data, device, precision) | {
            "wall_s": time.perf_counter() - t0}
    _, eval_transform = make_transforms(cfg, data, device)
    feats = _features(encoder, data, cfg, device, eval_transform)
    maps = save_query_maps(encoder, encoder, data, eval_transform, cfg.output_dir)
    (tx, ty), k = feats["train"], data.num_classes
    out: dict = {}
    predict, wd = None, None
    if name == "linear_probe":  # the L2 strength with the best val top-1 (one value: that one)
        predict, wd, _ = select_linear_probe(tx, ty, *feats["val"], k, cfg.eval.probe_weight_decay)
        out["probe_weight_decay"] = wd
    for split, (x, y) in feats.items():  # val, test and every shifted test set
        if split != "train":
            out[f"top1_{split}"] = (knn_accuracy(tx, ty, x, y, k, cfg.eval.knn_k, cfg.eval.knn_temperature)
                                    if predict is None else top1(predict(x), y))
    if predict is not None:
        extra = getattr(data.train, "extra", {})
        if "y_texture" in extra and "y_shape" in extra:  # shapes: which cue do the features carry?
            for cue in ("shape", "texture"):
                probe = fit_linear_probe(tx, extra[f"y_{cue}"].cpu(), k, wd)
                out[f"top1_{cue}_probe"] = top1(probe(feats["test"][0]), data.test.extra[f"y_{cue}"].cpu())
            if "shift_cue_conflict" in feats:
                # a probe trained where shape i always wore texture i, then shown conflicting cues
                aligned = (extra["y_shape"] == extra["y_texture"]).cpu()
                probe = fit_linear_probe(tx[aligned], extra["y_shape"].cpu()[aligned], k, wd)
                cc = data.extra_tests["cue_conflict"].extra
                pred = probe(feats["shift_cue_conflict"][0]).argmax(-1)
                out |= shape_bias(pred, cc["y_shape"].cpu(), cc["y_texture"].cpu())
    return base_record(cfg) | maps | {"eval": name, "pretext": pretext_id(cfg), "device": str(device),
                                      "wall_s": time.perf_counter() - t0, "history": [], **out}


def reference_linear_probe(cfg: JobConfig, on_epoch: OnEpoch, encoder, data: DatasetBundle, device, precision) -> dict:
    """MAE's linear probe (facebookresearch/mae: main_linprobe.py): a BatchNorm without affine and a linear
    head on the frozen encoder's pooled features, trained with cfg.train (optimizer sgd or lars, no weight
    decay, warm-up + cosine) on cfg.train.augment's random-resized crops and flips; evaluated on centre images."""
    from .analysis.probes import LinearProbe

    probe = LinearProbe(encoder, data.num_classes).to(device)
    train_transform, eval_transform = make_transforms(cfg, data, device)
    tc = cfg.train
    steps_per_epoch = len(data.train) // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the linear probe's batch_size {tc.batch_size} exceeds the {len(data.train)} training "
                         "images; lower it (pretext.linear_probe or transfer.by_method.linear_probe.train)")

    def evaluate() -> dict:
        probe.eval()
        return {"top1_val": top1(*predict(probe, data.val.batches(tc.eval_batch_size), precision, eval_transform))}

    result = fit(probe, classification_loss(probe, tc.label_smoothing),
                 epoch_batches(data.train, tc.batch_size, cfg.seed),
                 steps_per_epoch, tc, precision, Checkpoint(os.path.join(cfg.output_dir, "checkpoint.pt")), cfg.seed,
                 transform=train_transform, evaluate=evaluate, on_epoch=on_epoch, meta={"config": to_dict(cfg)})
    probe.eval()
    final = evaluate() | evaluate_splits(probe, data, tc.eval_batch_size, precision, eval_transform,
                                         shifted_sets(cfg, data))
    maps = save_query_maps(encoder, encoder, data, eval_transform, cfg.output_dir)
    return base_record(cfg) | maps | {"eval": cfg.eval.name, "pretext": pretext_id(cfg), "probe": "reference",
                                      "device": str(device), "epochs": tc.epochs, "train_s": result.train_s,
                                      "resumed_from_epoch": result.resumed_from_epoch, "history": result.history,
                                      **final}


def analyse_encoder(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Layer-wise analyses of a pre-trained encoder on a fixed evaluation batch (+ per-layer probes).

    Writes `representation.parquet` (long: layer, head, metric, value) beside the record.
    """
    import polars as pl

    from .analysis import layerwise_analysis, layerwise_features
    from .analysis.probes import select_linear_probe

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

    (tr, ty), (va, vy), (te, ey) = layer_feats(data.train), layer_feats(data.val), layer_feats(data.test)
    for layer, (a, v, b) in enumerate(zip(tr, va, te)):
        probe, _, _ = select_linear_probe(a, ty, v, vy, data.num_classes, cfg.eval.probe_weight_decay)
        rows.append((layer, -1, "layer_probe_top1", top1(probe(b), ey)))
    table = pl.DataFrame(rows, schema=["layer", "head", "metric", "value"], orient="row")
    path = os.path.join(cfg.output_dir, "representation.parquet")
    os.makedirs(cfg.output_dir, exist_ok=True)
    table.write_parquet(path + ".tmp")
    os.replace(path + ".tmp", path)
    per_layer = table.group_by(["layer", "metric"]).agg(pl.col("value").mean()).sort(["metric", "layer"])
    maps = save_query_maps(encoder, encoder, data, eval_transform, cfg.output_dir)
    return base_record(cfg) | maps | {"pretext": pretext_id(cfg), "analysis_path": path,
                                      "wall_s": time.perf_counter() - t0, "n_images": int(x_fixed.shape[0]),
                                      "layers": per_layer.to_dicts(), "history": []}


def ensemble_forward(members: list[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ensemble's forward: the log of its members' class probabilities averaged (not their logits), so
    that predict()'s softmax gives back exactly the averaged probabilities."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(-1) for m in members]).mean(0)
        return probs.clamp_min(1e-12).log()

    return forward


def ensemble(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Average the class probabilities of trained classifiers (transfer: distilled student + fine-tuned teacher)."""
    t0 = time.perf_counter()
    device, precision = setup(cfg)
    data = load_data(cfg, device)
    members = [load_encoder(p)[0].eval().to(device) for p in cfg.transfer.ensemble_members]
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members (transfer.ensemble_members)")
    _, eval_transform = make_transforms(cfg, data, device)
    forward = ensemble_forward(members)
    bs = cfg.train.eval_batch_size
    final = {"top1_val": top1(*predict(forward, data.val.batches(bs), precision, eval_transform))}
    final |= evaluate_splits(forward, data, bs, precision, eval_transform, shifted_sets(cfg, data))
    return base_record(cfg) | {"device": str(device), "wall_s": time.perf_counter() - t0, "history": [], **final,
                               "params_m": sum(count_params(m) for m in members) / 1e6}


TRANSFER_METHODS = ("scratch", "finetune", "linear_probe", "attn_copy", "attn_distill", "ensemble", "copy_q", "copy_k")


def transfer(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """One attention-transfer method (cfg.transfer.method) for one student and teacher."""
    from .models.teachers import load_teacher
    from .objectives import AttentionCopy, AttentionDistillation, parse_layers

    t = cfg.transfer
    tags = {"method": t.method, "teacher": t.teacher_name or "none", "layers": t.layers}
    if t.method not in TRANSFER_METHODS:
        raise ValueError(f"unknown transfer method {t.method!r}; choose one of {list(TRANSFER_METHODS)}")
    if t.method == "scratch":
        return train_classifier(cfg, on_epoch) | tags
    if t.method == "ensemble":
        return ensemble(cfg, on_epoch) | tags
    if t.method == "linear_probe":
        probe = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, name="linear_probe"))
        return evaluate_encoder(probe, on_epoch, teacher=t.teacher) | tags

    def build(model, kw, device):
        teacher = load_teacher(t.teacher, kw)
        if t.method == "finetune":
            load_pretrained(model, teacher.state_dict(), f"teacher {t.teacher}")
            model.to(device)
            return model, None, model
        layers = parse_layers(t.layers, len(model.blocks))
        if t.method == "attn_distill":
            wrapped = AttentionDistillation(teacher, model, layers, t.distill_weight, t.distill_temperature,
                                            cfg.train.label_smoothing, teacher_drop_path=t.teacher_drop_path).to(device)
            return wrapped, wrapped, model  # the teacher trains the student; evaluation is the student alone
        mode = {"attn_copy": "map", "copy_q": "q", "copy_k": "k"}[t.method]
        wrapped = AttentionCopy(teacher, model, layers, mode=mode, teacher_drop_path=t.teacher_drop_path).to(device)
        return wrapped, None, wrapped  # the teacher runs at test time too

    return classifier_job(cfg, on_epoch, build) | tags


def noop(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Trains nothing (execution.dry_jobs): measures the orchestration around a job, shows placement."""
    start = time.time()
    if cfg.execution.dry_job_sleep_s:
        time.sleep(cfg.execution.dry_job_sleep_s)
    if on_epoch is not None:
        on_epoch(1, {"epoch": 1, "train_loss": 0.0})
    return base_record(cfg) | {"history": [{"epoch": 1}], "top1_test": 0.0, "top1_val": 0.0, "params_m": 0.0,
                               "start_time": start, "end_time": time.time(), "dry": True}


JOBS: dict[str, Callable[[JobConfig, OnEpoch], dict]] = {
    "train_classifier": train_classifier,
    "pretrain": pretrain,
    "evaluate_encoder": evaluate_encoder,
    "analyse_encoder": analyse_encoder,
    "transfer": transfer,
    "noop": noop,
}


def run(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    if cfg.execution.dry_jobs:
        return noop(cfg, on_epoch)
    if cfg.job not in JOBS:
        raise ValueError(f"unknown job {cfg.job!r}; choose one of {sorted(JOBS)}")
    return JOBS[cfg.job](cfg, on_epoch)
