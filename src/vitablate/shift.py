"""The shift job: a trained transfer student tested under distribution shift.

Its transfer job saved the model (model.pt; a linear probe's probe.pt; an ensemble, its
members' model.pt); this job rebuilds what that job evaluated (the student; a copy method's
student with its teacher's attention; the probe on the teacher's frozen features; the members'
averaged probabilities) and reports top-1 on the clean test split and, as top1_shift_<name>,
on every shifted set (`jobs.shifted_sets`: the dataset's own and extra_test_dirs sets, the
transfer.shift corruptions at their severity), computed as the transfer job computed them
before this job existed, so the numbers are the same.
"""

from __future__ import annotations

import time

import torch

from .config import JobConfig
from .engine import predict, top1
from .jobs import (
    ensemble_forward,
    OnEpoch,
    base_record,
    load_data,
    load_encoder,
    make_transforms,
    model_kwargs,
    setup,
    sharded_predict,
    shifted_sets,
)
from .models import count_params


def _probe(cfg: JobConfig, data, device, precision, eval_transform, sets: dict) -> dict:
    """A transfer linear probe (probe.pt) on its teacher's frozen features, as `jobs.evaluate_encoder` applied it."""
    from .analysis.probes import LinearProbe, extract, linear_probe_from_state
    from .models.teachers import load_teacher

    from .models.checkpoint import read_checkpoint

    state = read_checkpoint(cfg.init_from, "linear probe", "is missing; run its transfer job first",
                            "delete it and re-run its transfer job")
    encoder = load_teacher(cfg.transfer.teacher, model_kwargs(cfg.model, data, "attention")).to(device)
    bs = cfg.train.eval_batch_size
    splits = {"test": data.test, **{f"shift_{n}": s for n, s in sets.items()}}
    if state["kind"] == "reference":  # MAE's BatchNorm + linear head, evaluated through the encoder
        probe = LinearProbe(encoder, data.num_classes).to(device)
        probe.head.load_state_dict(state["head"])
        probe.eval()
        return {f"top1_{n}": top1(*predict(probe, s.batches(bs), precision, eval_transform)) for n, s in splits.items()}
    encoder.eval()
    head = linear_probe_from_state(state)
    out = {}
    for name, split in splits.items():
        x, y = extract(encoder, split.batches(bs), device, eval_transform)
        out[f"top1_{name}"] = top1(head(x), y)
    return out


def evaluate_shift(cfg: JobConfig, on_epoch: OnEpoch = None) -> dict:
    from .methods import TRANSFER_METHODS
    from .models.teachers import load_teacher
    from .objectives import AttentionCopy, parse_layers

    t0 = time.perf_counter()
    t = cfg.transfer
    device, precision = setup(cfg)
    data = load_data(cfg, device)
    _, eval_transform = make_transforms(cfg, data, device)
    sets = shifted_sets(cfg, data)
    tags = {"method": t.method, "teacher": t.teacher_name or "none", "layers": t.layers}
    record = base_record(cfg) | tags | {"device": str(device), "history": [], "shift_sets": sorted(sets)}
    if t.method == "linear_probe":
        return record | _probe(cfg, data, device, precision, eval_transform, sets) | {
            "wall_s": time.perf_counter() - t0}
    if t.method == "ensemble":
        members = [load_encoder(p)[0].eval().to(device) for p in t.ensemble_members]
        forward = ensemble_forward(members)  # as the ensemble job averages them

        params_m = sum(count_params(m) for m in members) / 1e6
        batches = lambda split: predict(forward, split.batches(cfg.train.eval_batch_size), precision, eval_transform)  # noqa: E731
    else:
        model, kw, _ = load_encoder(cfg.init_from)
        model = model.to(device)
        params_m = count_params(model) / 1e6
        forward = model
        mode = TRANSFER_METHODS.entry(t.method).meta.get("copy_mode")  # a copy method: registry meta copy_mode
        if mode is not None:  # the teacher's attention at test time too
            teacher = load_teacher(t.teacher, kw)
            forward = AttentionCopy(teacher, model, parse_layers(t.layers, len(model.blocks)), mode=mode).to(device)
        forward.eval()
        if cfg.execution.compile:
            forward = torch.compile(forward)
        batches = lambda split: sharded_predict(forward, split, cfg.train.eval_batch_size, precision,  # noqa: E731
                                                eval_transform)
    out = {"top1_test": top1(*batches(data.test))}
    out |= {f"top1_shift_{name}": top1(*batches(split)) for name, split in sets.items()}
    return record | out | {"params_m": params_m, "wall_s": time.perf_counter() - t0}
