"""Failures clusters have: a worker killed mid-run; no config value ever reaches a shell."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from mlflow import MlflowClient

from conftest import REPO, read_config, write_config
from vitablate import jobs
from vitablate.config import JobConfig, from_dict


def _epoch_done(path) -> int:
    try:
        return torch.load(path, weights_only=False)["epoch"]
    except Exception:  # not there yet (it is replaced atomically, never half-written)
        return 0


@pytest.mark.slow
def test_killed_worker_is_retried_and_resumes_exactly(workflow, tmp_path, ray_cluster):
    config = read_config(workflow)
    config = {k: v for k, v in config.items() if k not in ("pretext", "transfer")}
    config["architecture"].update(mixers=["attention"], seeds=[0])
    config["architecture"]["train"]["epochs"] = 8
    write_config(workflow, config)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")} | ray_cluster
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", "architecture"], cwd=workflow,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    job_dir = workflow / "results/architecture/digits/attention/seed0"
    deadline = time.time() + 240
    while _epoch_done(job_dir / "checkpoint.pt") < 2:
        assert proc.poll() is None and time.time() < deadline, "the job ended or stalled before epoch 2"
        time.sleep(0.2)
    # this run's job: its task's name, in this workflow's directory (which the task enters; a test running beside
    # this one, under pytest -n, may run a task of the same name elsewhere)
    workers = [p for p in psutil.process_iter(["cmdline", "cwd"]) if "ray::architecture:seed0" in
               " ".join(p.info["cmdline"] or []) and p.info["cwd"] == str(workflow)]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]

    record = json.loads((job_dir / "record.json").read_text())
    assert record["resumed_from_epoch"] >= 2 and len(record["history"]) == 8
    # the same job, uninterrupted, in this process: identical numbers on CPU
    cfg = from_dict(JobConfig, json.loads((job_dir / "config.json").read_text()))
    cfg.output_dir = str(tmp_path / "reference")
    ref = jobs.run(cfg)
    assert record["top1_test"] == ref["top1_test"] and record["top1_val"] == ref["top1_val"]
    assert [h["train_loss"] for h in record["history"]] == [h["train_loss"] for h in ref["history"]]

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("architecture").experiment_id])
    by_attempt = {r.data.tags["attempt"]: r for r in runs}
    assert set(by_attempt) == {"1", "2"}
    assert by_attempt["1"].info.status == "KILLED" and "interrupted" in by_attempt["1"].data.tags
    assert by_attempt["2"].info.status == "FINISHED"
    assert by_attempt["2"].data.metrics["top1_test"] == record["top1_test"]


def test_no_config_value_is_interpolated_into_a_shell_command():
    """Rules run Python scripts that take the resolved config as params; none uses shell: or run:."""
    for smk in (REPO / "rules").glob("*.smk"):
        text = smk.read_text()
        assert not re.search(r"^\s*(shell|run):", text, re.M), f"{smk.name} has a shell:/run: directive"
    snakefile = (REPO / "Snakefile").read_text()
    assert "shell(" not in snakefile and not re.search(r"^\s*shell:", snakefile, re.M)
    src = "\n".join(p.read_text() for p in (REPO / "src/vitablate").rglob("*.py"))
    assert "shell=True" not in src and "os.system(" not in src


@pytest.mark.slow
def test_ctrl_c_ends_the_running_job_killed_and_a_rerun_finishes_it(workflow, ray_cluster):
    config = read_config(workflow)
    config = {k: v for k, v in config.items() if k not in ("pretext", "transfer")}
    config["architecture"].update(mixers=["identity"], seeds=[0])
    config["execution"].update(dry_jobs=True, dry_job_sleep_s=120)
    write_config(workflow, config)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")} | ray_cluster
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", "architecture"]
    # its own process group, as in a terminal: Ctrl-C reaches Snakemake and its job processes alike
    proc = subprocess.Popen(cmd, cwd=workflow, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    marker = workflow / "results/architecture/digits/identity/seed0/mlflow_run.json"
    deadline = time.time() + 240
    while not marker.exists():  # the job's MLflow run exists: it is running in a Ray worker
        assert proc.poll() is None and time.time() < deadline, "the job never started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    run_id = json.loads(marker.read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    assert client.get_run(run_id).info.status == "KILLED", out[-3000:]
    assert not (marker.parent / "record.json").exists()

    config["execution"]["dry_job_sleep_s"] = 0
    write_config(workflow, config)
    r = subprocess.run(cmd, cwd=workflow, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (marker.parent / "record.json").exists()
