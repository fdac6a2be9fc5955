"""What the Snakemake rules call: the grid, each job's resolved config, rule bodies.

Kept here, not in rules/*.smk, so it is plain Python that tests can import.
A job's config is resolved in this order, later winning:
JobConfig defaults <- the global `execution` <- the question's `model`/`train`/
`execution` <- the dataset's own entry under `datasets:`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from .config import (
    DataConfig, ExecutionConfig, JobConfig, ModelConfig, TrainConfig, deep_merge, from_dict, to_dict,
)

QUESTIONS = ("architecture",)


def active_questions(config: dict) -> list[str]:
    return [q for q in QUESTIONS if config.get(q)]


def results_dir(config: dict) -> str:
    return config.get("results_dir", "results")


def reports_dir(config: dict) -> str:
    return config.get("reports_dir", "reports")


def check_config(config: dict) -> None:
    """Cross-field checks the JSON schema cannot express; raises with the key and the fix."""
    from .config import ConfigError
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
    # build one job per dataset and question so that type errors surface before any job runs
    for q in QUESTIONS:
        section = config.get(q)
        if section:
            for name in section.get("datasets", []):
                mixer = (section.get("mixers") or ["attention"])[0]
                job_config(config, q, dataset=name, mixer=mixer, seed=(section.get("seeds") or [0])[0])


def grid(config: dict, question: str) -> list[dict[str, Any]]:
    """The wildcard values of every training job of `question`."""
    section = config.get(question) or {}
    if question == "architecture":
        return [dict(dataset=d, mixer=m, seed=s) for d in section.get("datasets", [])
                for m in section.get("mixers", []) for s in section.get("seeds", [])]
    raise ValueError(f"unknown question {question!r}; choose one of {QUESTIONS}")


def job_dir(config: dict, question: str, dataset: str, mixer: str, seed: int) -> str:
    return os.path.join(results_dir(config), question, dataset, mixer, f"seed{seed}")


def _layer(*parts: dict | None) -> dict:
    out: dict = {}
    for part in parts:
        out = deep_merge(out, part or {})
    return out


def job_config(config: dict, question: str, dataset: str, mixer: str, seed: int | str) -> JobConfig:
    """The resolved config of one job, checked field by field."""
    section = config.get(question) or {}
    entry = (config.get("datasets") or {}).get(dataset, {})
    layered = {
        "model": _layer(section.get("model"), entry.get("model")),
        "train": _layer(section.get("train"), entry.get("train")),
        "execution": _layer(config.get("execution"), section.get("execution"), entry.get("execution")),
    }
    data = deep_merge({"name": dataset, "root": config.get("data_root", "data")}, entry.get("data") or {})
    return JobConfig(
        question=question, job="train_classifier", seed=int(seed), mixer=mixer,
        output_dir=job_dir(config, question, dataset, mixer, int(seed)),
        data=from_dict(DataConfig, data, f"datasets.{dataset}.data"),
        model=from_dict(ModelConfig, layered["model"], f"{question}.model"),
        train=from_dict(TrainConfig, layered["train"], f"{question}.train"),
        execution=from_dict(ExecutionConfig, layered["execution"], "execution"),
        tags={"question": question, "dataset": dataset, "mixer": mixer},
    )


def job_params(config: dict, question: str, wildcards) -> dict:
    """A rule's `params.job`: the resolved config of the job these wildcards name."""
    return to_dict(job_config(config, question, **dict(wildcards.items())))


@contextlib.contextmanager
def logging_to(path: str | None):
    """Send this process's stdout and stderr to the rule's log file."""
    if not path:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def run_train_rule(smk) -> None:
    """Body of a training rule's script: run its job on Ray inside an MLflow run."""
    from .execution import run_job

    cfg = from_dict(JobConfig, smk.params.job)
    with logging_to(smk.log[0] if smk.log else None):
        print(f"[vitablate] job {cfg.output_dir} -> Ray (RAY_ADDRESS={os.environ.get('RAY_ADDRESS')})", flush=True)
        record = run_job(cfg, smk.output.record, uri=smk.params.mlflow_uri)
        print(f"[vitablate] done: top1_test={record.get('top1_test')} on {record.get('host')} "
              f"node={record.get('ray_node_id', '')[:8]} wall={record.get('wall_s', 0):.1f}s", flush=True)


def run_architecture_report(smk) -> None:
    from . import aggregate

    with logging_to(smk.log[0] if smk.log else None):
        records = aggregate.load_records(list(smk.input.records))
        table = aggregate.architecture_table(records)
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        aggregate.plot_architecture(table, smk.output.png)
        print(table, file=sys.stdout)
