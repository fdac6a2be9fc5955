"""The image-folder input pipeline for real-scale data (ImageNet layout).

What the legacy `FolderSplit` did (and what this replaces for `imagefolder`): resize to img_size
and centre-crop in PIL, float32 batches of the whole optimiser batch, a new DataLoader (new worker
processes) every epoch, and random crops taken afterwards inside that 224 px centre crop.

Here:
- images are decoded at full resolution in DataLoader workers that persist for the whole job
  (the DataLoader is built once, on the first epoch, and reused);
- training crops are random-resized crops of the FULL image (and a random flip), drawn from a
  per-sample seed that depends on (epoch, image) only, so neither the number of loader workers
  nor the number of training workers changes what a given image becomes;
- evaluation resizes the shorter side to img_size * 256 / 224 (bicubic) and centre-crops img_size;
- a self-supervised pretext (MoCo, SimMIM, MAE, hybrid) gets its own random-resized crops of the FULL
  image (mode "views": one crop per entry of `views`, each with its own area range, interpolation and
  flip, stacked as (N, k, C, H, W)); its device augmentation then skips crop and flip;
- batches are uint8 (N, C, H, W), a quarter of float32's bytes, and are scaled and normalised on
  the device (`to_unit` then `normalize`);
- loader batches have the micro-batch size (`micro` pieces per batch), not the optimiser batch.
"""

from __future__ import annotations

import math
import os
from typing import Iterator, Optional

import numpy as np
import torch

from .datasets import FolderSplit, _check_batch_size, batch_plan

EVAL_RESIZE = 256 / 224  # shorter side before the centre crop (the standard ImageNet evaluation)
PREFETCH = 4  # batches each loader worker keeps ready


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (on the tensor's device); float images pass unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                     gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop: area fraction in `scale`, log-uniform aspect in `ratio`;
    10 tries, then the largest centred crop within `ratio` (torchvision: transforms.RandomResizedCrop.get_params)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def rand_augment_pil(config: str, img_size: int, mean: tuple[float, ...]):
    """timm's RandAugment for PIL images of `img_size` px, with the parameters timm's create_transform gives it
    (timm/data/transforms_factory.py, transforms_imagenet_train: translate_const 0.45 x size, the dataset mean
    as fill, and the training interpolation, bicubic in DeiT main.py and MAE main_finetune.py)."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                   interpolation=Image.BICUBIC)
    return rand_augment_transform(config, hparams)


def seeded_host_rngs(seed: int, fn, *args):
    """fn(*args) with Python's and NumPy's global generators seeded from `seed` (timm's RandAugment draws from
    both), restoring their previous states afterwards, so each image's augmentation depends on its own seed."""
    import random

    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        return fn(*args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class _Plan:
    """A batch sampler whose batches are replaced every epoch (the DataLoader that iterates it persists)."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*items)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


class ImageFolderStream(FolderSplit):
    """A lazily-read ImageFolder split decoded at full resolution (see the module docstring).

    mode "train": random-resized crops (`crop_scale`, aspect 3/4..4/3) and flips (`flip`); "eval": the
    evaluation resize and centre crop; "view": shorter side to img_size, centre crop; "views": a pretext's
    k crops of the full image, `views` = [(low, high, "bilinear" | "bicubic", flip), ...], each drawn
    independently (and, with flip, flipped with p 0.5). Batches are uint8 (N, C, img_size, img_size), for "views"
    (N, k, C, img_size, img_size). A split that trains ("train", "view", "views") keeps its loader
    workers for the whole job.
    """

    def __init__(self, root: str | os.PathLike, img_size: int, mode: str = "eval", in_chans: int = 3,
                 indices=None, class_names: Optional[list[str]] = None, num_workers: int = 0,
                 crop_scale: Optional[tuple[float, float]] = None, flip: bool = True, pin_memory: bool = False,
                 views: Optional[list] = None, rand_augment: Optional[str] = None,
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406)):
        if mode not in ("train", "eval", "view", "views"):
            raise ValueError(f"ImageFolderStream mode must be train, eval, view or views, got {mode!r}")
        super().__init__(root, img_size, in_chans=in_chans, indices=indices, class_names=class_names,
                         num_workers=num_workers)
        self.mode = mode
        self.train = mode != "eval"  # persistent workers, per-sample seeds
        self.crop_scale = tuple(crop_scale) if crop_scale else (0.08, 1.0)
        self.flip = flip
        self.views = list(views or [])  # mode "views": set by the pretext (jobs.pretrain) before the first batch
        self.pin_memory = pin_memory
        # mode "train": timm's RandAugment on the PIL crop, as timm's create_transform places it (after the
        # random-resized crop and flip; DeiT main.py and MAE main_finetune.py --aa rand-m9-mstd0.5-inc1)
        self.rand_augment = rand_augment_pil(rand_augment, img_size, mean) if rand_augment else None
        self._plan = _Plan()
        self._loader: Optional[torch.utils.data.DataLoader] = None

    def __getstate__(self) -> dict:  # what loader workers receive: never the loader itself
        return {**self.__dict__, "_loader": None}

    def decode(self, i: int, seed: Optional[int] = None) -> torch.Tensor:
        """Image i as uint8 (C, img_size, img_size); seed draws its training crop and flip."""
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        path = self.folder.samples[int(self.indices[i])][0]
        mode = "L" if self.in_chans == 1 else "RGB"
        try:
            with Image.open(path) as f:
                f.load()  # decoded at full resolution
                img = f if f.mode == mode else f.convert(mode)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise RuntimeError(f"image {path} cannot be read ({type(e).__name__}: {e}); "
                               "replace or delete the file, then re-run") from e
        size = self.img_size
        if self.mode == "views":
            if not self.views:
                raise ValueError("ImageFolderStream mode 'views' needs views: [(low, high, interpolation, flip), ...]")
            gen = torch.Generator().manual_seed(seed if seed is not None else i)
            resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
            crops = []
            for low, high, interp, flip in self.views:  # independent crops of the full image, one per view
                top, left, h, w = resized_crop_box(img.width, img.height, (low, high), (3 / 4, 4 / 3), gen)
                crop = img.resize((size, size), resample[interp], box=(left, top, left + w, top + h))
                if flip and torch.rand(1, generator=gen).item() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crops.append(self._tensor(crop))
            return torch.stack(crops)
        if self.mode == "train":
            gen = torch.Generator().manual_seed(seed if seed is not None else i)
            top, left, h, w = resized_crop_box(img.width, img.height, self.crop_scale, (3 / 4, 4 / 3), gen)
            # crop and resize in one resampling pass (PIL's box), bilinear with antialiasing as torchvision's
            img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if self.flip and torch.rand(1, generator=gen).item() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if self.rand_augment is not None:  # drawn after crop and flip, so those stay as without it
                img = seeded_host_rngs(int(torch.randint(0, 2**31, (1,), generator=gen)), self.rand_augment, img)
        else:
            shorter = round(size * EVAL_RESIZE) if self.mode == "eval" else size
            img = TF.resize(img, shorter, InterpolationMode.BICUBIC, antialias=True)
            img = TF.center_crop(img, [size, size])
        return self._tensor(img)

    @staticmethod
    def _tensor(img) -> torch.Tensor:
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        return self.decode(i, seed), int(self.targets[i])

    def load(self, batch_size: int = 256):
        """Every image in an in-memory Split, float32 in [0, 1] like the other splits'."""
        from .datasets import Split

        split = super().load(batch_size)
        return Split(to_unit(split.x), split.y)

    def loader(self) -> torch.utils.data.DataLoader:
        """The split's DataLoader; a training split's workers persist across epochs (built once per job)."""
        if self._loader is not None:
            return self._loader
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            self, batch_sampler=self._plan, num_workers=workers, collate_fn=_collate,
            pin_memory=self.pin_memory or (self.device is not None and self.device.type == "cuda"),
            persistent_workers=workers > 0 and self.train, prefetch_factor=PREFETCH if workers > 0 else None,
        )
        if self.train:  # evaluation splits run once an epoch: their workers need not stay
            self._loader = loader
        return loader

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
        """Same contract as Split.batches, uint8 images; each loader batch is one micro-batch.

        repeats: repeated augmentation (`batch_plan`); copy k of image i draws its crop (and RandAugment) from
        the seed of virtual index k * n + i, so the copies differ (copy 0 keeps the seed it had without repeats).
        """
        _check_batch_size(batch_size)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("ImageFolderStream.batches needs a CPU generator for shuffling; pass torch.Generator()")
        base = int(torch.randint(0, 2**62, (1,), generator=generator)) if self.train else 0
        n = len(self)
        plan = batch_plan(n, batch_size, shuffle, generator, drop_last, shard, micro, repeats)
        self._plan.batches = [[(v % n, base + 7919 * v) if self.train else v % n for v in idx.tolist()]
                              for idx in plan]
        for x, y in self.loader():
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y


def loader_memory_bytes(micro_batch: int, img_size: int, num_workers: int, full_res_px: int = 500 * 375,
                        views: int = 1) -> int:
    """Host memory an image-folder job's loader needs: per worker process ~350 MB (Python, torch, PIL)
    plus its decoded full-resolution images in flight and PREFETCH uint8 batches ready, plus the
    pinned batches the training process holds; `views` crops per image (mode "views")."""
    batch = micro_batch * views * 3 * img_size * img_size
    per_worker = 350 * 2**20 + PREFETCH * batch + micro_batch * 3 * full_res_px
    return num_workers * per_worker + 2 * PREFETCH * batch
