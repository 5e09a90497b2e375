"""Validated decoding settings and the lane geometry of each method (docs/design.md §1).

A *lane* is a run of image slots decoded left to right with its own draft window.
- ar, sjd, sjd++: one lane over the whole raster (EOL slots inside it are forced);
- pjd, zipar: one lane per grid row; the row's EOL (if any) is the next row's leading token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pjd._choices import CACHES, METHODS, ROW_LEADS

DEFAULT_WINDOW = {"ar": 0, "sjd": 15, "sjd++": 15, "pjd": 7, "zipar": 0}
DEFAULT_REUSE_THRESHOLD = 0.5  # reuse_threshold="auto" for pjd and sjd++
# context=None: round(width * this), at least 1 (measured on the embedded model, issue 21: pjd keeps
# ar's FID and class accuracy down to c = 2 of 16 with row 0 first; zipar, one token per row and
# step, loses quality below c = width / 4).
DEFAULT_CONTEXT_FRACTION = {"pjd": 1 / 8, "zipar": 1 / 4}


@dataclass(frozen=True)
class DecodePlan:
    method: str
    height: int
    width: int
    row_slots: int          # width, or width + 1 with an EOL token
    eol_token_id: int | None
    lo: int                 # image tokens are ids [lo, hi)
    hi: int
    window: int             # drafts per lane per step
    context: int            # committed tokens of lane l-1 that activate lane l (row lanes)
    row0_first: bool        # lane 1 activates only once lane 0 is complete (row lanes)
    row_lead: str           # which row a fresh row's scaffold copies (ROW_LEADS)
    reuse_threshold: float | None
    row_causal: bool
    lane_base: tuple[int, ...]   # image-slot index of each lane's first slot
    lane_len: tuple[int, ...]
    coupled_draws: bool = False  # SCD: fresh drafts by the exponential race on per-slot noise
    continuation: bool = False   # SJD-PAC: drafts after the first rejection keep being verified

    @property
    def num_lanes(self) -> int:
        return len(self.lane_base)

    @property
    def row_lanes(self) -> bool:
        return self.method in ("pjd", "zipar")

    @property
    def image_slots(self) -> int:
        return self.height * self.row_slots

    @property
    def max_fed_lanes(self) -> int:
        """Most lanes one step can feed: the bucket of the fixed-shape step (N = this x (window + 1)).

        Single lane: 1. Row lanes (the schedule of ``pjd.engine._Decoder.schedule``): the top open
        row; at most one flushed row (only the top row commits a sampled token, and only it can
        complete in a step: a lower row stays behind the row above); and the fed rows below the
        top. Fed row i below the top has committed at most ``width - 1 - 2i`` tokens (it drafts only
        up to one column behind the row above, so it is fed only when at least two behind, and a
        lower row never passes a higher one) and the row above it has committed at least
        ``max(context, 2)``: at most ``(width - 1 - max(context, 2)) // 2 + 1`` of them. The engine
        also checks the bound on the device at every step (an internal error if it ever fails)."""
        if not self.row_lanes:
            return 1
        spare = self.width - 1 - max(self.context, 2)
        below = spare // 2 + 1 if spare >= 0 else 0
        return min(self.num_lanes, 2 + below)

    @property
    def max_fed_inputs(self) -> int:
        """Most inputs one step can feed per sequence: N of the fixed-shape step.

        Single lane: window + 1. Row lanes: at most ``max_fed_lanes x (window + 1)``, and at most
        ``width + 2``, which is the tighter bound for the usual windows (18 against 64 on the default
        16-wide grid with window 7): the top open row feeds ``1 + min(left, window) <= width + 1 -
        n_top`` inputs (its last committed token or leading token, then its drafts); a fed row r
        below it drafts only up to one column behind the row above, so it feeds at most ``n_{r-1} -
        n_r`` inputs, and since a lower row never passes a higher one these sum over the rows below
        to at most ``n_top``; a flushed row feeds one. The engine checks the bound on the device at
        every step (an internal error if it ever fails)."""
        lanes = self.max_fed_lanes * (self.window + 1)
        return min(lanes, self.width + 2) if self.row_lanes else lanes


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def make_plan(*, method, height, width, window, context, top_k, top_p, temperature, cfg_scale,
              image_token_range, eol_token_id, draft_init, reuse_threshold, cache, vocab_size,
              row_causal, row0_first="auto", row_lead="row_end", coupled_draws=False,
              continuation=False) -> DecodePlan:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _positive_int("height", height)
    _positive_int("width", width)
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if draft_init not in ("random", "repeat_left"):
        raise ValueError(f"draft_init must be 'random' or 'repeat_left', got {draft_init!r}")
    lo, hi = (0, vocab_size) if image_token_range is None else image_token_range
    if not (0 <= lo < hi <= vocab_size):
        raise ValueError(f"image_token_range must satisfy 0 <= lo < hi <= vocab size {vocab_size}, got {(lo, hi)}")
    if eol_token_id is not None:
        if not 0 <= eol_token_id < vocab_size:
            raise ValueError(f"eol_token_id must be a vocabulary id in [0, {vocab_size}), got {eol_token_id}")
        if lo <= eol_token_id < hi:
            raise ValueError(f"eol_token_id {eol_token_id} lies inside image_token_range {(lo, hi)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
    if top_k > hi - lo:
        raise ValueError(f"top_k={top_k} is beyond the {hi - lo} image tokens of image_token_range")
    if not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (float(temperature) > 0.0) or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number > 0 (use top_k=1 for greedy), got {temperature}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")

    if window is None:
        window = DEFAULT_WINDOW[method]
    elif method in ("ar", "zipar"):
        raise ValueError(f"method={method!r} decodes one token per lane per step; it takes no window")
    else:
        _positive_int("window", window)
    if method in ("pjd", "zipar"):
        if context is None:
            context = max(1, round(width * DEFAULT_CONTEXT_FRACTION[method]))
        _positive_int("context", context)
        context = min(context, width)
    elif context is not None:
        raise ValueError(f"context applies to the row-parallel methods 'pjd' and 'zipar', not {method!r}")
    else:
        context = width
    if coupled_draws or continuation:
        if method not in ("sjd", "pjd"):
            raise ValueError(f"coupled_draws / continuation apply to 'sjd' and 'pjd' (exact drafts), not {method!r}")
        if reuse_threshold not in (None, "auto"):
            raise ValueError(f"coupled_draws / continuation replace draft reuse: reuse_threshold must be None or "
                             f"'auto', got {reuse_threshold!r}")
        reuse_threshold = None  # reuse keeps a draft with its old q after a test on it: not exact
    if row_lead not in ROW_LEADS:
        raise ValueError(f"row_lead must be one of {ROW_LEADS}, got {row_lead!r}")
    if row_lead != ROW_LEADS[0] and method not in ("pjd", "zipar"):
        raise ValueError(f"row_lead applies to the row-parallel methods 'pjd' and 'zipar', not {method!r}")
    if row0_first == "auto":
        # Without EOL a fresh row then always has a complete row above it to lead from; with EOL
        # every row leads with its real EOL and waiting for row 0 would only cost steps.
        row0_first = method in ("pjd", "zipar") and eol_token_id is None
    elif not isinstance(row0_first, bool):
        raise TypeError(f"row0_first must be True, False or 'auto', got {type(row0_first).__name__} {row0_first!r}")
    elif row0_first and method not in ("pjd", "zipar"):
        raise ValueError(f"row0_first applies to the row-parallel methods 'pjd' and 'zipar', not {method!r}")
    if method not in ("pjd", "sjd++"):
        reuse_threshold = None  # sjd is the classic (lossless) Jacobi refresh; ar and zipar have no drafts
    elif reuse_threshold == "auto":
        reuse_threshold = DEFAULT_REUSE_THRESHOLD
    elif reuse_threshold is not None and not float(reuse_threshold) >= 0.0:
        raise ValueError(f"reuse_threshold must be >= 0, None (off) or 'auto', got {reuse_threshold}")

    row_slots = width + (eol_token_id is not None)
    if method in ("pjd", "zipar"):
        lane_base = tuple(r * row_slots for r in range(height))
        lane_len = (width,) * height
    else:  # one lane over the raster; the trailing EOL is never needed
        lane_base = (0,)
        lane_len = (height * row_slots - (eol_token_id is not None),)
    # Drafts past a lane's end are never fed: a larger window would only size buffers.
    window = min(window, max(lane_len))
    return DecodePlan(method, height, width, row_slots, eol_token_id, lo, hi, window, context, row0_first, row_lead,
                      None if reuse_threshold is None else float(reuse_threshold), bool(row_causal),
                      lane_base, lane_len, bool(coupled_draws), bool(continuation))

