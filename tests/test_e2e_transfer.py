"""A tiny real run of the `transfer` target: a pretext teacher built in the same DAG and a
file: teacher, through Snakemake, Ray and MLflow."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from conftest import e2e_config, expected_transfer_runs, snakemake, write_config
from vitablate.models import VARIANTS, create_model


@pytest.mark.slow
def test_tiny_transfer_run(workflow, tmp_path, ray_cluster):
    torch.manual_seed(0)
    ext = tmp_path / "external_vit.pth"
    torch.save(create_model(mixer="attention", in_chans=1, num_classes=0, **VARIANTS["vit_digits"]).state_dict(), ext)
    config = e2e_config("transfer")
    config["transfer"]["teachers"]["ext"] = f"file:{ext}"
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "1", "transfer", env=ray_cluster)  # one Ray worker (conftest.ray_cluster)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    table = pl.read_csv(workflow / "results/reports/tables/transfer.csv")
    assert table.columns[:8] == ["dataset", "teacher", "method", "layers", "n_seeds", "top1_mean", "top1_std",
                                 "gap_closed"]
    shift_cols = [c for c in table.columns if c.startswith("shift_")]
    assert sorted(shift_cols) == ["shift_contrast_top1_mean", "shift_gaussian_blur_top1_mean",
                                  "shift_gaussian_noise_top1_mean"]
    for teacher in ("mae", "ext"):
        sub = table.filter(pl.col("teacher") == teacher)
        assert set(sub["method"]) == {"scratch", "finetune", "linear_probe", "attn_copy", "attn_distill",
                                      "ensemble"}
        assert set(sub.filter(pl.col("method") == "attn_copy")["layers"]) == {"all", "first:1"}
        # the share of the scratch-to-fine-tune gap, recomputed here from the run records (one seed each)
        def top1(t, method, layers="all"):
            d = workflow / "results/transfer/digits" / t / method / layers.replace(":", "") / "seed0"
            return json.loads((d / "record.json").read_text())["top1_test"]

        scratch, finetune = top1("none", "scratch"), top1(teacher, "finetune")
        for row in sub.filter(~pl.col("method").is_in(["scratch", "finetune"])).iter_rows(named=True):
            expected = (top1(teacher, row["method"], row["layers"]) - scratch) / (finetune - scratch)
            if abs(finetune - scratch) > 1e-9:
                assert row["gap_closed"] == pytest.approx(expected, abs=1e-4), row  # the CSV keeps 4 decimals
    for fig in ("transfer.png", "transfer_layers.png", "transfer_curves.png", "transfer_attention.png"):
        assert (workflow / "results/reports/figures" / fig).read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("transfer").experiment_id])
    # every student and its shift job (the one that tests it under distribution shift)
    assert len(runs) == 2 * expected_transfer_runs(config) and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["teacher"] for r in runs} == {"none", "mae", "ext"}
    assert {r.data.tags["method"] for r in runs} >= {"attn_copy", "attn_distill", "ensemble"}
    shift = [r for r in runs if r.data.tags["job"] == "shift"]
    assert len(shift) == 1 + 2 * 7 and all("top1_shift_gaussian_noise" in r.data.metrics for r in shift)
