"""Reader for the IDX files of MNIST-style datasets (Fashion-MNIST as Debian packages it).

IDX layout (big-endian): two zero bytes, a type code byte (0x08 = uint8 is the only one these
datasets use), a byte with the number of dimensions n, n uint32 sizes, then the raw data in C order.
Files may be gzip-compressed (``*.gz``, as ``dataset-fashion-mnist`` installs them).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` or plain): uint8, shape from the header."""
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"path: {path} is not an IDX file (expected two zero magic bytes)")
    if raw[2] != 0x08:
        raise ValueError(f"path: {path} holds IDX type 0x{raw[2]:02x}; only 0x08 (uint8) is supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"path: {path} has {len(raw) - header} data bytes, the header says shape {shape}")
    return np.frombuffer(raw[header:], dtype=np.uint8).reshape(shape).copy()


def load_fashion_mnist(root: str | Path = DEFAULT_ROOT, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of one split (``"train"``: 60,000, ``"test"``: 10,000).

    ``root`` holds the four IDX files, gzip-compressed or not. Install Debian's copy with
    ``apt-get install dataset-fashion-mnist``; only training and reference statistics need it.
    """
    if split not in _FILES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(root)
    arrays = []
    for stem in _FILES[split]:
        found = [root / (stem + ext) for ext in (".gz", "") if (root / (stem + ext)).exists()]
        if not found:
            raise FileNotFoundError(f"root: no {stem}[.gz] under {root} (apt-get install dataset-fashion-mnist, "
                                    "or pass the folder holding the IDX files)")
        arrays.append(read_idx(found[0]))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"root: images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip if ``path`` ends in ``.gz``); used by tests' fixtures."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.tobytes())
