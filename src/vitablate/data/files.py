"""What the datasets read on disk, checked without torch: the folder layouts, ImageFolder class folders and
Fashion-MNIST's IDX files.

Snakemake's own process checks the data before any job starts (vitablate.checks.check_data); importing torch
there cost every run about 3 CPU-seconds, so nothing here imports it (numpy only). The loaders in
vitablate.data.datasets read through these same functions.
"""

from __future__ import annotations

import os

import numpy as np

# The image suffixes torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS, which imports
# torch); tests/test_data.py fails if torchvision's list moves away from this one.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# What each on-disk dataset reads under its root (torchvision's CIFAR base_folder; ImageFolder splits),
# so the workflow can name a missing path before any job starts.
FOLDER_LAYOUTS: dict[str, tuple[str, ...]] = {
    "cifar10": ("cifar-10-batches-py",),
    "cifar100": ("cifar-100-python",),
    "imagefolder": ("train", "val"),
}


def require_class_dirs(path: str, layout: str) -> None:
    """`path` is an ImageFolder: class folders, each holding at least one image (FileNotFoundError naming the
    folder and the layout otherwise)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"directory {path} not found; expected the ImageFolder layout {layout}")
    if not any(e.is_dir() for e in os.scandir(path)):
        raise FileNotFoundError(f"no class folders in {path}; expected the ImageFolder layout {layout}")
    for entry in os.scandir(path):  # torchvision's own error names the class, not where it is
        if entry.is_dir() and not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(entry.path)
                                       for f in files):
            raise FileNotFoundError(f"class folder {entry.path} has no images ({', '.join(IMG_EXTENSIONS)}); "
                                    f"add some or remove the folder (layout {layout})")


# --------------------------------------------------------------------------- Fashion-MNIST

# The four original IDX files (Xiao et al. 2017, github.com/zalandoresearch/fashion-mnist), gzipped or not.
FASHION_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", 60_000),
    "train_labels": ("train-labels-idx1-ubyte", 60_000),
    "test_images": ("t10k-images-idx3-ubyte", 10_000),
    "test_labels": ("t10k-labels-idx1-ubyte", 10_000),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
# Debian/Ubuntu's package dataset-fashion-mnist installs the gzipped files here.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FIX = "tools/get-data.sh fashion-mnist (or: apt-get install dataset-fashion-mnist)"
_IDX_DTYPE = {0x08: np.uint8}


def fashion_mnist_dirs(root: str | os.PathLike | None) -> list[str]:
    """Where the IDX files are looked for, in order: root, root/fashion-mnist, torchvision's
    root/FashionMNIST/raw, then the Debian package's directory."""
    out = []
    if root is not None:
        root = os.fspath(root)
        out += [root, os.path.join(root, "fashion-mnist"), os.path.join(root, "FashionMNIST", "raw")]
    return out + [FASHION_MNIST_SYSTEM_DIR]


def _idx_expected_size(header: bytes) -> int:
    """Bytes an IDX file must hold, from its header: 4-byte magic (0, 0, type, ndim), ndim big-endian sizes."""
    ndim = header[3]
    dims = np.frombuffer(header[4:4 + 4 * ndim], dtype=">u4")
    return 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))


def _idx_problem(path: str, count: int) -> str | None:
    """Why the IDX file at `path` (gzipped when it ends in .gz) is unusable, or None. Cheap: reads the
    header and, for gzip, the trailer's uncompressed size, so a truncated download is caught at once."""
    import gzip
    import struct

    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            header = f.read(16)
        if len(header) < 8 or header[:2] != b"\0\0" or header[2] not in _IDX_DTYPE:
            return f"{path} is not an IDX file of unsigned bytes"
        if struct.unpack(">I", header[4:8])[0] != count:
            return f"{path} holds {struct.unpack('>I', header[4:8])[0]} items, not {count}"
        want = _idx_expected_size(header)
        if path.endswith(".gz"):
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                have = struct.unpack("<I", f.read(4))[0]  # gzip ISIZE: uncompressed size mod 2**32
            want %= 2**32
        else:
            have = os.path.getsize(path)
        if have != want:
            return f"{path} is truncated or damaged ({have} bytes where the header implies {want})"
    except (OSError, EOFError) as e:
        return f"{path} cannot be read ({type(e).__name__}: {e})"
    return None


def find_fashion_mnist(root: str | os.PathLike | None) -> dict[str, str]:
    """{file key: path} of the four IDX files from the first directory that holds all four.

    Raises FileNotFoundError naming every directory searched (and ValueError for a truncated or
    damaged file), each with the command that fixes it. Never downloads.
    """
    dirs = fashion_mnist_dirs(root)
    for d in dirs:
        found = {}
        for key, (name, _) in FASHION_MNIST_FILES.items():
            for candidate in (os.path.join(d, name + ".gz"), os.path.join(d, name)):
                if os.path.isfile(candidate):
                    found[key] = candidate
                    break
        if not found:
            continue
        if len(found) < len(FASHION_MNIST_FILES):
            missing = sorted(FASHION_MNIST_FILES[k][0] for k in FASHION_MNIST_FILES if k not in found)
            raise FileNotFoundError(f"fashion_mnist: {d} lacks {missing} (gzipped or not); run {FASHION_MNIST_FIX}")
        problems = [p for k, path in found.items() if (p := _idx_problem(path, FASHION_MNIST_FILES[k][1]))]
        if problems:
            raise ValueError(f"fashion_mnist: {'; '.join(problems)}; delete the file and run {FASHION_MNIST_FIX}")
        return found
    raise FileNotFoundError(
        f"fashion_mnist: the IDX files (train-images-idx3-ubyte[.gz] and the three others) are in none of {dirs}; "
        f"run {FASHION_MNIST_FIX}, or point data_root / datasets.fashion_mnist.data.root at a folder holding them"
    )


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped when it ends in .gz) as a uint8 array of the shape its header gives."""
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = tuple(int(v) for v in np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4"))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
