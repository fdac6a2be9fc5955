"""Progress of long jobs: a line per epoch in the job's log, throughput and time left as MLflow
metrics, where the job ran, and MLflow system metrics when switched on (real SQLite stores)."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch
from mlflow import MlflowClient

from vitablate import execution
from vitablate.config import JobConfig, TrainConfig, to_dict
from vitablate.engine import Checkpoint, classification_loss, fit, format_duration, pick_precision
from vitablate.models import create_model

LINE = re.compile(r"epoch (\d+)/(\d+) loss \d+\.\d{4} top1_val \d+\.\d\d lr \S+ \d+ img/s eta (\d+):(\d\d):(\d\d)$")


def test_format_duration():
    assert [format_duration(s) for s in (0, 41, 4000, 90061.4, -3)] == [
        "0:00:00", "0:00:41", "1:06:40", "25:01:01", "0:00:00"]


def test_fit_logs_one_progress_line_and_eta_per_epoch(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 2, (64,), generator=g)
    model = create_model(mixer="attention", img_size=8, patch_size=2, embed_dim=16, depth=1, num_heads=2,
                         num_classes=2, in_chans=1)
    with caplog.at_level(logging.INFO, logger="vitablate.progress"):
        result = fit(model, classification_loss(model, 0.0), lambda e: [(x[:32], y[:32]), (x[32:], y[32:])], 2,
                     TrainConfig(epochs=3, batch_size=32), pick_precision(torch.device("cpu"), "fp32"),
                     Checkpoint(str(tmp_path / "c.pt")), 0, evaluate=lambda: {"top1_val": 50.0})
    lines = [r.getMessage() for r in caplog.records if r.name == "vitablate.progress"]
    assert [LINE.match(line).group(1, 2) for line in lines] == [("1", "3"), ("2", "3"), ("3", "3")], lines
    assert [h["eta_s"] >= 0 for h in result.history] == [True] * 3 and result.history[-1]["eta_s"] == 0
    assert all(h["images_per_s"] > 0 for h in result.history)


def _job(tmp_path, **execution_kw) -> dict:
    cfg = JobConfig(question="architecture", job="train_classifier", output_dir=str(tmp_path / "job"),
                    model=dataclasses.replace(JobConfig().model, variant="vit_digits"),
                    train=TrainConfig(epochs=3, batch_size=128),
                    tags={"question": "architecture", "dataset": "digits", "mixer": "attention"})
    cfg.execution = dataclasses.replace(cfg.execution, **execution_kw)
    return to_dict(cfg)


def _run(uri: str, record: dict):
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(record["mlflow_run_id"])


@pytest.mark.slow  # a real job with a new MLflow SQLite store (seconds to a minute on a loaded machine)
def test_job_log_gets_start_and_progress_lines_and_mlflow_the_progress_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "logs" / "job.log"
    record = execution._execute(_job(tmp_path), uri, "digits-attention-s0", log_path=str(log))
    text = log.read_text().splitlines()
    assert re.search(r"\[vitablate\] train_classifier \S+/job on \S+ \(not in Ray\) pid \d+$", text[0]), text[0]
    progress = [line for line in text if LINE.search(line)]
    assert [LINE.search(line).group(1) for line in progress] == ["1", "2", "3"]
    client, run = _run(uri, record)
    assert run.info.status == "FINISHED"
    eta = client.get_metric_history(run.info.run_id, "eta_s")
    assert [m.step for m in eta] == [1, 2, 3] and eta[-1].value == 0
    assert len(client.get_metric_history(run.info.run_id, "images_per_s")) == 3
    assert not [k for k in run.data.metrics if k.startswith("system/")], "system metrics are off by default"
    # the worker's handler is gone: a later job (Ray reuses worker processes) writes elsewhere
    assert not logging.getLogger("vitablate").handlers
    logging.getLogger("vitablate.progress").warning("not in the old log")
    assert "not in the old log" not in log.read_text()


@pytest.mark.slow  # a new MLflow SQLite store and 2 s of sampling
def test_system_metrics_switched_on_are_logged_into_the_jobs_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # a dry job holding its resources for 2 s: ten sampling intervals of 0.2 s
    record = execution._execute(_job(tmp_path, dry_jobs=True, dry_job_sleep_s=2.0), uri, "dry",
                                system_metrics_s=0.2)
    client, run = _run(uri, record)
    assert run.info.status == "FINISHED"
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
