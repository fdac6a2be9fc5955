"""Engine: schedule, repeatable seeds, checkpoint/resume, the non-finite guard."""

import math

import pytest
import torch

from vitablate.config import TrainConfig
from vitablate.engine import Checkpoint, NonFiniteLossError, classification_loss, fit, lr_at, pick_precision
from vitablate.execution import job_log
from vitablate.models import create_model


def test_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up
    assert lr_at(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)
    assert lrs[55] == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 0.5)))


def _problem(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()  # top half brighter: learnable
    return x, y


def _train(tmp_path, epochs=4, lr=3e-3, name="ck.pt", seed=0):
    x, y = _problem()
    torch.manual_seed(seed)
    model = create_model(mixer="attention", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                         num_classes=2, in_chans=1)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=lr, warmup_epochs=1)

    def batches(epoch):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        return [(x[perm[i:i + 16]], y[perm[i:i + 16]]) for i in range(0, len(x), 16)]

    def evaluate():
        model.eval()
        with torch.no_grad():
            return {"acc": (model(x).argmax(-1) == y).float().mean().item()}

    ck = Checkpoint(str(tmp_path / name))
    prec = pick_precision(torch.device("cpu"), "auto")
    return model, fit(model, classification_loss(model, 0.1), batches, 6, cfg, prec, ck, seed, evaluate=evaluate)


def test_training_learns_and_is_repeatable(tmp_path):
    m1, r1 = _train(tmp_path, name="a.pt")
    m2, r2 = _train(tmp_path, name="b.pt")
    assert r1.history[-1]["train_loss"] < r1.history[0]["train_loss"]
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("recipe", [False, True], ids=["plain", "mixup_erasing_ema"])
def test_resume_equals_uninterrupted(tmp_path, recipe):
    """recipe: timm's Mixup/CutMix in the loss, RandomErasing as the batch transform and a ModelEmaV3 in the
    checkpoint (DeiT's regularisers): their NumPy / Python / torch draws are seeded per epoch too."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.utils import ModelEmaV3

    class Stop(Exception):
        pass

    def setup(model):  # loss_fn, and fit's extra keyword arguments
        if not recipe:
            return classification_loss(model, 0.1), {}
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=2)
        erase = RandomErasing(0.5, mode="pixel", device="cpu")
        ema = ModelEmaV3(model, decay=0.9)
        return classification_loss(model, 0.1, mixup), dict(
            transform=lambda x, gen: erase(x.clone()), extra_state={"ema": ema},
            after_step=lambda step, total: ema.update(model))

    x, y = _problem()
    ck_path = tmp_path / "part.pt"

    def interrupted():
        torch.manual_seed(0)
        model = create_model(mixer="attention", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                             num_classes=2, in_chans=1)
        return model

    # first process: dies in epoch 3, after logging its metrics, before its checkpoint (which holds epochs 1-2)
    model = interrupted()
    cfg = TrainConfig(epochs=4, batch_size=16, lr=3e-3, warmup_epochs=1)

    def batches(epoch):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        return [(x[perm[i:i + 16]], y[perm[i:i + 16]]) for i in range(0, len(x), 16)]

    def stop_at_3(epoch, metrics):
        if epoch == 3:
            raise Stop

    prec = pick_precision(torch.device("cpu"), "fp32")
    loss, extra = setup(model)
    with pytest.raises(Stop):
        fit(model, loss, batches, 6, cfg, prec, Checkpoint(str(ck_path)), 0, on_epoch=stop_at_3, **extra)
    # second process: a fresh model resumes from the checkpoint
    model2 = interrupted()
    loss2, extra2 = setup(model2)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # whatever it holds is replaced by the checkpoint
    resumed = fit(model2, loss2, batches, 6, cfg, prec, Checkpoint(str(ck_path)), 0, **extra2)
    assert resumed.resumed_from_epoch == 2
    # reference: the same run uninterrupted
    model3 = interrupted()
    loss3, extra3 = setup(model3)
    ref = fit(model3, loss3, batches, 6, cfg, prec, Checkpoint(str(tmp_path / "r.pt")), 0, **extra3)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in ref.history]
    for p, q in zip(model2.parameters(), model3.parameters()):
        assert torch.equal(p, q)
    if recipe:  # the EMA came back from the checkpoint and followed the same steps
        ema2, ema3 = extra2["extra_state"]["ema"].module, extra3["extra_state"]["ema"].module
        assert all(torch.equal(p, q) for p, q in zip(ema2.parameters(), ema3.parameters()))
        assert any(not torch.equal(p, q) for p, q in zip(ema3.parameters(), model3.parameters()))


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    _train(tmp_path, epochs=1, name="nan.pt")  # a good epoch leaves a checkpoint
    before = (tmp_path / "nan.pt").read_bytes()
    x, y = _problem()
    model = create_model(mixer="attention", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                         num_classes=2, in_chans=1)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-3, warmup_epochs=1)

    def nan_loss(xb, yb):
        return model(xb).sum() * float("nan"), {}

    with pytest.raises(NonFiniteLossError, match="Lower train.lr"):
        fit(model, nan_loss, lambda e: [(x[:16], y[:16])], 1, cfg, pick_precision(torch.device("cpu"), "auto"),
            Checkpoint(str(tmp_path / "nan.pt")), 0)
    assert (tmp_path / "nan.pt").read_bytes() == before  # the last good checkpoint is untouched


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(RuntimeError, match="delete it"):
        Checkpoint(str(path)).load()


def test_precision_choice():
    assert pick_precision(torch.device("cpu"), "auto").dtype is None
    assert pick_precision(torch.device("cuda"), "auto").dtype is torch.bfloat16
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        pick_precision(torch.device("cpu"), "fp16")


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    """A job whose settings changed (Snakemake re-runs it) must train afresh, not 'resume' a finished run."""
    x, y = _problem()
    cfg_long = TrainConfig(epochs=4, batch_size=16, lr=3e-3, warmup_epochs=1)
    cfg_short = TrainConfig(epochs=2, batch_size=16, lr=3e-3, warmup_epochs=1)
    prec = pick_precision(torch.device("cpu"), "fp32")
    ck = Checkpoint(str(tmp_path / "c.pt"))

    def model():
        torch.manual_seed(0)
        return create_model(mixer="attention", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                            num_classes=2, in_chans=1)

    def batches(epoch):
        return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]

    m = model()
    fit(m, classification_loss(m, 0.1), batches, 6, cfg_long, prec, ck, 0, meta={"config": {"train": {"epochs": 4}}})
    m2 = model()
    log_path = tmp_path / "job.log"
    with job_log(str(log_path)):  # the job's log file, as a Ray task writes it
        short = fit(m2, classification_loss(m2, 0.1), batches, 6, cfg_short, prec, ck, 0,
                    meta={"config": {"train": {"epochs": 2}, "execution": {"num_cpus": 4}}})
    assert short.resumed_from_epoch == 0 and len(short.history) == 2
    notice = [line for line in log_path.read_text().splitlines() if "belongs to a different config" in line]
    assert len(notice) == 1 and str(tmp_path / "c.pt") in notice[0] and "training from scratch" in notice[0]
    # the same config (only resources differ) does resume
    m3 = model()
    again = fit(m3, classification_loss(m3, 0.1), batches, 6, cfg_short, prec, ck, 0,
                meta={"config": {"train": {"epochs": 2}, "execution": {"num_cpus": 1}}})
    assert again.resumed_from_epoch == 2


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    """accum_steps splits each batch into micro-batches: the same updates, up to float rounding."""
    x, y = _problem()
    prec = pick_precision(torch.device("cpu"), "fp32")

    def run(accum, name):
        torch.manual_seed(0)
        model = create_model(mixer="attention", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                             num_classes=2, in_chans=1)
        cfg = TrainConfig(epochs=2, batch_size=32, accum_steps=accum, lr=3e-3, warmup_epochs=1)
        seen = []

        def loss_fn(xb, yb):
            seen.append(len(xb))
            return classification_loss(model, 0.1)(xb, yb)

        def batches(epoch):
            return [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]

        result = fit(model, loss_fn, batches, 3, cfg, prec, Checkpoint(str(tmp_path / name)), 0)
        return model, result, seen

    m1, r1, seen1 = run(1, "a.pt")
    m4, r4, seen4 = run(4, "b.pt")
    assert set(seen1) == {32} and set(seen4) == {8} and len(seen4) == 4 * len(seen1)
    for h1, h4 in zip(r1.history, r4.history):
        assert h4["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
    for p, q in zip(m1.parameters(), m4.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="accum_steps 3 .*divide train.batch_size 32"):
        fit(m1, classification_loss(m1, 0.1), lambda e: [], 1,
            TrainConfig(epochs=1, batch_size=32, accum_steps=3), prec, Checkpoint(str(tmp_path / "c.pt")), 0)
