"""The decoding engine: ar, sjd, sjd++, pjd and zipar as one Jacobi iteration loop.

    prefill the prompt
    until every lane of every image is complete:
        lanes  = schedule()          which lanes are fed, how many drafts each, lane rules
        step   = pack(lanes)         packed inputs + row-causal metadata (leading/scaffold tokens)
        logits = forward(step)       the model, attention through pjd.ops.draft_attention
        result = verify(logits)      pjd.ops.speculative_verify: accept, resample, next drafts
        commit(result)               tokens, cache states, lane frontiers

State lives on the model's device; each step synchronises with the host once (the packed input
width N and the cache length are shapes). Randomness is counter-based per image (pjd.rng): image i's
draws are a function of (seed, image_index[i], step, lane, slot) computed with int64 tensor ops on
the device, so an image's tokens do not depend on its batch, the device, backend or cache layout.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from pjd import _checks
from pjd.cache import HIDDEN_POS, ActiveStep, AppendCache, SlotCache, StepInputs
from pjd.models.base import adapter_for
from pjd.ops._backend import resolve_backend, triton_unsupported
from pjd.ops.speculative_verify import PREFIX, TOP, VerifyResult, speculative_verify
from pjd.plan import DecodePlan, make_plan
from pjd.rng import DrawStream
from pjd.sampling import sample_inverse_cdf, target_probs

BIG = 1 << 30


@dataclass
class GenerationResult:
    tokens: torch.Tensor            # int64 [B, height, width] image tokens (EOL excluded)
    steps: int                      # forward passes after the prefill
    accepted: list[torch.Tensor] = field(default_factory=list)  # per step: image tokens committed per image [B]
    steps_per_image: torch.Tensor | None = None  # int64 [B]: step at which each image was complete
    wall_seconds: float = 0.0       # whole call, prefill included
    forward_seconds: float = 0.0    # time inside the model forward passes
    method: str = ""

    @property
    def tokens_per_step(self) -> float:
        return self.tokens[0].numel() / max(self.steps, 1)


@dataclass
class Lanes:
    """The schedule of one step, all [B, L]."""

    fed: torch.Tensor       # bool: the lane gets inputs this step
    drafts: torch.Tensor    # int64: m, drafts fed after the lane's last committed token
    rule: torch.Tensor      # int32: TOP or PREFIX
    room: torch.Tensor      # int64: slots left in the lane
    flush: torch.Tensor     # bool: a complete lane fed its last token only to cache its key


@dataclass
class Packed:
    """One step's packed inputs: what the forward, the verification and the commit share."""

    inputs: StepInputs           # row-causal metadata read by the attention hook and the cache
    tokens: torch.Tensor         # int64 [Bx, N] input ids
    rope: torch.Tensor           # int64 [Bx, N] position ids
    lane_start: torch.Tensor | None = None        # [B, L] index of each lane's first input (-1: not fed)
    dest: torch.Tensor | None = None              # [B, L*(W+1)] packed index of each grid entry (N: none)
    writes_committed: torch.Tensor | None = None  # [B, L, W+1] leading inputs that write their key
    fed_lanes: int = 0                            # most lanes fed in one image (host int)


def generate(model, input_ids, *, height, width, method="pjd", window=None, context=None, top_k=0,
             top_p=1.0, temperature=1.0, cfg_scale=1.0, uncond_input_ids=None, attention_mask=None,
             uncond_attention_mask=None, image_token_range=None, eol_token_id=None, draft_init="random",
             reuse_threshold="auto", cache="slot", backend="auto", generator=None, seed=None, progress=False,
             row_causal=True, row0_first="auto", row_lead="row_end", image_index=None) -> GenerationResult:
    """Generate a height x width grid of image tokens per prompt.

    Args:
        model: a transformers causal LM whose image tokens are vocabulary ids (or a pjd adapter).
        input_ids: int ``[B, P]`` conditioning prefix; left padding allowed through
            ``attention_mask`` ``[B, P]`` (1 = real token). Image token (r, c) takes the position
            ``P_real + r * row_slots + c`` exactly as in plain AR generation.
        method: "ar" | "sjd" | "sjd++" | "pjd" | "zipar". window: drafts per lane (sjd 15, pjd 7).
        context: committed tokens of row r that activate row r+1 (pjd: default round(width/8),
            zipar: round(width/4); at least 1).
        row0_first: True decodes row 0 completely before row 1 activates (pjd/zipar; "auto": True
            without EOL, where every fresh row then has a complete row to lead from, False with EOL).
        row_lead: without EOL, what a fresh row leads with while the row above is unfinished (a
            scaffold, taken at activation and kept): "row_end" the last token of the lowest complete
            row (default), "above" the row above's last committed token, "two_above" row r-2's
            (official ZipAR); with no complete row (row 1 without row0_first), the row above's.
        top_k (0 = off, 1 = greedy), top_p, temperature: the target distribution.
        cfg_scale: != 1 needs ``uncond_input_ids``; combined logits ``uncond + s * (cond - uncond)``.
        image_token_range: ``(lo, hi)`` image token ids (default: whole vocabulary).
        eol_token_id: forced end-of-line token after every row (row_slots = width + 1).
        draft_init: "random" | "repeat_left" (methods with drafts). reuse_threshold: pjd / sjd++
            draft reuse ("auto": 0.5; None: off); other methods take only "auto" or None.
        cache: "slot" | "append". backend: "auto" | "torch" | "triton" (attention and verification).
        seed: non-negative int below 2**64 (default 0). Image b draws its random numbers from its own
            stream keyed by ``(seed, image_index[b])`` (pjd.rng), so its tokens are the same whatever
            batch, batch position, rank or device decodes it.
        image_index: int ``[B]`` (list or tensor) global index of each image in the run (default
            ``arange(B)``); pass the indices of the images a batch holds when splitting a run.
        generator: deprecated (DeprecationWarning); a seed is drawn from this CPU torch.Generator.
        row_causal: False lets drafts see other rows' drafts (the paper's ablation; pjd only).

    Every argument is checked before any decoding work (TypeError / ValueError naming it); the call
    runs under ``torch.no_grad()``. A model emitting NaN / +inf logits, or -inf for every image
    token, raises ValueError naming the step and the image (pjd.ops.speculative_verify's rule).
    """
    adapter = adapter_for(model)
    _checks.check_settings(method=method, height=height, width=width, window=window, context=context, top_k=top_k,
                           top_p=top_p, temperature=temperature, cfg_scale=cfg_scale,
                           image_token_range=image_token_range, eol_token_id=eol_token_id, draft_init=draft_init,
                           reuse_threshold=reuse_threshold, generator=generator, seed=seed, progress=progress,
                           row_causal=row_causal)
    prompt_len = _checks.check_prompts(adapter, input_ids, attention_mask, uncond_input_ids, uncond_attention_mask,
                                       cfg_scale)
    _checks.check_positions(adapter, prompt_len, height, width, eol_token_id)
    plan = make_plan(method=method, height=height, width=width, window=window, context=context,
                     top_k=top_k, top_p=top_p, temperature=temperature, cfg_scale=cfg_scale,
                     image_token_range=image_token_range, eol_token_id=eol_token_id, draft_init=draft_init,
                     reuse_threshold=reuse_threshold, cache=cache, vocab_size=adapter.vocab_size,
                     row_causal=row_causal, row0_first=row0_first, row_lead=row_lead)
    # Fail before any work if the backend cannot run here; auto leaves the kernels for shapes they cannot serve.
    backend = resolve_backend(backend, adapter.device, lambda: triton_unsupported(
        ("draft_attention", adapter.head_dim, adapter.dtype), ("speculative_verify", plan.window, adapter.dtype)))
    image_index = _image_index(image_index, input_ids.shape[0], adapter.device)
    if generator is not None:
        warnings.warn("generate(generator=...) is deprecated: pass seed= (per-image streams, pjd.rng)",
                      DeprecationWarning, stacklevel=2)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
    seed = 0 if seed is None else int(seed)  # checked by _checks.check_settings (pjd.rng.check_seed)
    with torch.no_grad():  # as transformers' generate: no autograd graph of the whole decode
        decoder = _Decoder(adapter, plan, input_ids, attention_mask, uncond_input_ids, uncond_attention_mask,
                           cfg_scale, dict(top_k=top_k, top_p=float(top_p), temperature=float(temperature)),
                           draft_init, cache, backend, seed, image_index)
        return decoder.run(progress)


def _image_index(image_index, B: int, device) -> torch.Tensor:
    """int64 [B] on ``device``: the images' global indices (default 0..B-1), checked."""
    if image_index is None:
        return torch.arange(B, device=device)
    index = torch.as_tensor(image_index)
    if index.ndim != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"image_index: expected integer [B], got {index.dtype} {tuple(index.shape)}")
    if index.shape[0] != B:
        raise ValueError(f"image_index: expected {B} indices (one per prompt), got {index.shape[0]}")
    if index.numel() and int(index.min()) < 0:
        raise ValueError("image_index: expected non-negative indices")
    return index.long().to(device)


class _Decoder:
    def __init__(self, adapter, plan: DecodePlan, input_ids, attention_mask, uncond_input_ids,
                 uncond_attention_mask, cfg_scale, sampling, draft_init, cache, backend, seed, image_index):
        self.adapter, self.plan, self.backend = adapter, plan, backend
        self.sampling, self.draft_init, self.cfg_scale = sampling, draft_init, float(cfg_scale)
        device = self.device = adapter.device
        prompt, mask = self._prompts(input_ids, attention_mask, uncond_input_ids, uncond_attention_mask)
        self.B = input_ids.shape[0]
        self.Bx, self.P = prompt.shape
        total = self.P + plan.image_slots
        L, W = plan.num_lanes, max(plan.window, 1)  # ar/zipar store one (never fed) draft per lane
        self.L, self.W = L, W
        # Raster buffers: prompt then image slots. Image slots are shared by cond/uncond rows.
        self.dump = total  # a last column that absorbs writes that do not apply
        self.tokens = torch.zeros(self.Bx, total + 1, dtype=torch.long, device=device)
        self.tokens[:, :self.P] = prompt
        if plan.eol_token_id is not None:
            eol_slots = torch.arange(plan.width, plan.image_slots, plan.row_slots, device=device)
            self.tokens[:, self.P + eol_slots] = plan.eol_token_id
        self.real = torch.ones(self.Bx, total + 1, dtype=torch.bool, device=device)
        self.real[:, :self.P] = mask
        self.rope = (self.real.long().cumsum(1) - 1).clamp(min=0)  # position ids, as HF derives them
        self.kv_ready = torch.zeros(self.B, total + 1, dtype=torch.bool, device=device)
        self.lane_base = torch.tensor(plan.lane_base, device=device)
        self.lane_len = torch.tensor(plan.lane_len, device=device)
        self.n = torch.zeros(self.B, L, dtype=torch.long, device=device)
        self.draws = DrawStream(seed, image_index, L, W, (plan.lo, plan.hi))
        self.draft_tokens = self.draws.step(0)[2]
        self.draft_q = torch.nn.functional.one_hot(self.draft_tokens - plan.lo, plan.hi - plan.lo).float()
        self.scaffold_token = torch.full((self.B, L), -1, dtype=torch.long, device=device)  # -1: not taken yet
        if cache == "slot":
            self.cache = SlotCache(self.Bx, total, L, device)
        else:
            self.cache = AppendCache(self.Bx, total + L * (W + 1), device)
        self.lane_id = torch.arange(L, device=device)
        self.step = 0  # decoding steps verified
        # Per image, the first step whose target was undefined (-1: none); read at host syncs.
        self.bad_step = torch.full((self.B,), -1, dtype=torch.long, device=device)

    def _prompts(self, input_ids, attention_mask, uncond_input_ids, uncond_attention_mask):
        """(ids, mask) of every batch row: cond, then uncond with CFG (checked by pjd._checks)."""
        mask = self._mask(attention_mask, input_ids)
        if self.cfg_scale == 1.0:
            return input_ids.long(), mask
        umask = self._mask(uncond_attention_mask, uncond_input_ids)
        P = max(input_ids.shape[1], uncond_input_ids.shape[1])  # left-pad both to one length

        def pad(ids, m):
            extra = P - ids.shape[1]
            return (torch.nn.functional.pad(ids.long(), (extra, 0)),
                    torch.nn.functional.pad(m, (extra, 0), value=False))

        (c, cm), (u, um) = pad(input_ids, mask), pad(uncond_input_ids, umask)
        return torch.cat([c, u]), torch.cat([cm, um])

    @staticmethod
    def _mask(mask, ids):
        return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()

    # ------------------------------------------------------------------ the loop
    def run(self, progress: bool) -> GenerationResult:
        t0 = time.perf_counter()
        result = GenerationResult(tokens=None, steps=0, method=self.plan.method)
        finished_at = torch.full((self.B,), -1, dtype=torch.long, device=self.device)
        bar = _progress(progress, self.B * self.plan.height * self.plan.width, self.plan.method)
        with self.adapter.decoding():
            self.prefill(result)
            host_known = self.backend == "sdpa" and self.plan.method == "ar" and isinstance(self.cache, SlotCache)
            if host_known:
                finished_at = self.run_ar(result, bar)
            while not host_known:
                lanes = self.schedule()
                step = self.pack(lanes)
                if step is None:
                    break
                logits = self.forward(step, result)
                verdict = self.verify(logits, lanes, step, self.draws.step(result.steps + 1))
                accepted = self.commit(verdict, step)
                result.steps += 1
                result.accepted.append(accepted)
                done = self.n.ge(self.lane_len).all(1)
                finished_at = torch.where(done & (finished_at < 0), result.steps, finished_at)
                if progress:
                    bar.update(int(accepted.sum()))
        bar.close()
        self._check_targets(*self._first_undefined().tolist())
        plan = self.plan
        image = self.tokens[:self.B, self.P:self.dump].view(self.B, plan.height, plan.row_slots)[:, :, :plan.width]
        result.tokens = image.clone()
        result.steps_per_image = finished_at
        result.wall_seconds = time.perf_counter() - t0
        return result

    def run_ar(self, result, bar) -> torch.Tensor:
        """method="ar" on the sdpa path: step t feeds raster position P - 1 + t, writes its key there as
        committed and samples image slot t, all known on the host. So a step packs nothing, runs no
        verification (there are no drafts: it is the top lane's bonus sample of speculative_verify
        with m = 0, from the same draws) and never synchronises; its inputs live in preallocated
        buffers updated in place. Returns the step at which each image finished (all: the last)."""
        plan, B, Bx, P, device = self.plan, self.B, self.Bx, self.P, self.device
        off = self.cache_offset()
        pos = torch.empty(Bx, 1, dtype=torch.int32, device=device)
        slot = torch.empty(Bx, 1, dtype=torch.long, device=device)
        inputs = StepInputs(q_pos=pos, q_group=torch.zeros_like(pos), key_pos=pos,
                            key_group=torch.full_like(pos, -1), slot=slot, kv_len=0)
        counts = {True: torch.zeros(B, dtype=torch.long, device=device),  # image tokens committed per step
                  False: torch.ones(B, dtype=torch.long, device=device)}
        tokens = self.tokens.view(Bx // B, B, -1)  # cond and uncond rows share the image tokens
        undefined = torch.zeros(plan.lane_len[0], B, dtype=torch.bool, device=device)  # [step, image]
        # Every step's one uniform at once (counter-based, so known upfront): loop step t is step t + 1
        # of the general loop's numbering, and slot n + 0's sampling uniform there.
        uniforms = self.draws.sample_uniform(torch.arange(1, plan.lane_len[0] + 1, device=device))  # [T, B, 1]
        for t in range(plan.lane_len[0]):
            raster = P - 1 + t
            pos.fill_(raster)
            slot.fill_(off + raster)
            inputs.kv_len = off + raster + 1
            logits = self.forward(Packed(inputs, self.tokens[:, raster:raster + 1], self.rope[:, raster:raster + 1]),
                                  result)
            # No cache.end(): begin() already wrote the key as committed, and it stays so.
            forced = plan.eol_token_id is not None and t % plan.row_slots == plan.width
            if forced:
                tokens[:, :, raster + 1] = plan.eol_token_id
            else:
                u = uniforms[t]  # [B, 1]
                p = target_probs(logits, num_images=B, cfg_scale=self.cfg_scale,
                                 image_token_range=(plan.lo, plan.hi), **self.sampling)
                # p is NaN exactly where the target is undefined (pjd.sampling.undefined_rows).
                undefined[t] = torch.isnan(p).any((1, 2))
                tokens[:, :, raster + 1:raster + 2] = sample_inverse_cdf(p, u) + plan.lo
            result.steps += 1
            result.accepted.append(counts[forced])
            bar.update(0 if forced else B)
        self.n.fill_(plan.lane_len[0])
        self.bad_step = torch.where(undefined.any(0), undefined.int().argmax(0) + 1, -1)
        return torch.full((B,), result.steps, dtype=torch.long, device=device)

    def prefill(self, result):
        """Every prompt token but the last (which is re-fed by the first step) writes its KV."""
        n = self.P - 1
        if n == 0:
            return
        pos = torch.arange(n, dtype=torch.int32, device=self.device).expand(self.Bx, n)
        real = self.real[:, :n]
        inputs = StepInputs(
            q_pos=torch.where(real, pos, -1).int(),
            q_group=torch.full_like(pos, -1),
            key_pos=pos.clone(),
            key_group=torch.where(real, -1, -2).int(),
            slot=(self.cache_offset() + pos).long(),
            kv_len=self.cache_offset() + n,
        )
        self.forward(Packed(inputs, self.tokens[:, :n], self.rope[:, :n]), result, logits=False)
        self.cache.end(real)
        self.kv_ready[:, :n] = real[:self.B]

    def cache_offset(self) -> int:
        return self.cache.num_scratch if isinstance(self.cache, SlotCache) else 0

    def schedule(self) -> Lanes:
        """Which lanes are fed this step and with how many drafts (DESIGN.md §1.1)."""
        plan, n = self.plan, self.n
        left = self.lane_len - n
        done = left <= 0
        top = (~done).long().argmax(1, keepdim=True)  # lanes complete in order: the first open one
        is_top = (self.lane_id == top) & ~done
        if plan.row_lanes:
            above_n = torch.nn.functional.pad(n[:, :-1], (1, 0), value=BIG)
            above_done = torch.nn.functional.pad(done[:, :-1], (1, 0), value=True)
            activated = above_n >= plan.context
            if plan.row0_first:
                activated = activated & ((self.lane_id != 1) | above_done)
            # Row r may draft column j only once row r-1 has committed column j+1.
            room_above = torch.where(above_done, BIG, above_n - n - 1)
        else:
            activated = torch.ones_like(done)
            room_above = torch.full_like(n, BIG)
        drafts = torch.minimum(left, torch.where(is_top, BIG, room_above)).clamp(min=0, max=plan.window)
        fed = ~done & activated & (is_top | (room_above >= 1))
        # A lane that completed with a sampled (never fed) last token is fed it once more so that
        # its key exists for the rows below; it commits nothing. The last lane needs no flush.
        last_slot = self.P + self.lane_base + self.lane_len - 1
        flush = done & ~self.kv_ready.gather(1, last_slot.expand_as(n)) & (self.lane_id < self.L - 1)
        rule = TOP if plan.method == "zipar" else PREFIX
        rule = torch.where(is_top, TOP, rule)
        rule = torch.where(flush, PREFIX, rule).int()
        return Lanes(fed=fed | flush, drafts=torch.where(fed, drafts, 0), rule=rule, room=left.clamp(min=0),
                     flush=flush)

    def pack(self, lanes: Lanes) -> Packed | None:
        """Lay out this step's inputs: per fed lane, top to bottom, its leading input then its drafts."""
        plan, B, L, W, P = self.plan, self.B, self.L, self.W, self.P
        k = torch.arange(W + 1, device=self.device)
        count = torch.where(lanes.fed, 1 + lanes.drafts, 0)
        start = count.cumsum(1) - count
        valid = lanes.fed[..., None] & (k <= lanes.drafts[..., None])          # [B, L, W+1]
        image_slot = (self.lane_base + self.n - 1)[..., None] + k              # -1: the last prompt token
        raster = P + image_slot
        # The step's one host synchronisation: shapes (inputs, cache length, lanes fed) and whether
        # a previous step's target was undefined (checked here rather than by a sync of its own).
        N, max_raster, fed_lanes, bad_image, bad_step = torch.cat([torch.stack([
            count.sum(1).max(), torch.where(valid, raster, 0).max(), lanes.fed.sum(1).max()]),
            self._first_undefined()]).tolist()
        self._check_targets(bad_image, bad_step)
        if N == 0:
            return None

        # Tokens: the lane's last committed token (or leading token), then its drafts (EOL where forced).
        tokens = torch.cat([self.tokens[:B].gather(1, raster[..., 0])[..., None], self.draft_tokens], -1)
        if plan.eol_token_id is not None:
            forced = (image_slot >= 0) & (image_slot % plan.row_slots == plan.width)
            tokens = torch.where(forced, plan.eol_token_id, tokens)
        scaffold = self._scaffold(lanes)
        lead = k == 0
        if scaffold is not None:
            # Taken once, at the row's first step, then fixed: a leading token that moved with the
            # row above would move the first draft's target every step (DESIGN.md §1.1).
            take = scaffold & (self.scaffold_token < 0)
            self.scaffold_token = torch.where(take, self._lead_token(), self.scaffold_token)
            tokens[..., 0] = torch.where(scaffold, self.scaffold_token, tokens[..., 0])
            scaffold = scaffold[..., None] & lead
        else:
            scaffold = torch.zeros_like(valid)
        # Keys: a leading input whose key is not cached yet writes it as committed; otherwise its key
        # is discarded. Drafts write their own slot as drafts of their lane; scaffolds go to scratch.
        ready = self.kv_ready.gather(1, raster[..., 0])
        if plan.row_lanes and plan.eol_token_id is None:
            # A fresh row leads with the last token of the row above: do not write it twice.
            flush_above = torch.nn.functional.pad(lanes.flush[:, :-1], (1, 0), value=False)
            ready = ready | (flush_above & (self.n == 0))
        ready = ready[..., None]
        writes_committed = valid & lead & ~ready & ~scaffold
        lane = self.lane_id[:, None].expand(L, W + 1)
        draft_group = lane if plan.row_causal else torch.full_like(lane, -1)
        key_group = torch.where(lead, torch.where(writes_committed, -1, -2), draft_group)
        key_group = torch.where(scaffold, lane, key_group)
        off = self.cache_offset()
        slot = torch.where(writes_committed | ~lead, off + raster, L)  # L: the discard slot
        slot = torch.where(scaffold, lane, slot)

        # Scatter the [B, L, W+1] grid into packed [B, N] (padding: sees nothing, writes nowhere).
        dest = torch.where(valid, start[..., None] + k, N).view(B, -1)

        def packed(grid, fill):
            out = torch.full((B, N + 1), fill, dtype=grid.dtype, device=self.device)
            return out.scatter_(1, dest, grid.reshape(B, -1))[:, :N]

        q_pos = packed(raster, -1)
        inputs = StepInputs(
            q_pos=self._rows(q_pos).int(),
            q_group=self._rows(packed(lane.expand(B, L, W + 1), -1)).int(),
            key_pos=self._rows(torch.where(q_pos >= 0, q_pos, HIDDEN_POS)).int(),
            key_group=self._rows(packed(key_group, -2)).int(),
            slot=self._rows(packed(slot, L)).long(),
            kv_len=off + max_raster + 1,
        )
        raster_rows = self._rows(packed(raster, 0))
        # The first leading token is the last prompt token, which differs between cond/uncond rows.
        step_tokens = torch.where(raster_rows < P, self.tokens.gather(1, raster_rows), self._rows(packed(tokens, 0)))
        return Packed(inputs, step_tokens, self.rope.gather(1, raster_rows),
                      lane_start=torch.where(lanes.fed, start, -1), dest=dest, writes_committed=writes_committed,
                      fed_lanes=fed_lanes)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image [B, ...] -> per batch row [Bx, ...] (cond and uncond rows share image metadata)."""
        return x if self.Bx == self.B else torch.cat([x, x])

    def _scaffold(self, lanes: Lanes) -> torch.Tensor | None:
        """[B, L]: lanes whose leading token is a scaffold (no EOL, fresh row, row above unfinished)."""
        plan = self.plan
        if not plan.row_lanes or plan.eol_token_id is not None:
            return None
        above_open = torch.nn.functional.pad((self.n < self.lane_len)[:, :-1], (1, 0), value=False)
        return lanes.fed & (self.n == 0) & above_open

    def _lead_token(self) -> torch.Tensor:
        """[B, L]: each lane's scaffold token, the last committed token of the row plan.row_lead names
        (DESIGN.md §1.1). Rows complete in order, so the lowest complete row is the top open one's
        predecessor; where the named row does not exist (-1), the row above leads."""
        plan, lane = self.plan, self.lane_id
        if plan.row_lead == "row_end":
            top = (self.n < self.lane_len).long().argmax(1, keepdim=True)  # the top open row
            source = (top - 1).expand(-1, self.L)
        else:
            source = (lane - (1 if plan.row_lead == "above" else 2)).expand(self.B, -1)
        source = torch.where(source >= 0, source, lane - 1).clamp(min=0)
        n_source = self.n.gather(1, source)
        return self.tokens[:self.B].gather(1, self.P + self.lane_base[source] + (n_source - 1).clamp(min=0))

    def forward(self, step: Packed, result, logits: bool = True) -> torch.Tensor | None:
        t0 = time.perf_counter()
        self.cache.begin(step.inputs)
        with ActiveStep(self.cache, step.inputs, self.backend):
            # The prefill only writes keys: no output head over the prompt (logits=False).
            logits = self.adapter.forward(step.tokens, step.rope, **({} if logits else {"logits": False}))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result.forward_seconds += time.perf_counter() - t0
        return logits

    def _first_undefined(self) -> torch.Tensor:
        """int64 [2]: (image, step) of the first image whose target was undefined; (-1, -1) if none."""
        bad = self.bad_step >= 0
        image = torch.where(bad.any(), bad.int().argmax(), -1)
        return torch.stack([image, self.bad_step[image.clamp(min=0)]])

    @staticmethod
    def _check_targets(image: int, step: int) -> None:
        if image >= 0:
            raise ValueError(f"the model's logits define no distribution for image {image} at decoding step {step}: "
                             "a NaN or +inf, or -inf for every image token, in the CFG-combined image-token logits "
                             "/ temperature; pjd cannot sample from them")

    def verify(self, logits: torch.Tensor, lanes: Lanes, step: Packed, draws):
        """speculative_verify of the step with its per-image ``draws`` (DrawStream.step, all [B, L, ...]).
        Lanes are independent in it, so the sdpa path verifies only the lanes fed this step (gathered to
        the front with their draws, results scattered back): its work follows the active rows, not the
        grid height. A lane sees the same draws on both paths, so tokens agree."""
        plan, B, L, W = self.plan, self.B, self.L, self.W
        lane = [step.lane_start.int(), lanes.drafts.int(), lanes.rule, (self.lane_base + self.n).int(),
                lanes.room.int(), self.draft_tokens, self.draft_q, *draws]
        compact = self.backend == "sdpa" and step.fed_lanes < L
        if compact:
            # The fed lanes of each image first (stable), then enough unfed ones to fill A columns.
            order = torch.sort(lanes.fed.to(torch.uint8), dim=1, descending=True, stable=True).indices
            order = order[:, :step.fed_lanes]
            lane = [x.gather(1, order.view(B, -1, *(1,) * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
                    for x in lane]
        verdict = speculative_verify(
            logits, *lane,
            image_token_range=(plan.lo, plan.hi), cfg_scale=self.cfg_scale, reuse_threshold=plan.reuse_threshold,
            draft_init=self.draft_init, eol_token_id=plan.eol_token_id, row_slots=plan.row_slots,
            width=plan.width, backend=self.backend, validate=False, **self.sampling,
        )
        if not compact:
            return verdict

        def scatter(full, part):
            return full.scatter(1, order.view(B, -1, *(1,) * (part.dim() - 2)).expand_as(part), part)

        zeros = torch.zeros(B, L, dtype=verdict.num_commit.dtype, device=self.device)
        return VerifyResult(scatter(zeros, verdict.num_accepted), scatter(zeros, verdict.num_commit),
                            scatter(self.draft_tokens.new_zeros(B, L, W + 1), verdict.commit_tokens),
                            scatter(self.draft_tokens, verdict.next_tokens), scatter(self.draft_q, verdict.next_q),
                            scatter(torch.zeros_like(self.n, dtype=torch.bool), verdict.invalid))

    def commit(self, verdict, step: Packed) -> torch.Tensor:
        """Write committed tokens, flip cache states, advance frontiers. Returns image tokens per image."""
        plan, B, W = self.plan, self.B, self.W
        k = torch.arange(W + 1, device=self.device)
        # Keys kept: leading inputs that wrote theirs, and every accepted draft.
        accepted = (k < verdict.num_accepted[..., None])
        keep_grid = step.writes_committed | ((k >= 1) & (k <= verdict.num_accepted[..., None]))
        keep = torch.zeros(B, step.tokens.shape[1] + 1, dtype=torch.bool, device=self.device)
        keep.scatter_(1, step.dest, keep_grid.view(B, -1))
        self.cache.end(self._rows(keep[:, :-1]))
        # Lane offsets n + k as raster positions; writes that do not apply go to the dump column.
        slots = (self.P + self.lane_base + self.n)[..., None] + k             # [B, L, W+1]
        committed = k < verdict.num_commit[..., None]
        dump = self.dump
        target = torch.where(committed, slots, dump).view(B, -1)
        self.tokens.scatter_(1, self._rows(target), self._rows(verdict.commit_tokens.view(B, -1)))
        self.kv_ready.scatter_(1, torch.where(accepted, slots, dump).view(B, -1), True)
        self.kv_ready.scatter_(1, torch.where(step.writes_committed[..., 0], slots[..., 0] - 1, dump), True)
        self.n = self.n + verdict.num_commit.long()
        self.draft_tokens, self.draft_q = verdict.next_tokens, verdict.next_q
        self.step += 1
        self.bad_step = torch.where((self.bad_step < 0) & verdict.invalid.any(1), self.step, self.bad_step)
        is_image = (slots - self.P) % plan.row_slots < plan.width
        return (committed & is_image).sum((1, 2))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok")
