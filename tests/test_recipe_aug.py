"""DeiT's / MAE fine-tuning's regularisers (issue 12): Mixup/CutMix with soft targets, random erasing on the device,
RandAugment in the image-folder loader (refused for in-memory data), repeated augmentation, model EMA, and a
resumed run with them on staying bit-identical to an uninterrupted one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vitablate import jobs
from vitablate.config import AugmentConfig, ConfigError, JobConfig, ModelConfig, TrainConfig, check_recipe
from vitablate.data import ImageFolderStream, load_dataset
from vitablate.data.datasets import Split, batch_plan
from vitablate.engine import epoch_seed, seed_everything


def _cfg(tmp_path, name="job", **train) -> JobConfig:
    return JobConfig(output_dir=str(tmp_path / name), model=ModelConfig(variant="vit_digits"),
                     train=TrainConfig(**{"epochs": 2, "batch_size": 64, **train}))


def _smooth(y: torch.Tensor, k: int, s: float) -> torch.Tensor:
    """Label-smoothed one-hot rows, written out: 1 - s + s/k on the label, s/k elsewhere."""
    out = torch.full((len(y), k), s / k)
    out[torch.arange(len(y)), y] = 1 - s + s / k
    return out


# --------------------------------------------------------------------------- Mixup / CutMix


def test_mixup_matches_an_independent_computation_and_targets_sum_to_one():
    cfg = dataclasses.replace(JobConfig(), train=TrainConfig(batch_size=8, mixup_alpha=0.8, label_smoothing=0.1))
    mixup = jobs.build_mixup(cfg, num_classes=5)
    x = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for seed in range(5):
        np.random.seed(seed)
        xm, target = mixup(x.clone(), y)
        # the draws timm's Mixup documents: one uniform (mix_prob), then lam ~ Beta(0.8, 0.8)
        rng = np.random.RandomState(seed)
        rng.rand()
        lam = float(rng.beta(0.8, 0.8))
        torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
        expected = lam * _smooth(y, 5, 0.1) + (1 - lam) * _smooth(y.flip(0), 5, 0.1)
        torch.testing.assert_close(target, expected)
        torch.testing.assert_close(target.sum(1), torch.ones(8))


def test_cutmix_pastes_one_box_of_the_reversed_batch_and_weights_targets_by_area():
    cfg = dataclasses.replace(JobConfig(), train=TrainConfig(batch_size=6, cutmix_alpha=1.0, label_smoothing=0.0))
    mixup = jobs.build_mixup(cfg, num_classes=6)
    x = torch.rand(6, 1, 10, 10, generator=torch.Generator().manual_seed(2))
    y = torch.arange(6)
    seen_box = False
    for seed in range(8):
        np.random.seed(seed)
        xm, target = mixup(x.clone(), y)
        changed = (xm != x).any(0).any(0)  # (H, W): pixels taken from the reversed batch
        assert torch.equal(xm[:, :, changed], x.flip(0)[:, :, changed])
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        if len(rows):  # one rectangle: every pixel of its bounding box changed
            seen_box = True
            box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()
        lam = 1 - changed.float().mean().item()  # the kept area fraction
        torch.testing.assert_close(target[torch.arange(6), y], torch.full((6,), lam))
        torch.testing.assert_close(target.sum(1), torch.ones(6))
    assert seen_box


def test_odd_micro_batches_are_refused_for_mixup():
    with pytest.raises(ConfigError, match="even"):
        check_recipe(TrainConfig(batch_size=63, mixup_alpha=0.8), "digits")
    with pytest.raises(ConfigError, match="even"):
        jobs.build_mixup(dataclasses.replace(JobConfig(), train=TrainConfig(batch_size=6, accum_steps=2,
                                                                            cutmix_alpha=1.0)), 10)


# --------------------------------------------------------------------------- random erasing


def test_random_erasing_on_device_is_seeded_per_epoch(tmp_path):
    cfg = _cfg(tmp_path, augment=AugmentConfig(random_erasing=1.0))
    data = load_dataset("digits")
    train_transform, eval_transform = jobs.make_transforms(cfg, data, torch.device("cpu"))
    x = data.train.x[:32]

    def run(epoch):
        seed_everything(epoch_seed(0, epoch))  # what engine.fit does at the start of each epoch
        return train_transform(x.clone(), torch.Generator().manual_seed(epoch_seed(0, epoch)))

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    clean = eval_transform(x.clone())
    erased = (a != clean).flatten(1).any(1)
    assert erased.float().mean() > 0.5  # probability 1: (nearly) every image has a box of noise
    # off by default: the transform is exactly the normalisation
    plain, _ = jobs.make_transforms(_cfg(tmp_path), data, torch.device("cpu"))
    assert torch.equal(plain(x.clone(), torch.Generator()), clean)


# --------------------------------------------------------------------------- RandAugment


def _folder(root, n_per_class=4, size=(40, 32)):
    rng = np.random.default_rng(0)
    for sub in ("train", "val"):
        for c in ("a", "b"):
            (root / sub / c).mkdir(parents=True)
            for i in range(n_per_class):
                img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(img).save(root / sub / c / f"{i}.png")
    return root


def test_rand_augment_runs_in_the_loader_workers_and_is_seeded(tmp_path):
    root = _folder(tmp_path / "imgs")

    def epoch(rand_augment, workers, seed=0):
        stream = ImageFolderStream(root / "train", 16, mode="train", crop_scale=(0.5, 1.0), flip=True,
                                   num_workers=workers, rand_augment=rand_augment)
        x, _ = next(iter(stream.batches(8, shuffle=True, generator=torch.Generator().manual_seed(seed))))
        return x

    plain = epoch(None, 0)
    augmented = epoch("rand-m9-mstd0.5-inc1", 1)  # decoded in a loader worker process
    assert augmented.shape == plain.shape and augmented.dtype == torch.uint8
    # the same crops (seeds), then RandAugment's two ops: most images change
    assert (augmented != plain).flatten(1).any(1).float().mean() >= 0.5
    assert torch.equal(epoch("rand-m9-mstd0.5-inc1", 0), augmented)  # seeded per image, whatever the workers
    assert not torch.equal(epoch("rand-m9-mstd0.5-inc1", 0, seed=1), augmented)


@pytest.mark.slow  # runs whole jobs (data, model, training, checkpoint)
def test_rand_augment_reaches_the_loader_of_an_imagefolder_job(tmp_path):
    root = _folder(tmp_path / "imgs")
    cfg = JobConfig(data=dataclasses.replace(JobConfig().data, name="imagefolder", root=str(root)),
                    model=ModelConfig(img_size=16),
                    train=TrainConfig(batch_size=4, augment=AugmentConfig(crop_scale=[0.5, 1.0],
                                                                          rand_augment="rand-m9-mstd0.5-inc1")))
    check_recipe(cfg.train, cfg.data.name)
    data = jobs.load_data(cfg, torch.device("cpu"), train_crop=True)
    assert data.train.rand_augment is not None and data.val.rand_augment is None and data.test.rand_augment is None


def test_rand_augment_on_in_memory_data_is_refused_naming_the_key(tmp_path):
    train = TrainConfig(augment=AugmentConfig(rand_augment="rand-m9-mstd0.5-inc1"))
    with pytest.raises(ConfigError, match=r"architecture\.train\.augment\.rand_augment"):
        check_recipe(train, "cifar10", "architecture.train")
    # the workflow's config resolution refuses it before any job starts
    from pathlib import Path

    import yaml

    from vitablate.workflow import architecture_job

    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    config["architecture"]["train"]["augment"] = {"rand_augment": "rand-m9-mstd0.5-inc1"}
    with pytest.raises(ConfigError, match="rand_augment"):
        architecture_job(config, "digits", "attention", 0)
    # and so does the job itself
    cfg = dataclasses.replace(_cfg(tmp_path), train=train)
    with pytest.raises(ConfigError, match="rand_augment"):
        jobs.run(cfg)
    with pytest.raises(ConfigError, match="not a timm RandAugment"):
        check_recipe(TrainConfig(augment=AugmentConfig(rand_augment="rand-q9", crop_scale=[0.08, 1.0])),
                     "imagefolder")


# --------------------------------------------------------------------------- repeated augmentation


def test_repeated_augmentation_shows_each_image_three_times_with_different_crops():
    n = 48
    split = Split(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(n))
    for epoch in range(2):
        gen = torch.Generator().manual_seed(epoch)
        batches = list(split.batches(12, shuffle=True, generator=gen, drop_last=True, repeats=3))
        ys = torch.cat([y for _, y in batches])
        assert len(ys) == n  # the epoch keeps its length ...
        counts = torch.bincount(ys, minlength=n)
        assert set(counts.tolist()) <= {0, 3} and (counts == 3).sum() == n // 3  # ... with a third of the images
        # the copies sit in the same batch; the batched augmentation draws each its own crop
        from vitablate.data import BatchAugment

        x, y = batches[0]
        out = BatchAugment(crop_scale=(0.3, 1.0), flip=False, color_jitter=0.0, grayscale_p=0.0)(
            x, generator=torch.Generator().manual_seed(epoch))
        for label in y.unique():
            copies = out[y == label]
            assert len(copies) == 3
            assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    # repeats 1 draws the plan it always drew
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(batch_plan(n, 12, True, g1, True),
                                                  batch_plan(n, 12, True, g2, True, repeats=1)))


def test_repeated_copies_go_to_different_workers_as_deits_rasampler():
    n, world = 60, 3
    parts = [list(batch_plan(n, 12, True, torch.Generator().manual_seed(0), True, shard=(r, world), repeats=3))
             for r in range(world)]
    for step in range(n // 12):
        per_rank = [parts[r][step] % n for r in range(world)]
        for r in range(world):
            assert len(per_rank[r].unique()) == len(per_rank[r])  # no image twice on one worker
        whole = torch.cat(per_rank)
        assert set(torch.bincount(whole, minlength=n).tolist()) <= {0, 3}


def test_repeated_copies_of_an_image_folder_get_their_own_crops(tmp_path):
    root = _folder(tmp_path / "imgs", n_per_class=6)
    stream = ImageFolderStream(root / "train", 16, mode="train", crop_scale=(0.2, 0.5), flip=False)
    x, y = next(iter(stream.batches(12, shuffle=True, generator=torch.Generator().manual_seed(0), repeats=3)))
    idx = next(iter(batch_plan(len(stream), 12, True, torch.Generator().manual_seed(0), repeats=3))) % len(stream)
    assert torch.bincount(idx).max() == 3
    for i in idx.unique():
        copies = x[idx == i]
        assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[0], copies[2])


# --------------------------------------------------------------------------- EMA, and a resume with everything on


@pytest.mark.slow  # runs whole jobs (data, model, training, checkpoint)
def test_ema_weights_are_the_ones_evaluated_and_saved(tmp_path):
    cfg = _cfg(tmp_path, ema=True, ema_decay=0.9)
    record = jobs.run(cfg)
    assert record["evaluated_weights"] == "ema"
    saved = torch.load(tmp_path / "job" / "model.pt", weights_only=False)
    ck = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)["modules"]
    ema = {k[len("module."):]: v for k, v in ck["ema"].items()}
    for k, v in saved["model"].items():
        assert torch.equal(v, ema[k])  # model.pt keeps the EMA
        assert torch.equal(saved["online_model"][k], ck["model"][k])
    assert any(not torch.equal(v, saved["online_model"][k]) for k, v in saved["model"].items())
    # the record's test accuracy is the EMA model's: recompute it from model.pt
    from vitablate.engine import pick_precision, predict, top1

    data = load_dataset("digits")
    model, _, _ = jobs.load_encoder(str(tmp_path / "job" / "model.pt"))
    _, ev = jobs.make_transforms(cfg, data, torch.device("cpu"))
    acc = top1(*predict(model.eval(), data.test.batches(512), pick_precision(torch.device("cpu"), "auto"), ev))
    assert acc == pytest.approx(record["top1_test"])
    assert jobs.run(_cfg(tmp_path, "plain"))["evaluated_weights"] == "online"


@pytest.mark.slow  # runs whole jobs (data, model, training, checkpoint)
def test_resume_with_mixup_erasing_and_ema_is_bit_identical(tmp_path):
    class Stop(Exception):
        pass

    recipe = dict(mixup_alpha=0.8, cutmix_alpha=1.0, ema=True, ema_decay=0.9, repeated_aug=3, epochs=3,
                  augment=AugmentConfig(random_erasing=0.5, pad_crop=1))

    def stop_at_2(epoch, metrics):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        jobs.run(_cfg(tmp_path, "resumed", **recipe), on_epoch=stop_at_2)
    resumed = jobs.run(_cfg(tmp_path, "resumed", **recipe))
    assert resumed["resumed_from_epoch"] == 1
    ref = jobs.run(_cfg(tmp_path, "whole", **recipe))
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in ref["history"]]
    assert resumed["top1_test"] == ref["top1_test"]
    a = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)
    b = torch.load(tmp_path / "whole" / "model.pt", weights_only=False)
    for key in ("model", "online_model"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items())


def test_drop_rate_reaches_timms_vit():
    data = load_dataset("digits")
    kw = jobs.model_kwargs(ModelConfig(variant="vit_digits", drop_rate=0.3), data, "attention")
    from vitablate.models import create_model

    assert create_model(**kw).head_drop.p == 0.3
    assert "drop_rate" not in jobs.model_kwargs(ModelConfig(variant="vit_digits"), data, "attention")
