"""Row-causal draft attention: fused Triton kernel + torch wrapper.

Semantics (the specification is ``pjd.ops.draft_attention_reference``): key j is visible to query i iff
    k_group[j] != -2  and  k_pos[j] <= q_pos[i]  and  (k_group[j] == -1  or  k_group[j] == q_group[i]).
A query that sees no key gets zeros.

Layout of the work (docs/kernels.md has the full design):
- GQA packing: one program owns one kv head and a block of BLOCK_M *rows*, where row r of the
  ``Nq * G`` rows of that kv head is (query r // G, query head hkv * G + r % G). Every K/V tile is
  loaded once for all G query heads that read it, and any G works (no power-of-two requirement).
- Masking stages, decided per key tile from the loaded positions (keys are not sorted by position:
  the engine puts scratch slots first and the append layout orders keys by commit time):
    empty   - no key of the tile can be seen by any row of the block: K/V not loaded (predicated
              loads), scores masked to -inf;
    full    - every key committed, in range and at or before every row's position: no mask;
    partial - the visibility rule is evaluated element-wise from the four int32 arrays.
- Split-KV (flash-decoding): with few query rows the grid has too few programs to fill the GPU, so
  the key range is cut into NUM_SPLITS chunks; each program writes an fp32 partial output and its
  base-2 logsumexp, and ``_draft_attention_combine`` merges the chunks.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

COMMITTED = tl.constexpr(-1)
HIDDEN = tl.constexpr(-2)
INT32_MAX = tl.constexpr(2**31 - 1)
# Running max of a row that has seen no key yet. Finite (not -inf) so that exp2(m_old - m_new) and
# exp2(score - m_new) stay 0 or 1 instead of NaN while a row is still empty.
NO_SCORE = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634


@triton.jit
def _draft_attention_fwd(
    Q, K, V, QPos, QGroup, KPos, KGroup, Out, Lse,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_os, stride_ob, stride_oh, stride_on,
    stride_ls, stride_lb, stride_lh,
    stride_qmeta, stride_kmeta,
    num_kv_heads, group_size, num_queries, num_keys, keys_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M packed (query, head) rows of one (batch, kv head), one key chunk.

    Grid: (cdiv(Nq * G, BLOCK_M), B * Hkv, NUM_SPLITS). qk_scale = softmax scale * log2(e).
    SPLIT=False: writes the normalised output to Out [B, Hq, Nq, D].
    SPLIT=True: writes the chunk's normalised fp32 output to Out [S, B, Hq, Nq, D] and its base-2
    logsumexp (-inf when the chunk shows the row nothing) to Lse [S, B, Hq, Nq].
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads

    # Packed rows -> (query index, query head).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_queries * group_size
    query = rows // group_size
    head = kv_head * group_size + rows % group_size
    dims = tl.arange(0, HEAD_DIM)

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + query[:, None] * stride_qn + dims[None, :])
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(QPos + b * stride_qmeta + query, mask=row_valid, other=-1)
    q_group = tl.load(QGroup + b * stride_qmeta + query, mask=row_valid, other=HIDDEN)
    # Block-wide bounds used to classify key tiles (padding rows excluded).
    q_pos_max = tl.max(tl.where(row_valid, q_pos, -1))
    q_pos_min = tl.min(tl.where(row_valid, q_pos, INT32_MAX))

    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, num_keys)

    m_i = tl.full([BLOCK_M], NO_SCORE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_pos = tl.load(KPos + b * stride_kmeta + keys, mask=keys < hi, other=0)
        k_group = tl.load(KGroup + b * stride_kmeta + keys, mask=keys < hi, other=HIDDEN)
        # Keys some row of the block may see (out-of-range keys read as HIDDEN). K/V loads are
        # predicated on it, so an empty tile (and every hidden or too-late key) costs no HBM traffic.
        # The tile's two MMAs still issue on zeros: a data-dependent branch around them would stop
        # Triton's software pipeliner from multi-buffering the K/V loads (docs/kernels.md).
        maybe_seen = (k_group != HIDDEN) & (k_pos <= q_pos_max)
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=maybe_seen[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=maybe_seen[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Full tile: every key committed, in range and at or before the block's earliest query, so
        # every row sees every key. Otherwise (partial or empty) evaluate the visibility rule.
        committed_pos = tl.where((k_group == COMMITTED) & (keys < hi), k_pos, INT32_MAX)
        if tl.max(committed_pos) > q_pos_min:
            visible = ((k_group[None, :] != HIDDEN) & (k_pos[None, :] <= q_pos[:, None])
                       & ((k_group[None, :] == COMMITTED) | (k_group[None, :] == q_group[:, None])))
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Rows that saw nothing have l_i == 0 and acc == 0: they get zeros (and lse = -inf).
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = (Out + split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob
              + head[:, None].to(tl.int64) * stride_oh + query[:, None] * stride_on + dims[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None])
    if SPLIT:
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(Lse + split * stride_ls + b * stride_lb + head * stride_lh + query, lse, mask=row_valid)


@triton.jit
def _draft_attention_combine(
    OPart, Lse, Out,
    num_splits, num_heads, num_queries,
    stride_ps, stride_pb, stride_ph, stride_pn,
    stride_ls, stride_lb, stride_lh,
    stride_ob, stride_oh, stride_on,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Merge the split-KV partials of BLOCK_Q queries of one (batch, query head).

    Grid: (cdiv(Nq, BLOCK_Q), B * Hq). out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M).
    """
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    head = pid_bh % num_heads
    query = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = query < num_queries
    dims = tl.arange(0, HEAD_DIM)

    m = tl.full([BLOCK_Q], NO_SCORE, tl.float32)
    denom = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for split in range(num_splits):
        lse = tl.load(Lse + split * stride_ls + b * stride_lb + head * stride_lh + query,
                      mask=q_valid, other=float("-inf"))
        o = tl.load(OPart + split * stride_ps + b.to(tl.int64) * stride_pb
                    + head.to(tl.int64) * stride_ph + query[:, None] * stride_pn + dims[None, :],
                    mask=q_valid[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # 0 for a chunk that showed the row nothing
        denom = denom * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
              + query[:, None] * stride_on + dims[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_valid[:, None])


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Shipped tile configs, keyed by (head dim, element size in bytes). Each one is compiled for sm_80
# and sm_90 by the AOT gate (pjd.kernels.aot) and must have no spills and fit in shared memory.
# BLOCK_M = 64 rows covers the decode case (<= 8 rows x 8 inputs) in one block per kv head.
CONFIGS = {
    (64, 2): TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (128, 2): TileConfig(block_m=64, block_n=64, num_warps=8, num_stages=3),
    (64, 4): TileConfig(block_m=32, block_n=32, num_warps=4, num_stages=2),
    (128, 4): TileConfig(block_m=32, block_n=32, num_warps=8, num_stages=2),
}
COMBINE_BLOCK_Q = 16
COMBINE_NUM_WARPS = 4
# Split-KV heuristic constants (see _num_splits).
MIN_SPLIT_KEYS = 256
SPLIT_ROW_FACTOR = 8
DEFAULT_NUM_SMS = 132  # H100 SXM; used where no CUDA device can be queried (interpreter)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def _num_splits(programs: int, rows_per_program: int, num_keys: int, num_sms: int) -> int:
    """How many key chunks to run in parallel (1 = no split).

    Split only when the (row block, batch, kv head) programs alone leave SMs idle; then aim at about
    two programs per SM. Each chunk keeps at least max(MIN_SPLIT_KEYS, 8 * rows) keys: a split
    writes and the combine rereads an fp32 row per query row, 8 bytes per row element against at
    least 32 bytes of fp16 K/V per 8 keys, so the extra traffic stays under ~25% of the K/V read.
    """
    if programs >= num_sms:
        return 1
    min_keys = max(MIN_SPLIT_KEYS, SPLIT_ROW_FACTOR * rows_per_program)
    return max(1, min(triton.cdiv(2 * num_sms, programs), num_keys // min_keys))


def tile_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    config = CONFIGS.get((head_dim, torch.empty((), dtype=dtype).element_size()))
    if config is None:
        supported = sorted({d for d, _ in CONFIGS})
        raise ValueError(f"draft_attention triton kernel supports head dim D in {supported}, got D={head_dim}")
    return config


def draft_attention_triton(q, k, v, q_pos, q_group, k_pos, k_group, scale: float, *, num_splits=None):
    """Triton implementation of ``pjd.ops.draft_attention`` (inputs validated by the op).

    Args:
        q: ``[B, Hq, Nq, D]`` fp16 / bf16 / fp32; k, v: ``[B, Hkv, Nk, D]`` same dtype, Hq % Hkv == 0.
        q_pos, q_group: int32 ``[B, Nq]``; k_pos, k_group: int32 ``[B, Nk]``.
        scale: softmax scale.
        num_splits: force the number of key chunks (tests); None = the heuristic of _num_splits.

    Returns:
        ``[B, Hq, Nq, D]`` contiguous, q's dtype; zeros for queries that see no key.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group_size = Hq // Hkv
    config = tile_config(D, q.dtype)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if Nq == 0 or B == 0 or Hq == 0:
        return out
    # The kernel indexes the head dim and the metadata rows with unit stride.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q_pos, q_group, k_pos, k_group = (t.contiguous() for t in (q_pos, q_group, k_pos, k_group))

    rows = Nq * group_size
    row_blocks = triton.cdiv(rows, config.block_m)
    if num_splits is None:
        num_splits = _num_splits(row_blocks * B * Hkv, min(rows, config.block_m), Nk, _num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # Chunks are whole tiles; recount so that no chunk is empty.
    keys_per_split = max(1, triton.cdiv(triton.cdiv(Nk, config.block_n), num_splits)) * config.block_n
    num_splits = max(1, triton.cdiv(Nk, keys_per_split))
    split = num_splits > 1

    interpreting = _interpreting()
    upcast = interpreting and q.dtype == torch.bfloat16  # interpreter tl.dot on bf16 is wrong
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if split:
        o_part = torch.empty((num_splits, B, Hq, Nq, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_splits, B, Hq, Nq), dtype=torch.float32, device=q.device)
        target, lse_strides = o_part, lse.stride()[:3]
    else:
        target, lse, lse_strides = out.unsqueeze(0), out, (0, 0, 0)  # Lse unused without SPLIT

    _draft_attention_fwd[(row_blocks, B * Hkv, num_splits)](
        q, k, v, q_pos, q_group, k_pos, k_group, target, lse,
        scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *target.stride()[:4], *lse_strides,
        q_pos.stride(0), k_pos.stride(0),
        Hkv, group_size, Nq, Nk, keys_per_split,
        HEAD_DIM=D, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        SPLIT=split, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split:
        _draft_attention_combine[(triton.cdiv(Nq, COMBINE_BLOCK_Q), B * Hq)](
            o_part, lse, out, num_splits, Hq, Nq,
            *o_part.stride()[:4], *lse.stride()[:3], *out.stride()[:3],
            HEAD_DIM=D, BLOCK_Q=COMBINE_BLOCK_Q, num_warps=COMBINE_NUM_WARPS,
        )
    return out


def _int_args(fn):
    """Strides, sizes and counts: every argument named stride_* or num_* plus keys_per_split / group_size."""
    return {n: "i32" for n in fn.arg_names
            if n.startswith(("stride_", "num_")) or n in ("group_size", "keys_per_split")}


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_configs():
    """Every kernel instance the wrapper can launch on a GPU, for the AOT gate (pjd.kernels.aot)."""
    from .aot import KernelConfig

    configs = []
    for dtype, ty in _TRITON_DTYPE.items():
        for (head_dim, size), cfg in CONFIGS.items():
            if size != torch.empty((), dtype=dtype).element_size():
                continue
            for split in (False, True):
                signature = {
                    "Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}",
                    "QPos": "*i32", "QGroup": "*i32", "KPos": "*i32", "KGroup": "*i32",
                    "Out": "*fp32" if split else f"*{ty}", "Lse": "*fp32" if split else f"*{ty}",
                    "qk_scale": "fp32",
                    **_int_args(_draft_attention_fwd),
                }
                configs.append(KernelConfig(
                    kernel="draft_attention_fwd",
                    config=f"D{head_dim} {ty} M{cfg.block_m} N{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
                           + (" split" if split else ""),
                    fn=_draft_attention_fwd, signature=signature,
                    constexprs={"HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                                "SPLIT": split, "UPCAST": False,
                                "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"},
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    divisible=("Q", "K", "V", "QPos", "QGroup", "KPos", "KGroup", "Out", "Lse",
                               "stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
                               "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_on",
                               "keys_per_split"),
                ))
            signature = {"OPart": "*fp32", "Lse": "*fp32", "Out": f"*{ty}",
                         **_int_args(_draft_attention_combine)}
            configs.append(KernelConfig(
                kernel="draft_attention_combine",
                config=f"D{head_dim} {ty} Q{COMBINE_BLOCK_Q} w{COMBINE_NUM_WARPS}",
                fn=_draft_attention_combine, signature=signature,
                constexprs={"HEAD_DIM": head_dim, "BLOCK_Q": COMBINE_BLOCK_Q},
                num_warps=COMBINE_NUM_WARPS, num_stages=1,
                divisible=("OPart", "Lse", "Out", "stride_ps", "stride_pb", "stride_ph", "stride_pn",
                           "stride_ob", "stride_oh", "stride_on"),
            ))
    return configs
