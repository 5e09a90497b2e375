"""Training and evaluation crops of the embedded default model: real photographs from scikit-image.

Source: the photographs bundled inside the scikit-image wheel (``skimage/data/*``; no network).
Each photograph is one class. Grayscale photographs are repeated into three channels.

Split (train and eval never share a source pixel): every photograph is cut at column
``floor(W * (1 - EVAL_FRACTION))`` into a left part (training) and the rightmost strip (evaluation)
*before* any resizing, so no anti-aliasing filter mixes pixels across the cut. Each part is then
downscaled independently to a pyramid of sizes (the photograph's short side becomes one of
``SHORT_SIDES`` pixels, the same factor for both parts) and crops are drawn as: class uniformly,
pyramid level uniformly, 32×32 position uniformly within that part, horizontal flip with p = 0.5.
At the smallest level a 32×32 crop spans a quarter of the photograph's height, so crops show
recognisable structure (a face, a cup rim, a wheel), not only texture.

scikit-image is needed only here (training and ``heldout_crops``); loading the shipped model is not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT = WIDTH = 32
EVAL_FRACTION = 0.25
SHORT_SIDES = (128, 144, 160, 176, 192, 208, 224, 240, 256)

# (class name, file under skimage/data). Colour photographs first, then grayscale ones.
# motorcycle_right is left out: it is the other view of the motorcycle_left stereo pair.
SOURCES = (
    ("astronaut", "astronaut.png"),
    ("chelsea", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("ihc", "ihc.png"),
    ("motorcycle", "motorcycle_left.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
    ("camera", "camera.png"),
    ("brick", "brick.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
)
CLASS_NAMES = tuple(name for name, _ in SOURCES)


def load_photo(index: int) -> np.ndarray:
    """The full photograph of class ``index`` as uint8 ``[H, W, 3]``, read from the skimage wheel."""
    import skimage  # only the data pipeline needs it

    path = Path(skimage.__file__).parent / "data" / SOURCES[index][1]
    photo = np.asarray(Image.open(path).convert("RGB"))
    return photo


def split_columns(width: int) -> int:
    """First column of the evaluation strip: columns ``[0, cut)`` train, ``[cut, width)`` eval."""
    return int(width * (1 - EVAL_FRACTION))


class CropSampler:
    """Draws random 32×32 crops (uint8 ``[N, 32, 32, 3]``) and class labels from one split."""

    def __init__(self, split: str):
        if split not in ("train", "eval"):
            raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
        self.split = split
        # levels[c][l]: part of photo c at pyramid level l, uint8 [h, w, 3].
        self.levels: list[list[np.ndarray]] = []
        for c in range(len(SOURCES)):
            photo = load_photo(c)
            h, w = photo.shape[:2]
            cut = split_columns(w)
            part = photo[:, :cut] if split == "train" else photo[:, cut:]
            pyramid = []
            for short in SHORT_SIDES:
                factor = short / min(h, w)
                size = (round(part.shape[1] * factor), round(h * factor))  # >= 32: photos are landscape
                pyramid.append(np.asarray(Image.fromarray(part).resize(size, Image.Resampling.BOX)))
            self.levels.append(pyramid)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` crops and their int64 class labels, reproducible from ``rng``."""
        images = np.empty((n, HEIGHT, WIDTH, 3), dtype=np.uint8)
        labels = rng.integers(len(SOURCES), size=n)
        for i, c in enumerate(labels):
            level = self.levels[c][rng.integers(len(SHORT_SIDES))]
            y = rng.integers(level.shape[0] - HEIGHT + 1)
            x = rng.integers(level.shape[1] - WIDTH + 1)
            crop = level[y:y + HEIGHT, x:x + WIDTH]
            images[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
        return images, labels.astype(np.int64)


def heldout_crops(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` evaluation crops (uint8 ``[n, 32, 32, 3]``) and labels, from the held-out strips only."""
    return CropSampler("eval").sample(n, np.random.default_rng(seed))
