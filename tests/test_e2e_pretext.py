"""A tiny real run of the `pretext` target through Snakemake, Ray and MLflow."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient

from conftest import e2e_config, job_counts, snakemake, write_config


@pytest.mark.slow
def test_tiny_pretext_run(workflow, ray_cluster):
    config = e2e_config("pretext")  # shapes: the shape/texture probes and the cue-conflict shape bias
    p = config["pretext"]
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "1", env=ray_cluster)  # one Ray worker (conftest.ray_cluster)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    table = pl.read_csv(workflow / "results/reports/tables/pretext.csv")
    # shapes brings its cue-conflict set: each evaluation's shift job tests on it, and the table reads that
    assert table.columns == ["dataset", "pretext", "eval", "n_seeds", "top1_mean", "top1_std",
                             "shift_cue_conflict_top1_mean"]
    assert table["shift_cue_conflict_top1_mean"].is_between(0, 100).all()
    assert table.height == len(p["pretexts"]) * len(p["evals"]) and set(table["eval"]) == set(p["evals"])
    rep = pl.read_csv(workflow / "results/reports/tables/representation.csv")
    assert rep.columns == ["dataset", "pretext", "layer", "metric", "value_mean", "value_std"]
    assert set(rep["metric"]) == {"attention_distance", "nmi", "token_cosine", "fourier_hf"}
    depth = 4  # vit_shapes
    assert rep.filter(pl.col("metric") == "nmi").height == len(p["pretexts"]) * depth
    assert sorted(rep.filter(pl.col("metric") == "nmi")["layer"].unique()) == list(range(1, depth + 1))  # blocks
    # the token metrics and layer probes also read the embedding output: layer 0, then block i at layer i
    for metric in ("fourier_hf", "token_cosine"):
        assert sorted(rep.filter(pl.col("metric") == metric)["layer"].unique()) == list(range(depth + 1))
    assert pl.read_csv(workflow / "results/reports/tables/layer_probe.csv").height == 2 * (depth + 1)
    nmi = rep.filter(pl.col("metric") == "nmi")["value_mean"]
    assert nmi.min() >= 0 and nmi.max() <= 1
    bias = pl.read_csv(workflow / "results/reports/tables/shape_bias.csv")
    assert set(bias["pretext"]) == {"moco", "mae"} and bias["shape_bias_mean"].is_between(0, 1).all()
    for fig in ("pretext_eval.png", "representation.png", "pretext_curves.png", "pretext_attention.png"):
        assert (workflow / "results/reports/figures" / fig).read_bytes()[:4] == b"\x89PNG"
    parquet = workflow / "results/pretext/shapes/mae/seed0/analysis/representation.parquet"
    per_head = pl.read_parquet(parquet).filter(pl.col("metric") == "attention_distance")
    assert per_head.height == depth * 4  # one value per layer and head
    analysis = json.loads((workflow / "results/pretext/shapes/mae/seed0/analysis/record.json").read_text())
    maps = np.load(workflow / analysis["attention_maps_path"])["maps"]  # (layers, grid, grid): 16 px / patch 4
    assert maps.shape == (depth, 4, 4) and np.allclose(maps.sum(axis=(1, 2)), 1, atol=1e-5)

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pretext").experiment_id])
    assert len(runs) == 2 + 6 + 6 + 2  # pre-trainings, evaluations, their shift jobs, analyses
    assert {r.info.status for r in runs} == {"FINISHED"}
    shifts = [r for r in runs if r.data.tags["job"] == "shift"]
    assert sorted(r.data.tags["eval"] for r in shifts) == sorted(p["evals"] * 2)
    assert {r.data.tags["question"] for r in shifts} == {"pretext"}
    assert {r.data.tags["pretext"] for r in runs} == {"moco", "mae"}
    assert {r.data.tags["job"] for r in runs} >= {"pretrain", "eval_linear_probe", "eval_finetune", "eval_knn",
                                                  "analysis"}
    analysis = next(r for r in runs if r.data.tags["job"] == "analysis")
    assert "representation.parquet" in {a.path for a in client.list_artifacts(analysis.info.run_id)}
    rec = json.loads((workflow / "results/pretext/shapes/moco/seed0/record.json").read_text())
    assert rec["pretext"] == "moco" and rec["history"][0]["loss_moco"] > 0

    # changing an evaluation setting re-runs evaluations only, never the pre-training
    config["pretext"]["eval"]["knn_k"] = 5
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "2")
    counts = job_counts(r.stdout + r.stderr)
    assert "pretrain" not in counts and counts.get("pretext_eval", 0) >= 2
