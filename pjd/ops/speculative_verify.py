"""Speculative verification of one decoding step, for every active lane of every image.

A *lane* is a run of image slots decoded left to right with its own draft window: a grid row for
pjd / zipar, the whole raster for ar / sjd. Per lane, the step fed the lane's last committed token
(input 0) and ``m`` drafts (inputs 1..m); the output of input k is the target p at lane slot n + k
(n = tokens committed in the lane before the step). The op, without any host synchronisation:

1. p = target distribution of each fed input (CFG, image tokens, temperature, top-k, top-p).
2. Acceptance of draft i (slot n + i) against p_i:  ``u_accept[i] * q_i(d_i) < p_i(d_i)``, i.e.
   u < min(1, p/q). Forced slots (EOL) always pass. The accepted prefix ends at the first failure.
3. Lanes with ``lane_rule == TOP`` (the top-most active row; every lane of zipar) then commit one
   more token: at the first rejected slot j a sample of normalize(max(0, p_j - q_j)) (exact
   speculative sampling), or, if all m drafts passed and the lane has room, a bonus sample of p_m.
   ``PREFIX`` lanes (lower rows) commit only their accepted drafts.
4. Next drafts for the W slots after the new frontier (slot n + a + i, i < W; k = a + i):
   - a slot with a target this step (k <= m) keeps its old draft and q when reuse is on, the old
     draft was not the rejected one, k < W (there is a stored draft), and
     p_k(d)/q_k(d) > reuse_threshold; otherwise it takes a fresh sample of p_k (q := p_k). The slot
     right after the last fed draft (k = m, including k = W after a full window) is thus always
     drafted from this step's prediction p_m, never initialised: a random draft would waste it;
   - with ``continuation`` (SJD-PAC's adaptive continuation; reuse must be off), a stored draft
     with a target this step (k <= m, k < W) is tested against it as verification tests drafts,
     with the same uniform: kept if ``u_accept[k] * q_k(d) < p_k(d)`` (or forced), else replaced by a
     sample of normalize(max(0, p_k - q_k)) (u_sample[k]); either way q := p_k. Drafts after the
     first rejection thus keep being verified; nothing beyond the first rejection is committed
     (the draft at slot k is then distributed exactly as p_k: maximal coupling of q_k and p_k);
   - with ``coupled_noise`` (SCD's coupled draws), a fresh sample of p_k is the exponential race
     ``argmin_v E[k, v] / p_k(v)`` on the slot's own noise instead of an inverse-CDF draw; the
     engine keys E by image slot, so a slot redrawn from a similar p_k repeats its draft. Residual
     and bonus samples (committed tokens) and continuation's residual draws stay per-step draws;
   - a stored draft with no target this step (m < k < W) is kept as is;
   - slots beyond (k >= W and k > m) are initialised: a uniform image token from ``init_tokens``
     (q one-hot), or with ``draft_init="repeat_left"`` a copy of the last non-initialised token to
     the left (random if that is EOL);
   - forced slots hold the EOL token.
Inactive lanes (``lane_start < 0``) commit nothing and keep their drafts.

Non-finite logits: a lane is *invalid* when, for one of its fed inputs, x = CFG-combined image
logits / temperature (what the softmax sees) holds a NaN or +inf or has no entry above -inf. An
invalid lane is flagged in ``VerifyResult.invalid`` and treated as inactive (it commits nothing and
keeps its drafts), on every backend; -inf on some tokens is fine (probability 0).

Randomness comes in as tensors (``u_accept``, ``u_sample``, ``init_tokens``) so every backend gives
the same tokens for the same draws; sampling is inverse-CDF with one uniform per draw
(pjd.sampling.sample_inverse_cdf), u_sample[k] serving the one draw slot n + k can need.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from pjd.sampling import sample_coupled, sample_inverse_cdf, scaled_logits, target_probs, undefined_rows

from . import _checks
from ._backend import resolve_backend, triton_unsupported

TOP = 0
PREFIX = 1
DRAFT_INITS = ("random", "repeat_left")


class VerifyResult(NamedTuple):
    num_accepted: torch.Tensor  # int32 [B, L]: drafts accepted (their KV is kept)
    num_commit: torch.Tensor    # int32 [B, L]: tokens committed (accepted + resample/bonus)
    commit_tokens: torch.Tensor  # int64 [B, L, W+1]: committed tokens at slots n .. n+num_commit-1
    next_tokens: torch.Tensor   # int64 [B, L, W]: drafts for slots n' .. n'+W-1 (n' = n + num_commit)
    next_q: torch.Tensor        # float32 [B, L, W, V_img]: their draft distributions
    invalid: torch.Tensor       # bool [B, L]: a fed input of the lane has no target distribution


def _gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, L, S, V], idx [B, L, K] -> x[b, l, idx[b, l, k], :] as [B, L, K, V]."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [..., V], idx [...] -> x[..., idx]."""
    return x.gather(-1, idx[..., None]).squeeze(-1)


def speculative_verify_reference(
    logits, lane_start, lane_drafts, lane_rule, lane_slot, lane_room,
    draft_tokens, draft_q, u_accept, u_sample, init_tokens,
    cfg_scale: float, image_token_range: tuple[int, int], temperature: float, top_k: int,
    top_p: float, reuse_threshold: float, draft_init: str, eol_token_id: int, row_slots: int,
    width: int, continuation: bool = False, coupled_noise: torch.Tensor | None = None,
) -> VerifyResult:
    """Pure-torch specification (see the module docstring); reuse_threshold < 0 disables reuse."""
    B, L, W = draft_tokens.shape
    lo, hi = image_token_range
    device = draft_tokens.device
    probs = target_probs(logits, num_images=B, cfg_scale=cfg_scale, image_token_range=image_token_range,
                         temperature=temperature, top_k=top_k, top_p=top_p)  # [B, N, V]
    N = probs.shape[1]
    ks = torch.arange(W + 1, device=device)
    rows = (lane_start.clamp(min=0).long()[..., None] + ks).clamp(max=N - 1)  # [B, L, W+1]
    images = torch.arange(B, device=device)[:, None, None]
    undefined = undefined_rows(scaled_logits(logits, num_images=B, cfg_scale=cfg_scale,
                                             image_token_range=image_token_range, temperature=temperature))
    fed = lane_start >= 0
    invalid = fed & (undefined[images, rows] & (ks <= lane_drafts.long()[..., None])).any(-1)
    active = fed & ~invalid  # an invalid lane is treated as not fed
    m = torch.where(active, lane_drafts, 0).long()[..., None]  # [B, L, 1]
    p = probs[images, rows].masked_fill(invalid[..., None, None], 0.0)  # [B, L, W+1, V]

    def forced(offsets: torch.Tensor) -> torch.Tensor:
        if eol_token_id < 0:
            return torch.zeros_like(offsets, dtype=torch.bool)
        return (lane_slot.long()[..., None] + offsets) % row_slots == width

    # Acceptance scan.
    image_idx = (draft_tokens - lo).clamp(0, hi - lo - 1)
    p_d = _pick(p[:, :, :W], image_idx)
    q_d = _pick(draft_q, image_idx)
    passes = forced(ks[:W]) | (u_accept * q_d < p_d)
    passes &= ks[:W] < m
    num_accepted = passes.long().cumprod(-1).sum(-1, keepdim=True)  # [B, L, 1]
    rejected = num_accepted < m

    # Residual resample (first rejection) or bonus (all accepted and room left), TOP lanes only.
    j = num_accepted
    p_j = _gather_slots(p, j).squeeze(2)
    q_j = _gather_slots(draft_q, j.clamp(max=W - 1)).squeeze(2)
    residual = (p_j - q_j).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_j)
    extra_dist = torch.where(rejected, residual, p_j)
    extra_token = sample_inverse_cdf(extra_dist, u_sample.gather(-1, j).squeeze(-1)) + lo
    extra_token = torch.where(forced(j).squeeze(-1), eol_token_id, extra_token)[..., None]
    has_extra = (lane_rule[..., None] == TOP) & active[..., None] & (rejected | (m < lane_room[..., None]))
    num_commit = num_accepted + has_extra.long()

    commit_tokens = torch.cat([draft_tokens, draft_tokens[..., -1:]], dim=-1)
    commit_tokens = torch.where(ks == j, extra_token, commit_tokens)
    commit_tokens = torch.where(forced(ks), eol_token_id, commit_tokens)

    # Next drafts at lane offsets k = a + i.
    k = num_commit + ks[:W]  # [B, L, W]
    k_old = k.clamp(max=W - 1)
    old_tokens = draft_tokens.gather(-1, k_old)
    old_q = _gather_slots(draft_q, k_old)
    has_target = k <= m
    p_k = _gather_slots(p, k.clamp(max=W))
    old_idx = (old_tokens - lo).clamp(0, hi - lo - 1)
    reuse = (
        (reuse_threshold >= 0) & (k < W) & ~(rejected & (k == j))
        & (_pick(p_k, old_idx) > reuse_threshold * _pick(old_q, old_idx))
    )
    fresh = has_target & ~reuse
    u_k = u_sample.gather(-1, k.clamp(max=W))
    if coupled_noise is None:
        fresh_tokens = sample_inverse_cdf(p_k, u_k) + lo
    else:
        fresh_tokens = sample_coupled(p_k, _gather_slots(coupled_noise, k.clamp(max=W))) + lo
    if continuation:
        carried = has_target & (k < W)
        kept = forced(k) | (u_accept.gather(-1, k_old) * _pick(old_q, old_idx) < _pick(p_k, old_idx))
        residual_k = (p_k - old_q).clamp(min=0)
        residual_k = torch.where(residual_k.sum(-1, keepdim=True) > 0, residual_k, p_k)
        carried_tokens = torch.where(kept, old_tokens, sample_inverse_cdf(residual_k, u_k) + lo)
        fresh_tokens = torch.where(carried, carried_tokens, fresh_tokens)
    init = (k >= W) & ~has_target
    if draft_init == "repeat_left":
        # Init slots are a suffix; each copies the last non-init token to its left.
        last_set = torch.clamp(m, min=W - 1)  # lane offset of the last stored or targeted slot
        first_init = (last_set + 1 - num_commit).clamp(0, W)  # index i of the first init slot (W: none)
        left_new = old_tokens.gather(-1, (first_init - 1).clamp(min=0))
        left_new = torch.where(fresh.gather(-1, (first_init - 1).clamp(min=0)),
                               fresh_tokens.gather(-1, (first_init - 1).clamp(min=0)), left_new)
        last_commit = commit_tokens.gather(-1, (num_commit - 1).clamp(min=0))
        left = torch.where(first_init > 0, left_new, last_commit)
        init_fill = torch.where((left >= lo) & (left < hi), left.expand(B, L, W), init_tokens)
    else:
        init_fill = init_tokens
    next_tokens = torch.where(fresh, fresh_tokens, old_tokens)
    next_tokens = torch.where(init, init_fill, next_tokens)
    # One-hot by comparison: F.one_hot reads the indices back to check them (a host read every step).
    one_hot = ((next_tokens - lo).clamp(0, hi - lo - 1)[..., None] == torch.arange(hi - lo, device=device)).float()
    next_q = torch.where(fresh[..., None], p_k, old_q)
    next_q = torch.where(init[..., None], one_hot, next_q)
    is_forced = forced(k)
    next_tokens = torch.where(is_forced, eol_token_id, next_tokens)
    next_q = next_q.masked_fill(is_forced[..., None], 0.0)

    # Inactive lanes keep everything.
    keep_old = ~active[..., None]
    next_tokens = torch.where(keep_old, draft_tokens, next_tokens)
    next_q = torch.where(keep_old[..., None], draft_q, next_q)
    return VerifyResult(
        num_accepted.squeeze(-1).int(), num_commit.squeeze(-1).int(), commit_tokens, next_tokens, next_q, invalid
    )


# The op's outputs, in VerifyResult's order, whatever dtypes and strides its inputs have.
_OUTPUT_DTYPES = (torch.int32, torch.int32, torch.int64, torch.int64, torch.float32, torch.bool)


def _canonical(out) -> tuple[torch.Tensor, ...]:
    """Outputs as registered (the fake below): VerifyResult's dtypes, contiguous.

    The reference's dtypes follow type promotion of its inputs (an fp64 draft_q gives an fp64
    next_q) and its strides TensorIterator's choices (strided inputs give strided outputs). Outputs
    that are already canonical (every step of the engine) are returned as they are, with no op
    dispatched: this runs on the sdpa path's every step.
    """
    return tuple(t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()
                 for t, dtype in zip(out, _OUTPUT_DTYPES))


@torch.library.custom_op("pjd::speculative_verify", mutates_args=())
def _speculative_verify_op(
    logits: torch.Tensor, lane_start: torch.Tensor, lane_drafts: torch.Tensor, lane_rule: torch.Tensor,
    lane_slot: torch.Tensor, lane_room: torch.Tensor, draft_tokens: torch.Tensor, draft_q: torch.Tensor,
    u_accept: torch.Tensor, u_sample: torch.Tensor, init_tokens: torch.Tensor,
    cfg_scale: float, lo: int, hi: int, temperature: float, top_k: int, top_p: float,
    reuse_threshold: float, draft_init: str, eol_token_id: int, row_slots: int, width: int, continuation: bool,
    coupled_noise: Optional[torch.Tensor], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (logits, lane_start, lane_drafts, lane_rule, lane_slot, lane_room, draft_tokens, draft_q,
            u_accept, u_sample, init_tokens, cfg_scale, (lo, hi), temperature, top_k, top_p,
            reuse_threshold, draft_init, eol_token_id, row_slots, width, continuation, coupled_noise)
    if backend == "triton":
        from pjd.kernels.speculative_verify import speculative_verify_triton

        return _canonical(speculative_verify_triton(*args))
    return _canonical(speculative_verify_reference(*args))


@_speculative_verify_op.register_fake
def _(logits, lane_start, lane_drafts, lane_rule, lane_slot, lane_room, draft_tokens, draft_q, u_accept, u_sample,
      init_tokens, cfg_scale, lo, hi, *rules):
    B, L, W = draft_tokens.shape
    shapes = ((B, L), (B, L), (B, L, W + 1), (B, L, W), (B, L, W, hi - lo), (B, L))
    return tuple(draft_tokens.new_empty(shape, dtype=dtype) for shape, dtype in zip(shapes, _OUTPUT_DTYPES))


def speculative_verify(
    logits, lane_start, lane_drafts, lane_rule, lane_slot, lane_room,
    draft_tokens, draft_q, u_accept, u_sample, init_tokens, *,
    image_token_range, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, reuse_threshold=None,
    draft_init="random", eol_token_id=None, row_slots=1, width=1, continuation=False, coupled_noise=None,
    backend="auto", validate=True,
) -> VerifyResult:
    """Verify every lane's drafts, commit tokens, and propose the next drafts (one fused step).

    Args (B images, L lanes, W draft window, N packed inputs, V vocabulary, Vi = hi - lo):
        logits: ``[Bx, N, V]`` float logits of this step's packed inputs; Bx = B, or 2B with CFG
            (rows [0, B) conditional, [B, 2B) unconditional).
        lane_start: int32 ``[B, L]`` index in N of the lane's input 0 (its last committed token);
            -1 = lane not fed this step. Inputs 1..m of the lane follow it contiguously.
        lane_drafts: int32 ``[B, L]`` m, drafts fed (0..W).
        lane_rule: int32 ``[B, L]`` ``TOP`` (exact: residual resample + bonus) or ``PREFIX``.
        lane_slot: int32 ``[B, L]`` image-slot index (row * row_slots + col) of the lane's frontier
            n; used to recognise forced EOL slots (slot % row_slots == width).
        lane_room: int32 ``[B, L]`` slots left in the lane (caps the bonus).
        draft_tokens: int64 ``[B, L, W]`` stored drafts (vocabulary ids) for slots n .. n+W-1.
        draft_q: float32 ``[B, L, W, Vi]`` their draft distributions over image tokens.
        u_accept: float32 ``[B, L, W]``; u_sample: float32 ``[B, L, W+1]``; uniforms in [0, 1).
        init_tokens: int64 ``[B, L, W]`` uniform image-token ids for initialised slots.
        image_token_range: ``(lo, hi)`` image token ids; cfg_scale, temperature (> 0), top_k
            (0 = off), top_p (1 = off): the target distribution (pjd.sampling.target_probs).
        reuse_threshold: float or None (no reuse); draft_init: "random" | "repeat_left".
        eol_token_id: forced token after every row (None = no EOL; else a non-image id and
            ``row_slots == width + 1``); row_slots, width: the grid.
        continuation: SJD-PAC's adaptive continuation of drafts after the first rejection (needs
            ``reuse_threshold=None``). coupled_noise: float32 ``[B, L, W+1, Vi]`` exponential variates
            (>= 0, finite) of slots n .. n+W for coupled fresh draws (SCD), or None (inverse CDF).
        validate: also check tensor values (lane indices inside N, drafts in [0, W], rules, tokens
            in the image range or EOL, uniforms in [0, 1), draft_q finite and >= 0): one host read.
            Kinds, shapes, dtypes, devices and scalars are always checked (no device work).

    Returns:
        VerifyResult(num_accepted, num_commit, commit_tokens, next_tokens, next_q, invalid); see
        the module docstring for the rules. Without ``validate`` no host synchronisation happens.
    """
    lo, hi = _check_args(logits, lane_start, lane_drafts, lane_rule, lane_slot, lane_room, draft_tokens, draft_q,
                         u_accept, u_sample, init_tokens, image_token_range, cfg_scale, temperature, top_k, top_p,
                         reuse_threshold, draft_init, eol_token_id, row_slots, width, continuation, coupled_noise,
                         validate)
    backend = resolve_backend(backend, logits.device,
                              lambda: triton_unsupported(("speculative_verify", draft_tokens.shape[-1], logits.dtype)))
    lanes = (logits, lane_start, lane_drafts, lane_rule, lane_slot, lane_room, draft_tokens, draft_q,
             u_accept, u_sample, init_tokens, float(cfg_scale))
    rules = (float(temperature), int(top_k), float(top_p), -1.0 if reuse_threshold is None else float(reuse_threshold),
             draft_init, -1 if eol_token_id is None else int(eol_token_id), int(row_slots), int(width),
             bool(continuation), coupled_noise)
    if backend == "sdpa" or (backend == "torch" and torch.compiler.is_compiling()):
        # The sdpa (CPU) path calls the torch implementation directly: on a CPU the custom-op dispatch
        # costs about as much as a small verification. Under torch.compile the pure-torch backends are
        # traced through (inductor fuses them into the step: pjd.compiler); the Triton kernels stay
        # behind the registered op.
        out = _canonical(speculative_verify_reference(*lanes, (int(lo), int(hi)), *rules))
    else:
        out = _speculative_verify_op(*lanes, int(lo), int(hi), *rules, backend)
    return VerifyResult(*out)


def _check_args(logits, lane_start, lane_drafts, lane_rule, lane_slot, lane_room, draft_tokens, draft_q, u_accept,
                u_sample, init_tokens, image_token_range, cfg_scale, temperature, top_k, top_p, reuse_threshold,
                draft_init, eol_token_id, row_slots, width, continuation, coupled_noise, validate) -> tuple[int, int]:
    _checks.tensor("draft_tokens", draft_tokens, 3, torch.int64, None)
    B, L, W = draft_tokens.shape
    device = draft_tokens.device
    if W < 1:
        raise ValueError(f"draft_tokens must be [B, L, W] with W >= 1, got shape {list(draft_tokens.shape)}")
    _checks.tensor("logits", logits, 3, _checks.FLOATS, device)
    Bx, N, V = logits.shape
    if Bx not in (B, 2 * B):
        raise ValueError(f"logits must have B={B} rows, or 2B={2 * B} with CFG, got {Bx}")
    lo, hi = _checks.image_range(image_token_range, V)
    for name, t in (("lane_start", lane_start), ("lane_drafts", lane_drafts), ("lane_rule", lane_rule),
                    ("lane_slot", lane_slot), ("lane_room", lane_room)):
        _checks.tensor(name, t, (B, L), torch.int32, device)
    _checks.tensor("draft_q", draft_q, (B, L, W, hi - lo), torch.float32, device)
    _checks.tensor("u_accept", u_accept, (B, L, W), torch.float32, device)
    _checks.tensor("u_sample", u_sample, (B, L, W + 1), torch.float32, device)
    _checks.tensor("init_tokens", init_tokens, (B, L, W), torch.int64, device)
    if _checks.finite("cfg_scale", cfg_scale) != 1.0 and Bx == B:
        raise ValueError(f"cfg_scale={cfg_scale} needs 2B={2 * B} logits rows (cond, then uncond), got B={B}")
    if _checks.finite("temperature", temperature) < _checks.MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {_checks.MIN_TEMPERATURE:.3g} (smaller ones overflow the logits), "
                         f"got {temperature}")
    _checks.integer("top_k", top_k, low=0)
    if not 0.0 < _checks.finite("top_p", top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if reuse_threshold is not None and _checks.finite("reuse_threshold", reuse_threshold) < 0:
        raise ValueError(f"reuse_threshold must be >= 0 or None, got {reuse_threshold}")
    if not isinstance(continuation, bool):
        raise TypeError(f"continuation must be True or False, got {type(continuation).__name__} {continuation!r}")
    if continuation and reuse_threshold is not None:
        raise ValueError(f"continuation replaces draft reuse: pass reuse_threshold=None, got {reuse_threshold}")
    if coupled_noise is not None:
        _checks.tensor("coupled_noise", coupled_noise, (B, L, W + 1, hi - lo), torch.float32, device)
    if draft_init not in DRAFT_INITS:
        raise ValueError(f"draft_init must be one of {DRAFT_INITS}, got {draft_init!r}")
    _checks.integer("row_slots", row_slots, low=1)
    _checks.integer("width", width, low=1)
    eol = -1
    if eol_token_id is not None:
        eol = _checks.integer("eol_token_id", eol_token_id, low=0)
        if eol >= V or lo <= eol < hi:
            raise ValueError(f"eol_token_id must be a vocabulary id in [0, {V}) outside image_token_range "
                             f"{(lo, hi)}, got {eol}")
        if row_slots != width + 1:
            raise ValueError(f"with eol_token_id, row_slots must be width + 1 = {width + 1}, got {row_slots}")
    if validate and not torch.compiler.is_compiling():  # a host read would break the graph
        active = lane_start >= 0
        image = (draft_tokens >= lo) & (draft_tokens < hi)
        _checks.first_failure([
            (f"lane_start must be -1 (not fed) or a fed lane's first input with lane_start + lane_drafts < N={N}",
             (lane_start >= -1) & (~active | (lane_start + lane_drafts < N))),
            (f"lane_drafts must lie in [0, W={W}]", (lane_drafts >= 0) & (lane_drafts <= W)),
            (f"lane_rule must be TOP={TOP} or PREFIX={PREFIX}", (lane_rule == TOP) | (lane_rule == PREFIX)),
            ("lane_slot must be >= 0", lane_slot >= 0),
            ("lane_room must be >= 0", lane_room >= 0),
            (f"draft_tokens must be image tokens in [{lo}, {hi})" + (f" or eol_token_id={eol}" if eol >= 0 else ""),
             image | (draft_tokens == eol) if eol >= 0 else image),
            (f"init_tokens must be image tokens in [{lo}, {hi})", (init_tokens >= lo) & (init_tokens < hi)),
            ("u_accept must lie in [0, 1)", (u_accept >= 0) & (u_accept < 1)),
            ("u_sample must lie in [0, 1)", (u_sample >= 0) & (u_sample < 1)),
            ("draft_q must be finite and >= 0", torch.isfinite(draft_q) & (draft_q >= 0)),
            ("coupled_noise must be finite and >= 0",
             torch.ones((), dtype=torch.bool, device=device) if coupled_noise is None
             else torch.isfinite(coupled_noise) & (coupled_noise >= 0)),
        ])
    return lo, hi
