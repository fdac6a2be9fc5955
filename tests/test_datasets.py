"""Datasets on bundled data and on tiny stand-ins written in the real on-disk formats;
batched augmentation and corruptions."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vitablate.data import CORRUPTIONS, BatchAugment, corrupt, load_dataset


def _rows(split):
    return {tuple(r) for r in split.x.flatten(1).mul(255).round().to(torch.int16).tolist()}


def test_digits_fixed_stratified_splits():
    a, b = load_dataset("digits"), load_dataset("digits", seed=7)
    assert (a.num_classes, a.in_chans, a.img_size) == (10, 1, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)  # the run seed never moves the split
        assert sa.x.min() >= 0 and sa.x.max() <= 1 and sa.x.dtype == torch.float32
        counts = torch.bincount(sa.y, minlength=10).float()
        assert counts.min() / counts.max() > 0.8  # stratified
    # disjoint splits (the raw data repeats no image across them)
    assert not (_rows(a.train) & _rows(a.test)) and not (_rows(a.train) & _rows(a.val))


def test_shapes_labels_and_cue_conflict():
    s = load_dataset("shapes")
    t = load_dataset("shapes", label_by="texture")
    assert torch.equal(s.train.x, t.train.x) and torch.equal(s.train.y, s.train.extra["y_shape"])
    assert torch.equal(t.train.y, t.train.extra["y_texture"])
    cc = s.extra_tests["cue_conflict"]
    assert (cc.extra["y_shape"] != cc.extra["y_texture"]).all()
    assert torch.bincount(s.train.y, minlength=4).min() > 300
    with pytest.raises(ValueError, match="label_by"):
        load_dataset("shapes", label_by="colour")


def _write_cifar10(root, n_per_batch=20):
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for fname, _ in CIFAR10.train_list + CIFAR10.test_list:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(n_per_batch)]}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / CIFAR10.meta["filename"], "wb") as f:
        pickle.dump({CIFAR10.meta["key"]: [f"class{i}" for i in range(10)]}, f)


def test_cifar10_reads_torchvisions_layout(tmp_path):
    _write_cifar10(tmp_path)
    b = load_dataset("cifar10", root=str(tmp_path), verify_md5=False)
    assert (b.num_classes, b.in_chans, b.img_size) == (10, 3, 32)
    assert len(b.train) + len(b.val) == 5 * 20 and len(b.test) == 20
    assert b.train.x.shape[1:] == (3, 32, 32)
    with pytest.raises(ValueError, match="md5"):  # a stand-in is not the real download
        load_dataset("cifar10", root=str(tmp_path))


def test_missing_cifar_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_dataset("cifar100", root=str(tmp_path))


def _write_folder(root, classes, n=3, size=12):
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            arr = (np.random.default_rng(i).random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


def test_imagefolder_and_extra_test_dirs(tmp_path):
    _write_folder(tmp_path / "train", ["cat", "dog"], n=6)
    _write_folder(tmp_path / "val", ["cat", "dog"], n=2)
    _write_folder(tmp_path / "shifted", ["dog"], n=2)
    b = load_dataset("imagefolder", root=str(tmp_path), img_size=8, extra_test_dirs={"sketch": str(tmp_path / "shifted")})
    assert b.class_names == ["cat", "dog"] and b.num_classes == 2
    x, y = next(iter(b.test.batches(4)))
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) <= {0, 1}
    xs, ys = next(iter(b.extra_tests["sketch"].batches(4)))
    assert ys.tolist() == [1, 1]  # mapped by class name
    _write_folder(tmp_path / "bad", ["wolf"], n=1)
    with pytest.raises(ValueError, match="wolf"):
        load_dataset("imagefolder", root=str(tmp_path), img_size=8, extra_test_dirs={"x": str(tmp_path / "bad")})
    with pytest.raises(FileNotFoundError):
        load_dataset("imagefolder", root=str(tmp_path / "nowhere"), img_size=8)


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("mnist")


def test_batch_augment_per_image_and_repeatable():
    x = torch.rand(1, 3, 16, 16).expand(8, -1, -1, -1).contiguous()
    aug = BatchAugment(crop_scale=(0.3, 1.0), flip=True, color_jitter=0.4, grayscale_p=0.2, blur_p=0.5,
                       solarize_p=0.2)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert len({tuple(v.flatten().tolist()) for v in a}) == 8  # identical inputs, different views
    flip = BatchAugment(crop_scale=None, flip=True, color_jitter=0, grayscale_p=0)
    out = flip(x, torch.Generator().manual_seed(1))
    for o in out:
        assert torch.equal(o, x[0]) or torch.equal(o, x[0].flip(-1))
    shift = BatchAugment(crop_scale=None, flip=False, color_jitter=0, grayscale_p=0, pad_crop=2)
    one = BatchAugment(crop_scale=None, flip=False, color_jitter=0, grayscale_p=0)(x[:1], None)
    assert torch.equal(one, x[:1])  # no-op config is exact
    assert shift(torch.rand(4, 1, 8, 8)).shape == (4, 1, 8, 8)  # one channel works


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_monotone_and_deterministic(name):
    x = load_dataset("shapes").test.x[:64]
    diffs = [(corrupt(x, name, s) - x).abs().mean().item() for s in range(1, 6)]
    assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs
    assert torch.equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=1))
    out = corrupt(x, name, 5)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_corruption_errors():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="1..5"):
        corrupt(x, "contrast", 6)
