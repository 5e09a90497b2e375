"""Quality measures for generated Fashion-MNIST images, needing no dataset at run time.

- ``classifier_features``: the 128 penultimate activations of the shipped classifier
  (pjd/fashion/classifier.py, trained by ``python -m pjd.fashion.train_classifier``);
- ``fid``: Fréchet distance of a feature set to reference statistics, by default those of the
  10,000 Fashion-MNIST test images (mean and covariance shipped in pjd/fashion/assets/);
- ``class_accuracy``: how often the classifier assigns a generated image to the class it was
  generated for (the class-consistency analogue of the paper's CLIP score);
- ``bootstrap_ci``: percentile bootstrap intervals for both;
- ``nll_per_token``: the generator's own negative log-likelihood of its samples.

What each number can and cannot tell is written up in docs/default_model.md.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def nll_per_token(model, tokens: torch.Tensor, prompt_ids: torch.Tensor, *,
                  image_token_range: tuple[int, int]) -> torch.Tensor:
    """Mean negative log-likelihood (nats) of each image's tokens under ``model``, teacher-forced.

    One forward pass over ``prompt_ids + tokens`` (raster order, full causal context). The logits
    that predict image token t are those at the input just before it; log-softmax is taken over the
    image tokens only (``image_token_range = (lo, hi)``, ids ``[lo, hi)``), the same restriction the
    decoders apply before sampling, so the number is the NLL of the distribution images are drawn from.

    Args:
        model: a Hugging Face causal LM (``model(input_ids).logits`` of shape ``[B, L, V]``).
        tokens: int ``[B, H, W]`` image token ids (vocabulary ids, inside ``[lo, hi)``).
        prompt_ids: int ``[B, P]``, ``P >= 1`` (e.g. the class token).
        image_token_range: ``(lo, hi)``, the vocabulary ids of image tokens.

    Returns:
        float32 ``[B]``: mean over the ``H * W`` image tokens of ``-log p(token | everything before)``.
    """
    if tokens.ndim != 3 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens: expected integer [B, H, W], got {tokens.dtype} {tuple(tokens.shape)}")
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != tokens.shape[0] or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids: expected [B={tokens.shape[0]}, P>=1], got {tuple(prompt_ids.shape)}")
    lo, hi = image_token_range
    if tokens.numel() and (tokens.min() < lo or tokens.max() >= hi):
        raise ValueError(f"tokens: ids must lie in image_token_range [{lo}, {hi})")
    device = next(model.parameters()).device
    flat = tokens.reshape(tokens.shape[0], -1).long().to(device)
    input_ids = torch.cat([prompt_ids.long().to(device), flat], dim=1)
    logits = model(input_ids=input_ids).logits
    # Output at position i predicts input i + 1: the predictors of the image tokens are
    # positions P-1 .. P+HW-2. The last input's output predicts nothing and is dropped.
    p = prompt_ids.shape[1]
    pred = logits[:, p - 1:-1, lo:hi].float().log_softmax(-1)
    return -pred.gather(-1, (flat - lo)[..., None]).squeeze(-1).mean(1).cpu()


def unigram_nll_per_token(tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Trivial baseline: mean NLL (nats) of each image's tokens under fixed token frequencies.

    Args:
        tokens: int ``[B, H, W]`` ids in ``[0, K)``.
        counts: ``[K]`` token counts from training data (add-one smoothed here).
    Returns: float32 ``[B]``.
    """
    logp = torch.log((counts.double() + 1) / (counts.double() + 1).sum())
    return -logp[tokens.reshape(tokens.shape[0], -1).long()].mean(1).float()


# --- classifier features, FID, class accuracy ----------------------------------------------
@functools.lru_cache(maxsize=4)
def load_classifier(assets: str | Path | None = None):
    """The shipped FashionClassifier (eval mode, CPU, fp32); cached per assets folder."""
    from safetensors.torch import load_file

    from pjd.fashion.assets import ASSETS, CLASSIFIER_FILE
    from pjd.fashion.classifier import FashionClassifier

    net = FashionClassifier()
    net.load_state_dict(load_file(Path(assets or ASSETS) / CLASSIFIER_FILE))
    return net.eval()


@torch.no_grad()
def _run(images, what: str, classifier) -> torch.Tensor:
    """The classifier's features or logits, one image per forward pass.

    CPU convolution and matmul kernels pick their blocking by batch size, so in a batched pass an
    image's fp32 features change in the last bits with the batch it is in (and FID, whose square
    root of a near-singular covariance amplifies them, by ~1e-9 relative). One image at a time, an
    image's numbers depend on the image alone: `pjd eval` gives the same FID and predictions for any
    ``--batch-size`` and number of processes, and they equal this module's on all images at once.
    Cost on a CPU, one thread: about 0.7 ms per image (batches of 1,000: 0.8 ms, of 100: 0.5 ms).
    """
    from pjd.fashion.classifier import FEATURE_DIM, FashionClassifier

    x = FashionClassifier.to_input(images)  # validates before the classifier is loaded
    net = classifier or load_classifier()
    fn = net.features if what == "features" else net
    out = [fn(x[i:i + 1]) for i in range(x.shape[0])]
    return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM if what == "features" else 10)


def classifier_features(images: torch.Tensor, *, classifier=None) -> torch.Tensor:
    """float64 ``[N, 128]``: the classifier's penultimate (post-ReLU) features of uint8 images ``[N, 28, 28]``;
    each image's features are computed alone (independent of the other images passed with it).

    ``classifier``: a FashionClassifier to use instead of the shipped one (tests).
    """
    return _run(images, "features", classifier).double()


def classify(images: torch.Tensor, *, classifier=None) -> torch.Tensor:
    """int64 ``[N]``: the classifier's predicted class of each uint8 image ``[N, 28, 28]`` (each alone)."""
    return _run(images, "logits", classifier).argmax(1)


def class_correct(images: torch.Tensor, labels, *, classifier=None) -> torch.Tensor:
    """bool ``[N]``: whether the classifier puts image i in class ``labels[i]`` (int ``[N]`` in [0, 10))."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.shape[0] != torch.as_tensor(images).shape[0]:
        raise ValueError(f"labels: expected integer [N] matching images, got {labels.dtype} {tuple(labels.shape)}")
    return classify(images, classifier=classifier) == labels.long()


def class_accuracy(images: torch.Tensor, labels, *, classifier=None) -> float:
    """Fraction of uint8 images ``[N, 28, 28]`` the classifier assigns to their requested class ``labels`` ``[N]``."""
    return float(class_correct(images, labels, classifier=classifier).double().mean())


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean float64 ``[D]``, covariance float64 ``[D, D]``, unbiased) of features ``[N, D]``, N >= 2."""
    features = torch.as_tensor(features).double()
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected [N >= 2, D], got {tuple(features.shape)}")
    return features.mean(0), torch.cov(features.T)


@functools.lru_cache(maxsize=4)
def reference_stats(assets: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of the classifier features of the 10,000 Fashion-MNIST test images (shipped)."""
    from pjd.fashion.assets import ASSETS, REF_STATS_FILE

    data = np.load(Path(assets or ASSETS) / REF_STATS_FILE)
    return torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double()


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` for two Gaussians (float64)."""
    mu_a, mu_b, sigma_a, sigma_b = (torch.as_tensor(t).double() for t in (mu_a, mu_b, sigma_a, sigma_b))
    root_a = _psd_sqrt(sigma_a)
    # tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2): the inner matrix is symmetric PSD.
    cross = torch.linalg.eigvalsh(root_a @ sigma_b @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + sigma_a.trace() + sigma_b.trace() - 2 * cross)


def fid(features: torch.Tensor, ref_stats: tuple | None = None) -> float:
    """FID of features ``[N, D]`` (``classifier_features`` of generated images) against ``ref_stats``
    (``(mean, covariance)``; default: the shipped test-split statistics). Biased upward at small N
    (compare rows only at equal N)."""
    mu, sigma = feature_stats(features)
    ref_mu, ref_sigma = ref_stats if ref_stats is not None else reference_stats()
    if ref_mu.shape[0] != mu.shape[0]:
        raise ValueError(f"ref_stats: feature dimension {ref_mu.shape[0]} does not match features' {mu.shape[0]}")
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def bootstrap_ci(values: torch.Tensor, statistic, *, n_boot: int = 200, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values[idx])`` over ``n_boot`` resamples of the rows.

    E.g. ``bootstrap_ci(feats, fid)`` or ``bootstrap_ci(correct.double(), lambda v: float(v.mean()))``.
    """
    if not 0 < level < 1 or n_boot < 2:
        raise ValueError(f"level must be in (0, 1) and n_boot >= 2, got {level}, {n_boot}")
    values = torch.as_tensor(values)
    gen = torch.Generator().manual_seed(seed)
    stats = torch.tensor([statistic(values[torch.randint(0, values.shape[0], (values.shape[0],), generator=gen)])
                          for _ in range(n_boot)], dtype=torch.float64)
    lo, hi = torch.quantile(stats, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
