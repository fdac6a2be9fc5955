"""Job resolution: each job's `JobConfig` from the workflow config, and the params a rule hands it.

A job's config is resolved in layers, later winning:
JobConfig defaults <- global `execution` <- the question's section (its `model`, the
stage's `train` recipe, `execution`; then the recipe and model changes for this mixer, pretext
or method under `architecture.by_mixer`, `pretext.by_pretext` (`pretrain`/`finetune` recipes,
`pretrain_model`/`finetune_model`) and `transfer.by_method` (`train`, `model`)) <- the
dataset's own entry under `datasets:`.

A rule's `params.job` (`job_params`) holds exactly what determines the job's result, so that
Snakemake re-runs a job when, and only when, its result could change:
- the execution settings that only place the job (`RESOURCE_KEYS`: CPUs, GPUs, memory, retries, ...)
  are left out; the rule body adds them from the workflow config at run time (`job_resources`);
- each evaluation reads only its own settings (`EVAL_READS`): a k-NN job's params hold knn_k and
  knn_temperature, a fine-tuning job's no probe or k-NN settings, the analysis its analysis_images;
- every question's trained model is tested under distribution shift by a job of its own, which reads the
  model its job saved: a Q1 classifier's (`architecture_shift_job`), a Q2 evaluation's (`pretext_shift_job`:
  the fine-tuned model, the linear probe on the frozen encoder, k-NN on the frozen encoder with the
  evaluation's knn_k and knn_temperature) and a Q3 student's (`shift_job`). So the shift settings (the
  dataset's extra_test_dirs, `transfer.shift`) are none of a training, pre-training or evaluation job's params
  (`_job` leaves extra_test_dirs out of them): changing them re-runs the shift jobs alone.
Grids and paths: `vitablate.grid`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from .config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ExecutionConfig,
    JobConfig,
    ModelConfig,
    PretextConfig,
    ShiftConfig,
    TrainConfig,
    TransferConfig,
    check_recipe,
    deep_merge,
    from_dict,
    to_dict,
)
from .grid import (
    BUILTIN_SHIFT_SETS,
    FROZEN_EVALS,
    architecture_dir,
    ensemble_members,
    layers_spec,
    parse_pretext,
    pretext_dir,
    teacher_checkpoint,
    transfer_dir,
)

# execution settings that place a job (or pace a dry one) without changing its numbers: left out of the
# rule's params, so changing them re-runs nothing; the rule body adds them at run time (`job_resources`)
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory_gb", "max_retries", "data_on_device", "shared_fs", "dry_job_sleep_s")

class _EvalReads(Mapping):
    """evaluation name -> the `eval` settings it reads (the rest keep their defaults in its config): each registered
    evaluation's `reads` (vitablate.analysis.registry.EVALS, read live), and the analysis job's."""

    _ANALYSIS = ("probe_weight_decay", "analysis_images")  # per-layer probes on a fixed batch of images

    def __getitem__(self, name: str) -> tuple:
        from .analysis.registry import EVALS

        return self._ANALYSIS if name == "analysis" else tuple(EVALS.entry(name).meta.get("reads", ()))

    def __iter__(self):
        from .analysis.registry import EVALS

        return iter([*EVALS, "analysis"])

    def __len__(self) -> int:
        return len(list(iter(self)))


EVAL_READS = _EvalReads()


def _layer(*parts: dict | None) -> dict:
    out: dict = {}
    for part in parts:
        out = deep_merge(out, part or {})
    return out


def _job(config: dict, question: str, job: str, dataset: str, seed, output_dir: str, train_key: str,
         tags: dict, recipe: dict | None = None, model: dict | None = None, **fields) -> JobConfig:
    """Shared layering of data/model/train/execution; `train_key` names the section's recipe,
    `recipe` holds this job's changes to it and `model` this job's changes to the section's model
    (from by_mixer / by_pretext / by_method)."""
    section = config.get(question) or {}
    entry = (config.get("datasets") or {}).get(dataset, {})
    data = deep_merge({"name": dataset, "root": config.get("data_root", "data")}, entry.get("data") or {})
    for part in (section.get(train_key), recipe, entry.get("train")):
        # blr wins over lr wherever both end up set; one layer giving both is ambiguous (a more specific layer
        # that wants an absolute lr under a recipe with blr sets blr: null beside its lr)
        if (part or {}).get("blr") is not None and (part or {}).get("lr") is not None:
            raise ConfigError(f"{question}.{train_key} (dataset {dataset}): one recipe sets both train.lr "
                              f"{part['lr']} and train.blr {part['blr']}; keep one (blr: lr = blr x batch_size / "
                              "lr_batch_ref, and it wins over lr)")
    train = from_dict(TrainConfig, _layer(section.get(train_key), recipe, entry.get("train")),
                      f"{question}.{train_key}")
    if train.batch_size % train.accum_steps:
        raise ConfigError(f"{question}.{train_key}: accum_steps {train.accum_steps} does not divide batch_size "
                          f"{train.batch_size} (dataset {dataset}); pick a divisor")
    check_recipe(train, data["name"], f"{question}.{train_key}")
    # the dataset's extra_test_dirs are checked here but read by the shift jobs alone (`_shift_of`)
    data = dataclasses.replace(from_dict(DataConfig, data, f"datasets.{dataset}.data"), extra_test_dirs={})
    return JobConfig(
        question=question, job=job, seed=int(seed), output_dir=output_dir,
        data=data,
        model=from_dict(ModelConfig, _layer(section.get("model"), model, entry.get("model")), f"{question}.model"),
        train=train,
        execution=from_dict(ExecutionConfig, _execution(config, question, dataset), "execution"),
        tags={k: str(v) for k, v in dict(question=question, dataset=dataset, **tags).items()},
        **fields,
    )


def _execution(config: dict, question: str, dataset: str) -> dict:
    """A job's execution settings: global `execution` <- the question's <- the dataset's."""
    entry = (config.get("datasets") or {}).get(dataset) or {}
    return _layer(config.get("execution"), (config.get(question) or {}).get("execution"), entry.get("execution"))


def job_resources(config: dict, question: str, dataset: str) -> dict:
    """The `RESOURCE_KEYS` of a job's execution settings, resolved as its config is; what the rule body adds to
    its params (they are none of the params, so changing them re-runs no job)."""
    ex = to_dict(from_dict(ExecutionConfig, _execution(config, question, dataset), "execution"))
    return {k: ex[k] for k in RESOURCE_KEYS}


def _eval(settings: dict | None, name: str, where: str) -> EvalConfig:
    """The evaluation `name`'s config: every given key is checked, but only those it reads (`EVAL_READS`) are kept,
    so changing another evaluation's setting changes none of this one's params."""
    full = from_dict(EvalConfig, _layer(settings, {"name": name}), where)
    return EvalConfig(name=name, **{k: getattr(full, k) for k in EVAL_READS[name]})


def _by(config: dict, question: str, axis: str, name: str, train_key: str) -> dict:
    """The changes `<question>.<axis>.<name>.<train_key>` (e.g. pretext.by_pretext.mae.pretrain, a recipe;
    transfer.by_method.attn_copy.model, model settings)."""
    return (((config.get(question) or {}).get(axis) or {}).get(name) or {}).get(train_key) or {}


def _tested_in_job_on_val_and_test(job: JobConfig) -> JobConfig:
    """A Q1 classifier or Q2 evaluation tests on val and test only; its shift job tests its model on the shifted
    sets. `_job` left the extra_test_dirs out; a dataset that brings a shifted set itself (BUILTIN_SHIFT_SETS:
    shapes' cue_conflict) still hands it to the job's data, so there the job's config says shift.in_job false.
    On any other dataset the job has no shifted set, so shift.in_job is unread and keeps its default (the params
    of those jobs stay as they were)."""
    if job.data.name in BUILTIN_SHIFT_SETS:
        return dataclasses.replace(job, shift=ShiftConfig(in_job=False))
    return job


def architecture_job(config: dict, dataset: str, mixer: str, seed) -> JobConfig:
    out = architecture_dir(config, dataset, mixer, seed)
    return _tested_in_job_on_val_and_test(
        _job(config, "architecture", "train_classifier", dataset, seed, out, "train", {"mixer": mixer},
             model=_by(config, "architecture", "by_mixer", mixer, "model"), mixer=mixer))




def _pretext_config(config: dict, pretext: str) -> PretextConfig:
    name, extra = parse_pretext(pretext)
    objective = (config.get("pretext") or {}).get("objective") or {}
    return from_dict(PretextConfig, _layer(objective, {"name": name}, extra), "pretext.objective")


def pretrain_job(config: dict, dataset: str, pretext: str, seed) -> JobConfig:
    name = parse_pretext(pretext)[0]
    return _job(config, "pretext", "pretrain", dataset, seed, pretext_dir(config, dataset, pretext, seed),
                "pretrain", {"pretext": pretext, "job": "pretrain"},
                recipe=_by(config, "pretext", "by_pretext", name, "pretrain"),
                model=_by(config, "pretext", "by_pretext", name, "pretrain_model"),
                pretext=_pretext_config(config, pretext))


def pretext_eval_job(config: dict, dataset: str, pretext: str, seed, eval: str) -> JobConfig:
    section = config.get("pretext") or {}
    encoder = os.path.join(pretext_dir(config, dataset, pretext, seed), "encoder.pt")
    job = "evaluate_encoder"
    name = parse_pretext(pretext)[0]
    probe = (section.get("eval") or {}).get("probe", "lbfgs")
    # fine-tuning and the reference linear probe train; the frozen evaluations read nothing of a pretext's
    # own pre-training recipe (only its eval_batch_size)
    train_key = {"finetune": "finetune", "linear_probe": "linear_probe" if probe == "reference" else "pretrain"
                 }.get(eval, "pretrain")
    if train_key == "linear_probe" and not section.get("linear_probe"):
        raise ConfigError("pretext.eval.probe is reference, so pretext.linear_probe must give the probe's recipe "
                          "(MAE: main_linprobe.py, 90 epochs, LARS, lr 0.1 x batch/256, weight_decay 0)")
    recipe = _by(config, "pretext", "by_pretext", name, "finetune") if eval == "finetune" else {}
    model = _by(config, "pretext", "by_pretext", name, "finetune_model") if eval == "finetune" else {}
    return _tested_in_job_on_val_and_test(
        _job(config, "pretext", job, dataset, seed, os.path.join(pretext_dir(config, dataset, pretext, seed), eval),
             train_key, {"pretext": pretext, "job": f"eval_{eval}"}, recipe=recipe, model=model,
             pretext=_pretext_config(config, pretext), init_from=encoder,
             eval=_eval(section.get("eval"), eval, "pretext.eval")))


def analysis_job(config: dict, dataset: str, pretext: str, seed) -> JobConfig:
    section = config.get("pretext") or {}
    encoder = os.path.join(pretext_dir(config, dataset, pretext, seed), "encoder.pt")
    return _job(config, "pretext", "analyse_encoder", dataset, seed,
                os.path.join(pretext_dir(config, dataset, pretext, seed), "analysis"), "pretrain",
                {"pretext": pretext, "job": "analysis"}, pretext=_pretext_config(config, pretext), init_from=encoder,
                eval=_eval(section.get("eval"), "analysis", "pretext.eval"))


def transfer_job(config: dict, dataset: str, teacher: str, method: str, layers: str, seed) -> JobConfig:
    section = config.get("transfer") or {}
    if method == "scratch":
        spec = ""
    else:
        spec = section["teachers"][teacher]
        path = teacher_checkpoint(config, dataset, teacher, seed)
        spec = f"file:{path}" if path else spec
    members = [os.path.join(d, "model.pt") for d in ensemble_members(config, dataset, teacher, seed)
               ] if method == "ensemble" else []
    if (method == "linear_probe" and (section.get("eval") or {}).get("probe") == "reference"
            and not _by(config, "transfer", "by_method", "linear_probe", "train")):
        raise ConfigError("transfer.eval.probe is reference, so transfer.by_method.linear_probe.train must give the "
                          "probe's recipe (MAE: main_linprobe.py, 90 epochs, optimizer lars, weight_decay 0); "
                          "otherwise it would train with the student's recipe")
    from .methods import TRANSFER_METHODS

    settings = ("distill_weight", "distill_temperature", "teacher_drop_path")
    # every given setting is checked, but only those the method reads are its params (methods.py `reads`), so
    # changing distill_weight re-runs the distilled students alone
    from_dict(TransferConfig, {k: section[k] for k in settings if k in section}, "transfer")
    reads = TRANSFER_METHODS.entry(method).meta.get("reads", ())
    tc = from_dict(TransferConfig, dict(
        method=method, teacher=spec, teacher_name=teacher, layers=layers_spec(layers), ensemble_members=members,
        **{k: section[k] for k in settings if k in section and k in reads}), "transfer")
    probe = _eval(section.get("eval"), "linear_probe", "transfer.eval")  # only the linear_probe method reads it
    train = _job(config, "transfer", "transfer", dataset, seed,
                 transfer_dir(config, dataset, teacher, method, layers, seed), "train",
                 {"teacher": teacher, "method": method, "job": "transfer"},
                 recipe=_by(config, "transfer", "by_method", method, "train"),
                 model=_by(config, "transfer", "by_method", method, "model"), transfer=tc,
                 shift=ShiftConfig(in_job=False),  # the shift job tests the student (`shift_job`)
                 eval=EvalConfig(probe=probe.probe, probe_weight_decay=probe.probe_weight_decay)
                 if method == "linear_probe" else EvalConfig())
    from_dict(ShiftConfig, section.get("shift") or {}, "transfer.shift")  # checked here, read by the shift job
    return train


def _shift_of(config: dict, trained: JobConfig, init_from: str | None, tags: dict | None = None,
              **fields) -> JobConfig:
    """The shift job of the job `trained`: its model tested under distribution shift (`vitablate.shift`), written to
    `shift/` inside that job's output_dir. It holds only what the evaluation reads: the dataset's data settings
    (its extra_test_dirs with them), the model settings the data is read at, the evaluation batch size and the
    numerics; `init_from` and `fields` say which saved model it tests."""
    dataset = trained.tags["dataset"]
    data = from_dict(DataConfig, deep_merge({"name": dataset, "root": config.get("data_root", "data")},
                                            ((config.get("datasets") or {}).get(dataset) or {}).get("data") or {}),
                     f"datasets.{dataset}.data")
    ex = trained.execution
    return JobConfig(
        question=trained.question, job="evaluate_shift", seed=trained.seed, mixer=trained.mixer,
        output_dir=os.path.join(trained.output_dir, "shift"),
        data=data, model=trained.model, train=TrainConfig(eval_batch_size=trained.train.eval_batch_size),
        execution=dataclasses.replace(ExecutionConfig(), **{k: getattr(ex, k) for k in RESOURCE_KEYS},
                                      precision=ex.precision, compile=ex.compile, dry_jobs=ex.dry_jobs),
        init_from=init_from, tags=dict(trained.tags, job="shift", **(tags or {})), **fields)


def architecture_shift_job(config: dict, dataset: str, mixer: str, seed) -> JobConfig:
    """A Q1 classifier tested on the dataset's shifted sets (its extra_test_dirs, a set it brings): reads the
    classifier's model.pt."""
    trained = architecture_job(config, dataset, mixer, seed)
    return _shift_of(config, trained, os.path.join(trained.output_dir, "model.pt"))


# the `eval` settings a Q2 evaluation's shift job reads: k-NN classifies each shifted set among the encoder's
# training features with the evaluation's k and temperature; the linear probe's and the fine-tuned model's
# shift jobs read what their evaluation saved (probe.pt, model.pt), no setting
SHIFT_EVAL_READS = {"knn": ("knn_k", "knn_temperature")}


def pretext_shift_job(config: dict, dataset: str, pretext: str, seed, eval: str) -> JobConfig:
    """A Q2 evaluation's model tested on the dataset's shifted sets: the fine-tuned model (the evaluation's
    model.pt); the linear probe (its probe.pt) on the frozen encoder's features, the encoder named as the
    frozen teacher of Q3's linear_probe method is (transfer.teacher file:<encoder.pt>), so one probe path and one
    checkpoint hand-over serve both; k-NN among the frozen encoder's training features (init_from: encoder.pt)."""
    trained = pretext_eval_job(config, dataset, pretext, seed, eval)
    if eval not in ("finetune", *FROZEN_EVALS):
        raise ConfigError(f"pretext.evals {eval!r} has no shift job (vitablate.shift tests finetune, linear_probe "
                          "and knn); add its branch there and in vitablate.resolve.pretext_shift_job")
    encoder = trained.init_from
    fields = {}
    if eval == "linear_probe":
        init_from = os.path.join(trained.output_dir, "probe.pt")
        fields["transfer"] = TransferConfig(method="linear_probe", teacher=f"file:{encoder}")
    else:
        init_from = os.path.join(trained.output_dir, "model.pt") if eval == "finetune" else encoder
    reads = {k: getattr(trained.eval, k) for k in SHIFT_EVAL_READS.get(eval, ())}
    return _shift_of(config, trained, init_from, tags={"eval": eval}, eval=EvalConfig(name=eval, **reads),
                     pretext=PretextConfig(name=trained.pretext.name), **fields)


def shift_job(config: dict, dataset: str, teacher: str, method: str, layers: str, seed) -> JobConfig:
    """A transfer student tested under distribution shift (`transfer.shift` corruptions of its test split at
    `severity`, the dataset's extra_test_dirs and own shifted sets): reads what its transfer job saved (model.pt;
    a linear probe's probe.pt; an ensemble, its members' model.pt) and, where the model runs it at test time, the
    teacher. Holds only what the evaluation reads: the data, the evaluation batch size and numerics."""
    from .methods import TEACHER_AT_TEST  # the tested model runs its teacher (copied attention; the probe's features)

    trained = transfer_job(config, dataset, teacher, method, layers, seed)
    t = trained.transfer
    saved = {"ensemble": None, "linear_probe": "probe.pt"}.get(method, "model.pt")
    return _shift_of(
        config, trained, os.path.join(trained.output_dir, saved) if saved else None,
        transfer=TransferConfig(method=method, teacher_name=teacher, layers=t.layers,
                                teacher=t.teacher if method in TEACHER_AT_TEST else "",
                                ensemble_members=list(t.ensemble_members)),
        shift=from_dict(ShiftConfig, (config.get("transfer") or {}).get("shift") or {}, "transfer.shift"))


RESOLVERS = {
    "architecture": architecture_job,
    "architecture_shift": architecture_shift_job,
    "pretrain": pretrain_job,
    "pretext_eval": pretext_eval_job,
    "pretext_shift": pretext_shift_job,
    "analysis": analysis_job,
    "transfer": transfer_job,
    "shift": shift_job,
}


def job_params(config: dict, kind: str, wildcards) -> dict:
    """A rule's `params.job`: the resolved config of the job these wildcards name, less the execution settings
    that only place it (`RESOURCE_KEYS`; `with_resources` adds them back at run time)."""
    params = to_dict(RESOLVERS[kind](config, **dict(wildcards.items())))
    for key in RESOURCE_KEYS:
        del params["execution"][key]
    _reset_unread(params["train"])
    return params


# recipe settings a job reads only when another setting switches them on: while it is off they keep their
# defaults in the params, so setting one changes no params (and re-runs no finished job)
_TRAIN_DEFAULTS = to_dict(TrainConfig())
_READ_ONLY_WHEN = (
    (lambda t: t["blr"] is not None, ("lr_batch_ref",)),
    (lambda t: t["lr_schedule"] == "step", ("lr_step_gamma",)),
    (lambda t: t["ema"], ("ema_decay",)),
    (lambda t: t["mixup_alpha"] > 0 or t["cutmix_alpha"] > 0, ("mix_prob", "mix_switch_prob")),
)


def _reset_unread(train: dict) -> None:
    for on, keys in _READ_ONLY_WHEN:
        if not on(train):
            train.update({k: _TRAIN_DEFAULTS[k] for k in keys})
    if not train["augment"]["random_erasing"]:
        train["augment"]["random_erasing_mode"] = _TRAIN_DEFAULTS["augment"]["random_erasing_mode"]


def with_resources(params: dict, config: dict) -> JobConfig:
    """The job's config from its rule's params and the workflow config's resources for it (run time)."""
    resources = job_resources(config, params["question"], params["tags"]["dataset"])
    return from_dict(JobConfig, deep_merge(params, {"execution": resources}))

