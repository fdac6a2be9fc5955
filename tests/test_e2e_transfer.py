"""A tiny real run of the `transfer` target: a pretext teacher built in the same DAG and a
file: teacher, through Snakemake, Ray and MLflow."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from conftest import read_config, snakemake, write_config
from vitablate.models import VARIANTS, create_model


@pytest.mark.slow
def test_tiny_transfer_run(workflow, tmp_path):
    torch.manual_seed(0)
    ext = tmp_path / "external_vit.pth"
    torch.save(create_model(mixer="attention", in_chans=1, num_classes=0, **VARIANTS["vit_digits"]).state_dict(), ext)
    config = read_config(workflow)
    config.pop("architecture")
    config["pretext"].update(pretexts=["mae"], seeds=[0])
    config["pretext"]["pretrain"]["epochs"] = 1
    t = config["transfer"]
    t.update(teachers={"mae": "pretext:mae", "ext": f"file:{ext}"}, seeds=[0], layers=["all", "first:1"],
             methods=["scratch", "finetune", "linear_probe", "attn_copy", "attn_distill", "ensemble"])
    t["train"]["epochs"] = 1
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "2", "transfer")
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
        gap = {r["method"]: r["gap_closed"] for r in sub.filter(pl.col("layers") == "all").iter_rows(named=True)}
        assert gap["scratch"] == pytest.approx(0) and gap["finetune"] == pytest.approx(1)
    for fig in ("transfer.png", "transfer_layers.png", "transfer_curves.png", "transfer_attention.png"):
        assert (workflow / "results/reports/figures" / fig).read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("transfer").experiment_id])
    # every student and its shift job (the one that tests it under distribution shift)
    assert len(runs) == 2 * (1 + 2 * 7) and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["teacher"] for r in runs} == {"none", "mae", "ext"}
    assert {r.data.tags["method"] for r in runs} >= {"attn_copy", "attn_distill", "ensemble"}
    shift = [r for r in runs if r.data.tags["job"] == "shift"]
    assert len(shift) == 1 + 2 * 7 and all("top1_shift_gaussian_noise" in r.data.metrics for r in shift)
