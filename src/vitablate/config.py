"""Typed configuration: one dataclass per concern, a commented default per field.

The workflow config (config/config.yaml) is checked against config/schema.yaml by
Snakemake's `validate`; each job's resolved config is then built here with
`from_dict`, which refuses unknown keys and wrong types with a message naming the
key, so a typo fails before any job starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what is allowed."""


# Named model sizes (timm's names where they exist). Config `model.variant` picks one; other
# model keys override its fields.
VARIANTS: dict[str, dict] = {
    "vit_digits": dict(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=4),
    "vit_shapes": dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4),
    "vit_fmnist_p7": dict(img_size=28, patch_size=7, embed_dim=64, depth=4, num_heads=4),
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch4_32": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6),
    "vit_tiny_patch16_224": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch32_224": dict(img_size=224, patch_size=32, embed_dim=1024, depth=24, num_heads=16),
}


@dataclass
class ModelConfig:
    variant: Optional[str] = None  # a key of VARIANTS above; fields below override it
    img_size: Optional[int] = None  # pixels; None -> the dataset's native size
    patch_size: Optional[int] = None  # pixels
    embed_dim: Optional[int] = None  # width
    depth: Optional[int] = None  # blocks
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0  # channel-MLP hidden width / embed_dim
    global_pool: str = "avg"  # avg | token
    drop_path_rate: float = 0.0
    # The pre-training papers' architecture details (docs/recipes.md); the defaults build today's timm ViT.
    pos_embed: str = "learn"  # learn (timm: trunc-normal, trained) | sincos: fixed 2-D sin-cos, not trained, MAE's
    # layout (facebookresearch/mae util/pos_embed.py: column code first) | sincos_moco_v3: MoCo v3's (vits.py
    # build_2d_sincos_position_embedding: row code first); a fine-tuned copy of such an encoder learns it (learn)
    freeze_patch_embed: bool = False  # MoCo v3's random patch projection: patch_embed.proj never trained (vits.py
    # stop_grad_conv1, CONFIG.md --stop-grad-conv1)
    weight_init: str = "timm"  # timm (timm's default) | moco_v3 (vits.py: xavier-uniform Linear, Q/K/V bounds
    # apart, patch projection xavier-uniform, CLS N(0, 1e-6)) | mae (models_mae.py initialize_weights)
    init_values: Optional[float] = None  # LayerScale's initial gamma (timm); None: no LayerScale; SimMIM's ViT 0.1
    drop_rate: float = 0.0  # dropout before the head (timm VisionTransformer drop_rate; DeiT main.py --drop 0.0)


@dataclass
class AugmentConfig:
    pad_crop: int = 0  # random translation, pixels
    flip: bool = False  # horizontal flip (off for digits: a flipped 3 is not a 3)
    crop_scale: Optional[list[float]] = None  # random-resized-crop area range, e.g. [0.35, 1.0]
    color_jitter: float = 0.0  # strength; 0 disables
    # timm RandAugment config string (timm.data.auto_augment.rand_augment_transform), e.g. "rand-m9-mstd0.5-inc1"
    # (DeiT main.py --aa, MAE main_finetune.py --aa); applied in the image-folder loader workers; None = off
    rand_augment: Optional[str] = None
    random_erasing: float = 0.0  # probability (timm RandomErasing; DeiT main.py --reprob 0.25); 0 = off
    random_erasing_mode: str = "pixel"  # const | rand | pixel (timm RandomErasing mode; DeiT --remode pixel)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128  # images per optimiser step
    accum_steps: int = 1  # micro-batches per step, one backward each: 1/accum_steps the activation memory
    eval_batch_size: int = 512
    lr: float = 1e-3  # peak AdamW learning rate for this batch size
    min_lr: float = 1e-5  # end of the cosine decay
    weight_decay: float = 0.05  # never on biases, norms, position embeddings, CLS/mask tokens ...
    weight_decay_all: bool = False  # ... unless true: every parameter (MoCo v3's recipe, main_moco.py)
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9) | lars (MAE's linear probe, util/lars.py)
    warmup_epochs: float = 2.0  # linear warm-up from warmup_lr (default 0), in epochs (fractions allowed)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    label_smoothing: float = 0.1
    grad_clip: Optional[float] = None  # max global grad norm; None (the references but SimMIM) clips nothing
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # base learning rate: when set, lr = blr * batch_size / lr_batch_ref and blr wins over lr (MAE
    # main_finetune.py / main_pretrain.py / main_linprobe.py: blr x effective batch / 256; MoCo v3 main_moco.py:
    # lr x batch / 256; DeiT main.py and SimMIM main_simmim.py: / 512). batch_size is the global batch per step.
    blr: Optional[float] = None  # None: train.lr is the peak rate as given
    lr_batch_ref: int = 256  # the reference batch of the linear scaling rule
    lr_schedule: str = "cosine"  # cosine (to min_lr) | step (x lr_step_gamma at each of lr_step_epochs; SimMIM's multistep)
    lr_step_epochs: list[float] = field(default_factory=list)  # step: the epochs where the rate drops (SimMIM: [700])
    lr_step_gamma: float = 0.1  # step: the factor at each drop (SimMIM lr_scheduler.py, GAMMA 0.1)
    warmup_lr: float = 0.0  # the warm-up's start rate, linear to lr (SimMIM WARMUP_LR, DeiT --warmup-lr 1e-6)
    layer_decay: Optional[float] = None  # None: one rate for all layers; else block i of L gets lr x layer_decay^(L - i)
    # (MAE util/lr_decay.py; MAE fine-tuning ViT-B 0.65, ViT-L 0.75)

    # Mixup / CutMix on the device (timm.data.Mixup, as DeiT main.py and MAE main_finetune.py); either alpha > 0
    # switches the loss to timm's SoftTargetCrossEntropy with label_smoothing folded into the soft targets
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weight; 0 = off (DeiT --mixup 0.8)
    cutmix_alpha: float = 0.0  # 0 = off (DeiT --cutmix 1.0)
    mix_prob: float = 1.0  # probability a batch is mixed at all (DeiT --mixup-prob 1.0)
    mix_switch_prob: float = 0.5  # with both alphas > 0: probability of CutMix rather than Mixup (DeiT 0.5)
    repeated_aug: int = 1  # copies of each image per epoch, epoch length unchanged (DeiT samplers.py RASampler: 3)
    ema: bool = False  # evaluate (and save) an EMA of the weights, timm ModelEmaV3 updated after every step
    ema_decay: float = 0.99996  # per optimiser step (DeiT main.py --model-ema-decay)

    def __post_init__(self) -> None:
        if self.lr_batch_ref < 1:
            raise ConfigError(f"train.lr_batch_ref must be a positive batch size, got {self.lr_batch_ref}")
        if self.blr is not None:
            if not self.blr > 0:
                raise ConfigError(f"train.blr must be > 0 (or null to use train.lr), got {self.blr}")
            # resolved here, so the job's record, checkpoint meta and MLflow params carry the rate that trains
            self.lr = self.blr * self.batch_size / self.lr_batch_ref
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr_schedule == "step" and not self.lr_step_epochs:
            raise ConfigError("train.lr_schedule is step but train.lr_step_epochs is empty; list the epochs where the "
                              "rate drops (SimMIM ViT-B: [700]) or use lr_schedule: cosine")
        if self.lr_schedule != "step" and self.lr_step_epochs:
            raise ConfigError(f"train.lr_step_epochs {self.lr_step_epochs} only applies to lr_schedule: step "
                              f"(now {self.lr_schedule!r}); set lr_schedule: step or remove lr_step_epochs")
        if list(self.lr_step_epochs) != sorted(self.lr_step_epochs) or any(e < 0 for e in self.lr_step_epochs):
            raise ConfigError(f"train.lr_step_epochs must be non-negative and ascending, got {self.lr_step_epochs}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"train.layer_decay must be in (0, 1] (MAE: 0.65 for ViT-B, 0.75 for ViT-L) or null, "
                              f"got {self.layer_decay}")
        if self.warmup_lr < 0:
            raise ConfigError(f"train.warmup_lr must be >= 0, got {self.warmup_lr}")


LR_SCHEDULES = ("cosine", "step")


@dataclass
class ExecutionConfig:
    num_cpus: float = 1  # per job (Ray task); torch uses this many threads
    num_gpus: float = 0  # per job; fractional values pack small runs on one GPU
    workers: int = 1  # data-parallel processes of one job (Ray Train), each with num_cpus CPUs and num_gpus GPUs
    memory_gb: Optional[float] = None  # host memory per worker declared to Ray; None: computed for imagefolder
    max_retries: int = 2  # Ray re-runs a job whose worker died; it resumes from its checkpoint
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model (GPU runs)
    data_on_device: bool = True  # hold in-memory datasets on the job's device
    dry_jobs: bool = False  # jobs return at once without training: orchestration benchmarks, cluster smoke tests
    dry_job_sleep_s: float = 0.0  # how long a dry job holds its resources (to observe packing)
    shared_fs: bool = True  # every node sees results/; false: checkpoints one job hands another travel
    # through the MLflow artifact store (needs MLFLOW_TRACKING_URI=http://<server with --serve-artifacts>)


@dataclass
class DataConfig:
    name: str = "digits"  # a key of vitablate.data.DATASETS
    root: str = "data"  # where real-scale datasets live (cifar10, cifar100, imagefolder)
    label_by: str = "shape"  # shapes only: shape | texture
    num_workers: int = 0  # DataLoader processes decoding on-disk images (imagefolder, extra_test_dirs); 0 = in the job
    extra_test_dirs: dict[str, str] = field(default_factory=dict)  # name -> ImageFolder dir (distribution shift)
    n_train: Optional[int] = None  # fashion_mnist, shapes: a fixed class-balanced subset of the split; None = all
    n_val: Optional[int] = None
    n_test: Optional[int] = None


@dataclass
class PretextConfig:
    name: str = "supervised"  # a name in vitablate.objectives.registry.PRETEXTS
    lam: float = 0.2  # hybrid: lam * L_moco + (1 - lam) * L_simmim
    moco_temperature: float = 0.2
    moco_momentum: float = 0.99  # EMA start; cosine schedule to 1
    moco_dim: int = 128  # projector output
    moco_mlp_dim: int = 512  # projector / predictor hidden width
    # MoCo v3's augmentation (facebookresearch/moco-v3 main_moco.py); [view 1, view 2] where two
    moco_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    moco_color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # b, c, s, hue
    moco_color_jitter_p: float = 0.8
    moco_grayscale_p: float = 0.2
    moco_blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])
    moco_solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])
    simmim_mask_ratio: float = 0.6
    simmim_mask_patch_size: Optional[int] = None  # pixels per mask block (SimMIM: 32 at 224 px); None = one patch
    mae_mask_ratio: float = 0.75
    mae_decoder_dim: int = 64
    mae_decoder_depth: int = 2
    mae_decoder_heads: int = 4  # attention heads of each decoder block (MAE ViT-B: 16, models_mae.py)

    def objective_kwargs(self) -> dict:
        moco = dict(dim=self.moco_dim, mlp_dim=self.moco_mlp_dim, temperature=self.moco_temperature,
                    momentum=self.moco_momentum, crop_scale=self.moco_crop_scale,
                    color_jitter=self.moco_color_jitter, color_jitter_p=self.moco_color_jitter_p,
                    grayscale_p=self.moco_grayscale_p, blur_p=self.moco_blur_p, solarize_p=self.moco_solarize_p)
        simmim = dict(mask_ratio=self.simmim_mask_ratio, mask_patch_size=self.simmim_mask_patch_size)
        return {
            "supervised": {},
            "moco": moco,
            "simmim": simmim,
            "mae": dict(mask_ratio=self.mae_mask_ratio, decoder_dim=self.mae_decoder_dim,
                        decoder_depth=self.mae_decoder_depth, decoder_heads=self.mae_decoder_heads),
            "hybrid": dict(lam=self.lam, moco_kwargs=moco, simmim_kwargs=simmim),
        }.get(self.name, {})


@dataclass
class EvalConfig:
    name: str = "linear_probe"  # a name in vitablate.analysis.registry.EVALS (linear_probe, finetune, knn)
    knn_k: int = 20  # neighbours
    knn_temperature: float = 0.07
    probe: str = "lbfgs"  # lbfgs: fast full-batch probe on frozen features | reference: MAE's protocol
    # (main_linprobe.py: BatchNorm without affine + linear head, trained by SGD/LARS on random-resized crops)
    probe_weight_decay: float | list[float] = 1e-3  # L2 of the L-BFGS probe; a list: picked on the val split
    analysis_images: int = 128  # size of the fixed evaluation batch for the layer-wise analyses


@dataclass
class TransferConfig:
    method: str = "scratch"  # a name in vitablate.methods.TRANSFER_METHODS (scratch, finetune, attn_copy, ...)
    teacher: str = ""  # file:<checkpoint> (a pretext encoder.pt or a timm state dict) | timm:<model name>
    teacher_name: str = ""  # the grid's name for it (tables, tags)
    layers: str = "all"  # all | first:K | last:K | comma-separated block indices
    distill_weight: float = 3.0  # weight of the attention-distillation loss next to cross-entropy
    distill_temperature: float = 1.0
    teacher_drop_path: bool = False  # the teacher drops the student's paths, per sample (models_dual_vit.py)
    ensemble_members: list[str] = field(default_factory=list)  # model.pt files whose probabilities are averaged


@dataclass
class ShiftConfig:
    corruptions: list[str] = field(default_factory=list)  # names in vitablate.data.CORRUPTIONS, applied to test
    severity: int = 3  # 1..5
    in_job: bool = True  # false: this job tests on no shifted set (its shift job does: a transfer student; a Q1
    # classifier or Q2 evaluation on a dataset that brings a shifted set, shapes)


@dataclass
class TrackingConfig:
    """The workflow's `tracking:` section: observability only, so not part of any job's params
    (switching it never re-runs a job)."""

    system_metrics: bool = False  # MLflow system metrics (CPU, memory, disk, network, GPU) in every job's run
    system_metrics_interval_s: float = 10.0  # seconds between samples; a job shorter than this logs none
    retry_timeout_s: float = 300.0  # how long a job waits, warning, for a tracking server that does not answer


@dataclass
class JobConfig:
    """Everything one job needs; saved with its outputs and logged as MLflow params."""

    question: str = "architecture"
    job: str = "train_classifier"  # a key of vitablate.jobs.JOBS
    seed: int = 0
    mixer: str = "attention"
    output_dir: str = "results/job"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init_from: Optional[str] = None  # a pre-trained encoder checkpoint (encoder.pt) to start from
    transfer: TransferConfig = field(default_factory=TransferConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)  # distribution-shift test sets
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (question, dataset, ...)


def consumed_checkpoints(cfg: JobConfig) -> list[str]:
    """The checkpoint files a job reads: its encoder (init_from; a shift job's: the model.pt, probe.pt or
    encoder.pt it tests), a file: teacher (an ensemble averages its members and never runs the teacher; a Q2
    linear probe's shift job names its frozen encoder.pt so), ensemble members."""
    from .methods import LOADS_TEACHER

    paths = [cfg.init_from] if cfg.init_from else []
    if cfg.transfer.teacher.startswith("file:") and cfg.transfer.method in LOADS_TEACHER:
        paths.append(cfg.transfer.teacher[len("file:"):])
    return paths + list(cfg.transfer.ensemble_members)


def replace_checkpoints(cfg: JobConfig, local: dict[str, str]) -> JobConfig:
    """A copy of `cfg` reading each consumed checkpoint from `local[path]` (a downloaded copy) instead."""
    t = cfg.transfer
    teacher = t.teacher
    if teacher.startswith("file:"):
        teacher = "file:" + local.get(teacher[len("file:"):], teacher[len("file:"):])
    return dataclasses.replace(
        cfg, init_from=local.get(cfg.init_from, cfg.init_from) if cfg.init_from else cfg.init_from,
        transfer=dataclasses.replace(t, teacher=teacher,
                                     ensemble_members=[local.get(p, p) for p in t.ensemble_members]))


def _check(value: Any, tp: Any, key: str) -> Any:
    """Coerce `value` to annotation `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_check(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, varg = typing.get_args(tp)
        return {str(k): _check(v, varg, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


@functools.cache
def _fields(cls: type) -> tuple[dict, frozenset]:
    """A dataclass's resolved annotations and field names, computed once per class: resolving the string
    annotations (`from __future__ import annotations`) was two thirds of resolving a job's config, which a dry
    run of the default grid does for every job."""
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `d`; unknown keys and wrong types raise ConfigError."""
    hints, names = _fields(cls)
    unknown = sorted(set(d) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {[where + k for k in unknown]}; allowed: {sorted(names)}")
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in d.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3} (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in, recursively for mappings."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_job_config(path: str) -> JobConfig:
    with open(path) as f:
        return from_dict(JobConfig, json.load(f))


RANDOM_ERASING_MODES = ("const", "rand", "pixel")  # timm.data.random_erasing.RandomErasing's modes


def mixes(train: TrainConfig) -> bool:
    """Whether the recipe mixes batches (Mixup or CutMix): the loss then takes soft targets."""
    return train.mixup_alpha > 0 or train.cutmix_alpha > 0


def check_recipe(train: TrainConfig, data_name: str, where: str = "train") -> None:
    """The augmentation/regularisation keys of a resolved recipe, checked before any job starts (the workflow's
    config resolution and every classifier job): a wrong value raises ConfigError naming the key and the fix."""
    a = train.augment
    if a.rand_augment is not None:
        if data_name != "imagefolder":
            raise ConfigError(
                f"{where}.augment.rand_augment is {a.rand_augment!r}, but dataset {data_name!r} is held in memory and "
                "augmented on the device, where vitablate has no RandAugment (timm's runs per PIL image in the "
                "image-folder loader); set it to null for this dataset, or use data name imagefolder")
        if not a.crop_scale:
            raise ConfigError(f"{where}.augment.rand_augment needs {where}.augment.crop_scale (the loader applies "
                              "RandAugment after its random-resized crop, as timm's create_transform); "
                              "set crop_scale, e.g. [0.08, 1.0]")
        from timm.data.auto_augment import rand_augment_transform

        try:
            rand_augment_transform(a.rand_augment, {})
        except Exception as e:  # timm asserts/raises on an unknown section of the string
            raise ConfigError(f"{where}.augment.rand_augment {a.rand_augment!r} is not a timm RandAugment string "
                              f"({type(e).__name__}: {e}); e.g. rand-m9-mstd0.5-inc1") from None
        if not a.rand_augment.startswith("rand"):
            raise ConfigError(f"{where}.augment.rand_augment {a.rand_augment!r} must start with 'rand' "
                              "(e.g. rand-m9-mstd0.5-inc1)")
    if not 0 <= a.random_erasing <= 1:
        raise ConfigError(f"{where}.augment.random_erasing is {a.random_erasing}; give a probability in [0, 1]")
    if a.random_erasing_mode not in RANDOM_ERASING_MODES:
        raise ConfigError(f"{where}.augment.random_erasing_mode is {a.random_erasing_mode!r}; "
                          f"choose one of {list(RANDOM_ERASING_MODES)}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        if getattr(train, key) < 0:
            raise ConfigError(f"{where}.{key} is {getattr(train, key)}; give a value >= 0 (0 turns it off)")
    for key in ("mix_prob", "mix_switch_prob"):
        if not 0 <= getattr(train, key) <= 1:
            raise ConfigError(f"{where}.{key} is {getattr(train, key)}; give a probability in [0, 1]")
    if mixes(train):
        micro = train.batch_size // max(1, train.accum_steps)
        if micro % 2:
            raise ConfigError(f"{where}: Mixup/CutMix pairs each image with the batch reversed (timm Mixup), so "
                              f"every micro-batch must be even, but batch_size {train.batch_size} / accum_steps "
                              f"{train.accum_steps} = {micro}; pick an even micro-batch")
    if train.repeated_aug < 1:
        raise ConfigError(f"{where}.repeated_aug is {train.repeated_aug}; give 1 (off) or more copies per image")
    if not 0 < train.ema_decay < 1:
        raise ConfigError(f"{where}.ema_decay is {train.ema_decay}; give a decay in (0, 1), e.g. 0.99996")
