"""Fused speculative verification of one decoding step: Triton kernels + torch wrapper.

Semantics: ``pjd.ops.speculative_verify_reference`` (its module docstring has the rules). Three
launches, no host synchronisation, every shape fixed by the inputs:

1. ``_target_probs_kernel``, grid ``(B * L, W + 1)``: program (lane, k) builds the target
   distribution p of the lane's fed input k (k <= m; other programs exit at once) and writes it to a
   scratch row ``P[lane, k, :Vi]`` (fp32), with the row's inverse-CDF total and last nonzero index.
   Passes over the row (Vi = image vocabulary):
     - 1 pass over the logits (cond, plus uncond with CFG): x = CFG combine / temperature, written
       to the scratch row; running max and minimum order key;
     - top-k (0 < top_k < Vi): <= 8 counting passes over the scratch row (below);
     - 1 pass: softmax normaliser z over the tokens top-k keeps;
     - top-p (top_p < 1): <= 8 mass passes over the scratch row (below);
     - 1 pass: p = kept softmax (renormalised after top-p) written over x, its total and last
       nonzero index.
   So 3 passes without filters, at most 19 with both; only the first reads the logits, the rest
   stream the fp32 scratch row (an L2-resident 4 * Vi bytes per program).
2. ``_accept_kernel``, grid ``(B * L,)``: acceptance of the m drafts (gathers of p and q at the
   draft tokens), the first-rejection scan, and for TOP lanes the residual / bonus draw: at most
   two passes over one row (residual total, then the inverse-CDF search, which stops at the hit).
3. ``_next_drafts_kernel``, grid ``(B * L, W)``: next draft i of a lane: reuse test, fresh
   inverse-CDF sample, init (random / repeat_left), forced EOL, and its q row (one copy pass;
   fresh samples add one early-exit search pass). Inactive lanes copy their drafts through.
   Variants (constexpr, compiled only when asked): CONTINUATION tests a stored draft against its
   new target (a failing one adds the residual's two passes), COUPLED draws fresh samples by the
   exponential race over the slot's noise row (one pass over p and the noise).

Threshold search without a sort (top-k and top-p). Both filters keep the tokens whose order key
(an int32 with the order of the fp32 value) is >= t, where t is the largest key with
F(t) >= target: top-k counts elements (F = #{x >= t}, target k), top-p sums mass
(F = sum of p over p >= t, target top_p; this is pjd.sampling's "largest t whose tokens hold at
least top_p", ties kept). F is non-increasing in t, so t is found by a 16-way search over the key
range: each pass evaluates F at 16 evenly spaced keys at once and keeps the sub-range where F
crosses the target, shrinking the range 16-fold; a 32-bit range takes at most 8 passes.

Numerics. The reference (torch on CPU) accumulates cumulative sums in float64 and rounds them to
fp32; so do the kernels (mass sums and inverse-CDF running sums in fp64: with fp32 block sums and
carry, 0.04-0.1% of draws at Vi = 65,536 land on another token, measured in a numpy emulation;
docs/kernels.md). Remaining
differences are last-bit ones in exp and in summation order (the softmax normaliser), which can
flip a decision only when a uniform or top_p lands within ~1e-7 relative of a boundary.
Divisions use ``tl.math.div_rn`` (IEEE, as torch) rather than Triton's approximate fp32 divide,
exponentials use libdevice's ``expf`` (``_exp``) rather than ``ex2.approx``, and every launch
disables FP contraction (``enable_fp_fusion=False``): the CFG combine ``u + s * (c - u)`` is then
rounded after the product as torch rounds it, instead of fused into one FMA.

commit_tokens: entries k < num_commit are the contract. Beyond it the reference also writes the
extra token it samples for every lane (PREFIX and inactive lanes included); these kernels sample
only where the token is committed (top-row lanes), so those unspecified tail entries hold the
stored drafts (EOL at forced slots) instead.

Memory: scratch ``P`` is ``[B, L, W + 1, Vi]`` fp32 (4 * (W + 1) * Vi bytes per lane, e.g. 2 MiB per
lane at W = 7, Vi = 65,536) plus 8 bytes per row of statistics; docs/kernels.md counts the bytes
moved per step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETING, TRITON_DTYPE, device_guard, tuned_for

TOP = tl.constexpr(0)  # pjd.ops.speculative_verify.TOP
INT32_MIN = tl.constexpr(-(2**31))
INT32_MAX = tl.constexpr(2**31 - 1)
PROBES = 16  # keys evaluated per search pass: 4 bits of the 32-bit key range per pass

# Tiles. BLOCK_V: streaming passes over a row; BLOCK_S: search passes ([BLOCK_S, PROBES] compares,
# fp64 mass for top-p); BLOCK_W >= W + 1 (drafts of one lane in one tile).
# The interpreter pays per operation, not per element: big tiles keep a 65k-token row to a few
# iterations. Same code, same results (tests also force small tiles to cover the carries).
INTERPRETER_TILES = (4096, 4096)
BLOCK_WS = (16, 64)


class Tuning(NamedTuple):
    tiles: tuple  # (BLOCK_V, BLOCK_S) on a GPU
    num_warps: dict  # per kernel; the next-draft kernel per constexpr variant


# GPU tiles and warps per Triton release (kernels/_launch.py: tuned_for picks the table of the
# installed Triton; docs/decisions.md, issue 19), each spill-free under its release's dry-run gate.
# Neither changes a result: every tile size computes the same tokens (fp64 running sums, exact
# threshold searches; the interpreter tests force small tiles), and warps only split the work.
TUNINGS = {
    # Triton 3.6 (torch 2.11; no --regAllocOptLevel for ptxas). With 4 warps the target kernel spills
    # on sm_90; every next-draft variant spills with some warps counts on sm_80 or sm_90 (8-40 bytes at
    # 40-80 registers, at BLOCK_V 512 as at 1024), so each has a count that compiles clean on both:
    # continuation spills with 2, 4, 8 and 16 warps, not with 32.
    (3, 6): Tuning(tiles=(1024, 256), num_warps={
        "target_probs": 8, "accept": 8, "next_drafts": 8, "next_drafts_coupled": 4,
        "next_drafts_continuation": 32, "next_drafts_continuation_coupled": 4}),
    # Triton 3.9 (our pin). The accept kernel runs one program per lane over whole rows: 8 warps keep
    # more loads in flight (and, at BLOCK_V 1024, ptxas spills 8 bytes on sm_90 with 4). The
    # next-drafts kernel with continuation (a residual draw and, coupled, the exponential race in one
    # program) spills 8-16 bytes with 4. 8 warps for the target and plain next-draft kernels spill
    # here (12 bytes on sm_80, 28 on sm_90).
    (3, 9): Tuning(tiles=(1024, 256), num_warps={
        "target_probs": 4, "accept": 8, "next_drafts": 4, "next_drafts_coupled": 4,
        "next_drafts_continuation": 8, "next_drafts_continuation_coupled": 8}),
}
GPU_TILES, NUM_WARPS = TUNINGS[tuned_for(TUNINGS, triton.__version__)]

# Compile options of every launch: no FP contraction (module docstring, "Numerics").
NUMERICS = {"enable_fp_fusion": False}


if INTERPRETING:  # numpy's exp: accurate, as libdevice's (the interpreter has no libdevice)
    @triton.jit
    def _exp(x):
        return tl.exp(x)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)


@triton.jit
def _order_key(x):
    """int32 key with the order of fp32 x (no NaN); -0.0 and +0.0 share key 0 as they compare equal."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(x == 0.0, 0, key)


@triton.jit
def _probs(x, kth_key, x_max, z):
    """Softmax of the tokens top-k keeps (key(x) >= kth_key), 0 elsewhere."""
    return tl.where(_order_key(x) >= kth_key, tl.math.div_rn(_exp(x - x_max), z), 0.0)


@triton.jit
def _forced(slot, k, eol, row_slots, width):
    """Lane offset k is a forced EOL slot."""
    return (eol >= 0) & ((slot + k) % row_slots == width)


@triton.jit
def _threshold_search(Row, n, lo, hi, target, kth_key, x_max, z,
                      MASS: tl.constexpr, BLOCK: tl.constexpr, NPROBE: tl.constexpr):
    """Largest key t in [lo, hi] with F(t) >= target, and F(t).

    MASS=False (top-k): key = order key of x (the scratch row), F(t) = #{key >= t} (int32).
    MASS=True (top-p): key = order key of p = _probs(x), F(t) = sum of p with key >= t (fp64,
    compared in fp32 as the reference compares its fp32 cumulative mass). Requires F(lo) >= target.
    Each pass evaluates F at lo + i * step, i < NPROBE, step = ceil((hi - lo + 1) / NPROBE); F is
    non-increasing, so the keys where F >= target are a prefix; the range shrinks to the step after
    the last of them. A pass always runs, so F(t) is known even when lo == hi from the start.
    """
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    i = tl.arange(0, NPROBE).to(tl.int64)
    if MASS:
        f_lo = tl.full([], 0.0, tl.float64)
    else:
        f_lo = tl.full([], 0, tl.int32)
    searching = lo <= hi
    while searching:
        step = (hi - lo + NPROBE) // NPROBE
        probes = lo + i * step
        if MASS:
            f = tl.zeros([NPROBE], tl.float64)
        else:
            f = tl.zeros([NPROBE], tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            x = tl.load(Row + offs, mask=valid, other=0.0)
            if MASS:
                p = _probs(x, kth_key, x_max, z)
                key = _order_key(p)
                w = p.to(tl.float64)
            else:
                key = _order_key(x)
                w = tl.full([BLOCK], 1, tl.int32)
            ge = (key.to(tl.int64)[:, None] >= probes[None, :]) & valid[:, None]
            f += tl.sum(tl.where(ge, w[:, None], 0), axis=0)
        if MASS:
            ok = f.to(tl.float32) >= target
        else:
            ok = f >= target
        best = tl.max(tl.where(ok & (probes <= hi), i, 0), axis=0)
        f_lo = tl.sum(tl.where(i == best, f, 0), axis=0)
        lo = lo + best * step
        hi = tl.minimum(hi, lo + step - 1)
        searching = lo < hi
    return lo, f_lo


@triton.jit
def _inverse_cdf(Prow, Qrow, use_q, n, u, total, last, BLOCK: tl.constexpr):
    """pjd.sampling.sample_inverse_cdf on d = max(p - q, 0) (use_q != 0) or d = p, one row.

    First i with fp32(fp64 running sum of d)[i] > u * total, capped at `last` (the last nonzero
    index); total / last are the row's (from its statistics or _residual_stats). Blocks run in
    vocabulary order with an fp64 carry and the loop stops at the block holding the hit.
    """
    target = u * total
    q_len = tl.where(use_q != 0, n, 0)  # q is read only when used (as a length: see _next_drafts_kernel)
    carry = tl.full([], 0.0, tl.float64)
    found = n
    start = 0
    while (start < n) & (found == n):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        d = tl.load(Prow + offs, mask=valid, other=0.0)
        q = tl.load(Qrow + offs, mask=offs < q_len, other=0.0)
        d = tl.where(q_len > 0, tl.maximum(d - q, 0.0), d)
        d64 = d.to(tl.float64)
        cdf = carry + tl.cumsum(d64, axis=0)
        hit = valid & (cdf.to(tl.float32) > target)
        found = tl.min(tl.where(hit, offs, n), axis=0)
        carry += tl.sum(d64, axis=0)
        start += BLOCK
    return tl.minimum(found, last)


@triton.jit
def _residual_stats(Prow, Qrow, n, BLOCK: tl.constexpr):
    """(fp32 total of max(p - q, 0) summed in fp64, last index where it is > 0; 0 if none)."""
    total = tl.full([], 0.0, tl.float64)
    last = tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        d = tl.maximum(tl.load(Prow + offs, mask=valid, other=0.0) - tl.load(Qrow + offs, mask=valid, other=0.0), 0.0)
        total += tl.sum(d.to(tl.float64), axis=0)
        last = tl.maximum(last, tl.max(tl.where(valid & (d > 0.0), offs, 0), axis=0))
    return total.to(tl.float32), last


# Sizes that change every step (inputs, hence the logits' batch stride) and the image count (B = 1
# would become a constexpr) are never specialised.
@triton.jit(do_not_specialize=["stride_lb", "num_images", "num_inputs"])
def _target_probs_kernel(
    Logits, LaneStart, LaneDrafts, P, Total, Last, RowBad,
    stride_lb, stride_ln,
    num_images, num_lanes, num_inputs, num_slots, lo, vocab,
    cfg_scale, temperature, top_k, top_p,
    CFG: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, NPROBE: tl.constexpr,
):
    """Program (lane, k): p of the lane's fed input k into P[lane, k] (fp32 [Vi]); Total / Last;
    RowBad[lane, k] = 1 when x has a NaN or +inf or no entry above -inf (then P is garbage, unused).

    Grid (B * L, W + 1); lane = b * L + l. Inactive lanes (start < 0) and k > m do nothing.
    CFG: Logits rows [0, B) cond, [B, 2B) uncond. top_k = 0 / top_p >= 1: filter off.
    """
    lane = tl.program_id(0)
    k = tl.program_id(1)
    start = tl.load(LaneStart + lane)
    m = tl.load(LaneDrafts + lane)
    if (start >= 0) & (k <= m):
        b = lane // num_lanes
        row = tl.minimum(start + k, num_inputs - 1)  # as the reference's clamp
        cond = Logits + b.to(tl.int64) * stride_lb + row.to(tl.int64) * stride_ln + lo
        uncond = cond + num_images.to(tl.int64) * stride_lb
        out = P + (lane * num_slots + k).to(tl.int64) * vocab

        # Pass 1 (the only read of the logits): x = CFG combine / temperature into the scratch row.
        x_max = tl.full([], float("-inf"), tl.float32)
        key_min = tl.full([], INT32_MAX, tl.int32)
        n_bad = tl.full([], 0, tl.int32)  # NaN or +inf entries
        for s in range(0, vocab, BLOCK_V):
            offs = s + tl.arange(0, BLOCK_V)
            valid = offs < vocab
            x = tl.load(cond + offs, mask=valid, other=0.0).to(tl.float32)
            if CFG:  # same operation order as the reference: uncond + s * (cond - uncond), then / T
                un = tl.load(uncond + offs, mask=valid, other=0.0).to(tl.float32)
                x = un + cfg_scale * (x - un)
            x = tl.math.div_rn(x, temperature)
            tl.store(out + offs, x, mask=valid)
            x_max = tl.maximum(x_max, tl.max(tl.where(valid, x, float("-inf")), axis=0))
            key_min = tl.minimum(key_min, tl.min(tl.where(valid, _order_key(x), INT32_MAX), axis=0))
            n_bad += tl.sum(tl.where(valid & ((x != x) | (x == float("inf"))), 1, 0), axis=0)
        undefined = (n_bad > 0) | (x_max == float("-inf"))
        tl.store(RowBad + lane * num_slots + k, undefined.to(tl.int32))
        # Later passes read the row with other threads than the ones that wrote it.
        tl.debug_barrier()

        kth_key = tl.full([], INT32_MIN, tl.int32)  # top-k off: keep every token
        if top_k > 0:
            kth, _ = _threshold_search(out, vocab, key_min, _order_key(x_max), top_k, kth_key, x_max, 1.0,
                                       False, BLOCK_S, NPROBE)
            kth_key = kth.to(tl.int32)

        z = tl.full([], 0.0, tl.float32)
        for s in range(0, vocab, BLOCK_V):
            offs = s + tl.arange(0, BLOCK_V)
            valid = offs < vocab
            x = tl.load(out + offs, mask=valid, other=float("-inf"))
            z += tl.sum(tl.where(valid & (_order_key(x) >= kth_key), _exp(x - x_max), 0.0), axis=0)

        p_key = tl.full([], 0, tl.int32)  # top-p off: keep every p >= 0
        kept_mass = tl.full([], 1.0, tl.float32)  # p / 1.0 is exact
        if top_p < 1.0:
            p_max = _probs(x_max, kth_key, x_max, z)  # exp(0) / z: the largest p
            t, mass = _threshold_search(out, vocab, tl.full([], 0, tl.int32), _order_key(p_max), top_p,
                                        kth_key, x_max, z, True, BLOCK_S, NPROBE)
            p_key = t.to(tl.int32)
            kept_mass = mass.to(tl.float32)

        # Final pass: p over x in place (same thread reads then writes each element), statistics.
        total = tl.full([], 0.0, tl.float64)
        last = tl.full([], 0, tl.int32)
        for s in range(0, vocab, BLOCK_V):
            offs = s + tl.arange(0, BLOCK_V)
            valid = offs < vocab
            p = _probs(tl.load(out + offs, mask=valid, other=float("-inf")), kth_key, x_max, z)
            p = tl.where(_order_key(p) >= p_key, tl.math.div_rn(p, kept_mass), 0.0)
            tl.store(out + offs, p, mask=valid)
            total += tl.sum(tl.where(valid, p, 0.0).to(tl.float64), axis=0)
            last = tl.maximum(last, tl.max(tl.where(valid & (p > 0.0), offs, 0), axis=0))
        tl.store(Total + lane * num_slots + k, total.to(tl.float32))
        tl.store(Last + lane * num_slots + k, last)


@triton.jit
def _accept_kernel(
    P, Total, Last, RowBad, DraftTokens, DraftQ, UAccept, USample,
    LaneStart, LaneDrafts, LaneRule, LaneSlot, LaneRoom,
    NumAccepted, NumCommit, CommitTokens, LaneInvalid,
    window, vocab, lo, eol, row_slots, width,
    BLOCK_W: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program lane: acceptance scan, residual / bonus draw (TOP lanes), commit tokens. Grid (B * L,).

    A fed lane with an undefined target (RowBad at a fed input) is flagged in LaneInvalid and
    treated as inactive.
    """
    lane = tl.program_id(0)
    num_slots = window + 1
    start = tl.load(LaneStart + lane)
    i = tl.arange(0, BLOCK_W)
    m = tl.where(start >= 0, tl.load(LaneDrafts + lane), -1)
    bad = tl.max(tl.load(RowBad + lane * num_slots + i, mask=(i <= m) & (i < num_slots), other=0), axis=0)
    tl.store(LaneInvalid + lane, bad)
    active = (start >= 0) & (bad == 0)
    m = tl.where(active, m, 0)
    slot = tl.load(LaneSlot + lane)
    tokens = DraftTokens + lane * window
    q_lane = DraftQ + lane.to(tl.int64) * window * vocab
    p_lane = P + lane.to(tl.int64) * num_slots * vocab

    # Acceptance of drafts i < m: u * q(d) < p(d), forced EOL slots always pass.
    fed = i < m
    d = tl.load(tokens + i, mask=i < window, other=0)
    idx = tl.minimum(tl.maximum(d - lo, 0), vocab - 1)
    p_d = tl.load(p_lane + i.to(tl.int64) * vocab + idx, mask=fed, other=0.0)
    q_d = tl.load(q_lane + i.to(tl.int64) * vocab + idx, mask=fed, other=0.0)
    u = tl.load(UAccept + lane * window + i, mask=fed, other=1.0)
    passes = fed & (_forced(slot, i, eol, row_slots, width) | (u * q_d < p_d))
    a = tl.min(tl.where(passes | (i >= window), window, i), axis=0)  # first failure
    rejected = a < m

    # TOP lanes commit one more token at slot a: residual sample after a rejection, else a bonus.
    rule = tl.load(LaneRule + lane)
    room = tl.load(LaneRoom + lane)
    has_extra = (rule == TOP) & active & (rejected | (m < room))
    extra = tl.full([], 0, tl.int64) + eol
    if has_extra & ~_forced(slot, a, eol, row_slots, width):
        p_row = p_lane + a.to(tl.int64) * vocab
        q_row = q_lane + tl.minimum(a, window - 1).to(tl.int64) * vocab
        total = tl.load(Total + lane * num_slots + a)
        last = tl.load(Last + lane * num_slots + a)
        use_q = rejected
        if rejected:
            r_total, r_last = _residual_stats(p_row, q_row, vocab, BLOCK_V)
            use_q = r_total > 0.0  # no residual mass: sample p itself, as the reference
            total = tl.where(use_q, r_total, total)
            last = tl.where(use_q, r_last, last)
        u_s = tl.load(USample + lane * num_slots + a)
        extra = (_inverse_cdf(p_row, q_row, use_q.to(tl.int32), vocab, u_s, total, last, BLOCK_V) + lo).to(tl.int64)
    num_commit = a + has_extra.to(tl.int32)
    tl.store(NumAccepted + lane, a)
    tl.store(NumCommit + lane, num_commit)

    # commit_tokens[c], c <= W: the stored drafts, the extra token at a, EOL at forced slots.
    c = tl.arange(0, BLOCK_W)
    commit = tl.load(tokens + tl.minimum(c, window - 1), mask=c < num_slots, other=0)
    commit = tl.where(has_extra & (c == a), extra, commit)
    commit = tl.where(_forced(slot, c, eol, row_slots, width), eol, commit)
    tl.store(CommitTokens + lane * num_slots + c, commit, mask=c < num_slots)


@triton.jit
def _exp_race(Prow, Erow, n, BLOCK: tl.constexpr):
    """pjd.sampling.sample_coupled on one row: the first i minimising E[i] / p[i] over p[i] > 0
    (IEEE division, as torch); 0 if no ratio is finite (torch's argmin of all-inf)."""
    best = tl.full([], float("inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        p = tl.load(Prow + offs, mask=valid, other=0.0)
        e = tl.load(Erow + offs, mask=valid, other=0.0)
        r = tl.where(valid & (p > 0.0), tl.math.div_rn(e, tl.where(p > 0.0, p, 1.0)), float("inf"))
        block_min, block_i = tl.min(r, axis=0, return_indices=True, return_indices_tie_break_left=True)
        block_i += start
        take = block_min < best  # strict: an earlier block wins ties, as argmin's first index
        best_i = tl.where(take, block_i, best_i)
        best = tl.where(take, block_min, best)
    return best_i


@triton.jit
def _fresh_or_kept(p_lane, q_lane, tokens, Total, Last, UAccept, USample, Noise, lane, k, m, a, rejected,
                   slot, window, vocab, lo, eol, row_slots, width, reuse_threshold,
                   BLOCK_V: tl.constexpr, CONTINUATION: tl.constexpr, COUPLED: tl.constexpr):
    """Draft at lane offset k <= max(m, W - 1) (not init, not forced): (fresh, token).

    Kept (old draft and q) when reuse is on, there is a stored draft (k < W), it is not the rejected
    draft and p(d) > thr * q(d); else, if the slot has a target this step (k <= m), a fresh sample
    of p_k (always at k = W = m, right after a full window): the exponential race on the slot's
    coupled noise (COUPLED) or an inverse-CDF draw. With CONTINUATION (reuse off) a stored draft
    with a target is tested as verification tests it (u_accept[k]): kept if it passes, else an
    inverse-CDF draw of max(p_k - q_k, 0); its q becomes p_k either way (fresh).
    """
    num_slots = window + 1
    has_target = k <= m
    stored = k < window
    old = tl.load(tokens + k, mask=stored, other=0)
    idx = tl.minimum(tl.maximum(old - lo, 0), vocab - 1)
    p_old = tl.load(p_lane + k.to(tl.int64) * vocab + idx, mask=has_target, other=0.0)
    q_old = tl.load(q_lane + k.to(tl.int64) * vocab + idx, mask=stored, other=0.0)
    reuse = (reuse_threshold >= 0.0) & stored & ~(rejected & (k == a)) & (p_old > reuse_threshold * q_old)
    fresh = has_target & ~reuse
    token = old
    if fresh:
        row = lane * num_slots + k
        p_row = p_lane + k.to(tl.int64) * vocab
        q_row = q_lane + k.to(tl.int64) * vocab
        draw = tl.full([], 1, tl.int1)
        if CONTINUATION:
            if stored:  # continuation: the draft is tested; a failing one is redrawn from the residual
                draw = tl.full([], 0, tl.int1)
                u = tl.load(UAccept + lane * window + k)
                if ~(_forced(slot, k, eol, row_slots, width) | (u * q_old < p_old)):
                    r_total, r_last = _residual_stats(p_row, q_row, vocab, BLOCK_V)
                    use_q = r_total > 0.0  # no residual mass: sample p itself, as the reference
                    total = tl.where(use_q, r_total, tl.load(Total + row))
                    last = tl.where(use_q, r_last, tl.load(Last + row))
                    index = _inverse_cdf(p_row, q_row, use_q.to(tl.int32), vocab, tl.load(USample + row), total, last,
                                         BLOCK_V)
                    token = (index + lo).to(tl.int64)
        if draw:  # a fresh sample of p_k
            if COUPLED:
                index = _exp_race(p_row, Noise + row.to(tl.int64) * vocab, vocab, BLOCK_V)
            else:
                index = _inverse_cdf(p_row, p_lane, 0, vocab, tl.load(USample + row), tl.load(Total + row),
                                     tl.load(Last + row), BLOCK_V)
            token = (index + lo).to(tl.int64)
    return fresh, token


@triton.jit
def _next_drafts_kernel(
    P, Total, Last, DraftTokens, DraftQ, UAccept, USample, Noise, InitTokens,
    LaneStart, LaneDrafts, LaneSlot, LaneInvalid, NumAccepted, NumCommit, CommitTokens,
    NextTokens, NextQ,
    window, vocab, lo, eol, row_slots, width, reuse_threshold, repeat_left,
    BLOCK_V: tl.constexpr, CONTINUATION: tl.constexpr, COUPLED: tl.constexpr,
):
    """Program (lane, i): next draft i of the lane (slot n' + i) and its q row. Grid (B * L, W).

    Runs after _accept_kernel (reads NumAccepted / NumCommit / CommitTokens).
    """
    lane = tl.program_id(0)
    i = tl.program_id(1)
    num_slots = window + 1
    tokens = DraftTokens + lane * window
    q_lane = DraftQ + lane.to(tl.int64) * window * vocab
    p_lane = P + lane.to(tl.int64) * num_slots * vocab
    start = tl.load(LaneStart + lane)
    # What the q row becomes: a copy of `src` (copy_len = vocab), one-hot at `hot` (init), or zeros
    # (forced). The copy switch is a length, not a bool: the interpreter rejects vector & scalar masks.
    src = q_lane + i.to(tl.int64) * vocab
    copy_len = vocab  # elements of src copied: vocab, or 0 (one-hot / zeros)
    hot = tl.full([], -1, tl.int32)
    slot = tl.load(LaneSlot + lane)
    if (start < 0) | (tl.load(LaneInvalid + lane) != 0):  # inactive or invalid lane: keep draft and q
        token = tl.load(tokens + i)
    else:
        m = tl.load(LaneDrafts + lane)
        a = tl.load(NumAccepted + lane)
        num_commit = tl.load(NumCommit + lane)
        rejected = a < m
        k = num_commit + i
        last_set = tl.maximum(m, window - 1)  # lane offset of the last stored or targeted slot
        if k > last_set:  # beyond the window and every target: initialise
            token = tl.load(InitTokens + lane * window + i)
            if repeat_left != 0:
                # Every init slot copies the last non-init token on its left (slot last_set if
                # not committed, else the last committed token), unless that is no image token.
                if num_commit <= last_set:
                    _, left = _fresh_or_kept(p_lane, q_lane, tokens, Total, Last, UAccept, USample, Noise, lane,
                                             last_set, m, a, rejected, slot, window, vocab, lo, eol, row_slots,
                                             width, reuse_threshold, BLOCK_V, CONTINUATION, COUPLED)
                else:
                    left = tl.load(CommitTokens + lane * num_slots + num_commit - 1)
                token = tl.where((left >= lo) & (left < lo + vocab), left, token)
            copy_len = 0
            hot = tl.minimum(tl.maximum(token - lo, 0), vocab - 1).to(tl.int32)
        else:
            fresh, token = _fresh_or_kept(p_lane, q_lane, tokens, Total, Last, UAccept, USample, Noise, lane, k,
                                          m, a, rejected, slot, window, vocab, lo, eol, row_slots, width,
                                          reuse_threshold, BLOCK_V, CONTINUATION, COUPLED)
            if fresh:
                src = p_lane + k.to(tl.int64) * vocab
            else:
                src = q_lane + k.to(tl.int64) * vocab
        if _forced(slot, k, eol, row_slots, width):
            token = tl.full([], 0, tl.int64) + eol
            copy_len = 0
            hot = tl.full([], -1, tl.int32)
    tl.store(NextTokens + lane * window + i, token)
    dst = NextQ + (lane * window + i).to(tl.int64) * vocab
    for s in range(0, vocab, BLOCK_V):
        offs = s + tl.arange(0, BLOCK_V)
        valid = offs < vocab
        q = tl.load(src + offs, mask=offs < copy_len, other=0.0)
        tl.store(dst + offs, tl.where(offs == hot, 1.0, q), mask=valid)


MAX_WINDOW = BLOCK_WS[-1] - 1


def unsupported(window: int, logits_dtype: torch.dtype) -> str | None:
    """Why the kernels cannot serve this call (None when they can)."""
    if logits_dtype not in TRITON_DTYPE:
        return f"speculative_verify's triton kernels take float32, float16 or bfloat16 logits, got {logits_dtype}"
    if window > MAX_WINDOW:
        return f"speculative_verify's triton kernels support draft windows W <= {MAX_WINDOW}, got W={window}"
    return None


def _block_w(window: int) -> int:
    return next(block for block in BLOCK_WS if window + 1 <= block)


def speculative_verify_triton(
    logits, lane_start, lane_drafts, lane_rule, lane_slot, lane_room,
    draft_tokens, draft_q, u_accept, u_sample, init_tokens,
    cfg_scale, image_token_range, temperature, top_k, top_p, reuse_threshold, draft_init,
    eol_token_id, row_slots, width, continuation=False, coupled_noise=None, *, tiles=None,
):
    """Triton implementation of ``pjd.ops.speculative_verify`` (same positional arguments as
    ``speculative_verify_reference``; reuse_threshold < 0 = off, eol_token_id < 0 = no EOL).

    Args (B images, L lanes, W window, N packed inputs, Vi = hi - lo image tokens):
        logits: ``[B or 2B, N, V]`` fp32 / fp16 / bf16 (rows [B, 2B) unconditional with CFG).
        lane_*: int32 ``[B, L]``; draft_tokens, init_tokens: int64 ``[B, L, W]``;
        draft_q: fp32 ``[B, L, W, Vi]``; u_accept fp32 ``[B, L, W]``; u_sample fp32 ``[B, L, W+1]``.
        continuation: bool; coupled_noise: fp32 ``[B, L, W+1, Vi]`` or None (the reference's rules).
        tiles: ``(BLOCK_V, BLOCK_S)`` override (tests); default GPU_TILES, or INTERPRETER_TILES
            under TRITON_INTERPRET.

    Returns:
        (num_accepted int32 [B, L], num_commit int32 [B, L], commit_tokens int64 [B, L, W+1],
        next_tokens int64 [B, L, W], next_q fp32 [B, L, W, Vi], invalid bool [B, L]). commit_tokens
        beyond num_commit is unspecified (module docstring).
    """
    B, L, W = draft_tokens.shape
    lo, hi = image_token_range
    vocab = hi - lo
    Bx, N, _ = logits.shape
    if Bx not in (B, 2 * B):
        raise ValueError(f"logits must have B={B} rows, or 2B={2 * B} with CFG, got {Bx}")
    reason = unsupported(W, logits.dtype)
    if reason is not None:
        raise ValueError(reason)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:  # the threshold search needs a positive target
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if continuation and reuse_threshold >= 0:
        raise ValueError(f"continuation replaces draft reuse: reuse_threshold must be off, got {reuse_threshold}")
    if coupled_noise is not None and tuple(coupled_noise.shape) != (B, L, W + 1, vocab):
        raise ValueError(f"coupled_noise must have shape {[B, L, W + 1, vocab]}, got {list(coupled_noise.shape)}")
    block_w = _block_w(W)
    block_v, block_s = tiles or (INTERPRETER_TILES if INTERPRETING else GPU_TILES)
    device = draft_tokens.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    lane_start, lane_drafts, lane_rule, lane_slot, lane_room = (
        t.to(torch.int32).contiguous() for t in (lane_start, lane_drafts, lane_rule, lane_slot, lane_room))
    draft_tokens, init_tokens = draft_tokens.contiguous(), init_tokens.contiguous()
    draft_q, u_accept, u_sample = (t.float().contiguous() for t in (draft_q, u_accept, u_sample))
    if coupled_noise is not None:
        coupled_noise = coupled_noise.float().contiguous()

    num_accepted = torch.empty((B, L), dtype=torch.int32, device=device)
    num_commit = torch.empty_like(num_accepted)
    commit_tokens = torch.empty((B, L, W + 1), dtype=torch.int64, device=device)
    next_tokens = torch.empty_like(draft_tokens)
    next_q = torch.empty_like(draft_q)
    invalid = torch.zeros((B, L), dtype=torch.int32, device=device)
    if B * L == 0:
        return num_accepted, num_commit, commit_tokens, next_tokens, next_q, invalid.bool()
    p = torch.empty((B, L, W + 1, vocab), dtype=torch.float32, device=device)
    total = torch.empty((B, L, W + 1), dtype=torch.float32, device=device)
    last = torch.empty((B, L, W + 1), dtype=torch.int32, device=device)
    row_bad = torch.zeros((B, L, W + 1), dtype=torch.int32, device=device)  # rows no program computes stay 0
    top_k = int(top_k) if 0 < top_k < vocab else 0
    eol = int(eol_token_id)
    row_slots = max(int(row_slots), 1)

    next_drafts = "next_drafts" + "_continuation" * bool(continuation) + "_coupled" * (coupled_noise is not None)
    with device_guard(logits):
        _target_probs_kernel[(B * L, W + 1)](
            logits, lane_start, lane_drafts, p, total, last, row_bad,
            logits.stride(0), logits.stride(1),
            B, L, N, W + 1, lo, vocab,
            float(cfg_scale), float(temperature), top_k, float(top_p),
            CFG=Bx != B, BLOCK_V=block_v, BLOCK_S=block_s, NPROBE=PROBES,
            num_warps=NUM_WARPS["target_probs"], **NUMERICS,
        )
        _accept_kernel[(B * L,)](
            p, total, last, row_bad, draft_tokens, draft_q, u_accept, u_sample,
            lane_start, lane_drafts, lane_rule, lane_slot, lane_room,
            num_accepted, num_commit, commit_tokens, invalid,
            W, vocab, lo, eol, row_slots, int(width),
            BLOCK_W=block_w, BLOCK_V=block_v, num_warps=NUM_WARPS["accept"], **NUMERICS,
        )
        _next_drafts_kernel[(B * L, W)](
            p, total, last, draft_tokens, draft_q, u_accept, u_sample,
            p if coupled_noise is None else coupled_noise, init_tokens,
            lane_start, lane_drafts, lane_slot, invalid, num_accepted, num_commit, commit_tokens,
            next_tokens, next_q,
            W, vocab, lo, eol, row_slots, int(width), float(reuse_threshold), int(draft_init == "repeat_left"),
            BLOCK_V=block_v, CONTINUATION=bool(continuation), COUPLED=coupled_noise is not None,
            num_warps=NUM_WARPS[next_drafts], **NUMERICS,
        )
    return num_accepted, num_commit, commit_tokens, next_tokens, next_q, invalid.bool()

