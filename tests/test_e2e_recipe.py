"""A tiny DeiT-style run through Snakemake, Ray and MLflow with the papers' recipe ingredients on
(.test/config/recipe.yaml): Mixup/CutMix, random erasing, repeated augmentation, EMA, layer decay, a base
learning rate with its reference batch, a warm-up start rate and dropout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mlflow import MlflowClient

from conftest import e2e_config, snakemake, write_config


@pytest.mark.slow
def test_deit_style_recipe_runs_end_to_end_and_evaluates_the_ema(workflow, ray_cluster):
    config = e2e_config("recipe")
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "2", "architecture", env=ray_cluster)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    train = config["architecture"]["train"]
    d = workflow / "results/architecture/digits/attention/seed0"
    record = json.loads((d / "record.json").read_text())
    assert record["evaluated_weights"] == "ema"
    assert len(record["history"]) == train["epochs"]

    # the rate that trained: blr x batch / lr_batch_ref, warm-up from warmup_lr, cosine to min_lr; the logged
    # rate is the top group's (layer_decay's scale 1), computed here from the recipe
    peak = train["blr"] * train["batch_size"] / train["lr_batch_ref"]
    saved = json.loads((d / "config.json").read_text())
    assert saved["train"]["lr"] == pytest.approx(peak)
    first, last = record["history"][0]["lr"], record["history"][-1]["lr"]
    assert 0.8 * peak < first <= peak  # the warm-up epoch ends just below the peak
    assert train["min_lr"] <= last < first  # then the cosine decays towards min_lr

    # model.pt holds the EMA weights that were evaluated, the online ones beside them, and they differ
    state = torch.load(d / "model.pt", weights_only=True)
    assert set(state["online_model"]) == set(state["model"])
    assert any(not torch.equal(state["model"][k], state["online_model"][k]) for k in state["model"]
               if state["model"][k].is_floating_point())

    # MLflow: the run carries the recipe as params and finished
    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("architecture").experiment_id])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert float(p["train.mixup_alpha"]) == train["mixup_alpha"] and float(p["train.cutmix_alpha"]) == 1.0
    assert p["train.ema"] == "True" and float(p["train.layer_decay"]) == train["layer_decay"]
    assert int(p["train.repeated_aug"]) == 3 and float(p["model.drop_rate"]) == 0.1
    assert math.isclose(float(p["train.lr"]), peak)
    assert math.isclose(run.data.metrics["top1_test"], record["top1_test"], rel_tol=1e-6)
