"""A tiny real run of the `architecture` target: Snakemake -> Ray -> jobs -> MLflow -> Polars."""

from __future__ import annotations

import json
import re

import polars as pl
import psutil
import pytest
from mlflow import MlflowClient

from conftest import e2e_config, snakemake, write_config


def _tiny(workflow, mixers=None):
    """.test/config/architecture.yaml (attention and feedforward, seed 0, 1 epoch), with these mixers."""
    config = e2e_config("architecture")
    if mixers is not None:
        config["architecture"]["mixers"] = list(mixers)
    write_config(workflow, config)
    return config


def _private_ray_processes(output: str) -> list[str]:
    """Processes of the private Ray cluster the run in `output` started (the Snakefile prints its temp dir)."""
    started = re.findall(r"\[vitablate\] Ray cluster \S+ \(private, (/tmp/vtr\w+)\)", output)
    assert started, "the run did not say which private Ray cluster it started"
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(d in cmd for d in started):
            out.append(cmd[:120])
    return out


@pytest.mark.slow
def test_tiny_architecture_run_fills_table_and_mlflow(workflow):
    config = _tiny(workflow)
    config["tracking"] = {"system_metrics": True, "system_metrics_interval_s": 0.2}  # a job lasts seconds
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "2", "architecture")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    table = pl.read_csv(workflow / "results/reports/tables/architecture.csv")
    assert table.columns == ["dataset", "mixer", "model", "params_m", "n_seeds", "top1_mean", "top1_std"]
    mixers = config["architecture"]["mixers"]
    assert sorted(table["mixer"].to_list()) == sorted(mixers)
    assert table["n_seeds"].to_list() == [len(config["architecture"]["seeds"])] * len(mixers)
    assert all(0 <= v <= 100 for v in table["top1_mean"].to_list())
    assert (workflow / "results/reports/tables/architecture.md").exists()
    for fig in ("architecture.png", "architecture_curves.png"):
        assert (workflow / "results/reports/figures" / fig).read_bytes()[:4] == b"\x89PNG"

    # every job ran as a Ray task, and left its record, config, checkpoint and weights
    for mixer in mixers:
        d = workflow / "results/architecture/digits" / mixer / "seed0"
        record = json.loads((d / "record.json").read_text())
        assert record["ray_node_id"] and record["mixer"] == mixer and record["epochs"] == 1
        assert {"config.json", "checkpoint.pt", "model.pt"} <= {p.name for p in d.iterdir()}
        # the centre query's attention maps, where the model has attention to show
        assert ("attention_maps_path" in record) == (mixer == "attention")
        # the rule's log: the worker's start line (where it runs) and its progress, then the result;
        # the console: where each job ran
        log = (workflow / "results/logs/architecture/digits" / f"{mixer}/seed0.log").read_text()
        assert re.search(rf"train_classifier \S+/{mixer}/seed0 on node [0-9.]+ \(\w{{8}}\) gpus \[\]", log), log
        assert re.search(r"epoch 1/1 loss \S+ top1_val \S+ lr \S+ \d+ img/s eta 0:00:00", log), log
        assert f"[vitablate] done results/architecture/digits/{mixer}/seed0 on node" in r.stdout + r.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    exp = client.get_experiment_by_name("architecture")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == len(mixers) * len(config["architecture"]["seeds"])
    for run in runs:
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert {tags[k] for k in ("question", "dataset", "seed", "job")} == {"architecture", "digits", "0",
                                                                            "train_classifier"}
        assert tags["mixer"] in mixers
        assert run.data.params["train.epochs"] == "1" and run.data.params["data.name"] == "digits"
        assert {"top1_test", "top1_val", "train_loss", "params_m", "images_per_s", "eta_s"} <= set(run.data.metrics)
        assert "system/cpu_utilization_percentage" in run.data.metrics  # tracking.system_metrics reached the job
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1  # one per epoch
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"record.json", "config.json"} <= artifacts
    assert not _private_ray_processes(r.stdout + r.stderr), "the private Ray cluster outlived the run"


@pytest.mark.slow
def test_failed_job_ends_its_mlflow_run_failed_and_loses_nothing(workflow):
    config = _tiny(workflow, ["attention"])
    config["datasets"]["digits"]["execution"] = {"dry_jobs": True}  # the finished job needs no training here
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "2", "architecture")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    done = workflow / "results/architecture/digits/attention/seed0/record.json"
    before = done.read_text()

    # add a second dataset whose job fails at start (batch larger than its training set)
    config["architecture"]["datasets"] = ["digits", "shapes"]
    config["datasets"]["shapes"]["train"]["batch_size"] = 5000
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "2", "architecture")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert done.read_text() == before, "a finished job was re-run or its record touched"
    assert not (workflow / "results/architecture/shapes/attention/seed0/record.json").exists()
    log = (workflow / "results/logs/architecture/shapes/attention/seed0.log").read_text()
    assert "batch_size 5000" in log + out

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("architecture").experiment_id])
    status = {r.data.tags["dataset"]: r for r in runs}
    assert status["digits"].info.status == "FINISHED"
    assert status["shapes"].info.status == "FAILED"
    assert "batch_size 5000" in status["shapes"].data.tags["error"]
    assert "lower it" in status["shapes"].data.tags["error"]
    assert not _private_ray_processes(out)
