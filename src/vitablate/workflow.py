"""What the Snakemake rules call: the grids, each job's resolved config, rule bodies.

Kept here, not in rules/*.smk, so it is plain Python that tests can import.

A job's config is resolved in layers, later winning:
JobConfig defaults <- global `execution` <- the question's section (its `model`, the
stage's `train` recipe, `execution`; then the recipe and model changes for this mixer, pretext
or method under `architecture.by_mixer`, `pretext.by_pretext` (`pretrain`/`finetune` recipes,
`pretrain_model`/`finetune_model`) and `transfer.by_method` (`train`, `model`)) <- the
dataset's own entry under `datasets:`.
Each stage only reads the settings it uses, so changing an evaluation setting changes
only the evaluation jobs' params and Snakemake re-runs only those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import traceback
from typing import Any

from .config import (
    VARIANTS,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExecutionConfig,
    JobConfig,
    ModelConfig,
    PretextConfig,
    ShiftConfig,
    TrackingConfig,
    TrainConfig,
    TransferConfig,
    consumed_checkpoints,
    deep_merge,
    from_dict,
    to_dict,
)
from .io import warning_lines, write_text

log = logging.getLogger(__name__)
QUESTIONS = ("architecture", "pretext", "transfer")
LAYERED_METHODS = ("attn_copy", "attn_distill")  # the methods the `layers` axis applies to


def active_questions(config: dict) -> list[str]:
    return [q for q in QUESTIONS if config.get(q)]


def _path_setting(config: dict, key: str, default: str) -> str:
    """A directory setting, normalised: 'results/' and 'results' name the same outputs (the rules'
    paths are built from it, so a trailing slash would otherwise plan none of the existing files)."""
    value = config.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} is {value!r}; give a directory path (default: {default!r})")
    return os.path.normpath(value.strip())


def results_dir(config: dict) -> str:
    return _path_setting(config, "results_dir", "results")


def reports_dir(config: dict) -> str:
    """Generated reports: under the git-ignored results directory by default; the committed example
    reports live in examples/, where no rule writes."""
    return _path_setting(config, "reports_dir", "results/reports")


# --- checkpoints handed between jobs ------------------------------------------------------
# With a shared filesystem (execution.shared_fs, the default) a consumer reads the producer's
# checkpoint file, which is a declared output and input. Without one, the checkpoint stays on
# the producer's node and is uploaded to the MLflow artifact store; the consumer's input is the
# producer's record.json (which names its MLflow run), and the job downloads the checkpoint.

def shared_fs(config: dict) -> bool:
    return bool((config.get("execution") or {}).get("shared_fs", True))


def producer_record(checkpoint: str) -> str:
    """The record of the job that writes `checkpoint` (encoder.pt, model.pt): beside it in its output_dir."""
    return os.path.join(os.path.dirname(checkpoint), "record.json")


def checkpoint_input(config: dict, checkpoint: str) -> str:
    """What a consumer of `checkpoint` (a path or a wildcard pattern) declares as its input."""
    return checkpoint if shared_fs(config) else producer_record(checkpoint)


def checkpoint_sources(cfg: JobConfig) -> dict[str, str]:
    """Without a shared filesystem: {checkpoint path: id of the MLflow run that uploaded it}.

    Read from the producers' records, which are this rule's inputs (so present on the Snakemake
    host). A checkpoint with no record beside it (a file: teacher from outside the workflow) is
    read from its path, which every node must then see. Empty with a shared filesystem.
    """
    if cfg.execution.shared_fs:
        return {}
    out = {}
    for path in consumed_checkpoints(cfg):
        record = producer_record(path)
        if not os.path.exists(record):
            continue
        with open(record) as f:
            run_id = json.load(f).get("mlflow_run_id")
        if not run_id:
            raise RuntimeError(f"{record} names no MLflow run, so {path} cannot be downloaded (execution.shared_fs is "
                               "false): that job ran untracked; re-run it with MLFLOW_TRACKING_URI set")
        out[path] = run_id
    return out


def _check_ensemble_members(config: dict) -> None:
    """With seeds_by, an ensemble's seed must also be a seed of both its members."""
    jobs = {(j["dataset"], j["teacher"], j["method"], j["layers"], j["seed"]) for j in transfer_grid(config)}
    ref = layers_id(((config.get("transfer") or {}).get("layers") or ["all"])[0])
    for d, teacher, method, _, seed in sorted(jobs, key=str):
        if method != "ensemble":
            continue
        for m, lid in (("attn_distill", ref), ("finetune", "all")):
            if (d, teacher, m, lid, seed) not in jobs:
                raise ConfigError(f"transfer: the ensemble of teacher {teacher!r}, seed {seed}, needs {m} "
                                  f"({layers_spec(lid)}) at that seed, which transfer.seeds_by leaves out; give the "
                                  "ensemble no more seeds than its members (seeds_by.ensemble)")


def check_tracking(config: dict, uri: str) -> None:
    """Without a shared filesystem, every node must reach the tracking server and its artifact store."""
    if shared_fs(config) or uri.startswith(("http://", "https://")):
        return
    raise ConfigError(
        f"execution.shared_fs is false, so checkpoints travel through the MLflow artifact store, which every node "
        f"must reach, but MLflow logs to {uri}, a store on this machine only. Start a tracking server that serves "
        "artifacts (tools/mlflow-server.sh start <dir> <port>) and set MLFLOW_TRACKING_URI=http://<host>:<port>, "
        "or set execution.shared_fs: true if every node sees the results directory"
    )


def fetch_host_outputs(record: dict, uri: str) -> None:
    """Without a shared filesystem: bring back the files the report rules read on this host (the
    analysis table, the attention maps), from the job's run; checkpoints stay in the artifact store."""
    from .execution import HOST_OUTPUTS
    from .tracking import fetch_artifact

    for key in HOST_OUTPUTS:
        path = record.get(key)
        if path and not os.path.exists(path):
            fetch_artifact(uri, record["mlflow_run_id"], os.path.basename(path), path)


# --- grids --------------------------------------------------------------------------------

def pretext_ids(section: dict) -> list[str]:
    """Grid values of `pretext`: names, with `hybrid` expanded over its lambdas (hybrid_0.2)."""
    out = []
    for name in section.get("pretexts", []):
        if name == "hybrid":
            out += [f"hybrid_{lam:g}" for lam in section.get("hybrid_lambdas", [0.2])]
        else:
            out.append(name)
    return out


def parse_pretext(pretext_id: str) -> tuple[str, dict]:
    """'hybrid_0.2' -> ('hybrid', {'lam': 0.2}); 'moco' -> ('moco', {})."""
    if pretext_id.startswith("hybrid_"):
        return "hybrid", {"lam": float(pretext_id.split("_", 1)[1])}
    return pretext_id, {}


def seeds_for(section: dict, *values: str) -> list:
    """The seeds of one grid cell: the question's `seeds`, narrowed by every `seeds_by.<value>` that names
    one of the cell's axis values (a mixer; a pretext; a teacher, method or layer set). Headline arms keep
    every seed; axes beyond the headline can run fewer."""
    seeds = list(section.get("seeds", []))
    by = section.get("seeds_by") or {}
    for value in values:
        if value in by:
            seeds = [k for k in seeds if k in by[value]]
    return seeds


def seeds_by_keys(config: dict, question: str) -> set[str]:
    """The axis values `<question>.seeds_by` may name."""
    s = config.get(question) or {}
    if question == "architecture":
        return set(s.get("mixers", []))
    if question == "pretext":
        return set(pretext_ids(s)) | set(s.get("pretexts", []))
    return set(s.get("teachers", {})) | set(s.get("methods", [])) | {layers_spec(layers_id(v))
                                                                    for v in s.get("layers", ["all"])}


def grid(config: dict, kind: str) -> list[dict[str, Any]]:
    """Wildcard values of every job of a rule kind: architecture | pretrain | pretext_eval | analysis."""
    if kind == "architecture":
        s = config.get("architecture") or {}
        return [dict(dataset=d, mixer=m, seed=k) for d in s.get("datasets", [])
                for m in s.get("mixers", []) for k in seeds_for(s, m)]
    s = config.get("pretext") or {}
    base = [dict(dataset=d, pretext=p, seed=k) for d in s.get("datasets", [])
            for p in pretext_ids(s) for k in seeds_for(s, p, parse_pretext(p)[0])]
    if kind in ("pretrain", "analysis"):
        return base
    if kind == "pretext_eval":
        return [dict(b, eval=e) for b in base for e in s.get("evals", [])]
    if kind == "transfer":
        return transfer_grid(config)
    raise ValueError(f"unknown grid kind {kind!r}")


def layers_id(spec: str) -> str:
    """Path-safe form of a layers spec: 'first:2' -> 'first2', '0,3' -> 'l0-3', 'all' -> 'all'."""
    spec = str(spec).replace(" ", "")
    if spec == "all":
        return "all"
    if spec.startswith(("first:", "last:")):
        return spec.replace(":", "")
    return "l" + spec.replace(",", "-")


def layers_spec(layer_id: str) -> str:
    for prefix in ("first", "last"):
        if layer_id.startswith(prefix):
            return f"{prefix}:{layer_id[len(prefix):]}"
    return "all" if layer_id == "all" else layer_id[1:].replace("-", ",")


def transfer_grid(config: dict) -> list[dict[str, Any]]:
    """(dataset, teacher, method, layers, seed) of every transfer job; scratch needs no teacher."""
    s = config.get("transfer") or {}
    methods, layer_ids = s.get("methods", []), [layers_id(v) for v in s.get("layers", ["all"])]
    out = []
    for d in s.get("datasets", []):
        if "scratch" in methods:
            out += [dict(dataset=d, teacher="none", method="scratch", layers="all", seed=seed)
                    for seed in seeds_for(s, "scratch")]
        for teacher in s.get("teachers", {}):
            for m in methods:
                if m == "scratch":
                    continue
                for lid in (layer_ids if m in LAYERED_METHODS else ["all"]):
                    narrowing = (teacher, m, layers_spec(lid)) if m in LAYERED_METHODS else (teacher, m)
                    out += [dict(dataset=d, teacher=teacher, method=m, layers=lid, seed=seed)
                            for seed in seeds_for(s, *narrowing)]
    return out


def transfer_dir(config: dict, dataset: str, teacher: str, method: str, layers: str, seed) -> str:
    return os.path.join(results_dir(config), "transfer", dataset, teacher, method, layers, f"seed{seed}")


def teacher_checkpoint(config: dict, dataset: str, teacher: str, seed) -> str | None:
    """The file a teacher is read from (None for timm: teachers), for DAG inputs and specs."""
    spec = (config.get("transfer") or {}).get("teachers", {}).get(teacher)
    if spec is None:
        raise ConfigError(f"unknown teacher {teacher!r}; transfer.teachers has {sorted(config['transfer']['teachers'])}")
    if spec.startswith("pretext:"):
        name = spec[len("pretext:"):]
        seeds = seeds_for(config.get("pretext") or {}, name, parse_pretext(name)[0]) or [0]
        tseed = int(seed) if int(seed) in seeds else seeds[0]  # seed-matched teacher where one exists
        return os.path.join(pretext_dir(config, dataset, spec[len("pretext:"):], tseed), "encoder.pt")
    if spec.startswith("file:"):
        return spec[len("file:"):]
    return None


def reference_layers(config: dict) -> str:
    """The transfer layer set the answer, the tests against scratch, the paper column and the ensemble use:
    the first `transfer.layers` value (the imagenet preset's `first:21`, what the released code transfers)."""
    return layers_spec(layers_id(((config.get("transfer") or {}).get("layers") or ["all"])[0]))


def ensemble_members(config: dict, dataset: str, teacher: str, seed) -> list[str]:
    """Output dirs of an ensemble's members: the student distilled over the first `layers` value of the
    grid (the reference distils all but the last layers) and the fine-tuned teacher."""
    first = layers_id(((config.get("transfer") or {}).get("layers") or ["all"])[0])
    return [transfer_dir(config, dataset, teacher, "attn_distill", first, seed),
            transfer_dir(config, dataset, teacher, "finetune", "all", seed)]


def transfer_inputs(config: dict, dataset: str, teacher: str, method: str, layers: str, seed) -> list[str]:
    """What a transfer job reads: its teacher's checkpoint; an ensemble, its two members' models."""
    if method == "scratch":
        return []
    if method == "ensemble":
        return [os.path.join(d, "record.json") for d in ensemble_members(config, dataset, teacher, seed)]
    path = teacher_checkpoint(config, dataset, teacher, seed)
    if path and config["transfer"]["teachers"][teacher].startswith("pretext:"):
        return [checkpoint_input(config, path)]  # produced in this workflow
    return [path] if path else []  # file: teachers are the user's; timm: ones are downloaded


# --- resolved job configs -----------------------------------------------------------------

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
    train = from_dict(TrainConfig, _layer(section.get(train_key), recipe, entry.get("train")),
                      f"{question}.{train_key}")
    if train.batch_size % train.accum_steps:
        raise ConfigError(f"{question}.{train_key}: accum_steps {train.accum_steps} does not divide batch_size "
                          f"{train.batch_size} (dataset {dataset}); pick a divisor")
    return JobConfig(
        question=question, job=job, seed=int(seed), output_dir=output_dir,
        data=from_dict(DataConfig, data, f"datasets.{dataset}.data"),
        model=from_dict(ModelConfig, _layer(section.get("model"), model, entry.get("model")), f"{question}.model"),
        train=train,
        execution=from_dict(ExecutionConfig, _layer(config.get("execution"), section.get("execution"),
                                                    entry.get("execution")), "execution"),
        tags={k: str(v) for k, v in dict(question=question, dataset=dataset, **tags).items()},
        **fields,
    )


def _by(config: dict, question: str, axis: str, name: str, train_key: str) -> dict:
    """The changes `<question>.<axis>.<name>.<train_key>` (e.g. pretext.by_pretext.mae.pretrain, a recipe;
    transfer.by_method.attn_copy.model, model settings)."""
    return (((config.get(question) or {}).get(axis) or {}).get(name) or {}).get(train_key) or {}


def architecture_job(config: dict, dataset: str, mixer: str, seed) -> JobConfig:
    out = os.path.join(results_dir(config), "architecture", dataset, mixer, f"seed{seed}")
    return _job(config, "architecture", "train_classifier", dataset, seed, out, "train", {"mixer": mixer},
                model=_by(config, "architecture", "by_mixer", mixer, "model"), mixer=mixer)


def pretext_dir(config: dict, dataset: str, pretext: str, seed) -> str:
    return os.path.join(results_dir(config), "pretext", dataset, pretext, f"seed{seed}")


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
    return _job(config, "pretext", job, dataset, seed, os.path.join(pretext_dir(config, dataset, pretext, seed), eval),
                train_key, {"pretext": pretext, "job": f"eval_{eval}"}, recipe=recipe, model=model,
                pretext=_pretext_config(config, pretext), init_from=encoder,
                eval=from_dict(EvalConfig, _layer(section.get("eval"), {"name": eval}), "pretext.eval"))


def analysis_job(config: dict, dataset: str, pretext: str, seed) -> JobConfig:
    section = config.get("pretext") or {}
    encoder = os.path.join(pretext_dir(config, dataset, pretext, seed), "encoder.pt")
    return _job(config, "pretext", "analyse_encoder", dataset, seed,
                os.path.join(pretext_dir(config, dataset, pretext, seed), "analysis"), "pretrain",
                {"pretext": pretext, "job": "analysis"}, pretext=_pretext_config(config, pretext), init_from=encoder,
                eval=from_dict(EvalConfig, _layer(section.get("eval"), {"name": "analysis"}), "pretext.eval"))


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
    tc = from_dict(TransferConfig, dict(
        method=method, teacher=spec, teacher_name=teacher, layers=layers_spec(layers), ensemble_members=members,
        **{k: section[k] for k in ("distill_weight", "distill_temperature", "teacher_drop_path") if k in section}),
        "transfer")
    return _job(config, "transfer", "transfer", dataset, seed,
                transfer_dir(config, dataset, teacher, method, layers, seed), "train",
                {"teacher": teacher, "method": method, "job": "transfer"},
                recipe=_by(config, "transfer", "by_method", method, "train"),
                model=_by(config, "transfer", "by_method", method, "model"), transfer=tc,
                shift=from_dict(ShiftConfig, section.get("shift") or {}, "transfer.shift"),
                eval=from_dict(EvalConfig, section.get("eval") or {}, "transfer.eval"))


RESOLVERS = {
    "architecture": architecture_job,
    "pretrain": pretrain_job,
    "pretext_eval": pretext_eval_job,
    "analysis": analysis_job,
    "transfer": transfer_job,
}


def job_params(config: dict, kind: str, wildcards) -> dict:
    """A rule's `params.job`: the resolved config of the job these wildcards name."""
    return to_dict(RESOLVERS[kind](config, **dict(wildcards.items())))


MAX_CONFIG_VALUES = 1_000_000  # values in the config once YAML aliases are expanded
MAX_SEED = 2**31 - 1  # numpy / torch generators take 32-bit seeds
LARGE_GRID_JOBS = 5_000  # more jobs than this in one run is warned about (a typo such as range(20000) of seeds)


def check_raw_config(config: Any, source: str = "the config") -> None:
    """Checks that must come before the JSON schema's: a mapping at the top, a bounded size once YAML
    aliases are expanded (an alias bomb would make the schema check, and its error message, explode),
    and finite numbers (`.nan` and `.inf` pass the schema's bounds)."""
    if not isinstance(config, dict):
        what = "empty" if config is None else f"a YAML {type(config).__name__}"
        raise ConfigError(f"{source} is {what}, not a mapping of keys (results_dir:, execution:, architecture:, "
                          "...); see config/config.yaml")
    sizes: dict[int, int] = {}

    def size(value: Any) -> int:  # expanded size, each shared (aliased) node counted once per use
        if id(value) in sizes:
            return sizes[id(value)]
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        sizes[id(value)] = n = 1 + sum(size(v) for v in children)
        return n

    total = size(config)
    if total > MAX_CONFIG_VALUES:
        raise ConfigError(f"{source} expands to {total:,} values (more than {MAX_CONFIG_VALUES:,}): YAML aliases "
                          "(&name / *name) nested inside each other multiply; write the values out")

    def walk(value: Any, key: str, seen: set) -> None:
        if id(value) in seen:
            return
        if isinstance(value, (dict, list)):
            seen.add(id(value))
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} is {value}; give a finite number")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k), seen)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]", seen)

    walk(config, "", set())


def grid_size(config: dict) -> int:
    """Jobs in the whole grid (every question's training, evaluation and analysis jobs)."""
    kinds = {"architecture": ["architecture"], "pretext": ["pretrain", "pretext_eval", "analysis"],
             "transfer": ["transfer"]}
    return sum(len(grid(config, k)) for q in active_questions(config) for k in kinds[q])


def check_paths(config: dict) -> None:
    """Path settings: not empty, and reports never written where the committed examples live."""
    results_dir(config), reports_dir(config)
    if "data_root" in config:
        _path_setting(config, "data_root", "data")
    reports = os.path.abspath(reports_dir(config))
    examples = os.path.abspath("examples")
    if reports == examples or reports.startswith(examples + os.sep):
        raise ConfigError(f"reports_dir {config['reports_dir']!r} is inside examples/, which holds committed "
                          "example reports that a run must never overwrite; use results/reports (the default)")


def check_teacher_files(config: dict) -> None:
    """Every file: teacher a configured transfer job reads must exist before any job starts (otherwise
    Snakemake would see a missing input and plan nothing for it, leaving older reports in place)."""
    s = config.get("transfer") or {}
    if not s or not [m for m in s.get("methods", []) if m != "scratch"]:
        return
    for teacher, spec in (s.get("teachers") or {}).items():
        if isinstance(spec, str) and spec.startswith("file:") and not os.path.isfile(spec[len("file:"):]):
            raise ConfigError(f"transfer.teachers.{teacher} is {spec!r}, but {spec[len('file:'):]!r} is not a file "
                              "here; fix the path (relative paths start at the workflow directory) or remove the "
                              "teacher")


def check_config(config: dict) -> None:
    """Cross-field checks the JSON schema cannot express; raises with the key and the fix.

    Also resolves one job of every kind, so that type errors surface before any job runs.
    """
    check_raw_config(config)
    check_paths(config)
    check_teacher_files(config)
    datasets = config.get("datasets", {})
    for q in QUESTIONS:
        section = config.get(q)
        if not section:
            continue
        for name in section.get("datasets", []):
            if name not in datasets:
                raise ConfigError(
                    f"{q}.datasets names {name!r}, which has no entry under `datasets:`; "
                    f"add one or use one of {sorted(datasets)}"
                )
        seeds = section.get("seeds", [])
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{q}.seeds has duplicates: {seeds}")
        too_big = [k for k in seeds if isinstance(k, int) and not 0 <= k <= MAX_SEED]
        if too_big:
            raise ConfigError(f"{q}.seeds has {too_big}; seeds must lie in 0..{MAX_SEED} (2^31 - 1)")
        for key in section.get("seeds_by") or {}:
            if key not in seeds_by_keys(config, q):  # e.g. a mixer taken out of the grid: harmless, but say so
                log.warning("%s.seeds_by.%s names no value of this question's grid (%s); it narrows nothing",
                            q, key, sorted(seeds_by_keys(config, q)))
    _check_ensemble_members(config)
    for teacher, spec in ((config.get("transfer") or {}).get("teachers") or {}).items():
        if spec.startswith("pretext:"):
            name = spec[len("pretext:"):]
            pretrained = pretext_ids(config.get("pretext") or {})  # hybrid expanded: hybrid_0.2, ...
            if name not in pretrained:
                raise ConfigError(f"transfer.teachers.{teacher} is {spec!r}, but the pretext grid pre-trains only "
                                  f"{pretrained}; add it there (pretext.pretexts, pretext.hybrid_lambdas) "
                                  "or use file:<path> / timm:<name>")
        elif not spec.startswith(("file:", "timm:")):
            raise ConfigError(f"transfer.teachers.{teacher} is {spec!r}; use pretext:<name>, file:<path> or timm:<name>")
    for where, section in [(q, config.get(q) or {}) for q in QUESTIONS] + \
            [(f"datasets.{n}", e) for n, e in datasets.items()]:
        value = (section.get("execution") or {}).get("shared_fs")
        if value is not None and value != shared_fs(config):
            raise ConfigError(f"{where}.execution.shared_fs is {value} but execution.shared_fs is {shared_fs(config)}; "
                              "whether the nodes share a filesystem is workflow-wide: set it only under the "
                              "top-level `execution`")
    for name, entry in datasets.items():
        variant = (entry.get("model") or {}).get("variant")
        if variant is not None and variant not in VARIANTS:
            raise ConfigError(f"datasets.{name}.model.variant {variant!r} is unknown; choose one of {sorted(VARIANTS)}")
    for kind in RESOLVERS:
        for wc in grid(config, kind)[:1]:
            RESOLVERS[kind](config, **wc)
    jobs = grid_size(config)
    if jobs > LARGE_GRID_JOBS:
        logging.getLogger("vitablate").warning(
            f"[vitablate] warning: this config's grid has {jobs:,} jobs (more than {LARGE_GRID_JOBS:,}); check the "
            "seeds, datasets and methods lists (`snakemake -n` lists the jobs)")


def data_paths(config: dict) -> dict[str, list[str]]:
    """The on-disk paths each dataset of an active question reads (bundled datasets read none)."""
    from .data.datasets import FOLDER_LAYOUTS

    used = {d for q in active_questions(config) for d in config[q].get("datasets", [])}
    out: dict[str, list[str]] = {}
    for name in sorted(used):
        entry = (config.get("datasets") or {}).get(name) or {}
        data = deep_merge({"name": name, "root": config.get("data_root", "data")}, entry.get("data") or {})
        paths = [os.path.join(data["root"], sub) for sub in FOLDER_LAYOUTS.get(name, ())]
        out[name] = paths + list((data.get("extra_test_dirs") or {}).values())
    return out


def check_data(config: dict, remote: bool = False) -> list[str]:
    """Before the first job: every dataset path must exist here, or the jobs would each fail on it.

    With `remote` (jobs run on a Ray cluster at RAY_ADDRESS, which may mount the data where this
    machine does not) missing paths are returned as warnings instead of raising.
    """
    from .data.datasets import FOLDER_LAYOUTS, _require_class_dirs

    missing = [f"{name}: {p}" for name, paths in data_paths(config).items() for p in paths if not os.path.isdir(p)]
    if missing and not remote:
        raise ConfigError(f"dataset paths not found: {missing}; put the data there (see README, Datasets) or "
                          "point data_root / datasets.<name>.data.root / extra_test_dirs at it")
    for name, paths in data_paths(config).items():  # image folders: every class folder holds images
        folders = paths if name == "imagefolder" else paths[len(FOLDER_LAYOUTS.get(name, ())):]
        for path in folders:
            if os.path.isdir(path):
                try:
                    _require_class_dirs(path, "<dir>/<class>/<image>")
                except FileNotFoundError as e:
                    raise ConfigError(f"datasets.{name}: {e}") from None
    return missing + _check_idx_files(config, remote)


def _check_idx_files(config: dict, remote: bool) -> list[str]:
    """fashion_mnist: its four IDX files must be found and whole (the error names the path and the fix)."""
    from .data.datasets import find_fashion_mnist

    if "fashion_mnist" not in data_paths(config):
        return []
    entry = (config.get("datasets") or {}).get("fashion_mnist") or {}
    root = deep_merge({"root": config.get("data_root", "data")}, entry.get("data") or {})["root"]
    try:
        find_fashion_mnist(root)
    except (FileNotFoundError, ValueError) as e:
        if not remote:
            raise ConfigError(str(e)) from None
        return [str(e)]
    return []


MIN_FREE_MB = 200  # results_dir must have this much room before a run starts (checkpoints check again)


def check_results_dir(path: str, min_free_mb: float = MIN_FREE_MB) -> None:
    """Before any job: results_dir can be written (a real file is created and removed) and has room."""
    import shutil
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check"):
            pass
        free_mb = shutil.disk_usage(path).free / 2**20
    except OSError as e:
        raise ConfigError(f"results_dir {os.path.abspath(path)} cannot be written ({e.strerror or e}); fix its "
                          "permissions or mount, or point results_dir elsewhere") from None
    if free_mb < min_free_mb:
        raise ConfigError(f"results_dir {os.path.abspath(path)} has {free_mb:.0f} MB free, less than the "
                          f"{min_free_mb:.0f} MB a run needs to start; free some space or point results_dir elsewhere")


RUN_STARTED_ENV = "VITABLATE_RUN_STARTED"  # when this workflow run started (the onstart's time.time())


def mark_run_started() -> None:
    """The workflow's onstart: remember when this run started, for `end_orphaned_runs`."""
    import time

    os.environ[RUN_STARTED_ENV] = repr(time.time())


def end_orphaned_runs(results: str, uri: str, message: str, since: float | None = None) -> list[str]:
    """The workflow's onerror: end FAILED the MLflow runs that jobs of this run (markers written since `since`,
    default: `mark_run_started`'s time) left RUNNING without a record, e.g. because the dispatcher died or the disk
    filled; returns their dirs."""
    from .tracking import end_latest, latest_run

    since = float(os.environ.get(RUN_STARTED_ENV, "inf")) if since is None else since
    ended = []
    for root, _, files in os.walk(results):
        if "mlflow_run.json" not in files or "record.json" in files:
            continue
        with contextlib.suppress(OSError, ValueError):
            if os.path.getmtime(os.path.join(root, "mlflow_run.json")) >= since and latest_run(root):
                if end_latest(uri, root, message, "FAILED"):
                    ended.append(root)
    return ended


# --- rule bodies --------------------------------------------------------------------------

@contextlib.contextmanager
def logging_to(path: str | None):
    """Send this process's stdout and stderr, and its `vitablate` log records, to the rule's log file,
    a failure's traceback included."""
    from .execution import job_log

    if not path:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), job_log(path):
        try:
            yield
        except BaseException:
            traceback.print_exc()  # into the log; Snakemake's own output shows it again
            raise


def run_job_rule(smk) -> None:
    """Body of every job rule's script: run its job on Ray inside an MLflow run.

    The rule's log gets, in order: the submission, the job's own start line (node, GPUs) and one
    progress line per epoch (written by the Ray worker), and the result; the Snakemake console
    gets one line saying where the job ran.
    """
    from . import dispatcher
    from .execution import where

    cfg = from_dict(JobConfig, smk.params.job)
    tracking = from_dict(TrackingConfig, dict(smk.config.get("tracking") or {}), "tracking")
    log = smk.log[0] if smk.log else None
    log_start = os.path.getsize(log) if log and os.path.exists(log) else 0
    with logging_to(log):
        logging.getLogger("vitablate.workflow").info(
            f"[vitablate] {cfg.job} {cfg.output_dir} -> Ray (RAY_ADDRESS={os.environ.get('RAY_ADDRESS')})")
        sources = checkpoint_sources(cfg)
        system_metrics_s = tracking.system_metrics_interval_s if tracking.system_metrics else None
        if os.environ.get(dispatcher.ENV):  # the run's one Ray driver (started by the Snakefile's onstart)
            record = dispatcher.submit(to_dict(cfg), smk.output.record, smk.params.mlflow_uri, sources=sources,
                                       log_path=log and os.path.abspath(log), system_metrics_s=system_metrics_s)
        else:
            from .execution import run_job

            record = run_job(cfg, smk.output.record, uri=smk.params.mlflow_uri, sources=sources, log_path=log,
                             system_metrics_s=system_metrics_s)
        if not cfg.execution.shared_fs:
            fetch_host_outputs(record, smk.params.mlflow_uri)
        line = (f"[vitablate] done {cfg.output_dir} {where(record)} top1_test={record.get('top1_test')} "
                f"wall={record.get('wall_s', 0):.1f}s")
        logging.getLogger("vitablate.workflow").info(line)
    print(line, flush=True)  # the console too: which job ran where
    for warning in warning_lines(log, log_start):  # and the job's warnings (its log has them)
        print(warning, flush=True)


def run_architecture_report(smk) -> None:
    from . import aggregate, figures

    with logging_to(smk.log[0] if smk.log else None):
        records = aggregate.load_records(list(smk.input.records))
        table = aggregate.architecture_table(records)
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        figures.plot_architecture(table, smk.output.png)
        by = ["dataset", "mixer"]
        curves = aggregate.load_curves(list(smk.input.records), by, ["train_loss", "top1_val"])
        figures.plot_architecture_curves(aggregate.curve_table(curves, by), smk.output.curves_png)
        log.info(f"\n{table}")


def run_pretext_report(smk) -> None:
    from . import aggregate, figures

    with logging_to(smk.log[0] if smk.log else None):
        evals = aggregate.load_records(list(smk.input.evals))
        table = aggregate.pretext_table(evals)
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        figures.plot_pretext(table, smk.output.png)
        rep = aggregate.representation_table(list(smk.input.analyses))
        aggregate.write_table(rep.filter(~rep["metric"].is_in(["layer_probe_top1"])), smk.output.rep_csv,
                              smk.output.rep_md)
        aggregate.write_table(aggregate.layer_probe_table(rep), smk.output.probe_csv, smk.output.probe_md)
        figures.plot_representation(rep, smk.output.rep_png)
        bias = aggregate.shape_bias_table(evals)
        if bias is not None:
            aggregate.write_table(bias, smk.output.bias_csv, smk.output.bias_md)
        else:
            for path in (smk.output.bias_csv, smk.output.bias_md):
                write_text(path, "no shape/texture labels in these datasets\n")
        by = ["dataset", "pretext"]
        pretrain = aggregate.load_curves(list(smk.input.pretrains), by, ["train_loss"])
        finetune = aggregate.load_curves(list(smk.input.evals), by, ["top1_val"],
                                         where=lambda r: r.get("eval") == "finetune")
        figures.plot_pretext_curves(aggregate.curve_table(pretrain, by), aggregate.curve_table(finetune, by),
                                    smk.output.curves_png)
        figures.plot_pretext_attention(aggregate.attention_cells(list(smk.input.analyses), by),
                                       smk.output.attention_png)
        log.info(f"\n{table}\n{rep}")


def run_transfer_report(smk) -> None:
    from . import aggregate, figures

    with logging_to(smk.log[0] if smk.log else None):
        table = aggregate.transfer_table(aggregate.load_records(list(smk.input.records)))
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        figures.plot_transfer(table, smk.output.png)
        figures.plot_transfer_layers(table, smk.output.layers_png)
        by = ["dataset", "teacher", "method"]
        # the student's curves: jobs trained by epochs (not linear_probe, ensemble), all layers transferred
        curves = aggregate.load_curves(list(smk.input.records), by, ["top1_val"],
                                       where=lambda r: r.get("layers") == "all" and bool(r.get("history")))
        figures.plot_transfer_curves(aggregate.curve_table(curves, by), smk.output.curves_png)
        cells = aggregate.attention_cells(list(smk.input.records), by,
                                          where=lambda r: r.get("layers") == "all" and r.get("method") != "ensemble")
        figures.plot_transfer_attention(cells, smk.output.attention_png)
        log.info(f"\n{table}")


def run_summary(smk) -> None:
    """reports/summary.md (and .html) from the run records of every question in the config."""
    from .summary import write_summary

    with logging_to(smk.log[0] if smk.log else None):
        text = write_summary(smk.output.md, smk.output.html, architecture=list(smk.input.architecture),
                             pretext=list(smk.input.evals), analyses=list(smk.input.analyses),
                             transfer=list(smk.input.transfer), reference_layers=smk.params.reference_layers)
        log.info(f"\n{text}")
