"""What the Snakemake rules call: the grids, each job's resolved config, rule bodies.

Kept here, not in rules/*.smk, so it is plain Python that tests can import.

A job's config is resolved in layers, later winning:
JobConfig defaults <- global `execution` <- the question's section (its `model`, the
stage's `train` recipe, `execution`) <- the dataset's own entry under `datasets:`.
Each stage only reads the settings it uses, so changing an evaluation setting changes
only the evaluation jobs' params and Snakemake re-runs only those.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from .config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ExecutionConfig,
    JobConfig,
    ModelConfig,
    PretextConfig,
    TrainConfig,
    deep_merge,
    from_dict,
    to_dict,
)

QUESTIONS = ("architecture", "pretext")
EVALS = ("linear_probe", "finetune", "knn")


def active_questions(config: dict) -> list[str]:
    return [q for q in QUESTIONS if config.get(q)]


def results_dir(config: dict) -> str:
    return config.get("results_dir", "results")


def reports_dir(config: dict) -> str:
    return config.get("reports_dir", "reports")


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


def grid(config: dict, kind: str) -> list[dict[str, Any]]:
    """Wildcard values of every job of a rule kind: architecture | pretrain | pretext_eval | analysis."""
    if kind == "architecture":
        s = config.get("architecture") or {}
        return [dict(dataset=d, mixer=m, seed=k) for d in s.get("datasets", [])
                for m in s.get("mixers", []) for k in s.get("seeds", [])]
    s = config.get("pretext") or {}
    base = [dict(dataset=d, pretext=p, seed=k) for d in s.get("datasets", [])
            for p in pretext_ids(s) for k in s.get("seeds", [])]
    if kind in ("pretrain", "analysis"):
        return base
    if kind == "pretext_eval":
        return [dict(b, eval=e) for b in base for e in s.get("evals", [])]
    raise ValueError(f"unknown grid kind {kind!r}")


# --- resolved job configs -----------------------------------------------------------------

def _layer(*parts: dict | None) -> dict:
    out: dict = {}
    for part in parts:
        out = deep_merge(out, part or {})
    return out


def _job(config: dict, question: str, job: str, dataset: str, seed, output_dir: str, train_key: str,
         tags: dict, **fields) -> JobConfig:
    """Shared layering of data/model/train/execution; `train_key` names the section's recipe."""
    section = config.get(question) or {}
    entry = (config.get("datasets") or {}).get(dataset, {})
    data = deep_merge({"name": dataset, "root": config.get("data_root", "data")}, entry.get("data") or {})
    return JobConfig(
        question=question, job=job, seed=int(seed), output_dir=output_dir,
        data=from_dict(DataConfig, data, f"datasets.{dataset}.data"),
        model=from_dict(ModelConfig, _layer(section.get("model"), entry.get("model")), f"{question}.model"),
        train=from_dict(TrainConfig, _layer(section.get(train_key), entry.get("train")), f"{question}.{train_key}"),
        execution=from_dict(ExecutionConfig, _layer(config.get("execution"), section.get("execution"),
                                                    entry.get("execution")), "execution"),
        tags={k: str(v) for k, v in dict(question=question, dataset=dataset, **tags).items()},
        **fields,
    )


def architecture_job(config: dict, dataset: str, mixer: str, seed) -> JobConfig:
    out = os.path.join(results_dir(config), "architecture", dataset, mixer, f"seed{seed}")
    return _job(config, "architecture", "train_classifier", dataset, seed, out, "train", {"mixer": mixer},
                mixer=mixer)


def pretext_dir(config: dict, dataset: str, pretext: str, seed) -> str:
    return os.path.join(results_dir(config), "pretext", dataset, pretext, f"seed{seed}")


def _pretext_config(config: dict, pretext: str) -> PretextConfig:
    name, extra = parse_pretext(pretext)
    objective = (config.get("pretext") or {}).get("objective") or {}
    return from_dict(PretextConfig, _layer(objective, {"name": name}, extra), "pretext.objective")


def pretrain_job(config: dict, dataset: str, pretext: str, seed) -> JobConfig:
    return _job(config, "pretext", "pretrain", dataset, seed, pretext_dir(config, dataset, pretext, seed),
                "pretrain", {"pretext": pretext, "job": "pretrain"}, pretext=_pretext_config(config, pretext))


def pretext_eval_job(config: dict, dataset: str, pretext: str, seed, eval: str) -> JobConfig:
    section = config.get("pretext") or {}
    encoder = os.path.join(pretext_dir(config, dataset, pretext, seed), "encoder.pt")
    job = "evaluate_encoder"
    return _job(config, "pretext", job, dataset, seed, os.path.join(pretext_dir(config, dataset, pretext, seed), eval),
                "finetune" if eval == "finetune" else "pretrain", {"pretext": pretext, "job": f"eval_{eval}"},
                pretext=_pretext_config(config, pretext), init_from=encoder,
                eval=from_dict(EvalConfig, _layer(section.get("eval"), {"name": eval}), "pretext.eval"))


def analysis_job(config: dict, dataset: str, pretext: str, seed) -> JobConfig:
    section = config.get("pretext") or {}
    encoder = os.path.join(pretext_dir(config, dataset, pretext, seed), "encoder.pt")
    return _job(config, "pretext", "analyse_encoder", dataset, seed,
                os.path.join(pretext_dir(config, dataset, pretext, seed), "analysis"), "pretrain",
                {"pretext": pretext, "job": "analysis"}, pretext=_pretext_config(config, pretext), init_from=encoder,
                eval=from_dict(EvalConfig, _layer(section.get("eval"), {"name": "analysis"}), "pretext.eval"))


RESOLVERS = {
    "architecture": architecture_job,
    "pretrain": pretrain_job,
    "pretext_eval": pretext_eval_job,
    "analysis": analysis_job,
}


def job_params(config: dict, kind: str, wildcards) -> dict:
    """A rule's `params.job`: the resolved config of the job these wildcards name."""
    return to_dict(RESOLVERS[kind](config, **dict(wildcards.items())))


def check_config(config: dict) -> None:
    """Cross-field checks the JSON schema cannot express; raises with the key and the fix.

    Also resolves one job of every kind, so that type errors surface before any job runs.
    """
    from .models import VARIANTS

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
    for name, entry in datasets.items():
        variant = (entry.get("model") or {}).get("variant")
        if variant is not None and variant not in VARIANTS:
            raise ConfigError(f"datasets.{name}.model.variant {variant!r} is unknown; choose one of {sorted(VARIANTS)}")
    for kind in RESOLVERS:
        for wc in grid(config, kind)[:1]:
            RESOLVERS[kind](config, **wc)


# --- rule bodies --------------------------------------------------------------------------

@contextlib.contextmanager
def logging_to(path: str | None):
    """Send this process's stdout and stderr to the rule's log file."""
    if not path:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def run_job_rule(smk) -> None:
    """Body of every job rule's script: run its job on Ray inside an MLflow run."""
    from .execution import run_job

    cfg = from_dict(JobConfig, smk.params.job)
    with logging_to(smk.log[0] if smk.log else None):
        print(f"[vitablate] {cfg.job} {cfg.output_dir} -> Ray (RAY_ADDRESS={os.environ.get('RAY_ADDRESS')})",
              flush=True)
        record = run_job(cfg, smk.output.record, uri=smk.params.mlflow_uri)
        print(f"[vitablate] done: top1_test={record.get('top1_test')} on {record.get('host')} "
              f"node={str(record.get('ray_node_id', ''))[:8]} wall={record.get('wall_s', 0):.1f}s", flush=True)


def run_architecture_report(smk) -> None:
    from . import aggregate

    with logging_to(smk.log[0] if smk.log else None):
        records = aggregate.load_records(list(smk.input.records))
        table = aggregate.architecture_table(records)
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        aggregate.plot_architecture(table, smk.output.png)
        print(table, file=sys.stdout)


def run_pretext_report(smk) -> None:
    from . import aggregate

    with logging_to(smk.log[0] if smk.log else None):
        evals = aggregate.load_records(list(smk.input.evals))
        table = aggregate.pretext_table(evals)
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        aggregate.plot_pretext(table, smk.output.png)
        rep = aggregate.representation_table(list(smk.input.analyses))
        aggregate.write_table(rep.filter(~rep["metric"].is_in(["layer_probe_top1"])), smk.output.rep_csv,
                              smk.output.rep_md)
        aggregate.write_table(aggregate.layer_probe_table(rep), smk.output.probe_csv, smk.output.probe_md)
        aggregate.plot_representation(rep, smk.output.rep_png)
        bias = aggregate.shape_bias_table(evals)
        if bias is not None:
            aggregate.write_table(bias, smk.output.bias_csv, smk.output.bias_md)
        else:
            for path in (smk.output.bias_csv, smk.output.bias_md):
                aggregate._atomic_write(path, "no shape/texture labels in these datasets\n")
        print(table, rep, sep="\n", file=sys.stdout)

