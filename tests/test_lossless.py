"""Losslessness: sjd (and pjd with context >= width, no reuse), with or without coupled draws and
continuation, sample exactly the AR distribution.

A tiny model with peaked, context-dependent distributions over 3 image tokens and a 2x3 grid has
3**6 = 729 possible images; their exact AR probabilities come from one teacher-forced forward per
image. Each case's samples (5,000, or 20,000 where a smaller run would miss its mutation, and for
the cheap ar cases) are compared with them by a chi-square test (fails at p <= 1e-3).

Each case runs at the smallest sample size at which the mutation it guards still fails (p-values
below are of this file's cases at seed 1234, CPU; checked 2026-12-04 at 1,000 / 2,000 / 5,000 /
10,000 / 20,000 samples). Run them by hand when changing the verification
(pjd/ops/speculative_verify.py):
- the residual: replace `extra_dist = torch.where(rejected, residual, p_j)` by `extra_dist = p_j`
  (plain sampling from p instead of the residual). At 5,000 samples every sjd / pjd case fails:
  `sjd-kw1` p = 3e-55, `pjd-kw5` and `pjd-kw9` 2.8e-8 (the weakest), the others 5.9e-9 and below
  (at 20,000: 4e-268 and below). At 2,000 `pjd-kw5` would pass (p = 0.07).
- coupled draws (issue 22): sample the committed residual / bonus token with the slot's coupled
  noise too (`extra_token = sample_coupled(extra_dist, _gather_slots(coupled_noise, j).squeeze(2)) +
  lo` when `coupled_noise is not None`): the noise already drew the rejected draft, so the residual
  draw is correlated with it. `sjd-kw10` fails with p = 1.5e-7 at 5,000 samples (1.8e-19 at
  20,000; 0.005 at 2,000).
- continuation (issue 22): keep a passing draft's old q instead of q := p_k (what SCD's
  maximal-coupling code records: `next_q = torch.where((carried & kept)[..., None], old_q, next_q)`
  after next_q is built): the kept draft is distributed as p_k, not as its old q. `sjd-kw11` and
  `sjd-kw12` fail with p = 5.4e-7 and 6.1e-5 at 20,000 samples, and pass at 10,000 (p = 0.002 and
  0.025): these two keep 20,000.
"""
import itertools

import pytest
import torch

import pjd
from pjd.models import tiny_llama
from pjd.sampling import target_probs

IMAGE = (0, 3)
PROMPT_TOKEN, NULL_TOKEN, EOL = 3, 4, 5
H, W = 2, 3
SAMPLES, MORE_SAMPLES = 5_000, 20_000  # per case: see the module docstring


@pytest.fixture(scope="module")
def model():
    return tiny_llama(8, hidden_size=32, layers=2, heads=2, kv_heads=1, logit_scale=10.0, seed=8)


def exact_distribution(model, *, eol, cfg_scale, top_k, temperature):
    grids = torch.tensor(list(itertools.product(range(3), repeat=H * W)))  # [729, 6]
    rows = grids.view(-1, H, W)
    if eol is not None:
        rows = torch.cat([rows, torch.full((len(grids), H, 1), eol)], dim=-1)
    image = rows.reshape(len(grids), -1)
    slots = torch.arange(image.shape[1])
    is_image = slots % rows.shape[-1] < W

    def logits_for(prompt_token):
        seq = torch.cat([torch.full((len(grids), 2), prompt_token), image], dim=1)
        with torch.no_grad():
            return model(seq).logits[:, 1:-1]  # position i predicts image slot i

    logits = logits_for(PROMPT_TOKEN)
    if cfg_scale != 1.0:
        logits = torch.cat([logits, logits_for(NULL_TOKEN)])
    p = target_probs(logits, num_images=len(grids), cfg_scale=cfg_scale, image_token_range=IMAGE,
                     temperature=temperature, top_k=top_k)
    picked = p[:, is_image].gather(-1, grids[..., None]).squeeze(-1)
    return picked.prod(-1).double(), grids


def chi_square_pvalue(samples, grids, expected_probs):
    index = {tuple(g.tolist()): i for i, g in enumerate(grids)}
    observed = torch.zeros(len(grids), dtype=torch.float64)
    for s in samples.view(len(samples), -1).tolist():
        observed[index[tuple(s)]] += 1
    expected = expected_probs * len(samples)
    small = expected < 5  # merge rare outcomes into one bin
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0)), dof


CASES = [
    ("ar", dict(), MORE_SAMPLES),
    ("sjd", dict()),
    ("sjd", dict(cfg_scale=2.5)),
    ("sjd", dict(eol_token_id=EOL)),
    ("sjd", dict(cfg_scale=2.5, eol_token_id=EOL, top_k=2, temperature=0.8, window=2)),
    ("pjd", dict(context=W, reuse_threshold=None, cfg_scale=2.5)),
    ("pjd", dict(context=W + 2, reuse_threshold=None, eol_token_id=EOL, window=2)),
    # The cases above run backend="auto" (the sdpa path on a CPU); the reference path once per method.
    ("ar", dict(backend="torch"), MORE_SAMPLES),
    ("sjd", dict(cfg_scale=2.5, eol_token_id=EOL, backend="torch")),
    ("pjd", dict(context=W, reuse_threshold=None, cfg_scale=2.5, backend="torch")),
    # Coupled draws (SCD) and adaptive continuation (SJD-PAC), alone and together: see the mutation checks.
    ("sjd", dict(coupled_draws=True, cfg_scale=2.5, eol_token_id=EOL, top_k=2, window=2)),
    ("sjd", dict(continuation=True, cfg_scale=2.5, eol_token_id=EOL, top_k=2), MORE_SAMPLES),
    ("sjd", dict(coupled_draws=True, continuation=True, cfg_scale=2.5, eol_token_id=EOL, top_k=2, temperature=0.8),
     MORE_SAMPLES),
    ("pjd", dict(context=W, coupled_draws=True, continuation=True, cfg_scale=2.5, window=2)),
    ("sjd", dict(coupled_draws=True, continuation=True, cfg_scale=2.5, backend="torch")),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,kw,samples", [case if len(case) == 3 else (*case, SAMPLES) for case in CASES],
                         ids=[f"{case[0]}-kw{i}" for i, case in enumerate(CASES)])
def test_samples_follow_exact_ar_distribution(model, method, kw, samples):
    cfg_scale = kw.get("cfg_scale", 1.0)
    exact, grids = exact_distribution(model, eol=kw.get("eol_token_id"), cfg_scale=cfg_scale,
                                      top_k=kw.get("top_k", 0), temperature=kw.get("temperature", 1.0))
    assert abs(float(exact.sum()) - 1.0) < 1e-5
    assert float(exact.max()) > 10 / len(grids)  # peaked: far from uniform
    ids = torch.full((samples, 2), PROMPT_TOKEN)
    if cfg_scale != 1.0:
        kw = {**kw, "uncond_input_ids": torch.full((samples, 2), NULL_TOKEN)}
    with torch.no_grad():
        out = pjd.generate(model, ids, height=H, width=W, method=method, image_token_range=IMAGE, seed=1234, **kw)
    pvalue, dof = chi_square_pvalue(out.tokens, grids, exact)
    assert pvalue > 1e-3, f"{method} {kw}: chi-square p={pvalue:.2e} over {dof} dof"
    ar_steps = H * W + (H - 1) * ("eol_token_id" in kw)
    mean_steps = out.steps_per_image.double().mean()
    assert (mean_steps < ar_steps - 0.5) if method != "ar" else (mean_steps == ar_steps)  # drafts accepted
