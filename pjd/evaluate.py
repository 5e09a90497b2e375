"""`pjd eval`: quality of a sample directory or npz (FID, class accuracy), one process or torchrun.

Input: a `pjd sample` directory (its samples.npz, or its PNGs, and the class of every image from
manifest.json) or any ``.npz`` whose ``arr_0`` is uint8 ``[N, H, W, 3]`` (the ADM / LlamaGen layout;
class labels then come from a manifest.json beside it, if there is one).

How the work is split: images are cut into chunks of ``batch_size`` consecutive indices and chunk
j goes to rank ``j % world``, which computes its classifier features and predictions; rank 0
gathers them in index order and computes the measures. The chunks do not depend on the number of
ranks, and the default measures compute each image alone (pjd.quality), so a torchrun evaluation
gives the same numbers as one process, bit for bit, and so does any ``batch_size``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pjd import distributed
from pjd.quality import bootstrap_ci
from pjd.sample import IMAGE_DIR, MANIFEST_FILE, NPZ_FILE, _json_text, atomic_write, chunks

EVAL_FILE = "eval.json"


class EvalError(ValueError):
    """A bad argument or input file."""


@dataclass
class Measures:
    """What `pjd eval` measures: features for FID, their reference statistics, and a classifier.

    features: uint8 ``[n, H, W, 3]`` -> float64 ``[n, D]``; classify: same images -> int64 ``[n]``;
    reference: () -> (mean float64 ``[D]``, covariance float64 ``[D, D]``); fid: (features ``[N, D]``,
    reference) -> float. image_size: ``(H, W)`` the measures take (None: any), checked before any work;
    class_names: names of the class ids (per-class accuracy is reported by name), or None.
    """

    name: str
    features: Callable
    classify: Callable
    reference: Callable
    fid: Callable
    image_size: tuple[int, int] | None = None
    class_names: tuple[str, ...] | None = None


def default_measures() -> Measures:
    """The default model's measures (pjd.quality): Fashion-MNIST classifier features and accuracy."""
    from pjd import quality
    from pjd.fashion.idx import CLASS_NAMES

    def gray(images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != 3 or not bool((images == images[..., :1]).all()):
            raise EvalError("images: the Fashion-MNIST classifier takes grey images (equal R, G, B channels)")
        return images[..., 0]

    return Measures(name="fashion-mnist classifier",
                    features=lambda x: quality.classifier_features(gray(x)),
                    classify=lambda x: quality.classify(gray(x)),
                    reference=quality.reference_stats,
                    fid=quality.fid, image_size=(28, 28), class_names=CLASS_NAMES)


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, Path]:
    """(uint8 images ``[N, H, W, 3]``, int64 class labels ``[N]`` or None, folder for eval.json)."""
    path = Path(path)
    if path.is_dir():
        folder, npz = path, path / NPZ_FILE
    elif path.suffix == ".npz" and path.is_file():
        folder, npz = path.parent, path
    else:
        raise EvalError(f"samples: expected a `pjd sample` directory or an .npz file, got {str(path)!r}")
    manifest = folder / MANIFEST_FILE
    records = json.loads(manifest.read_text())["images"] if manifest.is_file() else None
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as f:
            if "arr_0" not in f:
                raise EvalError(f"samples: {str(npz)!r} has no arr_0")
            images = f["arr_0"]
    elif records is not None:
        from PIL import Image

        images = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in records])
    else:
        raise EvalError(f"samples: {str(folder)!r} holds neither {NPZ_FILE} nor {MANIFEST_FILE} with {IMAGE_DIR}/")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 2:
        raise EvalError(f"samples: expected RGB images [N >= 2, H, W, 3], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise EvalError(f"samples: expected uint8 pixels, got {images.dtype}")
    labels = None
    if records is not None:
        if len(records) != images.shape[0]:
            raise EvalError(f"samples: {MANIFEST_FILE} lists {len(records)} images, the npz holds {images.shape[0]}")
        labels = np.array([r["class_id"] for r in records], dtype=np.int64)
    return images, labels, folder


def run_eval(path: str | Path, *, batch_size: int = 500, bootstrap: int = 200, measures: Measures | None = None,
             write: bool = True) -> dict | None:
    """Measure the samples at ``path``; returns the report on rank 0 (None elsewhere) and writes it to
    eval.json beside the samples when ``write``. ``bootstrap`` >= 2 resamples of the images give a 95%
    percentile interval of the class accuracy (0: none). FID gets none: resampling with replacement
    duplicates images, which biases a resampled FID upward (its interval can miss the estimate)."""
    for name, value, low in (("batch_size", batch_size, 1), ("bootstrap", bootstrap, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EvalError(f"{name}: expected an integer >= {low}, got {value!r}")
    if bootstrap == 1:
        raise EvalError("bootstrap: expected 0 (off) or at least 2 resamples, got 1")
    images, labels, folder = load_samples(path)
    measures = measures or default_measures()
    if measures.image_size is not None and tuple(images.shape[1:3]) != tuple(measures.image_size):
        h, w = measures.image_size
        raise EvalError(f"samples: the {measures.name} takes {h}x{w} images, got {images.shape[1]}x{images.shape[2]} "
                        f"({images.shape[0]} images of shape {images.shape[1:]})")
    group, _ = distributed.init("cpu")
    try:
        parts = []
        for j, chunk in enumerate(chunks(images.shape[0], batch_size)):
            if j % group.world == group.rank:
                x = torch.from_numpy(images[chunk.start:chunk.stop])
                parts.append((chunk.start, measures.features(x), measures.classify(x)))
        gathered = group.gather(parts)
        if not group.is_main:
            return None
        parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
        features = torch.cat([p[1] for p in parts])
        predicted = torch.cat([p[2] for p in parts])
        reference = measures.reference()
        report = dict(samples=str(path), images=int(images.shape[0]), measures=measures.name, world_size=group.world,
                      fid=measures.fid(features, reference))
        if labels is not None:
            correct = predicted.numpy() == labels
            report["class_accuracy"] = float(correct.mean())
            if bootstrap:
                report["class_accuracy_ci95"] = bootstrap_ci(torch.from_numpy(correct).double(),
                                                             lambda v: float(v.mean()), n_boot=bootstrap)
            names = measures.class_names
            report["per_class_accuracy"] = {names[c] if names and 0 <= c < len(names) else int(c):
                                            float(correct[labels == c].mean()) for c in np.unique(labels)}
        if write:
            atomic_write(folder / EVAL_FILE, lambda tmp: tmp.write_text(_json_text(report)))
        print_report(report)
        return report
    finally:
        group.close()


def print_report(report: dict) -> None:
    def value(key, fmt):
        if key not in report:
            return "-"
        ci = report.get(f"{key}_ci95")
        return f"{report[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")

    accuracy = (f"class accuracy {value('class_accuracy', '.4f')}"
                + (" (95% bootstrap interval)" if "class_accuracy_ci95" in report else "")
                if "class_accuracy" in report else
                f"no class accuracy (no {MANIFEST_FILE} giving each image's class)")
    print(f"{report['samples']}: {report['images']} images, FID {value('fid', '.3f')} ({report['measures']} "
          f"features), {accuracy}, on {report['world_size']} process(es)")
    print(f"FID is biased upward at small N (it falls as N grows, for the same generator): compare FIDs computed "
          f"with the same number of images only (here N = {report['images']}).")
    if "per_class_accuracy" in report:
        print("per class: " + ", ".join(f"{c} {a:.2f}" for c, a in report["per_class_accuracy"].items()))


def main(args) -> int:
    run_eval(args.samples, batch_size=args.batch_size, bootstrap=args.bootstrap, write=not args.no_write)
    return 0
