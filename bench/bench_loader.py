"""Image-folder loader throughput: today's pipeline (FolderSplit) against the new one (ImageFolderStream).

A generated folder of ImageNet-sized JPEGs (default 2,000 at 500x375, kept in /tmp, never in the
repository) is read for whole training epochs by both pipelines with the same number of DataLoader
workers, interleaved round by round:
- legacy: resize + centre crop in PIL, float32 batches of the optimiser batch, a new DataLoader
  (new worker processes) every epoch;
- stream: full-resolution decode, random-resized crop + flip, uint8 batches of the micro-batch,
  one DataLoader whose workers persist across epochs.
Reports images/s (and per loader worker) and the peak resident memory of the loading process and its
workers together. The device-side uint8 -> float normalisation of the stream is not counted (on a GPU
it is one fused kernel per batch).

    nice python bench/bench_loader.py [--images 2000] [--workers 2] [--rounds 3] [--batch 256 --accum 4]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import psutil
import torch

from common import save
from vitablate.data import FolderSplit, ImageFolderStream

FOLDER = "/tmp/vitablate_bench_jpegs"


def make_folder(n: int, classes: int = 10, size=(500, 375)) -> str:
    """n JPEGs of size (w, h) under FOLDER/train/<class>/, smooth gradients plus noise (JPEG-like content)."""
    from PIL import Image

    root = os.path.join(FOLDER, f"{n}_{size[0]}x{size[1]}")
    done = os.path.join(root, ".done")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    for i in range(n):
        d = os.path.join(root, f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        base = (np.sin(xx / rng.uniform(5, 60)) + np.cos(yy / rng.uniform(5, 60)))[..., None] * 60 + 128
        img = np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)) + rng.uniform(-50, 50, 3), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"{i}.jpg"), quality=90)
    open(done, "w").close()
    return root


class PeakRSS:
    """Peak resident memory of this process and all its children (loader workers), sampled every 50 ms."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        me = psutil.Process()

        def sample():
            while not self._stop.is_set():
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                time.sleep(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=256, help="optimiser batch (today's loader batch)")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step (the stream's loader batch)")
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    root = make_folder(args.images)
    gen_s = time.perf_counter() - t0
    legacy = FolderSplit(root, args.img_size, num_workers=args.workers)
    stream = ImageFolderStream(root, args.img_size, mode="train", num_workers=args.workers, crop_scale=(0.08, 1.0))

    def epoch(split, micro: int, epoch_i: int) -> int:
        n = 0
        gen = torch.Generator().manual_seed(epoch_i)
        for x, y in split.batches(args.batch, shuffle=True, generator=gen, drop_last=True, micro=micro):
            n += x.shape[0]
        return n

    runs = {"legacy": (legacy, 1), "stream": (stream, args.accum)}
    samples = {k: [] for k in runs}
    peaks = {k: 0 for k in runs}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            split, micro = runs[name]
            with PeakRSS() as mem:
                t = time.perf_counter()
                n = epoch(split, micro, r)
                dt = time.perf_counter() - t
            samples[name].append(n / dt)
            peaks[name] = max(peaks[name], mem.peak)
            print(f"round {r} {name}: {n / dt:.0f} img/s, peak RSS {mem.peak / 2**20:.0f} MiB", flush=True)
    figures = {}
    for name, v in samples.items():
        # the first stream epoch starts the persistent workers; the median is the steady state
        med = float(np.median(v))
        figures[name] = {"images_per_s_median": med, "images_per_s_per_worker": med / max(1, args.workers),
                         "images_per_s_samples": v, "peak_rss_mib": peaks[name] / 2**20}
    ratio = figures["stream"]["images_per_s_median"] / figures["legacy"]["images_per_s_median"]
    print(f"stream / legacy images/s: {ratio:.2f} (goal >= 2 per worker), same {args.workers} workers")
    save("loader_throughput", {"args": vars(args), "folder": root, "generate_s": gen_s, "ratio": ratio, **figures})


if __name__ == "__main__":
    main()
