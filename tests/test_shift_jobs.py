"""Q1 classifiers and Q2 evaluations are tested under distribution shift by shift jobs of their own: a tiny run of
each in-process on digits with one extra_test_dirs folder, every top1_shift_* checked against a prediction made
here from the saved files (model.pt, probe.pt, encoder.pt) with plain torch, never with vitablate's evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import REPO
from vitablate import jobs
from vitablate import workflow as vw
from vitablate.data import load_dataset
from vitablate.models import create_model


def _ood_folder(root) -> str:
    """An ImageFolder of shifted digits: 6 of each class, resized to 16 px and read back at 8 (the resampling
    blurs them), so a model trained on the clean digits gets some of them right and some wrong."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i, idx in enumerate(rng.choice(np.flatnonzero(digits.target == c), 6, replace=False)):
            img = digits.images[idx] * 255 / 16
            Image.fromarray(img.astype(np.uint8)).resize((16, 16)).save(root / str(c) / f"{i}.png")
    return str(root)


def _config(tmp_path) -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["results_dir"] = str(tmp_path / "results")
    config["datasets"]["digits"]["data"] = {"extra_test_dirs": {"ood": _ood_folder(tmp_path / "ood")}}
    config["architecture"].update(mixers=["attention"], seeds=[0], seeds_by={})
    config["architecture"]["train"].update(epochs=2, warmup_epochs=0)  # better than chance on the shifted digits
    config["pretext"].update(pretexts=["mae"], seeds=[0], seeds_by={}, evals=["finetune", "linear_probe", "knn"])
    config["pretext"]["pretrain"]["epochs"] = 1
    config["pretext"]["finetune"].update(epochs=2, warmup_epochs=0)
    config["pretext"]["eval"].update(knn_k=7, knn_temperature=0.2, probe_weight_decay=[1.0e-3])
    del config["transfer"]
    vw.check_config(config)
    return config


def _images(ood: str):
    """The clean training split and the shifted folder as the job reads them, normalised here."""
    bundle = load_dataset("digits", extra_test_dirs={"ood": ood})

    def norm(x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - bundle.mean[0]) / bundle.std[0]

    s = bundle.extra_tests["ood"]
    return (norm(bundle.train.x), bundle.train.y), (norm(s.x), s.y)


def _load(path: str) -> torch.nn.Module:
    state = torch.load(path, weights_only=True)
    model = create_model(**state["model_kwargs"])
    model.load_state_dict(state["model"])
    return model.eval()


def _pct(pred: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (pred == y).float().mean().item()


def _knn_by_hand(train_f, train_y, test_f, k, temperature, num_classes=10):
    """DINO's weighted k-NN: cosine similarity, the k nearest vote with weight exp(sim / T)."""
    sim = F.normalize(test_f, dim=1) @ F.normalize(train_f, dim=1).T
    preds = []
    for row in sim:
        top = row.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes)
        for j in top:
            votes[train_y[j]] += torch.exp(row[j] / temperature)
        preds.append(int(votes.argmax()))
    return torch.tensor(preds)


@pytest.mark.slow  # ~20 s on 2 shared cores: a pre-training, two trainings of 2 epochs, 7 jobs in all
def test_classifier_and_evaluations_are_tested_on_shifted_sets_by_their_shift_jobs(tmp_path):
    config = _config(tmp_path)
    ood = config["datasets"]["digits"]["data"]["extra_test_dirs"]["ood"]
    (train_x, train_y), (x, y) = _images(ood)
    assert len(vw.grid(config, "architecture_shift")) == 1 and len(vw.grid(config, "pretext_shift")) == 3

    # Q1: the classifier tests on val and test only; its shift job reads its model.pt
    wc = dict(dataset="digits", mixer="attention", seed=0)
    trained = jobs.run(vw.architecture_job(config, **wc))
    assert not any(k.startswith("top1_shift_") for k in trained)
    shift = jobs.run(vw.architecture_shift_job(config, **wc))
    assert shift["shift_sets"] == ["ood"] and shift["question"] == "architecture"
    model = _load(f"{vw.architecture_job(config, **wc).output_dir}/model.pt")
    with torch.no_grad():
        want = _pct(model(x).argmax(-1), y)
    assert shift["top1_shift_ood"] == pytest.approx(want)
    assert shift["top1_test"] == pytest.approx(trained["top1_test"])  # the same model, as its job tested it

    # Q2: pre-train, then each evaluation and its shift job
    base = dict(dataset="digits", pretext="mae", seed=0)
    jobs.run(vw.pretrain_job(config, **base))
    encoder = _load(vw.pretext_eval_job(config, eval="knn", **base).init_from)
    with torch.no_grad():
        enc_train, enc_ood = encoder(train_x), encoder(x)
    records = {}
    for name in ("finetune", "linear_probe", "knn"):
        evaluated = jobs.run(vw.pretext_eval_job(config, eval=name, **base))
        assert not any(k.startswith("top1_shift_") for k in evaluated), name
        records[name] = jobs.run(vw.pretext_shift_job(config, eval=name, **base))
        assert records[name]["eval"] == name and records[name]["pretext"] == "mae"
        assert records[name]["top1_test"] == pytest.approx(evaluated["top1_test"]), name
    out = vw.pretext_eval_job(config, eval="finetune", **base).output_dir
    with torch.no_grad():
        want = _pct(_load(f"{out}/model.pt")(x).argmax(-1), y)
    assert records["finetune"]["top1_shift_ood"] == pytest.approx(want)

    probe = torch.load(f"{vw.pretext_eval_job(config, eval='linear_probe', **base).output_dir}/probe.pt",
                       weights_only=True)
    assert probe["kind"] == "lbfgs"
    logits = ((enc_ood - probe["mean"]) / probe["std"]) @ probe["head"]["weight"].T + probe["head"]["bias"]
    assert records["linear_probe"]["top1_shift_ood"] == pytest.approx(_pct(logits.argmax(-1), y))

    pred = _knn_by_hand(enc_train, train_y, enc_ood, k=7, temperature=0.2)
    assert records["knn"]["top1_shift_ood"] == pytest.approx(_pct(pred, y))
    # the k-NN shift job votes with the evaluation's k and temperature: other ones would vote otherwise here
    assert any(_pct(_knn_by_hand(enc_train, train_y, enc_ood, k, t), y) != records["knn"]["top1_shift_ood"]
               for k, t in ((1, 0.2), (50, 5.0)))
