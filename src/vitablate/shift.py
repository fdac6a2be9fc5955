"""The shift job: a trained model tested under distribution shift, one job function for all three questions.

A model's shift test is a job of its own (rules architecture_shift, pretext_shift, transfer_shift), so the
shift settings (a dataset's extra_test_dirs, transfer.shift) are none of a training or evaluation job's
params and changing them re-runs these jobs alone. The job reads what the tested job saved beside its record
and rebuilds what that job evaluated:
- Q1 (cfg.question architecture): the classifier (model.pt);
- Q2 (pretext, by cfg.eval.name): the fine-tuned model (finetune: model.pt); the linear probe (probe.pt: the
  L-BFGS head with its feature standardisation, or MAE's `reference` BatchNorm + linear head) on the frozen
  encoder's features (the encoder.pt named as transfer.teacher, file:<path>); k-NN (knn: the encoder.pt as
  init_from; the training split's features extracted again, each shifted image classified among them with the
  evaluation's knn_k and knn_temperature);
- Q3 (transfer, by cfg.transfer.method): the student (model.pt); a copy method's student with its teacher's
  attention; the linear probe on the teacher's frozen features (probe.pt); an ensemble's members' averaged
  probabilities (their model.pt).
It reports top-1 on the clean test split and, as top1_shift_<name>, on every shifted set (`jobs.shifted_sets`:
the dataset's extra_test_dirs and own sets such as shapes' cue_conflict; for Q3 also the transfer.shift
corruptions at their severity), through the code the tested job evaluates with (`jobs.evaluate_splits`,
`jobs.frozen_features`, `jobs.frozen_top1`), so the numbers are those the job computed when it tested the
shifted sets itself.
"""

from __future__ import annotations

import time

import torch

from .config import JobConfig
from .jobs import (
    ensemble_forward,
    OnEpoch,
    base_record,
    evaluate_splits,
    frozen_features,
    frozen_top1,
    load_data,
    load_encoder,
    make_transforms,
    model_kwargs,
    pretext_id,
    setup,
    shifted_sets,
)
from .models import count_params


def _frozen_encoder(cfg: JobConfig, data, device) -> torch.nn.Module:
    """The frozen encoder a linear probe or k-NN reads: a Q2 evaluation's pre-trained encoder.pt, loaded as the
    evaluation loaded it (`load_encoder`); a Q3 linear probe's teacher (`load_teacher`)."""
    from .models.teachers import load_teacher

    if cfg.question == "pretext":
        path = cfg.init_from if cfg.eval.name == "knn" else cfg.transfer.teacher[len("file:"):]
        return load_encoder(path)[0].to(device)
    return load_teacher(cfg.transfer.teacher, model_kwargs(cfg.model, data, "attention")).to(device)


def _probe(cfg: JobConfig, data, device, precision, eval_transform, sets: dict) -> dict:
    """A linear probe (probe.pt, cfg.init_from) on its frozen encoder's features, as `jobs.evaluate_encoder`
    applied it."""
    from .analysis.probes import LinearProbe, linear_probe_from_state
    from .models.checkpoint import read_checkpoint

    state = read_checkpoint(cfg.init_from, "linear probe",
                            "is missing; run its job first (the pretext linear_probe evaluation, or the transfer "
                            "job of the linear_probe method)", "delete it and re-run the job that writes it")
    encoder = _frozen_encoder(cfg, data, device)
    if state["kind"] == "reference":  # MAE's BatchNorm + linear head, evaluated through the encoder
        probe = LinearProbe(encoder, data.num_classes).to(device)
        probe.head.load_state_dict(state["head"])
        probe.eval()
        return evaluate_splits(probe, data, cfg.train.eval_batch_size, precision, eval_transform, sets)
    feats = frozen_features(encoder, {"test": data.test, **{f"shift_{n}": s for n, s in sets.items()}}, cfg,
                            device, eval_transform)
    return frozen_top1(feats, cfg, data.num_classes, linear_probe_from_state(state))


def _knn(cfg: JobConfig, data, device, eval_transform, sets: dict) -> dict:
    """k-NN on the frozen encoder (cfg.init_from): each test and shifted image among the training split's
    features, as `jobs.evaluate_encoder` classified them (cfg.eval.knn_k, knn_temperature)."""
    encoder = _frozen_encoder(cfg, data, device)
    feats = frozen_features(encoder, {"train": data.train, "test": data.test,
                                      **{f"shift_{n}": s for n, s in sets.items()}}, cfg, device, eval_transform)
    return frozen_top1(feats, cfg, data.num_classes, train=feats["train"])


def _classifier(cfg: JobConfig, data, device, precision, eval_transform, sets: dict) -> dict:
    """A classifier's forward (a Q1 classifier, a Q2 fine-tuned model, a Q3 student or ensemble) on test and the
    shifted sets."""
    from .methods import TRANSFER_METHODS
    from .models.teachers import load_teacher
    from .objectives import AttentionCopy, parse_layers

    t = cfg.transfer
    if cfg.question == "transfer" and t.method == "ensemble":
        members = [load_encoder(p)[0].eval().to(device) for p in t.ensemble_members]
        forward = ensemble_forward(members)  # as the ensemble job averages them
        params_m = sum(count_params(m) for m in members) / 1e6
    else:
        model, kw, _ = load_encoder(cfg.init_from)
        model = model.to(device)
        params_m = count_params(model) / 1e6
        forward = model
        mode = TRANSFER_METHODS.entry(t.method).meta.get("copy_mode") if cfg.question == "transfer" else None
        if mode is not None:  # a copy method (registry meta copy_mode): the teacher's attention at test time too
            teacher = load_teacher(t.teacher, kw)
            forward = AttentionCopy(teacher, model, parse_layers(t.layers, len(model.blocks)), mode=mode).to(device)
        forward.eval()
        if cfg.execution.compile:
            forward = torch.compile(forward)
    return evaluate_splits(forward, data, cfg.train.eval_batch_size, precision, eval_transform, sets) | {
        "params_m": params_m}


def _tags(cfg: JobConfig) -> dict:
    """The record's fields naming the tested job beyond `base_record` (which names the mixer)."""
    if cfg.question == "transfer":
        t = cfg.transfer
        return {"method": t.method, "teacher": t.teacher_name or "none", "layers": t.layers}
    if cfg.question == "pretext":
        return {"eval": cfg.eval.name, "pretext": pretext_id(cfg)}
    return {}


def evaluate_shift(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    t0 = time.perf_counter()
    device, precision = setup(cfg)
    data = load_data(cfg, device)
    _, eval_transform = make_transforms(cfg, data, device)
    sets = shifted_sets(cfg, data)
    record = base_record(cfg) | _tags(cfg) | {"device": str(device), "history": [], "shift_sets": sorted(sets)}
    probe = (cfg.question == "transfer" and cfg.transfer.method == "linear_probe"
             or cfg.question == "pretext" and cfg.eval.name == "linear_probe")
    if probe:
        out = _probe(cfg, data, device, precision, eval_transform, sets)
    elif cfg.question == "pretext" and cfg.eval.name == "knn":
        out = _knn(cfg, data, device, eval_transform, sets)
    else:
        out = _classifier(cfg, data, device, precision, eval_transform, sets)
    return record | out | {"wall_s": time.perf_counter() - t0}
