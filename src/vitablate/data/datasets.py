"""Datasets as in-memory tensors (small data) or lazy image folders (real-scale data).

Every loader returns a DatasetBundle whose train/val/test splits are FIXED: they
never depend on the run seed, so every run and every ablation sees exactly the
same images. Nothing here downloads anything.

Image tensors are always (N, C, H, W) float32 in [0, 1]; labels are (N,) int64.
"""

from __future__ import annotations

import copy
import functools
import os
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .files import (  # noqa: F401 (FOLDER_LAYOUTS, find_fashion_mnist: this module's names too)
    FASHION_MNIST_CLASSES,
    FOLDER_LAYOUTS,
    find_fashion_mnist,
    read_idx,
    require_class_dirs,
)

# Splits are fixed by this seed, not by the run seed (see module docstring).
SPLIT_SEED = 0
# Extra test folders up to this many images are loaded into memory.
MAX_IN_MEMORY_EXTRA = 20_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """One in-memory split; small/medium datasets can live on the GPU whole."""

    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # each (N, ...), e.g. y_texture

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(
                f"Split.x must be (N, C, H, W), got shape {tuple(self.x.shape)}; "
                "add a channel axis with x.unsqueeze(1) for grayscale images"
            )
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise ValueError(
                f"Split.y must be (N,) with N={len(self.x)} to match x, got shape "
                f"{tuple(self.y.shape)}; pass one integer label per image"
            )
        for k, v in self.extra.items():
            if len(v) != len(self.x):
                raise ValueError(
                    f"Split.extra[{k!r}] has {len(v)} rows but x has {len(self.x)}; "
                    "extra tensors need one row per image"
                )

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device), {k: v.to(device) for k, v in self.extra.items()})

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] | None = None,
        micro: int = 1,
        repeats: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches by slicing the tensors (no per-sample Python loop).

        With shuffle, the permutation comes from `generator` (on the generator's
        device, CPU by default), so a seeded generator makes runs repeatable.
        shard=(rank, world): yield only this worker's contiguous part of each batch (see
        `batch_plan`); micro: yield each (part of a) batch as this many consecutive micro-batches;
        repeats: repeated augmentation (`batch_plan`), each image `repeats` times per epoch.
        """
        _check_batch_size(batch_size)
        if not shuffle and shard is None and micro == 1 and repeats == 1:  # plain slices, no index tensors
            for start in range(0, len(self), batch_size):
                if drop_last and start + batch_size > len(self):
                    break
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            return
        for idx in batch_plan(len(self), batch_size, shuffle, generator, drop_last, shard, micro, repeats):
            idx = (idx % len(self) if repeats > 1 else idx).to(self.x.device)  # copy k of image i is k * n + i
            yield self.x[idx], self.y[idx]


def batch_plan(
    n: int,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    shard: tuple[int, int] | None = None,
    micro: int = 1,
    repeats: int = 1,
) -> Iterator[torch.Tensor]:
    """Index tensors of the batches of n items: the (seeded) permutation cut into batches; with
    shard=(rank, world), each batch cut into `world` contiguous parts and this rank's part kept (the
    parts of all ranks make up exactly the one-worker batch); each kept part cut into `micro` pieces.

    repeats > 1: repeated augmentation as DeiT's RASampler (facebookresearch/deit: samplers.py): every index
    of the permutation is repeated `repeats` times in a row and the epoch keeps the first n entries, so the
    epoch has its usual length and holds n / repeats distinct images, each `repeats` times, mostly in the same
    batch (each copy augmented on its own). The indices are then "virtual", copy k of item i being k * n + i
    (take them modulo n), so a loader can draw each copy's own augmentation; and a sharded batch is dealt
    out with a stride (rank r keeps entries r, r + world, ...) instead of in contiguous parts, so the copies
    of an image go to different workers, as RASampler's `indices[rank:total_size:num_replicas]` does.
    repeats 1 draws exactly the same numbers as before the option existed."""
    if shuffle:
        gen_device = generator.device if generator is not None else "cpu"
        order = torch.randperm(n, generator=generator, device=gen_device).cpu()
    else:
        order = torch.arange(n)
    if repeats > 1:
        copy = torch.arange(repeats).repeat(n)  # 0, 1, .., repeats-1, 0, 1, ..
        order = (order.repeat_interleave(repeats) + n * copy)[:n]
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if shard is not None:
            idx = idx[shard[0]::shard[1]] if repeats > 1 else torch.tensor_split(idx, shard[1])[shard[0]]
        yield from (part for part in torch.tensor_split(idx, micro) if len(part))


class FolderSplit(torch.utils.data.Dataset):
    """A lazily-read ImageFolder split (root/<class>/<image>) for data too big for memory.

    Images are resized (shorter side to `resize`, default img_size; bicubic) and center-cropped to
    (in_chans, img_size, img_size) float32 in [0, 1]. Evaluation splits use resize = img_size / 0.875
    (256 for 224), as DeiT and MAE evaluate (facebookresearch/mae: util/datasets.py, build_transform).
    A training split given `crop_scale` instead takes a random-resized crop of the full-resolution image (area fraction in crop_scale,
    aspect 3/4..4/3, bicubic) and, with `flip`, a random horizontal flip, as DeiT and MAE train.
    `class_names`: map folder names to these label indices (folders must be a subset);
    default: the folder's own sorted class list.
    `indices`: keep only these sample indices (e.g. a fixed train/val partition).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        img_size: int,
        in_chans: int = 3,
        indices: list[int] | np.ndarray | torch.Tensor | None = None,
        class_names: list[str] | None = None,
        num_workers: int = 0,
        resize: int | None = None,
        crop_scale: tuple[float, float] | None = None,
        flip: bool = False,
    ) -> None:
        from torchvision import datasets, transforms

        root = os.fspath(root)
        require_class_dirs(root, "<root>/<class>/<image>.png|jpg")
        if in_chans not in (1, 3):
            raise ValueError(f"FolderSplit in_chans must be 1 or 3, got {in_chans}; images are read as RGB or grayscale")
        _check_img_size(img_size)
        resize = img_size if resize is None else resize
        if resize < img_size:
            raise ValueError(f"FolderSplit resize {resize} is below img_size {img_size}; "
                             "the centre crop needs at least img_size")
        bicubic = transforms.InterpolationMode.BICUBIC
        if crop_scale is not None:  # facebookresearch/mae: util/datasets.py (timm's create_transform, is_train)
            tfs = [transforms.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=bicubic)]
            tfs += [transforms.RandomHorizontalFlip()] if flip else []
        else:
            tfs = [transforms.Resize(resize, interpolation=bicubic), transforms.CenterCrop(img_size)]
        if in_chans == 1:
            tfs.append(transforms.Grayscale(1))
        tfs.append(transforms.ToTensor())  # -> (C, H, W) float32 in [0, 1]
        self.folder = datasets.ImageFolder(root, transform=transforms.Compose(tfs))
        self.root, self.img_size, self.in_chans, self.num_workers = root, img_size, in_chans, num_workers
        self.crop_scale, self.flip = crop_scale, flip  # read by the jobs: the device augmentation then skips them
        self.device: torch.device | None = None  # set by .to(); batches are moved there

        folder_classes = self.folder.classes
        if class_names is None:
            class_names = list(folder_classes)
        unknown = sorted(set(folder_classes) - set(class_names))
        if unknown:
            raise ValueError(
                f"class folders {unknown} in {root} are not among the dataset's classes "
                f"{list(class_names)}; rename or remove those folders"
            )
        self.classes = list(class_names)
        # Labels by class *name*, so a test folder with a subset of classes still lines up.
        remap = torch.tensor([self.classes.index(c) for c in folder_classes], dtype=torch.int64)
        all_targets = remap[torch.as_tensor(self.folder.targets, dtype=torch.int64)]
        self._remap = remap
        if indices is None:
            self.indices = torch.arange(len(self.folder))
        else:
            self.indices = torch.as_tensor(indices, dtype=torch.int64)
            if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(self.folder)):
                raise ValueError(
                    f"FolderSplit indices must lie in [0, {len(self.folder)}) for {root}; "
                    "pass indices of images in this folder"
                )
        self.targets = all_targets[self.indices]  # (N,) int64, labels after remapping

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        try:
            x, t = self.folder[j]
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            path = self.folder.samples[j][0]
            raise RuntimeError(f"image {path} cannot be read ({type(e).__name__}: {e}); "
                               "replace or delete the file, then re-run") from e
        return x, int(self._remap[t])

    def to(self, device: torch.device | str) -> "FolderSplit":
        """Return a view whose batches land on `device` (the images stay on disk)."""
        other = copy.copy(self)
        other.device = torch.device(device)
        return other

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] | None = None,
        micro: int = 1,
        repeats: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Same contract as Split.batches; reads through a DataLoader (self.num_workers)."""
        _check_batch_size(batch_size)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("FolderSplit.batches needs a CPU generator for shuffling; pass torch.Generator()")
        plan = [(idx % len(self)).tolist()
                for idx in batch_plan(len(self), batch_size, shuffle, generator, drop_last, shard, micro, repeats)]
        loader = torch.utils.data.DataLoader(
            self,
            batch_sampler=plan,
            num_workers=self.num_workers,
            pin_memory=self.device is not None and self.device.type == "cuda",
        )
        for x, y in loader:
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y

    def load(self, batch_size: int = 256) -> Split:
        """Read every image into an in-memory Split."""
        if len(self) == 0:
            raise ValueError(f"FolderSplit of {self.root} is empty; it needs at least one image to load")
        xs, ys = zip(*self.batches(batch_size))
        return Split(torch.cat(xs), torch.cat(ys))


@dataclass
class DatasetBundle:
    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]  # per channel, of the train images, for normalize()
    std: tuple[float, ...]
    train: Split | FolderSplit
    val: Split | FolderSplit
    test: Split | FolderSplit
    # Distribution-shift test sets, e.g. "cue_conflict" for shapes, or extra folders.
    extra_tests: dict[str, Split | FolderSplit] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_img_size(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. 0.1 holds out 10% of train")


def _resize(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, img_size, img_size), bilinear, kept in [0, 1]."""
    if x.shape[-2:] == (img_size, img_size):
        return x
    shrink = img_size < min(x.shape[-2:])
    out = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.clamp_(0.0, 1.0)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (N, C, H, W) images."""
    x64 = x.double()
    return tuple(x64.mean(dim=(0, 2, 3)).tolist()), tuple(x64.std(dim=(0, 2, 3)).tolist())


def fixed_split(rows: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED,
                stratify: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows): the arrays scikit-learn's
    `train_test_split(rows, test_size=test_fraction, stratify=stratify, random_state=seed)` returns, in its order
    (v1.9, read in sklearn/model_selection/_split.py: ShuffleSplit, StratifiedShuffleSplit._iter_indices,
    _validate_shuffle_split), computed here without importing scikit-learn, which cost every job's process ~2
    CPU-seconds. The order matters: a split of the kept rows (the digits' train/val split) depends on it, so every
    split made with scikit-learn before is unchanged only if both the sets and their order are. tests/test_data.py
    compares the two, element by element.
    Raises ValueError where it does (a class with one row, fewer rows to keep or hold out than classes)."""
    n = len(rows)
    n_test = int(np.ceil(test_fraction * n))  # _validate_shuffle_split: ceil for a fractional test size
    n_train = n - n_test
    if not 0 < test_fraction < 1 or n_train == 0:
        raise ValueError(f"cannot hold out {test_fraction} of {n} rows and keep some")
    rng = np.random.RandomState(seed)
    if stratify is None:  # ShuffleSplit: one permutation, the held-out rows first
        order = rng.permutation(n)
        return rows[order[n_test:]], rows[order[:n_test]]
    classes, inverse, counts = np.unique(stratify, return_inverse=True, return_counts=True)
    if counts.min() < 2 or n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"too few rows per class ({counts.min()}) or in a split ({min(n_train, n_test)}) to "
                         f"stratify {len(classes)} classes")
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    keep_n = _approximate_mode(counts, n_train, rng)  # rows kept per class, then held out per class
    hold_n = _approximate_mode(counts - keep_n, n_test, rng)
    keep, hold = [], []
    for members, k, h in zip(by_class, keep_n, hold_n):
        shuffled = members.take(rng.permutation(len(members)), mode="clip")
        keep.append(shuffled[:k])
        hold.append(shuffled[k:k + h])
    # then each side is shuffled once more, the kept rows first (the last two draws of _iter_indices)
    keep, hold = rng.permutation(np.concatenate(keep)), rng.permutation(np.concatenate(hold))
    return rows[keep], rows[hold]


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Rows per class when `draws` rows are drawn from classes of `counts` rows (sklearn.utils.extmath
    ._approximate_mode): each class's share rounded down, then one more to the classes with the largest remainders,
    ties broken with `rng`, until the shares add up to `draws`."""
    share = counts / counts.sum() * draws
    out = np.floor(share)
    missing = int(draws - out.sum())
    remainder = share - out
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        out[chosen] += 1
        missing -= len(chosen)
    return out.astype(int)


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (keep_idx, holdout_idx) with `fraction` of the rows held out, stratified by y."""
    idx = np.arange(len(y))
    try:
        keep, hold = fixed_split(idx, fraction, seed, stratify=y)
    except ValueError:
        # Too few images per class to stratify (tiny stand-in data): plain fixed split.
        warnings.warn("too few images per class to stratify the val split; using an unstratified fixed split")
        keep, hold = fixed_split(idx, fraction, seed)
    return np.sort(keep), np.sort(hold)


def _no_extra_kwargs(name: str, kw: dict) -> None:
    if kw:
        raise ValueError(f"dataset {name!r} got unknown options {sorted(kw)}; remove them")


def _only_shape_labels(name: str, label_by: str) -> None:
    if label_by != "shape":
        raise ValueError(f"label_by={label_by!r} only applies to the 'shapes' dataset; leave it at 'shape' for {name!r}")


# --------------------------------------------------------------------------- digits


def load_digits(
    root: str | None = None,
    img_size: int | None = None,
    seed: int = 0,
    label_by: str = "shape",
    val_fraction: float = 0.1,
    num_workers: int = 0,
    **kw,
) -> DatasetBundle:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), fixed 60/20/20 split.

    root, seed, val_fraction and num_workers are accepted for a uniform signature
    and unused: the data ship with scikit-learn and the split is fixed.
    """
    _no_extra_kwargs("digits", kw)
    _only_shape_labels("digits", label_by)
    images, target = _sklearn_digits()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(target.astype(np.int64))
    img_size = 8 if img_size is None else img_size
    _check_img_size(img_size)
    x = _resize(x, img_size)

    idx = np.arange(len(y))
    rest, test = fixed_split(idx, 0.2, SPLIT_SEED, stratify=target)  # `rest` in scikit-learn's shuffled order,
    train, val = fixed_split(rest, 0.25, SPLIT_SEED, stratify=target[rest])  # which this second split depends on
    split = lambda i: Split(x[np.sort(i)].clone(), y[np.sort(i)].clone())  # noqa: E731
    tr = split(train)
    mean, std = _channel_stats(tr.x)
    return DatasetBundle(
        name="digits", num_classes=10, in_chans=1, img_size=img_size, mean=mean, std=std,
        train=tr, val=split(val), test=split(test), class_names=[str(i) for i in range(10)],
    )


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 in 0..16, labels) from the file scikit-learn ships, read as its load_digits reads
    it (sklearn/datasets/_base.py: np.loadtxt of data/digits.csv.gz, the label last), without importing it."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join((spec.submodule_search_locations or [""])[0] if spec else "", "datasets", "data",
                        "digits.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits: scikit-learn's {path} is missing; pip install scikit-learn (the digits "
                                "dataset ships with it)")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


# --------------------------------------------------------------------------- shapes

SHAPE_NAMES = ["disk", "square", "triangle", "cross"]
TEXTURE_NAMES = ["hstripes", "vstripes", "checker", "dots"]
LABEL_BY = ("shape", "texture")
# Fixed generator seeds per split (independent of the run seed).
_SHAPES_SEEDS = {"train": 1001, "val": 1002, "test": 1003, "cue_conflict": 1004}


@functools.lru_cache(maxsize=16)
def _make_shapes(n: int, img_size: int, seed: int, conflict: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate n images; returns x (n, 3, S, S) float32 in [0, 1], y_shape (n,), y_texture (n,).

    Fully vectorised over images: all per-image parameters are drawn up front and
    the masks are evaluated on one (n, S, S) coordinate grid.
    With conflict=True the texture class never equals the shape class.
    """
    g = torch.Generator().manual_seed(seed)
    S = img_size
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731  uniform [0, 1)

    y_shape = torch.randint(0, 4, (n,), generator=g)
    if conflict:
        y_tex = (y_shape + torch.randint(1, 4, (n,), generator=g)) % 4  # always != shape
    else:
        y_tex = torch.randint(0, 4, (n,), generator=g)  # independent of shape

    # Shape placement, in pixels: radius 20-35% of the image, fully inside it.
    r = S * (0.20 + 0.15 * u(n))
    cx = r + (S - 2 * r) * u(n)
    cy = r + (S - 2 * r) * u(n)
    coords = torch.arange(S, dtype=torch.float32) + 0.5  # pixel centres
    X = (coords[None, None, :] - cx[:, None, None]) / r[:, None, None]  # (n, S, S), shape units
    Y = (coords[None, :, None] - cy[:, None, None]) / r[:, None, None]
    ax, ay = X.abs(), Y.abs()
    masks = torch.stack(
        [
            X**2 + Y**2 <= 1.0,  # disk
            torch.maximum(ax, ay) <= 0.85,  # square (area close to the disk's)
            (Y >= -0.9) & (Y <= 0.7) & (ax <= (Y + 0.9) / 1.6),  # upward triangle
            ((ax <= 0.33) & (ay <= 1.0)) | ((ay <= 0.33) & (ax <= 1.0)),  # plus / cross
        ]
    )  # (4, n, S, S)
    fg = masks[y_shape, torch.arange(n)]  # (n, S, S) bool

    # Textures: stripes of width h pixels, random phase per image (integer pixel grid).
    h = max(2, S // 8)
    pix = torch.arange(S)
    px = torch.randint(0, 2 * h, (n, 1, 1), generator=g)
    py = torch.randint(0, 2 * h, (n, 1, 1), generator=g)
    vs = ((pix[None, None, :] + px) // h) % 2 == 0  # (n, 1, S) -> vertical stripes
    hs = ((pix[None, :, None] + py) // h) % 2 == 0  # (n, S, 1) -> horizontal stripes
    vs, hs = vs.expand(n, S, S), hs.expand(n, S, S)
    patterns = torch.stack([hs, vs, hs ^ vs, hs & vs])  # (4, n, S, S): h-stripes, v-stripes, checker, dots
    on = patterns[y_tex, torch.arange(n)]

    # Colours: background and two texture colours per channel are a third of the
    # colour circle apart (plus jitter), so all three stay distinct but are random,
    # hence colour carries no information about shape or texture.
    base = u(n, 3)
    jit = lambda: 0.16 * (u(n, 3) - 0.5)  # noqa: E731
    bg = base
    c1, c2 = (base + 1 / 3 + jit()) % 1.0, (base + 2 / 3 + jit()) % 1.0
    swap = u(n, 1) < 0.5
    c1, c2 = torch.where(swap, c2, c1), torch.where(swap, c1, c2)

    col = lambda c: c[:, :, None, None]  # noqa: E731  (n, 3) -> (n, 3, 1, 1)
    tex = torch.where(on[:, None], col(c1), col(c2))  # (n, 3, S, S)
    x = torch.where(fg[:, None], tex, col(bg)).float().contiguous()
    return x, y_shape, y_tex


def load_shapes(
    root: str | None = None,
    img_size: int | None = None,
    seed: int = 0,
    label_by: str = "shape",
    val_fraction: float = 0.1,
    num_workers: int = 0,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 500,
    n_conflict: int = 500,
    **kw,
) -> DatasetBundle:
    """Generated shape x texture images (4 shapes, 4 textures, drawn independently).

    `label_by` picks y ("shape" or "texture"); both labels are always in
    split.extra as y_shape / y_texture. extra_tests["cue_conflict"] has texture
    != shape for every image and y = shape label.
    root, seed, val_fraction and num_workers are unused: the images are generated
    from fixed seeds, so every run sees the same data.
    """
    _no_extra_kwargs("shapes", kw)
    if label_by not in LABEL_BY:
        raise ValueError(f"label_by must be one of {LABEL_BY}, got {label_by!r}")
    img_size = 16 if img_size is None else img_size
    if not isinstance(img_size, int) or not 16 <= img_size <= 64:
        raise ValueError(f"shapes img_size must be an int in 16..64, got {img_size!r}; smaller images lose the textures")
    for k, v in dict(n_train=n_train, n_val=n_val, n_test=n_test, n_conflict=n_conflict).items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")

    def split(n: int, which: str, conflict: bool = False, by: str = label_by) -> Split:
        x, ys, yt = _make_shapes(n, img_size, _SHAPES_SEEDS[which], conflict)
        # Clone: the lru_cache owns the originals and must not see in-place edits.
        return Split(x.clone(), (ys if by == "shape" else yt).clone(), {"y_shape": ys.clone(), "y_texture": yt.clone()})

    train = split(n_train, "train")
    mean, std = _channel_stats(train.x)
    return DatasetBundle(
        name="shapes", num_classes=4, in_chans=3, img_size=img_size, mean=mean, std=std,
        train=train, val=split(n_val, "val"), test=split(n_test, "test"),
        extra_tests={"cue_conflict": split(n_conflict, "cue_conflict", conflict=True, by="shape")},
        class_names=list(SHAPE_NAMES if label_by == "shape" else TEXTURE_NAMES),
    )


# --------------------------------------------------------------------------- CIFAR

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _read_cifar(root: str, name: str, verify_md5: bool) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Read torchvision's on-disk CIFAR layout; returns {"train"|"test": (x uint8 (N,3,32,32), y (N,))}, classes.

    File names, md5 sums and the meta key come from torchvision's own CIFAR10 /
    CIFAR100 classes, so this reads exactly what torchvision.datasets.CIFAR*
    (download=True) writes. The md5 check uses torchvision's check_integrity;
    pass verify_md5=False for a subsampled or self-made copy in the same format.
    """
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import check_integrity

    tv = CIFAR10 if name == "cifar10" else CIFAR100
    folder = os.path.join(root, tv.base_folder)
    wanted = tv.train_list + tv.test_list + [[tv.meta["filename"], tv.meta["md5"]]]
    missing = [f for f, _ in wanted if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        cls = tv.__name__
        raise FileNotFoundError(
            f"{name}: missing {[os.path.join(folder, f) for f in missing]}. Download the CIFAR python "
            f"version ({tv.url}) and extract it under {root}, or run "
            f"torchvision.datasets.{cls}({root!r}, download=True) once on a machine with internet "
            "and copy the folder here (this package never downloads)."
        )
    if verify_md5:
        bad = [f for f, md5 in wanted if not check_integrity(os.path.join(folder, f), md5)]
        if bad:
            raise ValueError(
                f"{name}: md5 mismatch for {bad} in {folder}; re-download the files, or pass "
                "verify_md5=False if this is a deliberately modified copy in the same format"
            )

    def read(files: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for fname, _ in files:
            with open(os.path.join(folder, fname), "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(entry["data"])  # (n, 3072) uint8, channel-major rows
            ys.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        return np.vstack(xs).reshape(-1, 3, 32, 32), np.asarray(ys, dtype=np.int64)

    with open(os.path.join(folder, tv.meta["filename"]), "rb") as f:
        classes = list(pickle.load(f, encoding="latin1")[tv.meta["key"]])
    return {"train": read(tv.train_list), "test": read(tv.test_list)}, classes


def _load_cifar(
    name: str,
    root: str | None = None,
    img_size: int | None = None,
    seed: int = 0,
    label_by: str = "shape",
    val_fraction: float = 0.1,
    num_workers: int = 0,
    verify_md5: bool = True,
    **kw,
) -> DatasetBundle:
    """CIFAR-10/100 from torchvision's on-disk layout, in memory; seed/num_workers unused (fixed split)."""
    _no_extra_kwargs(name, kw)
    _only_shape_labels(name, label_by)
    _check_val_fraction(val_fraction)
    if root is None:
        raise ValueError(f"{name} needs root=<folder holding {'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}>")
    img_size = 32 if img_size is None else img_size
    _check_img_size(img_size)
    data, classes = _read_cifar(os.fspath(root), name, verify_md5)

    def to_split(x_u8: np.ndarray, y: np.ndarray) -> Split:
        x = torch.from_numpy(x_u8).float().div_(255.0)  # (N, 3, 32, 32) in [0, 1]
        return Split(_resize(x, img_size), torch.from_numpy(y))

    x_tr, y_tr = data["train"]
    keep, hold = _stratified_holdout(y_tr, val_fraction)
    mean, std = _CIFAR_STATS[name]
    return DatasetBundle(
        name=name, num_classes=len(classes), in_chans=3, img_size=img_size, mean=mean, std=std,
        train=to_split(x_tr[keep], y_tr[keep]), val=to_split(x_tr[hold], y_tr[hold]),
        test=to_split(*data["test"]), class_names=classes,
    )


# --------------------------------------------------------------------------- Fashion-MNIST

@functools.lru_cache(maxsize=2)
def _read_fashion_mnist(root: str | None) -> dict[str, np.ndarray]:
    return {k: read_idx(p) for k, p in find_fashion_mnist(root).items()}


def _stratified_first(y: np.ndarray, n: int | None, what: str) -> np.ndarray:
    """A fixed, class-balanced subset of n of the rows (all when n is None), sorted.

    Each class keeps its first n // C rows of a fixed permutation (SPLIT_SEED); the remainder goes
    to the first classes. Growing n only adds images.
    """
    if n is None:
        return np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    if not isinstance(n, int) or not len(classes) <= n <= len(y):
        raise ValueError(f"datasets.fashion_mnist.data.{what} must be an int in {len(classes)}..{len(y)} "
                         f"(at least one image per class), got {n!r}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    per_class = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    if any(k > c for k, c in zip(per_class, counts)):
        raise ValueError(f"datasets.fashion_mnist.data.{what} = {n} asks for more images of a class than exist")
    keep = [order[y[order] == c][:k] for c, k in zip(classes, per_class)]
    return np.sort(np.concatenate(keep))


def load_fashion_mnist(
    root: str | None = None,
    img_size: int | None = None,
    seed: int = 0,
    label_by: str = "shape",
    val_fraction: float = 0.1,
    num_workers: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    **kw,
) -> DatasetBundle:
    """Fashion-MNIST (70,000 28x28 grayscale product photos, 10 classes) from its four IDX files.

    Files: root, root/fashion-mnist, root/FashionMNIST/raw (torchvision's layout) or the Debian
    package's /usr/share/datasets/fashion-mnist, gzipped or not (see find_fashion_mnist). Val is a
    fixed stratified `val_fraction` of the 60,000 training images, train the rest; the official
    10,000 are the test set. n_train / n_val / n_test keep a fixed class-balanced subset of each split
    (None: all). seed and num_workers are unused (fixed split, in memory).
    """
    _no_extra_kwargs("fashion_mnist", kw)
    _only_shape_labels("fashion_mnist", label_by)
    _check_val_fraction(val_fraction)
    img_size = 28 if img_size is None else img_size
    _check_img_size(img_size)
    raw = _read_fashion_mnist(None if root is None else os.fspath(root))
    y_all = raw["train_labels"].astype(np.int64)
    keep, hold = _stratified_holdout(y_all, val_fraction)

    def split(x_u8: np.ndarray, y: np.ndarray, n: int | None, what: str) -> Split:
        sub = _stratified_first(y, n, what)
        x = torch.from_numpy(x_u8[sub].astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]
        return Split(_resize(x, img_size), torch.from_numpy(y[sub].astype(np.int64)))

    train = split(raw["train_images"][keep], y_all[keep], n_train, "n_train")
    mean, std = _channel_stats(train.x)
    return DatasetBundle(
        name="fashion_mnist", num_classes=10, in_chans=1, img_size=img_size, mean=mean, std=std, train=train,
        val=split(raw["train_images"][hold], y_all[hold], n_val, "n_val"),
        test=split(raw["test_images"], raw["test_labels"].astype(np.int64), n_test, "n_test"),
        class_names=list(FASHION_MNIST_CLASSES),
    )


# --------------------------------------------------------------------------- image folders


def load_imagefolder(
    root: str | None = None,
    img_size: int | None = None,
    seed: int = 0,
    label_by: str = "shape",
    val_fraction: float = 0.1,
    num_workers: int = 0,
    crop_scale: tuple[float, float] | None = None,
    flip: bool = True,
    micro_batch: int | None = None,
    pin_memory: bool = False,
    train_mode: str = "train",
    rand_augment: str | None = None,
    **kw,
) -> DatasetBundle:
    """ImageNet-style root/train/<class>/* and root/val/<class>/*.

    root/val becomes the TEST split; val is a fixed stratified `val_fraction`
    of root/train (seed 0), and train is the rest. All splits read lazily through
    `ImageFolderStream` (data/pipeline.py) as uint8 batches. The train split's `train_mode`:
    "train" takes random-resized crops (area `crop_scale`, default 0.08..1) and flips (`flip`) from
    the full-resolution image; "view" resizes the whole image and centre-crops; "views" takes a pretext's
    own crops of the full-resolution image (ImageFolderStream `views`, set by jobs.pretrain);
    "eval" resizes to img_size / 0.875 (bicubic) and centre-crops, as val and test always do
    (jobs that only read features). rand_augment: a timm RandAugment string applied to the "train" crops in
    the loader workers (ImageFolderStream). seed and micro_batch are unused (fixed split; batches are
    sized by the caller).
    """
    from .pipeline import ImageFolderStream

    _no_extra_kwargs("imagefolder", kw)
    _only_shape_labels("imagefolder", label_by)
    _check_val_fraction(val_fraction)
    if root is None:
        raise ValueError("imagefolder needs root=<folder with train/<class>/ and val/<class>/ subfolders>")
    root = os.fspath(root)
    img_size = 224 if img_size is None else img_size
    layout = "<root>/train/<class>/<image>.png|jpg and <root>/val/<class>/<image>.png|jpg"
    for sub in ("train", "val"):
        require_class_dirs(os.path.join(root, sub), layout)
    class_lists = {sub: sorted(e.name for e in os.scandir(os.path.join(root, sub)) if e.is_dir()) for sub in ("train", "val")}
    if class_lists["train"] != class_lists["val"]:
        raise ValueError(
            f"train classes {class_lists['train']} differ from val classes {class_lists['val']} under {root}; "
            "both must have the same class folders"
        )

    def fs(sub: str, indices=None, mode: str = "eval") -> ImageFolderStream:
        return ImageFolderStream(os.path.join(root, sub), img_size, mode=mode, indices=indices,
                                 num_workers=num_workers, crop_scale=crop_scale, flip=flip, pin_memory=pin_memory,
                                 rand_augment=rand_augment if mode == "train" else None, mean=IMAGENET_MEAN)

    full = fs("train")
    keep, hold = _stratified_holdout(full.targets.numpy(), val_fraction)
    return DatasetBundle(
        name="imagefolder", num_classes=len(full.classes), in_chans=3, img_size=img_size,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        train=fs("train", keep, train_mode), val=fs("train", hold), test=fs("val"), class_names=full.classes,
    )


def eval_resize(img_size: int) -> int:
    """The shorter side evaluation images are resized to before the centre crop: img_size / 0.875, 256 for 224
    (facebookresearch/mae: util/datasets.py, build_transform; facebookresearch/deit: datasets.py)."""
    return int(img_size / 0.875)


# --------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., DatasetBundle]] = {
    "digits": load_digits,
    "shapes": load_shapes,
    "cifar10": functools.partial(_load_cifar, "cifar10"),
    "cifar100": functools.partial(_load_cifar, "cifar100"),
    "imagefolder": load_imagefolder,
    "fashion_mnist": load_fashion_mnist,
}


def _add_extra_test_dir(bundle: DatasetBundle, name: str, path: str, num_workers: int) -> None:
    """Load an ImageFolder test set whose class folders are a subset of bundle.class_names."""
    if name in bundle.extra_tests:
        raise ValueError(f"extra test set name {name!r} is already used by {bundle.name}; pick another name")
    # ImageNet's shift sets are evaluated as its test split; next to in-memory data, the whole image
    resize = eval_resize(bundle.img_size) if bundle.name == "imagefolder" else None
    fs = FolderSplit(
        path, bundle.img_size, in_chans=bundle.in_chans, class_names=bundle.class_names, num_workers=num_workers,
        resize=resize,
    )
    bundle.extra_tests[name] = fs.load() if len(fs) <= MAX_IN_MEMORY_EXTRA else fs


def load_dataset(
    name: str,
    root: str | None = None,
    img_size: int | None = None,
    seed: int = 0,
    label_by: str = "shape",
    extra_test_dirs: dict[str, str] | None = None,
    val_fraction: float = 0.1,
    **kw,
) -> DatasetBundle:
    """Load a registered dataset by name.

    `seed` is accepted for a uniform call signature but never changes the
    splits (they are fixed). `val_fraction` applies to cifar*/imagefolder
    (digits uses a fixed 60/20/20 split). Extra keyword options go to the
    loader (e.g. n_train for shapes, verify_md5 for cifar, num_workers).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    bundle = DATASETS[name](root=root, img_size=img_size, seed=seed, label_by=label_by, val_fraction=val_fraction, **kw)
    for test_name, path in (extra_test_dirs or {}).items():
            _add_extra_test_dir(bundle, test_name, os.fspath(path), kw.get("num_workers", 0))
    return bundle
