"""A tiny real run of the fashion-mnist-cpu preset on the real Fashion-MNIST files: Snakemake -> Ray ->
jobs -> MLflow -> Polars -> summary.md, all three questions, a few hundred images, one epoch."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow import MlflowClient

from conftest import copy_workflow, e2e_config, snakemake

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
def test_tiny_fashion_mnist_run_of_all_three_questions(tmp_path, ray_cluster):
    if not FMNIST.is_file():
        pytest.fail(f"{FMNIST} is missing: tools/get-data.sh fashion-mnist (.ci/run installs it)")
    wf = copy_workflow(tmp_path / "wf")
    config = e2e_config("fashion-mnist")  # the preset, 300/100/200 images, 1 seed, 1 epoch
    (wf / "config" / "tiny.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    r = snakemake(wf, "--cores", "1", "--configfile", "config/tiny.yaml", timeout=1500,
                  env=ray_cluster)  # one Ray worker (conftest.ray_cluster)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]

    results = wf / config["results_dir"]
    records = [json.loads(p.read_text()) for q in ("architecture", "pretext", "transfer")
               for p in (results / q).rglob("record.json")]
    # 2 mixers; 2 pre-trainings, each with 3 evaluations and an analysis; 4 transfer methods, each student
    # with its shift job (the preset's corruptions)
    assert config["transfer"]["shift"]["corruptions"]
    assert len(records) == 2 + 2 * (1 + 3 + 1) + 4 + 4
    trained = [r for r in records if r.get("history")]
    assert trained and all(r["epochs"] == 1 for r in trained)
    # every classifier read the real images: 200 test images, ten classes, better than chance after one epoch
    arch = pl.read_csv(wf / config["reports_dir"] / "tables/architecture.csv")
    assert arch["dataset"].to_list() == ["fashion_mnist"] * 2 and arch["n_seeds"].to_list() == [1, 1]
    assert all(10.0 < v <= 100.0 for v in arch["top1_mean"].to_list())
    for name in ("pretext.csv", "transfer.csv", "representation.csv"):
        assert pl.read_csv(wf / config["reports_dir"] / "tables" / name).height > 0
    summary = (wf / config["reports_dir"] / "summary.md").read_text()
    assert "### fashion_mnist" in summary and "## Q1" in summary and "## Q2" in summary and "## Q3" in summary

    client = MlflowClient(tracking_uri=f"sqlite:///{results}/mlflow.db")
    runs = [run for name in ("architecture", "pretext", "transfer")
            for run in client.search_runs([client.get_experiment_by_name(name).experiment_id])]
    assert len(runs) == len(records)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["data.name"] == "fashion_mnist" and run.data.params["data.n_train"] == "300"
        assert run.data.tags["dataset"] == "fashion_mnist"
