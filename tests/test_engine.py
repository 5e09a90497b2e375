"""Engine tests: greedy equivalence with AR, ragged batches, cache layouts, determinism, and the fast
CPU path (backend="sdpa", what "auto" runs on a CPU) against the reference (backend="torch")."""
import pytest
import torch

import pjd
from pjd.models import tiny_llama

IMAGE = (0, 24)      # image token ids
PROMPT = (24, 30)    # prompt token ids
EOL = 30
VOCAB = 32


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, hidden_size=48, layers=2, heads=4, kv_heads=2, logit_scale=2.0, seed=1)


def prompts(batch, length=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(*PROMPT, (batch, length), generator=g)


def run(model, ids, **kw):
    kw.setdefault("image_token_range", IMAGE)
    with torch.no_grad():
        return pjd.generate(model, ids, **kw)


def cfg_args(ids):
    return dict(cfg_scale=3.0, uncond_input_ids=torch.full_like(ids[:, :1], PROMPT[1] - 1))


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("eol", [None, EOL])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("grid", [(5, 7), (2, 3)])
def test_greedy_methods_equal_ar(model, eol, cfg, grid, backend):
    ids = prompts(2)
    kw = dict(height=grid[0], width=grid[1], top_k=1, eol_token_id=eol, backend=backend,
              **(cfg_args(ids) if cfg else {}))
    ar = run(model, ids, method="ar", **kw)
    assert ar.steps == grid[0] * (grid[1] + (eol is not None)) - (eol is not None)
    for method, extra in [("sjd", {}), ("sjd++", {}), ("sjd", dict(window=3)),
                          ("pjd", dict(context=grid[1])), ("pjd", dict(context=grid[1], window=2))]:
        out = run(model, ids, method=method, **extra, **kw)
        assert torch.equal(out.tokens, ar.tokens), (method, extra)
        assert out.steps <= ar.steps


@pytest.mark.parametrize("method,extra", [("sjd", {}), ("pjd", dict(context=5))])
def test_greedy_batch_with_left_padding_matches_single(model, method, extra):
    """Ragged prompts and ragged acceptance: each image equals its own single-image AR run.
    (Batch invariance of sampled, non-exact settings: tests/test_rng.py.)"""
    ids = prompts(3, length=4, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(height=4, width=5, top_k=1)
    batch = run(model, ids, attention_mask=mask, method=method, **extra, **kw)
    for b in range(3):
        single = run(model, ids[b:b + 1, mask[b].bool()], method="ar", **kw)
        assert torch.equal(batch.tokens[b], single.tokens[0]), b


def test_images_finish_at_their_own_step(model):
    ids = prompts(4, seed=8)
    out = run(model, ids, height=5, width=6, method="pjd", context=2, top_k=6, seed=3, **cfg_args(ids))
    assert out.steps == int(out.steps_per_image.max())
    assert len(set(out.steps_per_image.tolist())) > 1  # ragged acceptance across the batch
    per_image = torch.stack(out.accepted).sum(0)
    assert per_image.tolist() == [30] * 4


@pytest.mark.parametrize("method", ["pjd", "zipar", "sjd", "sjd++"])
def test_seed_reproducible_and_sensitive(model, method):
    ids = prompts(2)
    kw = dict(height=4, width=6, method=method, top_k=8, temperature=0.9, eol_token_id=EOL, **cfg_args(ids))
    a = run(model, ids, seed=5, **kw)
    b = run(model, ids, seed=5, **kw)
    c = run(model, ids, seed=6, **kw)
    assert torch.equal(a.tokens, b.tokens) and a.steps == b.steps
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.min() >= IMAGE[0] and a.tokens.max() < IMAGE[1]


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("eol", [None, EOL])
@pytest.mark.parametrize("method,extra", [("pjd", dict(context=2)), ("pjd", dict(context=1, row_causal=False)),
                                          ("pjd", dict(context=3, draft_init="repeat_left")),
                                          ("sjd", {}), ("zipar", {}), ("ar", {})])
def test_append_cache_equals_slot_cache(model, eol, method, extra, backend):
    ids = prompts(2, length=3, seed=2)
    kw = dict(height=4, width=6, method=method, top_k=10, top_p=0.9, seed=11, eol_token_id=eol, backend=backend,
              **cfg_args(ids), **extra)
    slot = run(model, ids, cache="slot", **kw)
    append = run(model, ids, cache="append", **kw)
    assert torch.equal(slot.tokens, append.tokens)
    assert slot.steps == append.steps


@pytest.fixture(scope="module")
def bf16_model():
    return tiny_llama(VOCAB, hidden_size=48, layers=2, heads=4, kv_heads=2, logit_scale=2.0, seed=1,
                      dtype=torch.bfloat16)


def _layouts(model, method, seed, backend):
    ids = prompts(3, seed=seed)
    kw = dict(height=3, width=4, method=method, seed=seed, backend=backend, **cfg_args(ids))
    return run(model, ids, cache="slot", **kw).tokens, run(model, ids, cache="append", **kw).tokens


@pytest.mark.parametrize("method", ["sjd", "sjd++", "zipar"])
def test_cache_layouts_in_half_precision(bf16_model, method):
    """What docs/design.md §2 promises per dtype. The torch reference accumulates attention in fp32 and
    rounds once: the same tokens in bf16 as in fp32. The sdpa path (and the Triton kernels) sum in the
    layouts' own key orders, and in bf16 that rounding can flip a draw near a threshold: the same
    distribution, not the same bits -- a handful of tokens differ (measured 11 of 360 for sjd over 10
    seeds, docs/decisions.md issue 23), never a wholesale divergence (a layout bug is)."""
    differing = total = 0
    for seed in range(6):
        slot, append = _layouts(bf16_model, method, seed, "torch")
        assert torch.equal(slot, append), seed
        slot, append = _layouts(bf16_model, method, seed, "sdpa")
        differing, total = differing + int((slot != append).sum()), total + slot.numel()
    assert differing <= 0.1 * total, (differing, total)


def test_pjd_parallel_rows_take_fewer_steps(model):
    # Mean steps per image over 8 prompts: on this random model one greedy image's count moves by a
    # few steps with the draft initialisation's luck, the mean does not.
    ids = prompts(8)
    kw = dict(height=6, width=8, top_k=1)
    ar = run(model, ids, method="ar", **kw)
    sjd = run(model, ids, method="sjd", **kw)
    pjd_ = run(model, ids, method="pjd", context=2, **kw)
    zipar = run(model, ids, method="zipar", context=2, **kw)
    mean = {name: float(r.steps_per_image.double().mean()) for name, r in [("ar", ar), ("sjd", sjd), ("pjd", pjd_)]}
    assert mean["pjd"] < mean["sjd"] <= mean["ar"]
    assert zipar.steps < ar.steps
    # Every image token is committed exactly once: per-step counts add up to the grid.
    for r in (ar, sjd, pjd_, zipar):
        assert torch.stack(r.accepted).sum(0).tolist() == [6 * 8] * 8
        assert int(r.steps_per_image.max()) == r.steps


def test_row_causal_ablation_changes_the_mask(model):
    ids = prompts(1)
    kw = dict(height=5, width=8, method="pjd", context=2, top_k=1)
    causal = run(model, ids, **kw)
    leaky = run(model, ids, row_causal=False, **kw)
    assert not torch.equal(causal.tokens, leaky.tokens) or causal.steps != leaky.steps


@pytest.mark.parametrize("eol", [None, EOL])
@pytest.mark.parametrize("method,extra", [("ar", {}), ("sjd", {}), ("sjd++", {}), ("zipar", {}),
                                          ("pjd", dict(context=2)), ("pjd", dict(context=1, draft_init="repeat_left")),
                                          ("sjd", dict(coupled_draws=True, continuation=True)),
                                          ("pjd", dict(context=1, coupled_draws=True, draft_init="repeat_left")),
                                          ("pjd", dict(context=2, continuation=True))])
def test_sdpa_path_gives_the_reference_tokens(model, eol, method, extra):
    """Same seed, same tokens, steps and per-step commits: sampled, CFG, left padding, a ragged batch."""
    ids = prompts(3, length=4, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(height=5, width=6, method=method, top_k=12, temperature=0.9, seed=4, eol_token_id=eol,
              attention_mask=mask, **cfg_args(ids), **extra)
    ref = run(model, ids, backend="torch", **kw)
    fast = run(model, ids, backend="sdpa", **kw)
    assert torch.equal(ref.tokens, fast.tokens)
    assert ref.steps == fast.steps and torch.equal(ref.steps_per_image, fast.steps_per_image)
    assert torch.equal(torch.stack(ref.accepted), torch.stack(fast.accepted))


def test_auto_backend_is_the_sdpa_path_on_cpu():
    from pjd.ops._backend import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_nan_logits_are_reported(model, backend):
    ids = prompts(1)
    weight = model.lm_head.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[3].fill_(float("nan"))
    try:
        for method in ("ar", "pjd"):
            with pytest.raises(ValueError, match="no distribution for image 0 at decoding step 1"):
                run(model, ids, height=2, width=3, method=method, backend=backend)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("row_lead", ["row_end", "above", "two_above"])
def test_no_eol_scaffold_is_fixed_from_activation_until_the_row_above_completes(model, monkeypatch, row_lead):
    """DESIGN.md §1.1: without EOL, a row activated while the row above is unfinished leads with a
    scaffold taken at its first step and kept while the rows above move on: the last committed token
    of the lowest complete row ("row_end"), of the row above ("above") or of row r-2 ("two_above");
    once the row above is complete its real last token leads."""
    from pjd import engine

    width, seen = 8, []  # (lane, leading token fed, expected scaffold now, row above complete, its last)
    pack = engine._Decoder.pack

    def last(self, row):
        return int(self.tokens[0, self.P + int(self.lane_base[row]) + int(self.n[0, row]) - 1])

    def spy(self, lanes):
        step = pack(self, lanes)
        top = int((self.n[0] < width).long().argmax())
        for lane in range(1, self.L):
            if step is not None and lanes.fed[0, lane] and self.n[0, lane] == 0:
                source = {"row_end": top - 1, "above": lane - 1, "two_above": lane - 2}[row_lead]
                source = source if source >= 0 else lane - 1
                seen.append((lane, int(step.tokens[0, int(step.lane_start[0, lane])]), last(self, source),
                             bool(self.n[0, lane - 1] >= width), last(self, lane - 1)))
        return step

    monkeypatch.setattr(engine._Decoder, "pack", spy)
    # The case is asserted below (rows starting early, the scaffold's source moving): it holds for
    # these seeds under the per-image streams of pjd.rng.
    run(model, prompts(1, seed=4), method="pjd", height=6, width=width, context=2, top_k=6, seed=4,
        row_lead=row_lead)
    moved = 0
    for lane in range(2, 6):
        open_steps = [s for s in seen if s[0] == lane and not s[3]]
        assert open_steps, f"row {lane} must start while the row above is unfinished"
        assert {s[1] for s in open_steps} == {open_steps[0][2]}, (lane, open_steps)
        moved += len({s[2] for s in open_steps}) > 1
        assert all(token == real for la, token, _, done, real in seen if la == lane and done)
    # Row 0 first (the default without EOL): row 1 never leads with a scaffold.
    assert [s for s in seen if s[0] == 1] and all(s[3] for s in seen if s[0] == 1)
    # The case must move the scaffold's source while a row still leads with its scaffold (where
    # re-copying it every step would differ).
    assert moved >= 1, (moved, seen)


def test_rows_that_never_start_early_ignore_the_lead_rule_and_row0_first(model):
    """With context = width a row starts only once the row above is complete: no scaffold ever leads
    and row 0 is first anyway, so row_lead and row0_first change no token (Table 1's pjd c = width
    row is reused across the issue-21 change on this ground)."""
    ids = prompts(2, seed=5)
    kw = dict(method="pjd", height=4, width=5, context=5, top_k=6, seed=7)
    base = run(model, ids, row_lead="above", row0_first=False, **kw)
    for lead in ("row_end", "two_above"):
        for first in (True, False):
            out = run(model, ids, row_lead=lead, row0_first=first, **kw)
            assert torch.equal(out.tokens, base.tokens) and torch.equal(out.steps_per_image, base.steps_per_image)
    early = run(model, ids, **{**kw, "context": 1})  # the rule does matter once rows start early
    assert not torch.equal(early.tokens, run(model, ids, row_lead="above", row0_first=False, **{**kw, "context": 1}).tokens)


@pytest.mark.parametrize("extra", [dict(coupled_draws=True), dict(continuation=True),
                                   dict(coupled_draws=True, continuation=True)])
def test_coupled_draws_and_continuation_greedy_equal_ar(model, extra):
    """Issue 22's options keep sjd and pjd (context = width) exact: greedy, they equal ar token for token."""
    ids = prompts(2)
    kw = dict(height=4, width=5, top_k=1, eol_token_id=EOL, **cfg_args(ids))
    ar = run(model, ids, method="ar", **kw)
    for method, more in (("sjd", {}), ("pjd", dict(context=5))):
        out = run(model, ids, method=method, **more, **extra, **kw)
        assert torch.equal(out.tokens, ar.tokens), method
        assert out.steps < ar.steps
