"""Tests for vitablate.data: datasets, batched augmentation, corruptions."""

from __future__ import annotations

import colorsys
import gzip
import os
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vitablate.data import (
    CORRUPTIONS,
    DATASETS,
    BatchAugment,
    DatasetBundle,
    FolderSplit,
    Split,
    corrupt,
    corrupt_split,
    load_dataset,
    normalize,
    two_views,
)
from vitablate.data import files as files_module
from vitablate.data.files import find_fashion_mnist

# --------------------------------------------------------------------------- helpers


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def _check_split(s: Split, C: int, S: int) -> None:
    assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64
    assert s.x.shape[1:] == (C, S, S) and s.y.shape == (len(s.x),)
    assert 0.0 <= s.x.min() and s.x.max() <= 1.0


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def shapes() -> DatasetBundle:
    return load_dataset("shapes")


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="digits") as e:
        load_dataset("mnist")
    assert all(name in str(e.value) for name in DATASETS)


def test_unknown_loader_option_is_rejected():
    with pytest.raises(ValueError, match="n_trian"):
        load_dataset("shapes", n_trian=10)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_ranges(digits):
    assert (digits.num_classes, digits.in_chans, digits.img_size) == (10, 1, 8)
    for s in (digits.train, digits.val, digits.test):
        _check_split(s, 1, 8)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert abs(len(digits.test) / 1797 - 0.2) < 0.01 and abs(len(digits.val) / 1797 - 0.2) < 0.01
    # Values are k/16: the original 0..16 intensities.
    assert torch.allclose(digits.train.x * 16, (digits.train.x * 16).round())
    assert len(digits.mean) == len(digits.std) == 1
    assert abs(digits.mean[0] - digits.train.x.mean().item()) < 1e-5


def test_digits_stratified(digits):
    fracs = [torch.bincount(s.y, minlength=10).double() / len(s) for s in (digits.train, digits.val, digits.test)]
    assert (fracs[0] - fracs[1]).abs().max() < 0.02 and (fracs[0] - fracs[2]).abs().max() < 0.02


def test_digits_splits_fixed_and_disjoint(digits):
    again = load_dataset("digits", seed=123)
    for a, b in [(digits.train, again.train), (digits.val, again.val), (digits.test, again.test)]:
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    tr, va, te = _rows(digits.train.x), _rows(digits.val.x), _rows(digits.test.x)
    assert len(tr) == len(digits.train)  # no duplicate images inside a split either
    assert not (tr & va or tr & te or va & te)


def test_fixed_splits_are_scikit_learns_without_importing_it(digits):
    """vitablate.data.datasets.fixed_split against scikit-learn's own train_test_split (the independent
    computation): the same kept and held-out rows, stratified or not, with ties among the class remainders, and the
    same refusals; and the digits are the ones sklearn.datasets.load_digits returns."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    from vitablate.data.datasets import SPLIT_SEED, _sklearn_digits, fixed_split

    sk = sk_load_digits()
    images, target = _sklearn_digits()
    assert np.array_equal(images, sk.images) and np.array_equal(target, sk.target)
    rng = np.random.default_rng(0)
    cases = [(np.arange(1797), sk.target, 0.2, 0), (np.arange(1437), sk.target[:1437], 0.25, 0)]
    for n, k in [(30, 3), (101, 7), (64, 4), (50, 2), (1000, 10), (12, 4)]:
        labels = rng.integers(0, k, n)
        labels[:2 * k] = np.repeat(np.arange(k), 2)  # every class twice at least
        for fraction, seed in [(0.1, 0), (0.25, 3), (0.5, 7), (0.33, 11)]:
            cases.append((rng.permutation(n) + 1000, labels, fraction, seed))
    for rows, labels, fraction, seed in cases:
        for stratify in (labels, None):
            try:  # the same arrays in the same order: a split of the kept rows depends on their order
                want = train_test_split(rows, test_size=fraction, stratify=stratify, random_state=seed)
            except ValueError:
                with pytest.raises(ValueError):
                    fixed_split(rows, fraction, seed, stratify=stratify)
                continue
            got = fixed_split(rows, fraction, seed, stratify=stratify)
            assert all(np.array_equal(g, w) for g, w in zip(got, want)), (len(rows), fraction, seed, stratify)
    # the digits' own 60/20/20 split, made by scikit-learn in two steps (the second on the first's shuffled rows)
    rest, test = train_test_split(np.arange(1797), test_size=0.2, stratify=sk.target, random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=0.25, stratify=sk.target[rest], random_state=SPLIT_SEED)
    for split, rows in [(digits.train, train), (digits.val, val), (digits.test, test)]:
        want = torch.from_numpy(sk.images[np.sort(rows)].astype(np.float32) / 16.0).unsqueeze(1)
        assert torch.equal(split.x, want) and torch.equal(split.y, torch.from_numpy(sk.target[np.sort(rows)]))
    with pytest.raises(ValueError):  # a class of one row cannot be stratified: scikit-learn refuses too
        train_test_split(np.arange(5), test_size=0.4, stratify=[0, 0, 1, 1, 2], random_state=0)
    with pytest.raises(ValueError):
        fixed_split(np.arange(5), 0.4, 0, stratify=np.array([0, 0, 1, 1, 2]))


def test_digits_resize(digits):
    b = load_dataset("digits", img_size=16)
    _check_split(b.test, 1, 16)
    assert torch.equal(b.test.y, digits.test.y)


# --------------------------------------------------------------------------- shapes


def test_shapes_deterministic(shapes):
    from vitablate.data import datasets

    datasets._make_shapes.cache_clear()  # generate again, not a cached copy
    again = load_dataset("shapes", seed=7)
    assert torch.equal(shapes.train.x, again.train.x) and torch.equal(shapes.test.y, again.test.y)
    for s in (shapes.train, shapes.val, shapes.test, shapes.extra_tests["cue_conflict"]):
        _check_split(s, 3, 16)
    assert (len(shapes.train), len(shapes.val), len(shapes.test)) == (2000, 500, 500)
    assert not (_rows(shapes.train.x) & _rows(shapes.test.x))


def test_shapes_cache_is_not_aliased(shapes):
    b = load_dataset("shapes")
    b.train.x.zero_()
    assert load_dataset("shapes").train.x.abs().sum() > 0


def test_shapes_label_by(shapes):
    tex = load_dataset("shapes", label_by="texture")
    assert torch.equal(tex.train.x, shapes.train.x)
    assert torch.equal(shapes.train.y, shapes.train.extra["y_shape"])
    assert torch.equal(tex.train.y, tex.train.extra["y_texture"])
    assert not torch.equal(tex.train.y, shapes.train.y)
    with pytest.raises(ValueError, match="texture"):
        load_dataset("shapes", label_by="colour")


def test_shapes_balanced_and_independent(shapes):
    ys, yt = shapes.train.extra["y_shape"], shapes.train.extra["y_texture"]
    for y in (ys, yt):
        frac = torch.bincount(y, minlength=4).double() / len(y)
        assert (frac - 0.25).abs().max() < 0.04
    joint = torch.bincount(ys * 4 + yt, minlength=16).double() / len(ys)
    assert (joint - 1 / 16).abs().max() < 0.025  # shape and texture drawn independently


def test_shapes_cue_conflict(shapes):
    cc = shapes.extra_tests["cue_conflict"]
    assert len(cc) == 500
    assert (cc.extra["y_texture"] != cc.extra["y_shape"]).all()
    assert torch.equal(cc.y, cc.extra["y_shape"])


def test_shapes_sizes_and_overrides():
    b = load_dataset("shapes", img_size=32, n_train=64, n_val=8, n_test=8)
    _check_split(b.train, 3, 32)
    assert (len(b.train), len(b.val), len(b.test)) == (64, 8, 8)
    with pytest.raises(ValueError, match="16..64"):
        load_dataset("shapes", img_size=8)


@pytest.mark.parametrize("key", ["y_shape", "y_texture"])
def test_shapes_labels_learnable(shapes, key):
    # Shapes move and textures have random phase, so a linear model on raw pixels
    # is near chance; the Fourier amplitude is translation invariant and a linear
    # model on it must beat chance (0.25) by a wide margin if the labels are real.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def feats(x):
        return torch.fft.rfft2(x - x.mean(dim=(2, 3), keepdim=True)).abs().log1p().flatten(1).numpy()

    n = 1000
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200, C=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(feats(shapes.train.x[:n]), shapes.train.extra[key][:n].numpy())
    assert clf.score(feats(shapes.val.x), shapes.val.extra[key].numpy()) > 0.6


# --------------------------------------------------------------------------- Split


def test_split_batches(digits):
    s = digits.test
    got = list(s.batches(100))
    assert torch.equal(torch.cat([x for x, _ in got]), s.x) and len(got[-1][0]) == len(s) % 100
    assert all(len(x) == 100 for x, _ in s.batches(100, drop_last=True))
    a = torch.cat([y for _, y in s.batches(64, shuffle=True, generator=torch.Generator().manual_seed(3))])
    b = torch.cat([y for _, y in s.batches(64, shuffle=True, generator=torch.Generator().manual_seed(3))])
    assert torch.equal(a, b) and not torch.equal(a, s.y)
    assert torch.equal(a.sort().values, s.y.sort().values)
    with pytest.raises(ValueError, match="batch_size"):
        next(s.batches(0))


def test_split_validates_and_moves():
    with pytest.raises(ValueError, match="unsqueeze"):
        Split(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="one integer label"):
        Split(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.int64))
    s = Split(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), {"z": torch.ones(4)}).to("cpu")
    assert s.extra["z"].device.type == "cpu" and len(s) == 4


# --------------------------------------------------------------------------- CIFAR


def _write_cifar(root, name: str, n_train_per_class: int, n_test_per_class: int) -> dict:
    """Write a tiny stand-in in torchvision's real on-disk pickle format."""
    from torchvision.datasets import CIFAR10, CIFAR100

    tv = CIFAR10 if name == "cifar10" else CIFAR100
    k = 10 if name == "cifar10" else 100
    folder = root / tv.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    written = {}

    def batch(n_per_class: int, fname: str) -> None:
        labels = np.repeat(np.arange(k), n_per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)  # rows are R plane, G plane, B plane
        entry = {"batch_label": fname, label_key: labels.tolist(), "data": data, "filenames": [f"{i}.png" for i in range(len(labels))]}
        if name == "cifar100":
            entry["coarse_labels"] = (labels // 5).tolist()
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[fname] = (data, labels)

    n_files = len(tv.train_list)
    for fname, _ in tv.train_list:
        batch(n_train_per_class // n_files, fname)
    for fname, _ in tv.test_list:
        batch(n_test_per_class, fname)
    names = [f"class{i}" for i in range(k)]
    meta = {tv.meta["key"]: names}
    meta.update({"num_cases_per_batch": 10, "num_vis": 3072} if name == "cifar10" else {"coarse_label_names": names[:20]})
    with open(folder / tv.meta["filename"], "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


@pytest.mark.parametrize("name,per_class", [("cifar10", 10), ("cifar100", 5)])
def test_cifar_standin(tmp_path, monkeypatch, name, per_class):
    written = _write_cifar(tmp_path, name, n_train_per_class=per_class, n_test_per_class=2)
    k = 10 if name == "cifar10" else 100
    # The md5 sums are of the real files, so the stand-in needs verify_md5=False...
    with pytest.raises(ValueError, match="verify_md5=False"):
        load_dataset(name, root=str(tmp_path))
    b = load_dataset(name, root=str(tmp_path), val_fraction=0.2, verify_md5=False)
    assert (b.num_classes, b.in_chans, b.img_size, len(b.class_names)) == (k, 3, 32, k)
    n_train = per_class * k
    assert len(b.train) + len(b.val) == n_train and len(b.val) == round(0.2 * n_train)
    assert len(b.test) == 2 * k
    for s in (b.train, b.val, b.test):
        _check_split(s, 3, 32)
    assert torch.bincount(b.val.y, minlength=k).min() >= 1  # stratified: every class in val
    assert not (_rows(b.train.x) & _rows(b.val.x))

    # ...and our reader must agree with torchvision's own CIFAR reader on the same files.
    import torchvision.datasets.cifar as tvc

    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    ref = (tvc.CIFAR10 if name == "cifar10" else tvc.CIFAR100)(str(tmp_path), train=False, download=False)
    ref_x = torch.from_numpy(ref.data).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(b.test.x, ref_x) and b.test.y.tolist() == ref.targets
    assert b.class_names == ref.classes
    _, test_labels = written[tvc.CIFAR10.test_list[0][0] if name == "cifar10" else "test"]
    assert torch.equal(b.test.y, torch.from_numpy(test_labels))

    # Fixed split and resize.
    again = load_dataset(name, root=str(tmp_path), val_fraction=0.2, verify_md5=False, seed=5, img_size=16)
    assert torch.equal(again.val.y, b.val.y) and again.val.x.shape[-1] == 16


def test_cifar_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as e:
        load_dataset("cifar10", root=str(tmp_path / "nowhere"))
    assert "cifar-10-batches-py" in str(e.value)
    with pytest.raises(ValueError, match="root="):
        load_dataset("cifar100")


# --------------------------------------------------------------------------- image folders


def _write_images(folder, classes, n_per_class, size=(12, 10), gray=False):
    from PIL import Image

    rng = np.random.default_rng(len(str(folder)))
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i}.png")


@pytest.fixture
def imagefolder_root(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog", "eel"], 10)
    _write_images(tmp_path / "val", ["cat", "dog", "eel"], 3)
    return tmp_path


def test_imagefolder(imagefolder_root):
    b = load_dataset("imagefolder", root=str(imagefolder_root), img_size=8, val_fraction=0.2)
    assert b.class_names == ["cat", "dog", "eel"] and b.num_classes == 3 and b.in_chans == 3
    assert all(isinstance(s, FolderSplit) for s in (b.train, b.val, b.test))
    assert (len(b.train), len(b.val), len(b.test)) == (24, 6, 9)
    assert torch.bincount(b.val.targets, minlength=3).tolist() == [2, 2, 2]
    assert not set(b.train.indices.tolist()) & set(b.val.indices.tolist())
    xs, ys = zip(*b.train.batches(5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert xs[0].shape == (5, 3, 8, 8) and xs[0].dtype == torch.uint8  # scaled and normalised on the device
    assert sorted(torch.cat(ys).tolist()) == sorted(b.train.targets.tolist())
    assert torch.equal(b.test.load().y, b.test.targets)
    again = load_dataset("imagefolder", root=str(imagefolder_root), img_size=8, val_fraction=0.2)
    assert torch.equal(again.val.indices, b.val.indices)


def test_imagefolder_errors(tmp_path, imagefolder_root):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        load_dataset("imagefolder", root=str(tmp_path / "missing"))
    _write_images(tmp_path / "odd" / "train", ["a", "b"], 2)
    _write_images(tmp_path / "odd" / "val", ["a", "c"], 2)
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*\['a', 'c'\]"):
        load_dataset("imagefolder", root=str(tmp_path / "odd"))


def test_extra_test_dirs(tmp_path, imagefolder_root):
    _write_images(tmp_path / "shifted", ["dog"], 4)
    b = load_dataset(
        "imagefolder", root=str(imagefolder_root), img_size=8, extra_test_dirs={"shifted": str(tmp_path / "shifted")}
    )
    s = b.extra_tests["shifted"]
    assert isinstance(s, Split) and s.x.shape == (4, 3, 8, 8)
    assert s.y.tolist() == [1, 1, 1, 1]  # labelled by name: "dog" is class 1 of cat/dog/eel

    _write_images(tmp_path / "bad", ["dog", "wolf"], 1)
    with pytest.raises(ValueError, match="wolf"):
        load_dataset("imagefolder", root=str(imagefolder_root), img_size=8, extra_test_dirs={"bad": str(tmp_path / "bad")})


def test_extra_test_dirs_grayscale_digits(tmp_path):
    _write_images(tmp_path / "ood", ["3", "7"], 2, size=(20, 20))
    b = load_dataset("digits", extra_test_dirs={"ood": str(tmp_path / "ood")})
    s = b.extra_tests["ood"]
    _check_split(s, 1, 8)
    assert s.y.tolist() == [3, 3, 7, 7]


# --------------------------------------------------------------------------- augment


def _batch(n=64, C=3, S=16):
    return torch.rand(n, C, S, S, generator=torch.Generator().manual_seed(0))


def test_normalize():
    x = _batch()
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[:, 1], (x[:, 1] - 0.5) / 0.5)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize(x, (0.5,), (0.25,))


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        dict(crop_scale=None, pad_crop=4, color_jitter=0.0, grayscale_p=0.0),
        dict(blur_p=1.0, solarize_p=0.5, grayscale_p=0.5),
    ],
)
@pytest.mark.parametrize("C", [1, 3])
def test_augment_shape_range_randomness_determinism(cfg, C):
    aug = BatchAugment(**cfg)
    x = _batch(C=C)
    x[1] = x[0]  # identical inputs must get different augmentations
    out = aug(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out, x)
    assert torch.equal(out, aug(x, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(out, aug(x, generator=torch.Generator().manual_seed(2)))


def test_flip_only_flips_exactly_some_images():
    aug = BatchAugment(crop_scale=None, flip=True, color_jitter=0.0, grayscale_p=0.0)
    x = _batch(n=200)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same ^ flipped).all()  # every image is exactly one of the two
    assert 60 < flipped.sum() < 140  # p = 0.5


def test_pad_crop_is_integer_shift():
    aug = BatchAugment(crop_scale=None, flip=False, color_jitter=0.0, grayscale_p=0.0, pad_crop=2)
    x = _batch(n=32)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    # Interior pixels come from the image shifted by some (dy, dx) in [-2, 2]^2.
    inner = out[:, :, 2:-2, 2:-2]
    shifts = [x[:, :, 2 + dy : 14 + dy, 2 + dx : 14 + dx] for dy in range(-2, 3) for dx in range(-2, 3)]
    matches = torch.stack([(inner == s).flatten(1).all(1) for s in shifts])  # (25, B)
    assert matches.any(0).all() and matches.any(1).sum() > 5
    with pytest.raises(ValueError, match="pad_crop"):
        BatchAugment(pad_crop=-1)


def test_crop_scale_one_is_nearly_identity():
    aug = BatchAugment(crop_scale=(1.0, 1.0), flip=False, color_jitter=0.0, grayscale_p=0.0)
    x = _batch()
    # Area 1 with aspect != 1 gets clamped to a slightly stretched full view.
    assert (aug(x) - x).abs().mean() < 0.15
    with pytest.raises(ValueError, match="crop_scale"):
        BatchAugment(crop_scale=(0.0, 1.0))


def test_two_views_differ():
    x = _batch()
    v1, v2 = two_views(BatchAugment(), BatchAugment(blur_p=1.0), x, generator=torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == x.shape and not torch.allclose(v1, v2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augment_on_gpu():
    """On a GPU the generator lives on the GPU (a CPU generator cannot drive CUDA draws, and the two streams
    differ, so random outputs are never compared with the CPU's): one seed repeats its batch, and the
    operations that draw nothing that matters (probability 1, no geometry) give the CPU's result."""
    x = _batch()
    aug = BatchAugment(blur_p=0.5, solarize_p=0.2, pad_crop=2)
    a = aug(x.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    b = aug(x.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    assert a.is_cuda and a.shape == x.shape and torch.allclose(a, b, atol=1e-6)
    assert 0 <= a.min() and a.max() <= 1 and not torch.allclose(a.cpu(), x)
    fixed = BatchAugment(crop_scale=None, flip=False, color_jitter=0.0, grayscale_p=1.0, solarize_p=1.0)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    expected = torch.where(gray >= 0.5, 1 - gray, gray)
    got = fixed(x.cuda(), generator=torch.Generator(device="cuda").manual_seed(0)).cpu()
    assert torch.allclose(got, expected, atol=1e-5)


# --------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_shape_range_monotone_deterministic(shapes, name):
    x = shapes.test.x[:200]
    diffs = []
    for sev in range(1, 6):
        out = corrupt(x, name, sev, seed=0)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert 0 <= out.min() and out.max() <= 1
        diffs.append((out - x).abs().mean().item())
    assert diffs[0] > 0
    assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs
    assert torch.equal(corrupt(x, name, 3, seed=4), corrupt(x, name, 3, seed=4))


def test_corruption_noise_depends_on_seed(shapes):
    x = shapes.test.x[:16]
    assert not torch.equal(corrupt(x, "gaussian_noise", 3, seed=0), corrupt(x, "gaussian_noise", 3, seed=1))


def test_corruption_errors_and_split(digits):
    x = digits.test.x
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 0)
    s = corrupt_split(digits.test, "contrast", 5)
    assert torch.equal(s.y, digits.test.y) and s.x.shape == x.shape and not torch.equal(s.x, x)


def test_color_jitter_hue_matches_torchvision_per_image():
    """Hue only: each image is torchvision's adjust_hue of itself by one shift in [-hue, hue]."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    aug = BatchAugment(crop_scale=None, flip=False, color_jitter=(0.0, 0.0, 0.0, 0.1), grayscale_p=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 6, 6, generator=g)
    x[:, :, 0, 0] = torch.tensor([0.9, 0.2, 0.1])  # a saturated pixel whose hue reads off the shift
    out = aug(x, generator=torch.Generator().manual_seed(1))
    shifts = []
    for i in range(len(x)):
        h_in = colorsys.rgb_to_hsv(*x[i, :, 0, 0].tolist())[0]
        h_out = colorsys.rgb_to_hsv(*out[i, :, 0, 0].tolist())[0]
        shift = (h_out - h_in + 0.5) % 1.0 - 0.5
        assert abs(shift) <= 0.1 + 1e-3
        torch.testing.assert_close(out[i], tvf.adjust_hue(x[i], shift), atol=2e-3, rtol=0)
        shifts.append(shift)
    assert min(shifts) < -0.05 and max(shifts) > 0.05  # drawn across the range


def test_color_jitter_p_and_strength_validation():
    x = _batch(n=2000)
    aug = BatchAugment(crop_scale=None, flip=False, color_jitter=(0.4, 0.0, 0.0, 0.0), grayscale_p=0.0,
                       color_jitter_p=0.8)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    changed = (out - x).abs().flatten(1).amax(1) > 1e-6
    assert abs(float(changed.float().mean()) - 0.8) < 0.04  # RandomApply(p=0.8)
    # brightness: one factor per image in [0.6, 1.4] (pixels clamped at 1 excluded)
    for xi, oi in zip(x[changed][:50], out[changed][:50]):
        keep = (oi < 1) & (xi > 0.05)
        f = oi[keep] / xi[keep]
        assert float(f.max() - f.min()) < 1e-4 and 0.6 - 1e-4 <= float(f.mean()) <= 1.4 + 1e-4
    with pytest.raises(ValueError, match="color_jitter"):
        BatchAugment(color_jitter=(0.4, 0.4, 0.2))
    with pytest.raises(ValueError, match="color_jitter_p"):
        BatchAugment(color_jitter_p=1.5)


# --------------------------------------------------------------------------- Fashion-MNIST (the real files)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (.ci/run installs it)
FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _parse_idx(path: Path) -> np.ndarray:
    """The IDX format written out here (not vitablate's reader): magic 0x0000 0x08 ndim, big-endian dims."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    assert (zero, dtype) == (0, 0x08)
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


@pytest.fixture(scope="module")
def fmnist_files() -> dict[str, np.ndarray]:
    if not all((FMNIST_DIR / f"{f}.gz").is_file() for f in FMNIST_FILES):
        if os.environ.get("CI"):
            pytest.fail(f"{FMNIST_DIR} lacks the Fashion-MNIST IDX files; .ci/run installs dataset-fashion-mnist")
        pytest.skip(f"Fashion-MNIST is not installed in {FMNIST_DIR}; run tools/get-data.sh fashion-mnist")
    return {f: _parse_idx(FMNIST_DIR / f"{f}.gz") for f in FMNIST_FILES}


@pytest.fixture(scope="module")
def fmnist(fmnist_files, tmp_path_factory) -> DatasetBundle:
    # an empty data_root: the loader must fall back to the Debian package's directory
    return load_dataset("fashion_mnist", root=str(tmp_path_factory.mktemp("empty_root")))


def test_fashion_mnist_sizes_and_label_balance(fmnist, fmnist_files):
    x_tr, y_tr = fmnist_files["train-images-idx3-ubyte"], fmnist_files["train-labels-idx1-ubyte"]
    x_te, y_te = fmnist_files["t10k-images-idx3-ubyte"], fmnist_files["t10k-labels-idx1-ubyte"]
    assert x_tr.shape == (60_000, 28, 28) and x_te.shape == (10_000, 28, 28)
    # the files themselves: 6,000 training and 1,000 test images per class
    assert np.bincount(y_tr).tolist() == [6000] * 10 and np.bincount(y_te).tolist() == [1000] * 10
    assert (fmnist.num_classes, fmnist.in_chans, fmnist.img_size) == (10, 1, 28)
    for s in (fmnist.train, fmnist.val, fmnist.test):
        _check_split(s, 1, 28)
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (54_000, 6_000, 10_000)
    # stratified 10 % validation split: exactly 600 per class, 5,400 left for training
    assert torch.bincount(fmnist.val.y, minlength=10).tolist() == [600] * 10
    assert torch.bincount(fmnist.train.y, minlength=10).tolist() == [5400] * 10


def test_fashion_mnist_pixels_are_the_files(fmnist, fmnist_files):
    x_tr = fmnist_files["train-images-idx3-ubyte"].astype(np.float64) / 255.0
    bytes_of = lambda x: np.rint(x[:, 0].double().numpy() * 255).astype(np.uint8)  # noqa: E731  back to the file's bytes
    # the test split is the official test file, image for image, in order
    assert np.array_equal(bytes_of(fmnist.test.x), fmnist_files["t10k-images-idx3-ubyte"])
    assert np.array_equal(fmnist.test.y.numpy(), fmnist_files["t10k-labels-idx1-ubyte"])
    # train + val are the 60,000 training images, each once: per-class pixel sums and the image multiset match
    both_x = bytes_of(torch.cat([fmnist.train.x, fmnist.val.x]))
    both_y = torch.cat([fmnist.train.y, fmnist.val.y]).numpy()
    x_tr_u8, y_tr = fmnist_files["train-images-idx3-ubyte"], fmnist_files["train-labels-idx1-ubyte"]
    for c in range(10):
        assert both_x[both_y == c].sum(dtype=np.int64) == x_tr_u8[y_tr == c].sum(dtype=np.int64)
    rows = lambda x: sorted(r.tobytes() for r in x.reshape(len(x), -1))  # noqa: E731
    assert rows(both_x) == rows(x_tr_u8)
    # normalisation statistics are the training split's own
    train_px = fmnist.train.x.double()
    assert fmnist.mean[0] == pytest.approx(train_px.mean().item(), abs=1e-6)
    assert fmnist.std[0] == pytest.approx(train_px.std().item(), abs=1e-6)
    # and close to the whole training file's (Fashion-MNIST's widely quoted 0.2860 / 0.3530)
    assert fmnist.mean[0] == pytest.approx(x_tr.mean(), abs=2e-3)
    assert fmnist.std[0] == pytest.approx(x_tr.std(), abs=2e-3)


def test_fashion_mnist_subsets_are_fixed_balanced_and_nested(fmnist_files):
    small = load_dataset("fashion_mnist", root=None, n_train=500, n_val=100, n_test=205)
    big = load_dataset("fashion_mnist", root=None, n_train=1000, n_val=100, n_test=205)
    again = load_dataset("fashion_mnist", root=None, n_train=500, n_val=100, n_test=205)
    assert (len(small.train), len(small.val), len(small.test)) == (500, 100, 205)
    assert torch.bincount(small.train.y).tolist() == [50] * 10
    assert sorted(torch.bincount(small.test.y).tolist()) == [20] * 5 + [21] * 5
    assert torch.equal(small.train.x, again.train.x) and torch.equal(small.test.y, again.test.y)
    assert _rows(small.train.x) <= _rows(big.train.x)  # growing n_train only adds images
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("fashion_mnist", root=None, n_train=5)


def test_fashion_mnist_reads_torchvision_layout_and_plain_idx(tmp_path, fmnist_files):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FMNIST_FILES:  # torchvision's download leaves the files unpacked beside the .gz
        (raw / f).write_bytes(gzip.decompress((FMNIST_DIR / f"{f}.gz").read_bytes()))
    found = find_fashion_mnist(str(tmp_path))
    assert set(map(Path, found.values())) == {raw / f for f in FMNIST_FILES}
    b = load_dataset("fashion_mnist", root=str(tmp_path), n_train=100, n_val=50, n_test=10_000)
    assert np.array_equal(b.test.y.numpy(), fmnist_files["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_missing_or_truncated_files_name_the_path_and_the_fix(tmp_path, fmnist_files, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    for f in FMNIST_FILES[:3]:
        shutil.copy(FMNIST_DIR / f"{f}.gz", root / f"{f}.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as e:
        find_fashion_mnist(str(root))
    assert "tools/get-data.sh fashion-mnist" in str(e.value)
    shutil.copy(FMNIST_DIR / f"{FMNIST_FILES[3]}.gz", root / f"{FMNIST_FILES[3]}.gz")
    assert len(find_fashion_mnist(str(root))) == 4
    # a download cut short: the gzip stream stops half way
    blob = (FMNIST_DIR / f"{FMNIST_FILES[0]}.gz").read_bytes()
    (root / f"{FMNIST_FILES[0]}.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated") as e:
        find_fashion_mnist(str(root))
    assert str(root / f"{FMNIST_FILES[0]}.gz") in str(e.value) and "tools/get-data.sh fashion-mnist" in str(e.value)
    # an unpacked file cut short
    (root / f"{FMNIST_FILES[0]}.gz").unlink()
    (root / FMNIST_FILES[0]).write_bytes(gzip.decompress(blob)[:-784])
    with pytest.raises(ValueError, match="truncated"):
        find_fashion_mnist(str(root))
    # nothing anywhere (the Debian directory pointed elsewhere)
    monkeypatch.setattr(files_module, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="tools/get-data.sh fashion-mnist") as e:
        find_fashion_mnist(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(e.value)
