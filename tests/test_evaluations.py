"""Frozen-feature evaluations, the ensemble, layer specs and `vitablate check`, each against an independent
computation written here (numpy, scikit-learn, plain counting), never against vitablate's own output."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO


def _blobs(n_per_class=60, classes=4, dim=8, spread=1.5, seed=0):
    """Overlapping Gaussian blobs: a probe can err, so a wrong fit shows in the predictions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2.0
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat(np.arange(classes), n_per_class)
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


# --- k-NN: DINO's weighted vote on cosine similarity --------------------------------------------------------

def _knn_by_hand(train_x, train_y, test_x, test_y, num_classes, k, temperature):
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    correct = 0
    for q, label in zip(te, test_y):
        sims = tr @ q
        nearest = np.argsort(-sims)[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        correct += int(np.argmax(votes) == label)
    return 100.0 * correct / len(test_y)


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (500, 1.0)])
def test_knn_accuracy_matches_a_weighted_vote_by_hand(k, temperature):
    from vitablate.analysis.probes import knn_accuracy

    x, y = _blobs()
    tx, ty, vx, vy = x[:160], y[:160], x[160:], y[160:]
    expected = _knn_by_hand(tx, ty, vx, vy, 4, min(k, len(tx)), temperature)
    got = knn_accuracy(torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(vx), torch.from_numpy(vy), 4,
                       k, temperature)
    assert got == pytest.approx(expected)
    assert 25 < got < 100  # the blobs overlap: neither chance nor perfect, so a wrong vote would show


def test_knn_weights_decide_against_the_majority():
    """Two far neighbours of class 0 against one very close neighbour of class 1: a low temperature follows
    the close one (weights exp(sim / T)), a high one the majority."""
    from vitablate.analysis.probes import knn_accuracy

    train = torch.tensor([[1.0, 0.02], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([1, 0, 0])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_accuracy(train, labels, query, truth, 2, k=3, temperature=0.05) == 100.0
    assert knn_accuracy(train, labels, query, truth, 2, k=3, temperature=100.0) == 0.0


# --- the L-BFGS linear probe against scikit-learn's logistic regression --------------------------------------

def test_linear_probe_matches_sklearn_logistic_regression():
    """fit_linear_probe minimises mean cross-entropy + wd·‖W‖² (bias free) on standardised features;
    scikit-learn's multinomial LogisticRegression minimises ½‖W‖² + C·Σ cross-entropy, the same problem at
    C = 1 / (2·N·wd)."""
    from sklearn.linear_model import LogisticRegression

    from vitablate.analysis.probes import fit_linear_probe

    x, y = _blobs(n_per_class=80)
    tx, ty, vx = x[:240], y[:240], x[240:]
    wd = 1e-2
    mean, std = tx.mean(0), tx.std(0, ddof=1) + 1e-6
    ref = LogisticRegression(C=1 / (2 * len(tx) * wd), tol=1e-10, max_iter=10_000).fit((tx - mean) / std, ty)
    expected = ref.predict_proba((vx - mean) / std)
    predict = fit_linear_probe(torch.from_numpy(tx), torch.from_numpy(ty), 4, wd)
    got = predict(torch.from_numpy(vx)).softmax(-1).numpy()
    assert np.abs(got - expected).max() < 1e-3
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_select_linear_probe_keeps_the_best_val_decay():
    from sklearn.linear_model import LogisticRegression

    from vitablate.analysis.probes import select_linear_probe

    x, y = _blobs(n_per_class=40, dim=30, spread=3.0, seed=3)  # few images, many features: L2 matters
    tx, ty, vx, vy = x[:100], y[:100], x[100:], y[100:]
    mean, std = tx.mean(0), tx.std(0, ddof=1) + 1e-6
    decays = [1e-4, 1.0]
    val = {wd: 100.0 * (LogisticRegression(C=1 / (2 * len(tx) * wd), tol=1e-10, max_iter=10_000)
                        .fit((tx - mean) / std, ty).predict((vx - mean) / std) == vy).mean() for wd in decays}
    _, chosen, scores = select_linear_probe(torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(vx),
                                            torch.from_numpy(vy), 4, decays)
    assert scores == pytest.approx(val, abs=100 / len(vy) + 1e-9)  # at most one image apart
    best = max(val.values())
    assert val[chosen] >= best - 100 / len(vy)


# --- the cue-conflict shape bias -----------------------------------------------------------------------------

def test_shape_bias_against_a_count():
    from vitablate.analysis.probes import shape_bias

    rng = np.random.default_rng(1)
    y_shape = rng.integers(0, 4, 200)
    y_texture = (y_shape + rng.integers(1, 4, 200)) % 4  # every image conflicts
    pred = np.where(rng.random(200) < 0.5, y_shape, np.where(rng.random(200) < 0.6, y_texture, rng.integers(0, 4, 200)))
    shape_hits = sum(int(p == s) for p, s in zip(pred, y_shape))
    texture_hits = sum(int(p == t) for p, t in zip(pred, y_texture))
    out = shape_bias(torch.from_numpy(pred), torch.from_numpy(y_shape), torch.from_numpy(y_texture))
    assert out["shape_bias"] == pytest.approx(shape_hits / (shape_hits + texture_hits))
    assert out["cue_conflict_shape_top1"] == pytest.approx(100 * shape_hits / 200)
    assert out["cue_conflict_texture_top1"] == pytest.approx(100 * texture_hits / 200)
    none = shape_bias(torch.tensor([3, 3]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    assert np.isnan(none["shape_bias"]) and none["cue_conflict_shape_top1"] == 0.0


# --- the ensemble averages probabilities, not logits ---------------------------------------------------------

def test_ensemble_averages_probabilities_not_logits():
    from vitablate.jobs import ensemble_forward

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    # member A is sure of class 0; member B mildly prefers class 1 over 0 and strongly dislikes class 2.
    a, b = [10.0, 0.0, 0.0], [0.0, 2.0, -20.0]
    x = torch.zeros(3, 1)
    out = ensemble_forward([Fixed(a), Fixed(b)])(x).softmax(-1)
    pa, pb = np.exp(a) / np.exp(a).sum(), np.exp(b) / np.exp(b).sum()
    expected = (pa + pb) / 2
    assert np.allclose(out.numpy(), np.tile(expected, (3, 1)), atol=1e-6)
    mean_logits = (np.array(a) + np.array(b)) / 2
    assert not np.allclose(expected, np.exp(mean_logits) / np.exp(mean_logits).sum(), atol=1e-2)


# --- layer specs: the grid's path-safe ids and back -----------------------------------------------------------

@pytest.mark.parametrize("spec", ["all", "first:1", "first:21", "last:3", "0", "0,3,5", "11,2"])
def test_layers_spec_round_trip(spec):
    from vitablate.workflow import layers_id, layers_spec

    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    pattern = schema["properties"]["transfer"]["properties"]["layers"]["items"]["pattern"]
    assert re.fullmatch(pattern, spec), "the spec is one the schema admits"
    lid = layers_id(spec)
    assert re.fullmatch(r"[A-Za-z0-9-]+", lid), f"{lid!r} is not a safe path component"
    assert layers_spec(lid) == spec


def test_layer_ids_are_distinct():
    from vitablate.workflow import layers_id

    specs = ["all", "first:1", "first:12", "last:1", "last:12", "1", "12", "1,2", "12,1"]
    assert len({layers_id(s) for s in specs}) == len(specs)


# --- `vitablate check` -------------------------------------------------------------------------------------

def test_check_a_config_outside_the_config_folder(tmp_path, capsys):
    """The schema is the repository's, not a schema.yaml beside the config (none there)."""
    from vitablate.cli import main

    mine = tmp_path / "elsewhere" / "my.yaml"
    mine.parent.mkdir()
    mine.write_text((REPO / "config/config.yaml").read_text())
    assert main(["check", str(mine)]) == 0
    assert capsys.readouterr().out.strip() == f"{mine}: ok"

    config = yaml.safe_load(mine.read_text())
    config["architecture"]["mixers"] = ["attention", "no_such_mixer"]
    mine.write_text(yaml.safe_dump(config))
    assert main(["check", str(mine)]) == 1
    err = capsys.readouterr().err
    assert "no_such_mixer" in err and "Traceback" not in err


def test_check_every_preset_the_default_and_the_e2e_configs(capsys):
    """Including .test/config/*.yaml, the end-to-end tests' configs a person runs by hand."""
    from vitablate.cli import main

    e2e = sorted((REPO / ".test/config").glob("*.yaml"))
    assert {p.stem for p in e2e} >= {"architecture", "pretext", "transfer", "fashion-mnist"}
    for path in [REPO / "config/config.yaml", *sorted(p for p in (REPO / "config/presets").glob("*.yaml") if p.name != "reference_recipes.yaml"), *e2e]:
        assert main(["check", str(path)]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.strip().endswith(": ok")


def test_check_a_missing_file_is_one_line(tmp_path, capsys):
    from vitablate.cli import main

    assert main(["check", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "missing.yaml" in err and len(err.splitlines()) == 1


# --- transfer.eval: the schema admits what transfer_job reads -------------------------------------------------

def test_transfer_eval_is_admitted_and_reaches_the_linear_probe_job(tmp_path):
    from snakemake.utils import validate

    from vitablate import workflow as vw

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["transfer"]["eval"] = {"probe": "lbfgs", "probe_weight_decay": [1e-4, 1e-2]}
    validate(config, str(REPO / "config/schema.yaml"))
    vw.check_config(config)
    teacher = next(iter(config["transfer"]["teachers"]))
    job = vw.transfer_job(config, config["transfer"]["datasets"][0], teacher, "linear_probe", "all", 0)
    assert job.eval.probe == "lbfgs" and job.eval.probe_weight_decay == [1e-4, 1e-2]
    config["transfer"]["eval"] = {"knn_k": 5}  # only the probe's keys: the transfer methods run no k-NN
    with pytest.raises(Exception, match="knn_k"):
        validate(config, str(REPO / "config/schema.yaml"))
