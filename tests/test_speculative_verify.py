"""speculative_verify: reference self-checks, input validation, Triton kernels (interpreter) vs the
reference, and pjd.generate with backend="triton" vs "torch".

The Triton parts run this file as a script in a subprocess with TRITON_INTERPRET=1 set before any
import (an out-of-bounds load kills the interpreter process; the AOT gate needs a process without
it). The script runs a named group of cases and prints one JSON line with every failure.

Parity is exact on the integer outputs (num_accepted, num_commit, committed tokens, next_tokens)
and allclose on next_q (fp32 p: last-bit differences of exp and of the softmax normaliser's
summation order). commit_tokens is compared on its committed prefix k < num_commit, the contract;
the reference also fills the tail with samples it never commits (kernels/speculative_verify.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import pjd
from pjd.models import tiny_llama
from pjd.ops import PREFIX, TOP, speculative_verify, speculative_verify_reference
from pjd.sampling import target_probs

WIDTH = 5  # grid width of the EOL cases: row_slots = 6, slot % 6 == 5 is forced


def make_case(seed, B, L, W, V, *, image=None, cfg=False, dtype="float32", top_k=0, top_p=1.0,
              temperature=1.0, reuse=0.5, eol=False, draft_init="random", scale=4.0, continuation=False,
              coupled=False):
    """Positional arguments of speculative_verify_reference for one random step.

    Lanes: about a quarter inactive (lane 0 of every image active and TOP, the rest TOP or PREFIX);
    lane (0, 0) feeds m = W drafts, lane (0, 1) none; rooms m .. m + 2 (so some full acceptances get
    no bonus). Inputs are packed per image behind one unrelated input. Logits ~ N(0, scale^2) over
    the whole vocabulary. Drafts per slot: 45% a sample of its target p with q = p, 30% the argmax of
    p with q one-hot, 15% a sample of an unrelated softmax q, 10% a uniform token with q one-hot;
    with EOL, forced slots hold the EOL id with q = 0 (as the engine stores them).
    continuation / coupled (issue 22): the two trailing arguments (continuation, coupled_noise:
    exponential variates) are appended; otherwise the 21 arguments of the original op.
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = image or ((0, V - 1) if eol else (0, V))  # with EOL the last id is the EOL token
    vi = hi - lo
    eol_id = (hi if hi < V else lo - 1) if eol else -1
    assert eol_id >= 0 or not eol, "no id left for the EOL token"
    row_slots = WIDTH + 1 if eol else 1
    active = torch.rand(B, L, generator=g) < 0.75
    active[:, 0] = True
    m = torch.randint(0, W + 1, (B, L), generator=g)
    m[0, 0] = W
    if L > 1:
        m[0, 1] = 0
    lane_start = torch.full((B, L), -1, dtype=torch.int32)
    inputs = []
    for b in range(B):
        offset = 1
        for lane in range(L):
            if active[b, lane]:
                lane_start[b, lane] = offset
                offset += 1 + int(m[b, lane])
        inputs.append(offset)
    N = max(inputs) + 1
    rule = torch.where(torch.rand(B, L, generator=g) < 0.5, TOP, PREFIX).int()
    rule[:, 0] = TOP
    lane_slot = torch.randint(0, 4 * row_slots + 1, (B, L), generator=g).int()
    room = (m + torch.randint(0, 3, (B, L), generator=g)).int()
    logits = (torch.randn(2 * B if cfg else B, N, V, generator=g) * scale).to(getattr(torch, dtype))
    cfg_scale = 2.5 if cfg else 1.0
    probs = target_probs(logits, num_images=B, cfg_scale=cfg_scale, image_token_range=(lo, hi),
                         temperature=temperature, top_k=top_k, top_p=top_p)
    draft_tokens = torch.empty(B, L, W, dtype=torch.int64)
    draft_q = torch.zeros(B, L, W, vi)
    mode_weights = torch.tensor([0.45, 0.3, 0.15, 0.1])
    for b in range(B):
        for lane in range(L):
            for i in range(W):
                p = probs[b, min(max(int(lane_start[b, lane]), 0) + i, N - 1)]
                mode = int(torch.multinomial(mode_weights, 1, generator=g))
                if mode == 0:
                    q = p
                elif mode == 2:
                    q = torch.softmax(torch.randn(vi, generator=g) * 2, 0)
                if mode in (0, 2):
                    tok = int(torch.multinomial(q, 1, generator=g))
                else:
                    tok = int(p.argmax()) if mode == 1 else int(torch.randint(0, vi, (1,), generator=g))
                    q = torch.nn.functional.one_hot(torch.tensor(tok), vi).float()
                draft_tokens[b, lane, i], draft_q[b, lane, i] = tok + lo, q
                if eol and (int(lane_slot[b, lane]) + i) % row_slots == WIDTH:
                    draft_tokens[b, lane, i], draft_q[b, lane, i] = eol_id, 0.0
    u_accept = torch.rand(B, L, W, generator=g)
    u_sample = torch.rand(B, L, W + 1, generator=g)
    init_tokens = torch.randint(lo, hi, (B, L, W), generator=g)
    trailing = ()
    if continuation or coupled:
        noise = -torch.log1p(-torch.rand(B, L, W + 1, vi, generator=g)) if coupled else None
        trailing = (continuation, noise)
    return (logits, lane_start, m.int(), rule, lane_slot, room, draft_tokens, draft_q, u_accept, u_sample,
            init_tokens, cfg_scale, (lo, hi), temperature, top_k, top_p, -1.0 if reuse is None else reuse,
            draft_init, eol_id, row_slots, WIDTH, *trailing)


def public_kwargs(args):
    """The keyword part of pjd.ops.speculative_verify for make_case's positional arguments."""
    (cfg_scale, image, temperature, top_k, top_p, reuse, draft_init, eol, row_slots, width) = args[11:21]
    continuation, noise = (*args[21:], False, None)[:2] if len(args) > 21 else (False, None)
    return dict(image_token_range=image, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                reuse_threshold=None if reuse < 0 else reuse, draft_init=draft_init,
                eol_token_id=None if eol < 0 else eol, row_slots=row_slots, width=width,
                continuation=continuation, coupled_noise=noise)


# ---------------------------------------------------------------- (a) reference self-checks
def test_greedy_accepts_exactly_the_argmax_prefix():
    args = list(make_case(0, B=3, L=4, W=7, V=50, top_k=1))
    logits, lane_start, m, draft_tokens = args[0], args[1], args[2], args[6]
    argmax = logits.argmax(-1)  # [B, N]
    # Make some drafts the argmax so that long prefixes exist, others surely not.
    g = torch.Generator().manual_seed(1)
    for b, lane in zip(*torch.nonzero(lane_start >= 0, as_tuple=True)):
        for i in range(7):
            want_argmax = bool(torch.rand(1, generator=g) < 0.8)
            best = int(argmax[b, min(int(lane_start[b, lane]) + i, logits.shape[1] - 1)])
            draft_tokens[b, lane, i] = best if want_argmax else (best + 1) % 50
    out = speculative_verify_reference(*args)
    for b, lane in zip(*torch.nonzero(lane_start >= 0, as_tuple=True)):
        start, mm = int(lane_start[b, lane]), int(m[b, lane])
        expect = 0
        while expect < mm and int(draft_tokens[b, lane, expect]) == int(argmax[b, start + expect]):
            expect += 1
        assert int(out.num_accepted[b, lane]) == expect, (b, lane)
    assert int(out.num_accepted.max()) >= 3 and int(out.num_accepted.min()) == 0


def _all_drafts_argmax(args):
    """Drafts of every active lane = the argmax of their targets (top_k = 1), EOL slots left as EOL."""
    logits, lane_start, draft_tokens, eol = args[0], args[1], args[6], args[18]
    argmax = logits.argmax(-1)
    for b, lane in zip(*torch.nonzero(lane_start >= 0, as_tuple=True)):
        for i in range(draft_tokens.shape[-1]):
            if int(draft_tokens[b, lane, i]) != eol:
                draft_tokens[b, lane, i] = argmax[b, min(int(lane_start[b, lane]) + i, logits.shape[1] - 1)]


def test_forced_eol_drafts_always_pass():
    args = list(make_case(2, B=2, L=4, W=7, V=40, image=(0, 39), eol=True, top_k=1))
    _all_drafts_argmax(args)
    args[8] = torch.full_like(args[8], 0.999)  # u_accept: an unforced EOL draft (p = 0) would fail
    out = speculative_verify_reference(*args)
    active = args[1] >= 0
    crossed = (args[6] == args[18]) & (torch.arange(7) < args[2][..., None].long())
    assert crossed[active].any(), "the case must feed EOL slots"
    assert torch.equal(out.num_accepted[active], args[2][active])
    # Control: without the EOL rule the same drafts stop at the first EOL slot.
    args[18] = -1
    control = speculative_verify_reference(*args)
    assert (control.num_accepted[active] < args[2][active]).any()


def test_inactive_lanes_keep_drafts_and_commit_nothing():
    args = make_case(3, B=3, L=5, W=3, V=64, cfg=True)
    out = speculative_verify_reference(*args)
    inactive = args[1] < 0
    assert inactive.any() and (~inactive).any()
    assert (out.num_commit[inactive] == 0).all() and (out.num_accepted[inactive] == 0).all()
    assert torch.equal(out.next_tokens[inactive], args[6][inactive])
    assert torch.equal(out.next_q[inactive], args[7][inactive])
    assert (out.num_commit[:, 0] >= 1).all(), "a TOP lane commits at least one token"


def test_no_reuse_means_fresh_drafts_at_targeted_slots():
    args = list(make_case(4, B=2, L=4, W=7, V=80, reuse=None))
    probs = target_probs(args[0], num_images=2, image_token_range=(0, 80))
    out = speculative_verify_reference(*args)
    checked = 0
    for b, lane in zip(*torch.nonzero(args[1] >= 0, as_tuple=True)):
        for i in range(7):
            k = int(out.num_commit[b, lane]) + i
            if k <= int(args[2][b, lane]) and k < 7:
                torch.testing.assert_close(out.next_q[b, lane, i], probs[b, int(args[1][b, lane]) + k])
                checked += 1
    assert checked >= 5
    # Control: with reuse every accepted-ratio draft is kept with its old q somewhere.
    args[16] = 0.0
    reused = speculative_verify_reference(*args)
    kept = [(reused.next_q[b, lane, i] == args[7][b, lane, (int(reused.num_commit[b, lane]) + i)]).all()
            for b, lane in zip(*torch.nonzero(args[1] >= 0, as_tuple=True))
            for i in range(7) if int(reused.num_commit[b, lane]) + i < min(7, int(args[2][b, lane]) + 1)]
    assert any(kept)


def test_continuation_tests_stored_drafts_and_redraws_from_the_residual():
    """Issue 22 (SJD-PAC's adaptive continuation): after the first rejection a stored draft with a
    target stays iff it passes u_accept[k] * q(d) < p_k(d); otherwise it is redrawn from
    max(p_k - q_k, 0) (a token where p_k > q_k); its q becomes p_k either way. Commits are unchanged."""
    args = list(make_case(8, B=3, L=4, W=7, V=60, reuse=None, continuation=True, scale=2.0))
    probs = target_probs(args[0], num_images=3, image_token_range=(0, 60))
    out = speculative_verify_reference(*args)
    plain = speculative_verify_reference(*args[:21])
    for name in ("num_accepted", "num_commit", "commit_tokens"):
        assert torch.equal(getattr(out, name), getattr(plain, name)), name
    kept = redrawn = 0
    for b, lane in zip(*torch.nonzero(args[1] >= 0, as_tuple=True)):
        start, m, c = int(args[1][b, lane]), int(args[2][b, lane]), int(out.num_commit[b, lane])
        for i in range(7):
            k = c + i
            if not (k <= m and k < 7):
                continue
            p, q, d = probs[b, start + k], args[7][b, lane, k], int(args[6][b, lane, k])
            token = int(out.next_tokens[b, lane, i])
            torch.testing.assert_close(out.next_q[b, lane, i], p)
            if float(args[8][b, lane, k] * q[d]) < float(p[d]):
                assert token == d
                kept += 1
            else:
                assert float(p[token]) > float(q[token])
                redrawn += 1
    assert kept >= 3 and redrawn >= 3, (kept, redrawn)


def test_coupled_draws_sample_p_and_repeat_under_similar_p():
    """The exponential race samples p (frequencies), and the same noise under a nearby p gives the
    same token far more often than independent draws would."""
    from pjd.sampling import sample_coupled

    g = torch.Generator().manual_seed(3)
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    noise = -torch.log1p(-torch.rand(200_000, 5, generator=g))
    freq = torch.bincount(sample_coupled(p.expand(200_000, 5), noise), minlength=5).double() / 200_000
    assert torch.allclose(freq, p.double(), atol=4e-3) and freq[1] == 0
    near = torch.tensor([0.45, 0.0, 0.25, 0.25, 0.05])  # total variation 0.05 from p
    same = (sample_coupled(p.expand(200_000, 5), noise) == sample_coupled(near.expand(200_000, 5), noise))
    independent = float((p * near).sum())  # P(same) of two independent draws: 0.3275
    assert float(same.double().mean()) > 0.9 > independent


def full_window_case(draft_init):
    """Positional arguments of one greedy step (top_k = 1) where every lane fed a full window m = W = 4.

    Lane 0 (TOP): draft 2 is wrong, so slot 2 is resampled and the next drafts are lane offsets
    k = 3..6. Lane 1 (PREFIX): every draft right, next drafts k = 4..7. Lane 2 (TOP, room for the
    bonus): every draft right, bonus at k = 4, next drafts k = 5..8. Every init token differs from
    every target's argmax, so a slot drafted from a target cannot pass for an initialised one.
    """
    W, V, L = 4, 64, 3
    g = torch.Generator().manual_seed(12)
    lane_start = torch.tensor([[1, 6, 11]], dtype=torch.int32)
    logits = torch.randn(1, 1 + L * (W + 1), V, generator=g) * 4
    argmax = logits[0].argmax(-1)
    draft_tokens = torch.stack([argmax[s:s + W] for s in lane_start[0].tolist()])[None].clone()
    draft_tokens[0, 0, 2] = (argmax[1 + 2] + 1) % V
    draft_q = torch.nn.functional.one_hot(draft_tokens, V).float()
    unused = [t for t in range(V) if t not in set(argmax.tolist())]
    init_tokens = torch.tensor(unused[:L * W]).view(1, L, W)
    return (logits, lane_start, torch.full((1, L), W, dtype=torch.int32), torch.tensor([[TOP, PREFIX, TOP]]).int(),
            torch.tensor([[0, 8, 16]]).int(), torch.tensor([[W, W, W + 2]]).int(), draft_tokens, draft_q,
            torch.full((1, L, W), 0.5), torch.rand(1, L, W + 1, generator=g), init_tokens,
            1.0, (0, V), 1.0, 1, 1.0, 0.5, draft_init, -1, 1, 1)


@pytest.mark.parametrize("draft_init", ["random", "repeat_left"])
def test_slot_after_a_full_window_is_drafted_from_its_target(draft_init):
    """DESIGN.md §1.1: the slot right after the last fed draft (k = m = W) takes a fresh sample of
    this step's p_W; only slots beyond every target are initialised."""
    args = full_window_case(draft_init)
    logits, lane_start, init_tokens = args[0], args[1], args[10]
    argmax = logits[0].argmax(-1)
    out = speculative_verify_reference(*args)
    assert out.num_accepted.tolist() == [[2, 4, 4]] and out.num_commit.tolist() == [[3, 4, 5]]
    for lane in range(3):
        a = int(out.num_commit[0, lane])
        for i in range(4):
            k = a + i
            token = int(out.next_tokens[0, lane, i])
            if k == 4:  # k = m = W: a fresh sample of p_W (top_k = 1: its argmax, q = p_W one-hot)
                target = int(argmax[int(lane_start[0, lane]) + 4])
                assert token == target, (lane, i)
                torch.testing.assert_close(out.next_q[0, lane, i], torch.nn.functional.one_hot(
                    torch.tensor(target), 64).float())
            elif k > 4:  # initialised: uniform, or a copy of the last non-initialised token to the left
                left = out.next_tokens[0, lane, i - 1] if i > 0 else out.commit_tokens[0, lane, a - 1]
                expect = int(init_tokens[0, lane, i]) if draft_init == "random" else int(left)
                assert token == expect, (lane, i)
                assert out.next_q[0, lane, i, token] == 1


@pytest.mark.parametrize("change,needle", [
    (lambda a: a.__setitem__(7, a[7][..., :-1]), "draft_q must have shape"),
    (lambda a: a.__setitem__("draft_init", "copy"), "draft_init must be one of"),
    (lambda a: a.__setitem__("continuation", True), "continuation replaces draft reuse"),
    (lambda a: a.__setitem__("coupled_noise", torch.ones(1, 2, 3, 30)), "coupled_noise must have shape"),
    (lambda a: a.__setitem__("coupled_noise", torch.full((1, 2, 4, 30), float("inf"))),
     "coupled_noise must be finite"),
])
def test_bad_inputs(change, needle):
    args = list(make_case(5, B=1, L=2, W=3, V=30))
    kwargs = public_kwargs(args)
    change(kwargs if needle.startswith(("draft_init", "continuation", "coupled")) else args)
    with pytest.raises(ValueError, match=needle):
        speculative_verify(*args[:11], **kwargs, backend="torch")


def test_triton_wrapper_rejects_bad_inputs_before_launch():
    from pjd.kernels.speculative_verify import speculative_verify_triton

    args = list(make_case(6, B=2, L=2, W=3, V=30))
    bad_logits = args.copy()
    bad_logits[0] = torch.cat([args[0]] * 3)  # 3B rows: neither B nor 2B
    with pytest.raises(ValueError, match="logits must have B=2 rows"):
        speculative_verify_triton(*bad_logits)
    bad_window = list(make_case(6, B=1, L=1, W=64, V=30))
    with pytest.raises(ValueError, match="W=64"):
        speculative_verify_triton(*bad_window)
    args[15] = 0.0
    with pytest.raises(ValueError, match="top_p must be in"):
        speculative_verify_triton(*args)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = make_case(7, B=1, L=2, W=3, V=30)
    with pytest.raises(ValueError, match="backend='triton' got tensors on cpu"):
        speculative_verify(*args[:11], **public_kwargs(args), backend="triton")


# ---------------------------------------------------------------- (a') torch.library registration
def _permuted(t):
    """t's values in reversed memory order: non-contiguous strides that TensorIterator propagates."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def _with_tensors(args, change):
    return [change(i, a) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]


# Inputs the custom op's schema accepts (any dtype and strides), beyond what the public wrapper passes.
INPUT_VARIANTS = {
    "canonical": lambda args: args,
    "bf16_draft_q": lambda args: _with_tensors(args, lambda i, a: a.bfloat16() if i == 7 else a),
    "fp64_draft_q": lambda args: _with_tensors(args, lambda i, a: a.double() if i == 7 else a),
    "int64_lanes": lambda args: _with_tensors(args, lambda i, a: a.long() if 1 <= i <= 5 else a),
    "non_contiguous": lambda args: _with_tensors(args, lambda i, a: _permuted(a)),
}


def _op_args(args, backend):
    """make_case's positional arguments as pjd::speculative_verify takes them."""
    lo, hi = args[12]
    continuation, noise = args[21:23] if len(args) > 21 else (False, None)
    return (*args[:12], lo, hi, *args[13:21], continuation, noise, backend)


def assert_canonical(out, B, L, W, Vi):
    """The registered output contract: dtypes and shapes of VerifyResult, every tensor contiguous."""
    want = [(torch.int32, (B, L)), (torch.int32, (B, L)), (torch.int64, (B, L, W + 1)), (torch.int64, (B, L, W)),
            (torch.float32, (B, L, W, Vi)), (torch.bool, (B, L))]
    got = [(t.dtype, tuple(t.shape)) for t in out]
    assert got == want
    assert all(t.is_contiguous() for t in out), [t.stride() for t in out]


@pytest.mark.parametrize("variant", list(INPUT_VARIANTS))
@pytest.mark.parametrize("dtype,cfg", [(d, c) for d in ("float32", "float16", "bfloat16") for c in (False, True)])
def test_opcheck(dtype, cfg, variant):
    """Fake kernel == real outputs (dtype, shape, strides), schema, autograd and AOT dispatch."""
    args = INPUT_VARIANTS[variant](list(make_case(21, B=2, L=3, W=3, V=40, cfg=cfg, dtype=dtype, eol=True)))
    op_args = _op_args(args, "torch")
    assert_canonical(torch.ops.pjd.speculative_verify(*op_args), B=2, L=3, W=3, Vi=39)
    torch.library.opcheck(torch.ops.pjd.speculative_verify.default, op_args)


def test_opcheck_with_continuation_and_coupled_noise():
    args = make_case(23, B=2, L=3, W=3, V=40, reuse=None, continuation=True, coupled=True)
    op_args = _op_args(list(args), "torch")
    assert_canonical(torch.ops.pjd.speculative_verify(*op_args), B=2, L=3, W=3, Vi=40)
    torch.library.opcheck(torch.ops.pjd.speculative_verify.default, op_args)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_non_contiguous_inputs_give_canonical_outputs(backend):
    """The public op on strided inputs: the same values as on contiguous ones, canonical outputs."""
    args = make_case(22, B=2, L=3, W=3, V=40, cfg=True)
    want = speculative_verify(*args[:11], **public_kwargs(args), backend=backend)
    got = speculative_verify(*INPUT_VARIANTS["non_contiguous"](list(args))[:11], **public_kwargs(args),
                             backend=backend)
    assert_canonical(got, B=2, L=3, W=3, Vi=40)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------- (b) Triton interpreter parity
# name -> list of (make_case kwargs (seed 100 + index unless given), tiles); tiles None = the wrapper's default (interpreter tiles),
# small tiles force several blocks per row (running-sum carries, multi-block searches).
CASES = {
    "small": [
        (dict(B=1, L=1, W=1, V=300), None),
        (dict(B=2, L=3, W=3, V=301, image=(5, 290), cfg=True, temperature=0.7), None),
        (dict(B=3, L=5, W=7, V=517, top_k=10, eol=True, draft_init="repeat_left"), None),
        (dict(B=2, L=4, W=15, V=400, top_p=0.8, reuse=None), None),
        (dict(B=2, L=2, W=7, V=700, dtype="float16", top_k=1), None),
        (dict(B=1, L=5, W=3, V=333, eol=True, reuse=None, draft_init="repeat_left", cfg=True, dtype="float16"), None),
        (dict(B=2, L=3, W=7, V=2000, top_k=300, top_p=0.9, temperature=1.3, eol=True, scale=2.0), None),
        # low reuse threshold, peaked p: rejected drafts with p/q above the threshold (never kept)
        (dict(B=3, L=5, W=7, V=400, reuse=0.2, scale=6.0), None),
    ],
    "tiles": [
        (dict(B=2, L=3, W=7, V=600, image=(3, 590), top_k=37, top_p=0.85, cfg=True), (128, 64)),
        (dict(B=1, L=4, W=3, V=1000, dtype="bfloat16", top_p=0.95, draft_init="repeat_left", eol=True), (256, 128)),
    ],
    # Issue 22: continuation (reuse off) and coupled draws, alone and together, with EOL / CFG / filters.
    "issue22": [
        (dict(B=2, L=4, W=7, V=300, reuse=None, continuation=True, scale=2.0), None),
        (dict(B=2, L=3, W=5, V=517, reuse=None, continuation=True, eol=True, draft_init="repeat_left", cfg=True,
              top_k=40, seed=212), None),
        (dict(B=2, L=4, W=7, V=400, coupled=True, top_p=0.9, temperature=0.8), None),
        (dict(B=3, L=3, W=3, V=333, reuse=None, coupled=True, eol=True, draft_init="repeat_left"), None),
        (dict(B=2, L=4, W=15, V=600, reuse=None, continuation=True, coupled=True, cfg=True, dtype="bfloat16",
              scale=2.0), None),
        (dict(B=2, L=3, W=7, V=700, image=(3, 690), reuse=None, continuation=True, coupled=True, top_k=50,
              scale=2.0), (128, 64)),
    ],
    "large": [
        # seeds picked for coverage (accepted prefixes, a full acceptance across an EOL slot + bonus)
        (dict(B=1, L=3, W=3, V=70000, image=(100, 65636), cfg=True, dtype="bfloat16", top_k=50, top_p=0.9,
              scale=8.0, seed=107), None),
        (dict(B=1, L=2, W=7, V=65536, top_p=0.95, temperature=0.8, eol=True, scale=8.0, seed=109), None),
    ],
}


def compare(ref, out) -> list[str]:
    names = ("num_accepted", "num_commit", "commit_tokens", "next_tokens", "next_q")
    problems = [f"{n}: dtype {o.dtype} / shape {list(o.shape)}, expected {r.dtype} / {list(r.shape)}"
                for n, r, o in zip(names, ref, out) if o.dtype != r.dtype or o.shape != r.shape]
    if problems:
        return problems
    committed = torch.arange(ref.commit_tokens.shape[-1]) < ref.num_commit[..., None]
    for n, r, o in zip(names[:4], ref[:4], out[:4]):
        if n == "commit_tokens":
            r, o = r.masked_fill(~committed, 0), o.masked_fill(~committed, 0)
        if not torch.equal(r, o):
            problems.append(f"{n}: {o.tolist()} != {r.tolist()}")
    if not torch.allclose(out[4], ref[4], rtol=1e-5, atol=1e-7):
        problems.append(f"next_q: max |diff| {(out[4] - ref[4]).abs().max().item():.3g}")
    return problems


def _parity_cases(name):
    """(label, positional args, tiles) of a named group: CASES, or "rules" (full_window_case)."""
    if name == "rules":
        return [(f"full window, {init}", full_window_case(init), None) for init in ("random", "repeat_left")]
    return [(kwargs, make_case(**{"seed": 100 + i, **kwargs}), tiles) for i, (kwargs, tiles) in enumerate(CASES[name])]


def _interpreter_parity(name):
    from pjd.kernels.speculative_verify import speculative_verify_triton

    failures, stats = [], {"accepted": 0, "committed": 0}
    for kwargs, args, tiles in _parity_cases(name):
        ref = speculative_verify_reference(*args)
        stats["accepted"] += int(ref.num_accepted.sum())
        stats["committed"] += int(ref.num_commit.sum())
        try:
            if tiles is None:  # the public op's dispatch
                out = speculative_verify(*args[:11], **public_kwargs(args), backend="triton")
            else:
                out = speculative_verify_triton(*args, tiles=tiles)
            failures += [f"{kwargs} tiles={tiles}: {p}" for p in compare(ref, out)]
        except Exception as exc:  # report every failing case, not just the first
            failures.append(f"{kwargs} tiles={tiles}: {type(exc).__name__}: {exc}")
    return {"failures": failures, **stats}


def _generate_parity(name):
    # head dim 64: the draft_attention kernel supports D in {64, 128}
    model = tiny_llama(32, hidden_size=128, layers=2, heads=2, kv_heads=1, logit_scale=3.0, seed=3)
    ids = torch.randint(24, 30, (2, 3), generator=torch.Generator().manual_seed(0))
    if name == "pjd_cfg":
        kw = dict(method="pjd", height=4, width=6, context=2, window=3, cfg_scale=3.0,
                  uncond_input_ids=torch.full_like(ids[:, :1], 29))
    elif name == "pjd_coupled_continuation":  # issue 22: both options, every kernel variant they add
        kw = dict(method="pjd", height=4, width=6, context=2, window=3, eol_token_id=30, top_k=12,
                  coupled_draws=True, continuation=True)
    else:
        kw = dict(method="sjd", height=3, width=5, window=5, eol_token_id=30, top_k=12)
    import pjd.kernels.speculative_verify as kernel_module

    calls = []
    kernel = kernel_module.speculative_verify_triton
    kernel_module.speculative_verify_triton = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    results = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            results[backend] = pjd.generate(model, ids, image_token_range=(0, 24), backend=backend, seed=11, **kw)
    torch_, triton_ = results["torch"], results["triton"]
    failures = []
    if not torch.equal(torch_.tokens, triton_.tokens):
        failures.append(f"{name}: tokens differ\n{torch_.tokens.tolist()}\n{triton_.tokens.tolist()}")
    if torch_.steps != triton_.steps:
        failures.append(f"{name}: steps {torch_.steps} (torch) != {triton_.steps} (triton)")
    if len(calls) != triton_.steps:
        failures.append(f"{name}: the Triton kernel ran {len(calls)} times in {triton_.steps} steps")
    return {"failures": failures, "steps": torch_.steps, "tokens": torch_.tokens[0].numel()}


def _run_subprocess(*argv):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"interpreter subprocess printed nothing (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert not result["failures"], "\n".join(result["failures"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CASES, "rules"])
def test_triton_interpreter_matches_reference(name):
    result = _run_subprocess("parity", name)
    # The cases must exercise acceptance, not only first-draft rejections.
    assert result["accepted"] >= 3 and result["committed"] > result["accepted"]


def _bench_module():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import verify

    return verify


def _bench_gate():
    """benchmarks/verify.py's correctness gate passes on its own inputs and rejects a wrong result."""
    verify = _bench_module()
    x = verify.make_inputs(1024, 2, torch.device("cpu"), torch.float32)
    verify.check(x, draws=3)
    # A wrong kernel: the Triton side samples with other uniforms than the torch side.
    run_op, failures = verify.run_op, []
    verify.run_op = lambda x, backend: run_op({**x, "u_sample": 1 - x["u_sample"]} if backend == "triton" else x,
                                             backend)
    try:
        verify.check(x, draws=3)
        failures.append("check accepted a Triton result computed from different draws")
    except RuntimeError:
        pass
    return {"failures": failures}


def test_verify_benchmark_cpu_rows():
    verify = _bench_module()
    row = verify.run_case(512, 2, torch.device("cpu"), torch.float32, repeats=1)
    assert row["torch_ms"] > 0 and row["triton_note"] == "not measured on this device"
    assert row["flashinfer_ms"] != row["flashinfer_ms"] and row["flashinfer_note"]  # NaN + a reason
    b = verify.bytes_moved(16384, 8, 2)
    assert b["logits"] == 2 * 64 * 16384 * 2 and b["q_io"] == 2 * 56 * 16384 * 4


@pytest.mark.slow
def test_verify_benchmark_gate_under_interpreter():
    _run_subprocess("bench", "gate")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pjd_cfg", "sjd_eol", "pjd_coupled_continuation"])
def test_generate_with_triton_backend_matches_torch(name):
    result = _run_subprocess("generate", name)
    assert result["steps"] < result["tokens"], "the run must accept drafts (fewer steps than tokens)"


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the test (sets TRITON_INTERPRET=1)"
    torch.set_num_threads(1)
    kind, name = sys.argv[1:3]
    out = {"parity": _interpreter_parity, "generate": _generate_parity, "bench": lambda _: _bench_gate()}[kind](name)
    print(json.dumps(out))
    sys.exit(1 if out["failures"] else 0)
