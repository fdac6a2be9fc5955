"""The image-folder pipeline: full-resolution crops, uint8 batches, one persistent loader, sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vitablate.data import FolderSplit, ImageFolderStream, to_unit
from vitablate.data.pipeline import resized_crop_box


def _coordinate_images(root, n_per_class=3, size=(80, 60)):
    """PNGs whose red channel is 3 x column and green 4 x row: a crop tells where it came from."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 3, yy * 4, np.full_like(xx, 128)], -1).astype(np.uint8)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


def test_crop_boxes_stay_in_the_image_with_the_asked_area_and_aspect():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), gen)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        # rounding to whole pixels moves area and aspect a little
        assert 0.08 * 0.97 <= h * w / (500 * 375) <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_training_crops_come_from_the_full_image_not_its_centre(tmp_path):
    root = _coordinate_images(tmp_path / "imgs")
    stream = ImageFolderStream(root, 16, mode="train", crop_scale=(0.2, 0.3), flip=False)
    legacy = FolderSplit(root, 16)
    # the legacy pipeline resizes to 21 x 16 and keeps the centre 16 columns: original columns ~8..68 (red ~24..206)
    reds = []
    for epoch in range(6):
        x, _ = next(iter(stream.batches(6, shuffle=True, generator=torch.Generator().manual_seed(epoch))))
        assert x.dtype == torch.uint8 and x.shape == (6, 3, 16, 16)
        reds.append(x[:, 0].float())
    reds = torch.cat(reds)
    assert (reds.amin(dim=(1, 2)) < 12).any() and (reds.amax(dim=(1, 2)) > 225).any()
    lx = legacy.load().x[:, 0] * 255
    assert lx.min() > 15 and lx.max() < 215
    # evaluation: bicubic resize of the shorter side to 16 * 256 / 224 = 18, then the centre 16 x 16
    ev = ImageFolderStream(root, 16, mode="eval")
    x, _ = next(iter(ev.batches(1)))
    ref = Image.open(root / "a" / "0.png").resize((24, 18), Image.BICUBIC).crop((4, 1, 20, 17))
    assert np.abs(x[0].permute(1, 2, 0).numpy().astype(int) - np.asarray(ref).astype(int)).max() <= 1


def test_pretext_views_are_independent_crops_of_the_full_image(tmp_path):
    root = _coordinate_images(tmp_path / "imgs")
    views = [(0.2, 0.3, "bilinear", False), (0.2, 0.3, "bicubic", False)]
    stream = ImageFolderStream(root, 16, mode="views", views=views)
    # the old "view" image (shorter side 60 -> 16, centre 16 of 21 columns) spans columns ~10..70: red ~30..210
    centre = ImageFolderStream(root, 16, mode="view")
    cx, _ = next(iter(centre.batches(6)))
    assert cx[:, 0].min() > 20 and cx[:, 0].max() < 220
    xs = []
    for epoch in range(6):
        x, _ = next(iter(stream.batches(6, shuffle=True, generator=torch.Generator().manual_seed(epoch))))
        assert x.dtype == torch.uint8 and x.shape == (6, 2, 3, 16, 16)
        xs.append(x.float())
    x = torch.cat(xs)
    for v in range(2):  # each view's crops reach beyond the centre square, on both sides
        reds = x[:, v, 0]
        assert (reds.amin(dim=(1, 2)) < 12).any() and (reds.amax(dim=(1, 2)) > 225).any()
    # the two views of an image are different crops (their top-left corners differ)
    corner = x[:, :, :2, 0, 0]  # (N, 2 views, red/green)
    assert (corner[:, 0] != corner[:, 1]).any(dim=1).float().mean() > 0.8
    with pytest.raises(ValueError, match="needs views"):
        ImageFolderStream(root, 16, mode="views")[0]


def test_loader_is_built_once_and_batches_do_not_depend_on_worker_counts(tmp_path):
    root = _coordinate_images(tmp_path / "imgs", n_per_class=6)

    def epochs(workers, shard=None, micro=1):
        s = ImageFolderStream(root, 8, mode="train", num_workers=workers)
        out = [list(s.batches(4, shuffle=True, generator=torch.Generator().manual_seed(e), drop_last=True,
                              shard=shard, micro=micro)) for e in range(2)]
        return s, out

    s0, plain = epochs(0)
    s2, with_workers = epochs(2)
    assert s2.loader() is s2.loader() and s2.loader()._iterator is not None  # persistent workers, one loader
    for a, b in zip(plain, with_workers):
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    # two workers of a job, 2 micro-batches each: together exactly the one-worker batches
    parts = [epochs(0, shard=(r, 2), micro=2)[1] for r in range(2)]
    for e in range(2):
        for step, (x, y) in enumerate(plain[e]):
            xs = [parts[r][e][2 * step + m][0] for r in range(2) for m in range(2)]
            assert torch.equal(torch.cat(xs), x)
    assert plain[0][0][0].shape[0] == 4 and parts[0][0][0][0].shape[0] == 1


def test_uint8_batches_are_scaled_on_the_device():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    assert torch.allclose(to_unit(x), torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]]]))
    f = torch.rand(1, 1, 2, 2)
    assert to_unit(f) is f
    with pytest.raises(ValueError, match="mode must be train, eval, view or views"):
        ImageFolderStream("unused", 8, mode="random")


def test_declared_memory_grows_with_loader_workers():
    from vitablate.config import JobConfig, from_dict
    from vitablate.train_launch import memory_bytes

    cfg = lambda **d: from_dict(JobConfig, {"data": {"name": "imagefolder", **d},  # noqa: E731
                                            "model": {"img_size": 224}, "train": {"batch_size": 256}})
    two, fourteen = memory_bytes(cfg(num_workers=2)), memory_bytes(cfg(num_workers=14))
    assert 2 * 2**30 < two < fourteen
    # per worker at least its process (350 MiB) and 4 prefetched uint8 batches of 256 images of 224 x 224
    assert (fourteen - two) / 12 >= 350 * 2**20 + 4 * 256 * 3 * 224 * 224
    assert memory_bytes(from_dict(JobConfig, {"execution": {"memory_gb": 3.5}})) == int(3.5 * 2**30)
    assert memory_bytes(JobConfig()) is None and not math.isnan(two)
