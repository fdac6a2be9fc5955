"""One function per job kind: takes a resolved `JobConfig`, returns a run record (a dict).

Jobs know nothing of Ray, MLflow or Snakemake: `execution.py` runs them as Ray
tasks and `tracking.py` logs what they return. A job writes its outputs under
`cfg.output_dir` atomically and resumes from its checkpoint if one is there.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import distributed as dist
from .config import ConfigError, JobConfig, ModelConfig, check_recipe, mixes, to_dict
from .data import BatchAugment, DatasetBundle, load_dataset, normalize, to_unit
from .dry import base_record, noop
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
from .io import atomic_path
from .models import VARIANTS, count_params, create_model
from .models.checkpoint import load_vit, save_checkpoint

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
    # model.drop_rate: timm VisionTransformer's drop_rate (dropout before the head), passed only when set, so the
    # kwargs (and the checkpoints' meta) of a run without it stay as they were
    dropout = {"drop_rate": m.drop_rate} if m.drop_rate else {}
    return dict(kw, mixer=mixer, in_chans=data.in_chans, num_classes=data.num_classes,
                mlp_ratio=m.mlp_ratio, global_pool=m.global_pool, drop_path_rate=m.drop_path_rate,
                pos_embed=m.pos_embed, freeze_patch_embed=m.freeze_patch_embed, weight_init=m.weight_init,
                init_values=m.init_values, **dropout)


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
        self_cropping = cfg.job == "pretrain" and not _labelled_pretext(cfg)
        # "train": random-resized crops and flips of the full image for a job that trains with train.augment;
        # "views": each crop a pretext (MoCo, SimMIM, MAE, hybrid) asks for, from the full image (`pretrain`
        # sets them: objective.take_loader_views); "eval": resize and centre crop for jobs that only read
        # features (probes, k-NN, analysis)
        mode = "train" if train_crop and a.crop_scale else "views" if self_cropping else "eval"
        extra = dict(crop_scale=tuple(a.crop_scale) if a.crop_scale else None, flip=a.flip,
                     micro_batch=dist.check_batch(cfg.train.batch_size, cfg.train.accum_steps),
                     pin_memory=device.type == "cuda", train_mode=mode)
        if mode == "train" and a.rand_augment:  # timm's RandAugment on each crop, in the loader workers
            extra["rand_augment"] = a.rand_augment
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
    erase = random_erasing(cfg, device)

    def eval_transform(x: torch.Tensor) -> torch.Tensor:
        return normalize(to_unit(x), mean, std)

    def train_transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = normalize(aug(to_unit(x), generator=gen), mean, std)
        return x if erase is None else erase(x)

    return train_transform, eval_transform


@dataclass
class JobContext:
    """What every job sets up first, built once (`JobContext.create`): threads and seeds, the device and
    precision, the dataset, the clock; the device transforms on first use (`transforms`)."""

    cfg: JobConfig
    device: torch.device
    precision: object
    data: DatasetBundle
    t0: float
    _transforms: Optional[tuple] = field(default=None, repr=False)

    @classmethod
    def create(cls, cfg: JobConfig, train_crop: bool = False) -> "JobContext":
        """`train_crop`: the job trains with train.augment (see `load_data`)."""
        t0 = time.perf_counter()
        device, precision = setup(cfg)
        return cls(cfg, device, precision, load_data(cfg, device, train_crop=train_crop), t0)

    @property
    def transforms(self) -> tuple[Callable, Callable]:
        """(train_transform(x, gen), eval_transform(x)) of `make_transforms`."""
        if self._transforms is None:
            self._transforms = make_transforms(self.cfg, self.data, self.device)
        return self._transforms

    @property
    def eval_transform(self) -> Callable:
        return self.transforms[1]

    def steps_per_epoch(self, batch_size: int, what: str = "train.batch_size", fix: str = "lower it") -> int:
        """Optimizer steps per epoch; a batch larger than the training split is an error naming `what`."""
        steps = len(self.data.train) // batch_size
        if steps == 0:
            raise ValueError(f"{what} {batch_size} exceeds the {len(self.data.train)} training images; {fix}")
        return steps

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(os.path.join(self.cfg.output_dir, "checkpoint.pt"))

    def wall_s(self) -> float:
        return time.perf_counter() - self.t0


def random_erasing(cfg: JobConfig, device: torch.device):
    """train.augment.random_erasing: timm's RandomErasing on the normalised batch, on the device (None when 0).

    timm's create_transform places it after Normalize (timm/data/transforms_factory.py; DeiT main.py --reprob
    0.25 --remode pixel --recount 1), where "pixel" fills with N(0, 1) noise in normalised units. Its per-image
    draws come from Python's `random` and torch's global generator (timm/data/random_erasing.py), both seeded
    from (seed, epoch) by engine.fit, so a resumed run erases the same boxes. Image-folder batches leave the
    loader as uint8 and are normalised on the device, so both kinds of data are erased here."""
    a = cfg.train.augment
    if not a.random_erasing:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(a.random_erasing, mode=a.random_erasing_mode, device=str(device))


def build_mixup(cfg: JobConfig, num_classes: int):
    """timm's Mixup/CutMix for the recipe (None when both alphas are 0), as DeiT's main.py and MAE's
    main_finetune.py build it: batch mode, label smoothing folded into the soft targets."""
    tc = cfg.train
    if not mixes(tc):
        return None
    micro = dist.check_batch(tc.batch_size, tc.accum_steps)
    if micro % 2:
        raise ConfigError(f"train.mixup_alpha/cutmix_alpha: timm's Mixup pairs each image with the micro-batch "
                          f"reversed, so a worker's micro-batch must be even, but train.batch_size {tc.batch_size} / "
                          f"(execution.workers {dist.world_size()} x train.accum_steps {tc.accum_steps}) = {micro}; "
                          "pick an even micro-batch")
    from timm.data import Mixup

    return Mixup(mixup_alpha=tc.mixup_alpha, cutmix_alpha=tc.cutmix_alpha, prob=tc.mix_prob,
                 switch_prob=tc.mix_switch_prob, mode="batch", label_smoothing=tc.label_smoothing,
                 num_classes=num_classes)


def build_ema(cfg: JobConfig, model: torch.nn.Module):
    """train.ema: timm's ModelEmaV3 of `model` (the student: what model.pt keeps), decay train.ema_decay per
    optimiser step with no warm-up, as DeiT's ModelEma (main.py --model-ema-decay 0.99996); None when off."""
    if not cfg.train.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.train.ema_decay)


@contextlib.contextmanager
def evaluated_weights(model: torch.nn.Module, ema):
    """Inside: `model` holds the EMA weights (every forward built on it, a wrapper's or a compiled one, uses
    them); on leaving, its own weights come back bit for bit. Yields the online state dict (None without an
    EMA, when nothing changes)."""
    if ema is None:
        yield None
        return
    online = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema.module.state_dict())
    try:
        yield online
    finally:
        model.load_state_dict(online)


def epoch_batches(split, batch_size: int, seed: int, accum_steps: int = 1, repeats: int = 1):
    """train_batches(epoch) for `fit(micro_batches=True)`: a fresh shuffle drawn from (seed, epoch), the same on
    every worker; this worker's share of each step's `batch_size` images, as accum_steps micro-batches.
    repeats > 1: repeated augmentation (train.repeated_aug; datasets.batch_plan, after DeiT's RASampler)."""
    dist.check_batch(batch_size, accum_steps)
    more = {"repeats": repeats} if repeats > 1 else {}

    def batches(epoch: int):
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        return split.batches(batch_size, shuffle=True, generator=gen, drop_last=True,
                             shard=dist.shard() if dist.is_distributed() else None, micro=accum_steps, **more)

    return batches


def sharded_predict(forward, split, batch_size: int, precision, transform):
    """`predict` over a whole split, each worker evaluating its share of every batch (gathered on all ranks)."""
    if not dist.is_distributed():
        return predict(forward, split.batches(batch_size), precision, transform)
    return predict(forward, split.batches(batch_size, shard=dist.shard()), precision, transform, gather=True)


def shifted_sets(cfg: JobConfig, data: DatasetBundle) -> dict:
    """Distribution-shift test sets: the dataset's extra tests (cue-conflict, ImageFolder dirs) and
    the configured corruptions of the test split at the configured severity; none where cfg.shift.in_job is
    false. In the workflow only the shift jobs (vitablate.shift) test on them: the training and evaluation jobs'
    configs hold no extra_test_dirs or corruptions, and say in_job false where the dataset brings a set."""
    from .data import corrupt_split

    if not cfg.shift.in_job:
        return {}
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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, image=x[0].permute(1, 2, 0).float().cpu().numpy(),
                 maps=attn.reshape(len(maps), *grid).cpu().numpy(), prefix_mass=prefix.cpu().numpy(),
                 query=np.array(centre_query(grid)), patch_size=int(model.patch_embed.patch_size[0]))
    return {"attention_maps_path": path}


def accum_fields(result) -> dict:
    """The record's note on gradient accumulation: accum_changes_objective (true where train.accum_steps > 1 is not
    the update of one whole batch: MoCo's negatives, BatchNorm statistics) and, then, why."""
    reason = result.accum_changes_objective
    return {"accum_changes_objective": bool(reason), **({"accum_changes_objective_reason": reason} if reason else {})}


def classifier_job(cfg: JobConfig, on_epoch: OnEpoch, build: Callable) -> dict:
    """Train and evaluate a classifier; `build(model, kw, device)` says how.

    build returns (fit_module, loss_fn or None, eval_forward): the module whose state the
    checkpoint keeps (a wrapper holding a frozen teacher, say), the loss (None: cross-entropy
    of eval_forward) and what evaluation calls. The student `model` is what model.pt keeps.
    """
    check_recipe(cfg.train, cfg.data.name)
    ctx = JobContext.create(cfg, train_crop=True)
    device, precision, data = ctx.device, ctx.precision, ctx.data
    kw = model_kwargs(cfg.model, data, cfg.mixer)
    model = create_model(**kw)
    fit_module, loss_fn, forward = build(model, kw, device)
    if loss_fn is not None and mixes(cfg.train):
        raise ConfigError(f"train.mixup_alpha/cutmix_alpha need the plain classification loss, but {cfg.job} "
                          f"{cfg.transfer.method} brings its own; set both alphas to 0 for it")
    ema = build_ema(cfg, model)  # a copy of the weights as built (after a fine-tune's encoder is loaded)
    eager_forward = forward  # attention capture needs the eager modules
    if cfg.execution.compile:
        forward = torch.compile(forward)
    train_transform, eval_transform = ctx.transforms
    tc = cfg.train
    steps_per_epoch = ctx.steps_per_epoch(tc.batch_size)
    if loss_fn is None:
        loss_fn = classification_loss(forward, tc.label_smoothing, build_mixup(cfg, data.num_classes))

    def evaluate() -> dict:
        fit_module.eval()
        with evaluated_weights(model, ema):  # train.ema: the EMA weights are the ones evaluated
            return {"top1_val": top1(*sharded_predict(forward, data.val, tc.eval_batch_size, precision,
                                                      eval_transform))}

    extra = {}
    if ema is not None:  # the EMA lives in the checkpoint and follows each optimiser step (DeiT main.py)
        extra = dict(extra_state={"ema": ema}, after_step=lambda step, total: ema.update(model))
    result = fit(
        fit_module, loss_fn, epoch_batches(data.train, tc.batch_size, cfg.seed, tc.accum_steps, tc.repeated_aug),
        steps_per_epoch, tc, precision, ctx.checkpoint(), cfg.seed,
        transform=train_transform, evaluate=evaluate, on_epoch=on_epoch, meta={"config": to_dict(cfg), "model": kw},
        micro_batches=True, **extra,
    )
    fit_module.eval()
    maps = {}
    with evaluated_weights(model, ema) as online:  # test, shifted sets, model.pt, maps: the evaluated weights
        final = evaluate() | evaluate_splits(forward, data, tc.eval_batch_size, precision, eval_transform,
                                             shifted_sets(cfg, data))
        if dist.is_main():  # rank 0 alone writes the job's outputs
            # with an EMA, "model" holds the EMA weights that were evaluated; the online ones beside them
            save_checkpoint(os.path.join(cfg.output_dir, "model.pt"), model, kw, to_dict(cfg),
                            extra=None if ema is None else {"online_model": online})
            maps = save_query_maps(model, eager_forward, data, eval_transform, cfg.output_dir)
    return base_record(cfg) | maps | {
        "params_m": count_params(model) / 1e6, "epochs": tc.epochs, "device": str(device),
        "evaluated_weights": "ema" if ema is not None else "online",
        "precision": str(precision.dtype or "float32"), "resumed_from_epoch": result.resumed_from_epoch,
        "train_s": result.train_s, "wall_s": ctx.wall_s(), "history": result.history, **final,
        **accum_fields(result),
    }


def train_classifier(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Supervised training from scratch, or from a pre-trained encoder when cfg.init_from is set."""

    def build(model, kw, device):
        if cfg.init_from:  # fine-tuning: every weight but the new head comes from the encoder
            init_classifier_from_encoder(model, load_encoder(cfg.init_from)[0].state_dict(),
                                         f"encoder {cfg.init_from}")
        model.to(device)
        return model, None, model

    return classifier_job(cfg, on_epoch, build)


def load_encoder(path: str) -> tuple[torch.nn.Module, dict, dict]:
    """(model, its create_model kwargs, its job's config) from an encoder.pt or a model.pt (read with
    weights_only=True: `vitablate.models.checkpoint`)."""
    return load_vit(path)


def load_encoder_into(model: torch.nn.Module, path: str) -> None:
    """Copy a pre-trained encoder's weights into `model` (`init_classifier_from_encoder`)."""
    encoder, kw, _ = load_encoder(path)
    init_classifier_from_encoder(model, encoder.state_dict(), f"encoder {path} ({kw})")


# the final norm a ViT pools through: `norm` (token pooling) or `fc_norm` (average pooling)
_FINAL_NORMS = ("norm.", "fc_norm.")


def init_classifier_from_encoder(model: torch.nn.Module, state: dict, what: str) -> None:
    """Initialise a classifier for fine-tuning from a pre-trained ViT's weights `state`: the one way shared by
    Q2's fine-tune evaluation (`evaluate_encoder`, eval finetune) and Q3's `finetune` method.

    As MAE's main_finetune.py (facebookresearch/mae): every weight of the encoder is loaded except the
    classifier head, which keeps this model's fresh initialisation (`head.*` of `state` is dropped; a
    pre-trained encoder has none). The final norm is loaded where both pool the same way; an encoder pooled
    otherwise (token-pooled ones end in `norm`, average-pooled ones in `fc_norm`) leaves the model's final
    norm freshly initialised, as main_finetune.py keeps fc_norm new when global_pool is on. Any other weight
    that does not match is an error naming it."""
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")},
                                                strict=False)
    bad = [k for k in missing if not k.startswith(("head.",) + _FINAL_NORMS)]
    bad += [k for k in unexpected if not k.startswith(_FINAL_NORMS)]
    if bad:
        hint = ("; LayerScale (ls1/ls2.gamma) is in one model only: give the fine-tuned model the encoder's "
                "model.init_values (pretext.by_pretext.<pretext>.finetune_model, transfer.model)"
                if any(".ls1." in k or ".ls2." in k for k in bad) else "")
        raise ValueError(f"{what} does not fit this model: mismatched weights {bad[:5]}{hint}")


def pretext_id(cfg: JobConfig) -> str:
    """The grid's name for the pretext (hybrid_0.2 carries its lambda)."""
    return cfg.tags.get("pretext", cfg.pretext.name)


def encoder_kwargs(cfg: JobConfig, data: DatasetBundle) -> dict:
    return model_kwargs(cfg.model, data, "attention") | {"num_classes": 0}  # pooled features out


def build_objective(cfg: JobConfig, data: DatasetBundle, device: torch.device = torch.device("cpu")):
    """(the pretext objective around a new encoder, the encoder's create_model kwargs): the encoder is built
    from the pre-training job's own model settings (pretext.model <- by_pretext.<pretext>.pretrain_model)."""
    from .objectives import build_pretext

    kw = encoder_kwargs(cfg, data)
    extra = cfg.pretext.objective_kwargs()
    if _labelled_pretext(cfg):
        extra = dict(num_classes=data.num_classes, label_smoothing=cfg.train.label_smoothing,
                     augment=build_augment(cfg, data),  # the same augmentation as training from scratch
                     erase=random_erasing(cfg, device), mixup=build_mixup(cfg, data.num_classes))
    return build_pretext(cfg.pretext.name, create_model(**kw), data.mean, data.std, **extra), kw


def _labelled_pretext(cfg: JobConfig) -> bool:
    """The pretext trains on labels (registry family meta `labelled`: supervised): it takes train.augment's crops,
    random erasing, Mixup/CutMix and repeated augmentation like a classifier."""
    from .objectives.registry import PRETEXTS

    return bool(PRETEXTS.entry(cfg.pretext.name).meta.get("labelled"))


def pretrain_setup(cfg: JobConfig, device: torch.device, data: Optional[DatasetBundle] = None):
    """(data, objective, encoder kwargs) of a pre-training job. The supervised pretext trains with train.augment
    (crops from the full images); on an image folder the others' loader takes their crops of the full images
    (mode "views": objective.take_loader_views), and their device augmentation no longer crops or flips.
    `data`: the job's dataset, if loaded already (`JobContext`)."""
    if data is None:
        data = load_data(cfg, device, train_crop=_labelled_pretext(cfg))
    objective, kw = build_objective(cfg, data, device)
    if getattr(data.train, "mode", None) == "views":
        data.train.views = objective.take_loader_views()
    return data, objective, kw


def check_pretext_recipe(cfg: JobConfig) -> None:
    """A pre-training recipe's DeiT keys: the supervised pretext applies RandAugment (loader), random erasing,
    Mixup/CutMix (objectives.Supervised) and repeated augmentation; the self-supervised ones draw their own views,
    so there those keys would be silently ignored: refused, naming them. An EMA is never evaluated in pre-training."""
    tc, a = cfg.train, cfg.train.augment
    check_recipe(tc, cfg.data.name, "pretext.pretrain")
    if not _labelled_pretext(cfg):
        used = [k for k, on in (("augment.rand_augment", a.rand_augment), ("augment.random_erasing", a.random_erasing),
                                ("mixup_alpha", tc.mixup_alpha), ("cutmix_alpha", tc.cutmix_alpha),
                                ("repeated_aug", tc.repeated_aug > 1)) if on]
        if used:
            raise ConfigError(f"pretext {cfg.pretext.name!r} draws its own views and does not apply train.{used}; "
                              "remove them from its pre-training recipe (pretext.pretrain / by_pretext) and set them "
                              "in pretext.finetune instead")
    if tc.ema:
        raise ConfigError("train.ema is not applied in pre-training (the encoder saved is the online one); remove it "
                          "from pretext.pretrain / by_pretext.<pretext>.pretrain")


def pretrain(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Pre-train an encoder with `cfg.pretext` (the pretext question's first job)."""

    check_pretext_recipe(cfg)
    ctx = JobContext.create(cfg, train_crop=_labelled_pretext(cfg))
    device, precision = ctx.device, ctx.precision
    data, objective, kw = pretrain_setup(cfg, device, ctx.data)
    encoder = objective.encoder
    objective = objective.to(device)
    objective = dist.sync_batchnorm(objective, device)  # several workers: heads normalise over the global batch
    tc = cfg.train
    steps_per_epoch = ctx.steps_per_epoch(tc.batch_size)
    result = fit(
        objective, lambda x, y: objective(x, y), epoch_batches(data.train, tc.batch_size, cfg.seed, tc.accum_steps,
                                                                  tc.repeated_aug),
        steps_per_epoch, tc, precision, ctx.checkpoint(), cfg.seed,
        on_epoch=on_epoch, after_step=objective.after_step, meta={"config": to_dict(cfg)}, micro_batches=True,
        transform=lambda x, gen: to_unit(x),  # uint8 image-folder batches -> [0, 1] on the device
    )
    if dist.is_main():
        path = os.path.join(cfg.output_dir, "encoder.pt")
        save_checkpoint(path, encoder, kw, to_dict(cfg))
    return base_record(cfg) | {
        "pretext": pretext_id(cfg), "params_m": count_params(encoder) / 1e6, "epochs": tc.epochs,
        "final_loss": result.history[-1]["train_loss"], "device": str(device), "train_s": result.train_s,
        "resumed_from_epoch": result.resumed_from_epoch, "wall_s": ctx.wall_s(),
        "history": result.history, **accum_fields(result),
    }


def frozen_features(encoder, splits: dict, cfg: JobConfig, device, eval_transform) -> dict:
    """Pooled features and labels of the frozen `encoder` on each of `splits` ({name: split}; unshuffled, so a
    split's `extra` labels align): what the linear probe and k-NN read, in the evaluation and in its shift job."""
    from .analysis.probes import extract

    encoder.eval()
    bs = cfg.train.eval_batch_size
    return {name: extract(encoder, split.batches(bs), device, eval_transform) for name, split in splits.items()}


def frozen_top1(feats: dict, cfg: JobConfig, num_classes: int, predict=None, train=None) -> dict:
    """top1_<split> of every split of `feats` but train: the linear probe's `predict` on its features, or (predict
    None) the weighted k-NN vote among the `train` (features, labels) with cfg.eval.knn_k and knn_temperature."""
    from .analysis.probes import knn_accuracy

    out = {}
    for split, (x, y) in feats.items():
        if split != "train":
            out[f"top1_{split}"] = (knn_accuracy(*train, x, y, num_classes, cfg.eval.knn_k, cfg.eval.knn_temperature)
                                    if predict is None else top1(predict(x), y))
    return out


def evaluate_encoder(cfg: JobConfig, on_epoch: OnEpoch = None, teacher: Optional[str] = None) -> dict:
    """Evaluate a pre-trained encoder: linear_probe, knn (frozen) or finetune (all weights).

    The encoder is cfg.init_from (a pretext encoder.pt) or, for transfer, the teacher spec. A linear probe's
    head is saved as probe.pt beside the record, which its shift job (vitablate.shift) applies to the shifted
    test sets; on shapes the job also measures the cue-conflict shape bias with probes of its own.
    """
    from .analysis.probes import fit_linear_probe, select_linear_probe, shape_bias
    from .analysis.registry import EVALS

    name = cfg.eval.name
    EVALS.entry(name)  # an unknown name: an error naming pretext.evals and the choices
    if name == "finetune":
        return train_classifier(cfg, on_epoch) | {"eval": name, "pretext": pretext_id(cfg)}
    if name not in ("linear_probe", "knn"):
        raise ValueError(f"eval {name!r} is registered (vitablate.analysis.registry.EVALS) but "
                         "vitablate.jobs.evaluate_encoder does not run it; add its branch there")
    if cfg.eval.probe not in ("lbfgs", "reference"):
        raise ValueError(f"eval.probe must be lbfgs or reference, got {cfg.eval.probe!r}")
    reference = name == "linear_probe" and cfg.eval.probe == "reference"
    ctx = JobContext.create(cfg, train_crop=reference)  # the reference probe trains on crops of the full images
    device, data = ctx.device, ctx.data
    if teacher:
        from .models.teachers import load_teacher

        encoder = load_teacher(teacher, model_kwargs(cfg.model, data, "attention"))
    else:
        encoder, _, _ = load_encoder(cfg.init_from)
    encoder = encoder.to(device)
    if reference:
        return reference_linear_probe(ctx, on_epoch, encoder) | {"wall_s": ctx.wall_s()}
    eval_transform = ctx.eval_transform
    feats = frozen_features(encoder, {"train": data.train, "val": data.val, "test": data.test,
                                      **{f"shift_{n}": v for n, v in shifted_sets(cfg, data).items()}},
                            cfg, device, eval_transform)
    maps = save_query_maps(encoder, encoder, data, eval_transform, cfg.output_dir)
    (tx, ty), k = feats["train"], data.num_classes
    out: dict = {}
    predict, wd = None, None
    if name == "linear_probe":  # the L2 strength with the best val top-1 (one value: that one)
        predict, wd, _ = select_linear_probe(tx, ty, *feats["val"], k, cfg.eval.probe_weight_decay)
        out["probe_weight_decay"] = wd
        save_probe(cfg, predict.state)  # its shift job applies this probe to the shifted sets
    out |= frozen_top1(feats, cfg, k, predict, train=feats["train"])  # val, test (and shifted sets in the job)
    if predict is not None:
        extra = getattr(data.train, "extra", {})
        if "y_texture" in extra and "y_shape" in extra:  # shapes: which cue do the features carry?
            for cue in ("shape", "texture"):
                probe = fit_linear_probe(tx, extra[f"y_{cue}"].cpu(), k, wd)
                out[f"top1_{cue}_probe"] = top1(probe(feats["test"][0]), data.test.extra[f"y_{cue}"].cpu())
            if "cue_conflict" in data.extra_tests:
                # a probe trained where shape i always wore texture i, then shown conflicting cues; the
                # cue-conflict split is the dataset's own (fixed by its name), read here whether or not the job
                # tests on shifted sets (its top1 on it is the shift job's)
                split = data.extra_tests["cue_conflict"]
                cc_x = (feats["shift_cue_conflict"] if "shift_cue_conflict" in feats else
                        frozen_features(encoder, {"cc": split}, cfg, device, eval_transform)["cc"])[0]
                aligned = (extra["y_shape"] == extra["y_texture"]).cpu()
                probe = fit_linear_probe(tx[aligned], extra["y_shape"].cpu()[aligned], k, wd)
                pred = probe(cc_x).argmax(-1)
                out |= shape_bias(pred, split.extra["y_shape"].cpu(), split.extra["y_texture"].cpu())
    return base_record(cfg) | maps | {"eval": name, "pretext": pretext_id(cfg), "device": str(device),
                                      "wall_s": ctx.wall_s(), "history": [], **out}


def save_probe(cfg: JobConfig, state: dict) -> None:
    """A linear probe's head (probe.pt beside its record: a Q2 linear_probe evaluation's, a Q3 linear_probe
    student's), which its shift job applies to the shifted test sets."""
    path = os.path.join(cfg.output_dir, "probe.pt")
    with atomic_path(path) as tmp:  # creates output_dir
        torch.save(state, tmp)


def reference_linear_probe(ctx: JobContext, on_epoch: OnEpoch, encoder) -> dict:
    """MAE's linear probe (facebookresearch/mae: main_linprobe.py): a BatchNorm without affine and a linear
    head on the frozen encoder's pooled features, trained with cfg.train (optimizer sgd or lars, no weight
    decay, warm-up + cosine) on cfg.train.augment's random-resized crops and flips; evaluated on centre images."""
    from .analysis.probes import LinearProbe

    cfg, data, device, precision = ctx.cfg, ctx.data, ctx.device, ctx.precision
    probe = LinearProbe(encoder, data.num_classes).to(device)
    train_transform, eval_transform = ctx.transforms
    tc = cfg.train
    steps_per_epoch = ctx.steps_per_epoch(tc.batch_size, "the linear probe's batch_size",
                                          "lower it (pretext.linear_probe or transfer.by_method.linear_probe.train)")

    def evaluate() -> dict:
        probe.eval()
        return {"top1_val": top1(*predict(probe, data.val.batches(tc.eval_batch_size), precision, eval_transform))}

    result = fit(probe, classification_loss(probe, tc.label_smoothing),
                 epoch_batches(data.train, tc.batch_size, cfg.seed),
                 steps_per_epoch, tc, precision, ctx.checkpoint(), cfg.seed,
                 transform=train_transform, evaluate=evaluate, on_epoch=on_epoch, meta={"config": to_dict(cfg)})
    probe.eval()
    final = evaluate() | evaluate_splits(probe, data, tc.eval_batch_size, precision, eval_transform,
                                         shifted_sets(cfg, data))
    maps = save_query_maps(encoder, encoder, data, eval_transform, cfg.output_dir)
    save_probe(cfg, {"kind": "reference", "head": probe.head.state_dict()})  # its shift job applies it
    return base_record(cfg) | maps | {"eval": cfg.eval.name, "pretext": pretext_id(cfg), "probe": "reference",
                                      "device": str(device), "epochs": tc.epochs, "train_s": result.train_s,
                                      "resumed_from_epoch": result.resumed_from_epoch, "history": result.history,
                                      **final, **accum_fields(result)}


def analyse_encoder(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """Layer-wise analyses of a pre-trained encoder on a fixed evaluation batch (+ per-layer probes).

    Writes `representation.parquet` (long: layer, head, metric, value) beside the record.
    """
    import polars as pl

    from .analysis import layerwise_analysis, layerwise_features
    from .analysis.probes import select_linear_probe
    from .analysis.registry import METRICS

    ctx = JobContext.create(cfg)
    device, data = ctx.device, ctx.data
    encoder, _, _ = load_encoder(cfg.init_from)
    encoder = encoder.to(device).eval()
    eval_transform = ctx.eval_transform
    n = cfg.eval.analysis_images
    x_fixed = eval_transform(next(iter(data.test.batches(n)))[0].to(device))  # the same images for every run
    rows = []
    computed = [e for e in METRICS.entries() if e.input in ("attention", "tokens")]  # every registered metric
    for entry in layerwise_analysis(encoder, x_fixed):
        layer = entry["layer"]
        for m in computed:  # per head (head 0..H-1) or one value (head -1); None: the block has no attention
            value = entry[m.name]
            if value is None:
                continue
            if m.meta.get("per_head"):
                rows += [(layer, h, m.name, float(v)) for h, v in enumerate(value.tolist())]
            else:
                rows.append((layer, -1, m.name, float(value)))
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
    with atomic_path(path) as tmp:
        table.write_parquet(tmp)
    per_layer = table.group_by(["layer", "metric"]).agg(pl.col("value").mean()).sort(["metric", "layer"])
    maps = save_query_maps(encoder, encoder, data, eval_transform, cfg.output_dir)
    return base_record(cfg) | maps | {"pretext": pretext_id(cfg), "analysis_path": path,
                                      "wall_s": ctx.wall_s(), "n_images": int(x_fixed.shape[0]),
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
    ctx = JobContext.create(cfg)
    device, precision, data = ctx.device, ctx.precision, ctx.data
    members = [load_encoder(p)[0].eval().to(device) for p in cfg.transfer.ensemble_members]
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members (transfer.ensemble_members)")
    eval_transform = ctx.eval_transform
    forward = ensemble_forward(members)
    bs = cfg.train.eval_batch_size
    final = {"top1_val": top1(*predict(forward, data.val.batches(bs), precision, eval_transform))}
    final |= evaluate_splits(forward, data, bs, precision, eval_transform, shifted_sets(cfg, data))
    return base_record(cfg) | {"device": str(device), "wall_s": ctx.wall_s(), "history": [], **final,
                               "params_m": sum(count_params(m) for m in members) / 1e6}


def transfer(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """One attention-transfer method (cfg.transfer.method, a name in `vitablate.methods.TRANSFER_METHODS`,
    whose entry runs it) for one student and teacher."""
    from .methods import run_method

    t = cfg.transfer
    tags = {"method": t.method, "teacher": t.teacher_name or "none", "layers": t.layers}
    return run_method(cfg, on_epoch) | tags


def evaluate_shift(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    """A trained model (a Q1 classifier, a Q2 evaluation's, a Q3 student) tested under distribution shift
    (vitablate.shift)."""
    from .shift import evaluate_shift as run

    return run(cfg, on_epoch)


JOBS: dict[str, Callable[[JobConfig, OnEpoch], dict]] = {
    "train_classifier": train_classifier,
    "pretrain": pretrain,
    "evaluate_encoder": evaluate_encoder,
    "analyse_encoder": analyse_encoder,
    "transfer": transfer,
    "evaluate_shift": evaluate_shift,
    "noop": noop,
}


def run(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    if cfg.execution.dry_jobs:
        return noop(cfg, on_epoch)
    if cfg.job not in JOBS:
        raise ValueError(f"unknown job {cfg.job!r}; choose one of {sorted(JOBS)}")
    return JOBS[cfg.job](cfg, on_epoch)
