"""Recipe optimisation (issue 12): layer-wise lr decay, base-lr scaling, step schedule and warm-up start rate,
LARS, and the warning when gradient accumulation changes the objective.

Every expectation is computed here from the reference's formula, not by calling the code under test.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from vitablate import jobs
from vitablate import workflow as vw
from vitablate.config import ConfigError, JobConfig, PretextConfig, TrainConfig
from vitablate.engine import LARS, Checkpoint, classification_loss, fit, no_weight_decay_names, param_groups, \
    pick_precision, schedule
from vitablate.models import create_model
from vitablate.objectives import build_pretext
from vitablate.objectives.transfer import AttentionCopy, AttentionDistillation

DEPTH = 3


def tiny_vit(num_classes=2, **kw):
    return create_model(mixer="attention", img_size=8, patch_size=2, embed_dim=16, depth=DEPTH, num_heads=2,
                        num_classes=num_classes, in_chans=1, **kw)


def maes_layer_id(name: str, prefix: str = "") -> int:
    """MAE util/lr_decay.py get_layer_id_for_vit, on the encoder's names under `prefix`."""
    if not name.startswith(prefix):
        return DEPTH + 1
    name = name[len(prefix):]
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return DEPTH + 1


def old_lr(step, total, warmup, lr, min_lr):
    """The schedule before issue 12 (linear warm-up from 0, cosine), as it was written."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return x, (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()


def record_steps(monkeypatch, opt_cls):
    """Each optimiser step's groups: [(lr, weight_decay, [param ids]), ...] as the optimiser used them."""
    seen = []
    original = opt_cls.step

    def step(self, *args, **kwargs):
        seen.append([(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(opt_cls, "step", step)
    return seen


def run_fit(tmp_path, model, cfg, name="ck.pt", steps_per_epoch=3):
    x, y = _data(16 * steps_per_epoch)
    bs = cfg.batch_size
    batches = lambda epoch: [(x[i:i + bs], y[i:i + bs]) for i in range(0, bs * steps_per_epoch, bs)]
    return fit(model, classification_loss(model, 0.0), batches, steps_per_epoch, cfg,
               pick_precision(torch.device("cpu"), "fp32"), Checkpoint(str(tmp_path / name)), 0)


# --- layer-wise lr decay ------------------------------------------------------------------------------

def test_layer_decay_scales_each_group_at_every_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_vit()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=2e-3, min_lr=1e-5, warmup_epochs=1, warmup_lr=1e-4,
                      layer_decay=0.6, weight_decay=0.05)
    seen = record_steps(monkeypatch, torch.optim.AdamW)
    result = run_fit(tmp_path, model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    total, warmup = 9, 3
    assert len(seen) == total
    for step, groups in enumerate(seen):
        sched = (1e-4 + (2e-3 - 1e-4) * (step + 1) / warmup if step < warmup
                 else 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))
        for lr, wd, ids in groups:
            layer = {maes_layer_id(names[i]) for i in ids}
            assert len(layer) == 1, layer  # a group never mixes layers
            assert lr == pytest.approx(sched * 0.6 ** (DEPTH + 1 - layer.pop()), rel=1e-12)
    # every layer 0 .. depth + 1 trains, the head at the full rate, the patch embedding at 0.6^(depth + 1)
    assert {maes_layer_id(names[i]) for _, _, ids in seen[0] for i in ids} == set(range(DEPTH + 2))
    assert {names[i] for lr, _, ids in seen[-1] for i in ids if lr == max(g[0] for g in seen[-1])} >= {"head.weight"}
    # the history's lr is the schedule's (the top layer's)
    assert result.history[-1]["lr"] == pytest.approx(
        1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))))


def test_layer_decay_keeps_the_weight_decay_rules():
    model = tiny_vit()
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    skip = {"cls_token", "pos_embed"}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 or n in skip else 0.05), n
    every = param_groups(model, 0.05, decay_all=True, layer_decay=0.5)  # MoCo v3's rule: every parameter decays
    assert {g["weight_decay"] for g in every} == {0.05}
    assert sum(len(g["params"]) for g in every) == len(list(model.parameters()))


def test_layer_decay_in_attention_transfer_comes_from_the_student():
    for wrapper in (AttentionCopy(tiny_vit(), tiny_vit(num_classes=3), [0]),
                    AttentionDistillation(tiny_vit(), tiny_vit(num_classes=3), [0, 1])):
        groups = param_groups(wrapper, 0.05, layer_decay=0.5)
        names = {id(p): n for n, p in wrapper.named_parameters()}
        trained = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
        assert not [n for n in trained if n.startswith("teacher.")]  # the frozen teacher has no group
        assert trained == {n: 0.5 ** (DEPTH + 1 - maes_layer_id(n, "student.")) for n in trained}
        assert trained["student.blocks.0.attn.proj.weight"] == 0.5 ** DEPTH
        assert trained["student.head.weight"] == 1.0


@pytest.mark.parametrize("pretext", ["moco", "mae", "simmim", "hybrid"])
def test_layer_decay_in_pretext_objectives_comes_from_the_encoder(pretext):
    encoder = tiny_vit(num_classes=0)
    kw = {"moco": dict(dim=8, mlp_dim=16), "mae": dict(decoder_dim=8, decoder_depth=1)}.get(pretext, {})
    objective = build_pretext(pretext, encoder, (0.5,), (0.5,), **kw)
    groups = param_groups(objective, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in objective.named_parameters()}
    trained = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    prefix = next(n for n, m in objective.named_modules() if m is encoder) + "."
    assert set(trained) == {n for n, p in objective.named_parameters() if p.requires_grad}
    assert trained == {n: 0.5 ** (DEPTH + 1 - maes_layer_id(n, prefix)) for n in trained}
    heads = [n for n in trained if not n.startswith(prefix)]  # projector, predictor, decoder, mask token
    assert heads and all(trained[n] == 1.0 for n in heads)


def test_layer_decay_without_a_training_encoder_says_so():
    from vitablate.analysis.probes import LinearProbe

    with pytest.raises(ValueError, match="train.layer_decay.*set train.layer_decay: null"):
        param_groups(LinearProbe(tiny_vit(num_classes=0), 3), 0.0, layer_decay=0.65)


def test_without_layer_decay_the_groups_and_rates_are_todays(tmp_path, monkeypatch):
    model = tiny_vit()
    skip = no_weight_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters()]
    want = [[p for n, p in named if p.ndim <= 1 or n.endswith(".bias") or n in skip],
            [p for n, p in named if not (p.ndim <= 1 or n.endswith(".bias") or n in skip)]]
    groups = param_groups(model, 0.05)
    assert [sorted(g) for g in groups] == [["params", "weight_decay"]] * 2  # no lr_scale
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in w] for w in want]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    seen = record_steps(monkeypatch, torch.optim.AdamW)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-3, min_lr=1e-5, warmup_epochs=1)
    result = run_fit(tmp_path, model, cfg)
    for step, step_groups in enumerate(seen):  # bit for bit the rate of the old formula
        assert [lr for lr, _, _ in step_groups] == [old_lr(step, 9, 3, 3e-3, 1e-5)] * 2
    assert [h["lr"] for h in result.history] == [old_lr(s, 9, 3, 3e-3, 1e-5) for s in (2, 5, 8)]


# --- schedules ------------------------------------------------------------------------------------------

def test_step_schedule_and_warmup_start_rate(tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=8, batch_size=16, lr=1e-3, warmup_epochs=2, warmup_lr=5e-7, lr_schedule="step",
                      lr_step_epochs=[5, 7], lr_step_gamma=0.1)
    spe = 3
    lr_of = schedule(cfg, spe)
    for step in range(8 * spe):
        if step < 6:  # timm / SimMIM: warmup_lr_init + t (lr - warmup_lr_init) / warmup_t, counting step + 1
            want = 5e-7 + (step + 1) * (1e-3 - 5e-7) / 6
        else:  # SimMIM MultiStepLRScheduler: lr x gamma^bisect_right(milestones, t), milestones at epoch x steps
            want = 1e-3 * 0.1 ** ((step >= 15) + (step >= 21))
        assert lr_of(step) == pytest.approx(want, rel=1e-12), step
    assert lr_of(14) == pytest.approx(1e-3) and lr_of(15) == pytest.approx(1e-4) and lr_of(21) == pytest.approx(1e-5)
    # the loop uses it
    seen = record_steps(monkeypatch, torch.optim.AdamW)
    run_fit(tmp_path, tiny_vit(), cfg, steps_per_epoch=spe)
    assert [groups[0][0] for groups in seen] == pytest.approx([lr_of(s) for s in range(8 * spe)], rel=1e-12)
    # cosine starts from warmup_lr too
    cos = schedule(TrainConfig(epochs=4, lr=1e-3, min_lr=1e-5, warmup_epochs=1, warmup_lr=1e-6), 10)
    assert cos(0) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 10) and cos(9) == pytest.approx(1e-3)
    assert cos(40) == pytest.approx(1e-5)


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="lr_step_epochs is empty"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ConfigError, match="only applies to lr_schedule: step"):
        TrainConfig(lr_step_epochs=[5])
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="train.layer_decay must be in"):
        TrainConfig(layer_decay=1.5)


# --- base learning rate ---------------------------------------------------------------------------------

def test_blr_gives_lr_by_the_linear_scaling_rule():
    assert TrainConfig(blr=5e-4, batch_size=1024).lr == pytest.approx(5e-4 * 1024 / 256)  # MAE fine-tuning
    assert TrainConfig(blr=5e-4, batch_size=1024, lr_batch_ref=512).lr == pytest.approx(1e-3)  # DeiT
    assert TrainConfig(lr=0.1, batch_size=64).lr == 0.1  # no blr: lr as given
    assert TrainConfig(lr=0.1, blr=1e-3, batch_size=512).lr == pytest.approx(2e-3)  # blr wins
    cfg = TrainConfig(blr=1e-3, batch_size=512)
    assert dataclasses.replace(cfg, batch_size=256).lr == pytest.approx(1e-3)  # follows the batch


def test_blr_is_resolved_in_the_job_config_and_one_layer_cannot_set_both():
    config = {"architecture": {"datasets": ["digits"], "mixers": ["attention"], "seeds": [0],
                               "train": {"blr": 1e-3, "batch_size": 64, "lr_batch_ref": 256}}}
    job = vw.architecture_job(config, "digits", "attention", 0)
    assert job.train.lr == pytest.approx(2.5e-4) and job.train.blr == 1e-3
    config["datasets"] = {"digits": {"train": {"batch_size": 128}}}  # a dataset's batch: lr follows it
    assert vw.architecture_job(config, "digits", "attention", 0).train.lr == pytest.approx(5e-4)
    config["architecture"]["train"]["lr"] = 0.1
    with pytest.raises(ConfigError, match="sets both train.lr 0.1 and train.blr"):
        vw.architecture_job(config, "digits", "attention", 0)


# --- LARS ---------------------------------------------------------------------------------------------

def test_lars_matches_an_independent_computation_of_maes_update():
    torch.manual_seed(0)
    w, b, z = torch.randn(4, 3), torch.randn(4), torch.zeros(2, 2)
    params = [torch.nn.Parameter(t.clone()) for t in (w, b, z)]
    opt = LARS(params, lr=0.3, weight_decay=0.05, momentum=0.9, trust_coefficient=0.001)
    grads = [[torch.randn_like(t) for t in (w, b, z)] for _ in range(2)]
    ref = [t.clone().double() for t in (w, b, z)]
    mu = [torch.zeros_like(t) for t in ref]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step_grads):  # util/lars.py: wd and trust ratio only where ndim > 1
            d = g.double()
            if ref[i].ndim > 1:
                d = d + 0.05 * ref[i]
                pn, dn = ref[i].norm().item(), d.norm().item()
                d = d * (0.001 * pn / dn if pn > 0 and dn > 0 else 1.0)
            mu[i] = 0.9 * mu[i] + d
            ref[i] = ref[i] - 0.3 * mu[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-7)
    assert not torch.equal(params[2].detach(), z)  # a zero weight takes the plain step (ratio 1)


# --- gradient accumulation that changes the objective ----------------------------------------------------

def _job(tmp_path, name, **kw):
    return JobConfig(output_dir=str(tmp_path / name), model=dataclasses.replace(JobConfig().model, variant="vit_digits"),
                     **kw)


@pytest.mark.slow  # runs whole jobs (data, model, training, checkpoint)
def test_accumulation_warning_in_the_record_for_moco_not_for_supervised(tmp_path, caplog):
    train = TrainConfig(epochs=1, batch_size=128, accum_steps=2, eval_batch_size=256)
    moco = _job(tmp_path, "moco", job="pretrain", train=train,
                pretext=PretextConfig(name="moco", moco_dim=16, moco_mlp_dim=32))
    with caplog.at_level(logging.WARNING, logger="vitablate"):
        record = jobs.pretrain(moco)
    assert record["accum_changes_objective"] is True
    reason = record["accum_changes_objective_reason"]
    assert "negatives come from each micro-batch of 64 images" in reason and "BatchNorm" in reason
    assert any("accum_steps 2 changes the objective" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitablate"):
        plain = jobs.train_classifier(_job(tmp_path, "sup", train=train))
    assert plain["accum_changes_objective"] is False and "accum_changes_objective_reason" not in plain
    assert not any("changes the objective" in r.getMessage() for r in caplog.records)
    one = jobs.pretrain(dataclasses.replace(moco, output_dir=str(tmp_path / "moco1"),
                                            train=dataclasses.replace(train, accum_steps=1)))
    assert one["accum_changes_objective"] is False  # one micro-batch: the reference's update
