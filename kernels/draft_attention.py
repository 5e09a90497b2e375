"""Row-causal draft attention: fused Triton kernel + torch wrapper.

Semantics (the specification is ``pjd.ops.draft_attention_reference``): key j is visible to query i iff
    k_group[j] != -2  and  k_pos[j] <= q_pos[i]  and  (k_group[j] == -1  or  k_group[j] == q_group[i]).
A query that sees no key gets zeros.

Layout of the work (docs/kernels.md has the full design):
- Any head dim 1..256: computed padded to BLOCK_D (a power of two >= 16) with masked loads.
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
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETING, TRITON_DTYPE, device_guard, tuned_for

COMMITTED = tl.constexpr(-1)
HIDDEN = tl.constexpr(-2)
INT32_MAX = tl.constexpr(2**31 - 1)
# Running max of a row that has seen no key yet. Finite (not -inf) so that exp2(m_old - m_new) and
# exp2(score - m_new) stay 0 or 1 instead of NaN while a row is still empty.
NO_SCORE = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634

if INTERPRETING:
    # Triton 3.9's interpreter multiplies the raw bit patterns of bf16 operands in tl.dot and
    # truncates fp32 -> bf16 casts, where a GPU rounds to nearest even. Interpreted, bf16 values are
    # therefore rounded by hand (and kept in fp32, exactly) and bf16 products run in fp32: the same
    # numbers a GPU multiplies and stores, so the parity tests exercise the GPU's numerics.
    @triton.jit
    def _mma(a, b, DOT_PRECISION: tl.constexpr):
        if (a.dtype == tl.bfloat16) or (b.dtype == tl.bfloat16):
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=DOT_PRECISION)

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(dtype)
else:
    @triton.jit
    def _mma(a, b, DOT_PRECISION: tl.constexpr):
        return tl.dot(a, b, input_precision=DOT_PRECISION)

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        return x.to(dtype)


@triton.jit
def _keys_maybe_seen(k_pos, k_group, q_pos_max):
    """Per key: may some row of the block see it? (False for hidden, too-late and out-of-range keys.)
    K/V loads are predicated on it, so an *empty* tile, and every unseen key of a live tile, costs no
    memory traffic. The tile's MMAs still issue on zeros: a branch around them would stop Triton's
    software pipeliner from multi-buffering the K/V loads (docs/kernels.md)."""
    return (k_group != HIDDEN) & (k_pos <= q_pos_max)


@triton.jit
def _tile_is_full(k_pos, k_group, keys, hi, q_pos_min):
    """Every key of the tile committed, in range and at or before the block's earliest query: every
    row sees every key and no mask is needed (the committed prefix, most of the cache)."""
    committed_pos = tl.where((k_group == COMMITTED) & (keys < hi), k_pos, INT32_MAX)
    return tl.max(committed_pos) <= q_pos_min


@triton.jit
def _visible(q_pos, q_group, k_pos, k_group):
    """The visibility rule, element-wise on a [rows, keys] tile (a *partial* tile)."""
    return ((k_group[None, :] != HIDDEN) & (k_pos[None, :] <= q_pos[:, None])
            & ((k_group[None, :] == COMMITTED) | (k_group[None, :] == q_group[:, None])))


@triton.jit
def _online_softmax_update(m_i, l_i, acc, s, v, DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the running (max, denominator, output) of each row.

    s: base-2 scores [BLOCK_M, BLOCK_N], -inf where masked. P is rounded to V's dtype before the
    P·V MMA (tensor cores for fp16 / bf16), as FlashAttention does.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mma(_round_to(p, v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


# Counts that change every decoding step, and the strides that follow the query count, are never
# specialised: no new compile in the middle of a decode (the JIT turns an int equal to 1 into a
# constexpr and gives multiples of 16 their own variant). K/V strides (fixed by the cache's
# capacity) and the row strides stay specialised: their divisibility is what vectorises the loads.
@triton.jit(do_not_specialize=["num_queries", "num_keys", "keys_per_split", "stride_qb", "stride_qh",
                               "stride_os", "stride_ob", "stride_oh", "stride_ls", "stride_lb", "stride_lh",
                               "stride_qpos", "stride_qgroup"])
def _draft_attention_fwd(
    Q, K, V, QPos, QGroup, KPos, KGroup, Out, Lse,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_os, stride_ob, stride_oh, stride_on,
    stride_ls, stride_lb, stride_lh,
    stride_qpos, stride_qgroup, stride_kpos, stride_kgroup,
    num_kv_heads, group_size, num_queries, num_keys, keys_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M packed (query, head) rows of one (batch, kv head), one key chunk.

    Grid: (B * Hkv, cdiv(Nq * G, BLOCK_M), NUM_SPLITS) -- B * Hkv on axis 0, the only axis not
    capped at 65,535. qk_scale = softmax scale * log2(e). The head dim is padded to BLOCK_D (a power
    of two >= 16, what tl.arange and tl.dot need) with masked loads; padded lanes hold zeros.
    SPLIT=False: writes the normalised output to Out [B, Hq, Nq, D]; Lse is None.
    SPLIT=True: writes the chunk's normalised fp32 output to Out [S, B, Hq, Nq, D] and its base-2
    logsumexp (-inf when the chunk shows the row nothing) to Lse [S, B, Hq, Nq].
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads

    # Packed rows -> (query index, query head).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_queries * group_size
    query = rows // group_size
    head = kv_head * group_size + rows % group_size
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + query[:, None] * stride_qn + dims[None, :])
    q = tl.load(q_ptrs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    q_pos = tl.load(QPos + b * stride_qpos + query, mask=row_valid, other=-1)
    q_group = tl.load(QGroup + b * stride_qgroup + query, mask=row_valid, other=HIDDEN)
    # Block-wide bounds used to classify key tiles (padding rows excluded).
    q_pos_max = tl.max(tl.where(row_valid, q_pos, -1))
    q_pos_min = tl.min(tl.where(row_valid, q_pos, INT32_MAX))

    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, num_keys)

    m_i = tl.full([BLOCK_M], NO_SCORE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_pos = tl.load(KPos + b * stride_kpos + keys, mask=keys < hi, other=0)
        k_group = tl.load(KGroup + b * stride_kgroup + keys, mask=keys < hi, other=HIDDEN)  # out of range: hidden
        kv_mask = _keys_maybe_seen(k_pos, k_group, q_pos_max)[:, None] & dim_valid[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), DOT_PRECISION) * qk_scale
        if not _tile_is_full(k_pos, k_group, keys, hi, q_pos_min):  # partial or empty tile
            s = tl.where(_visible(q_pos, q_group, k_pos, k_group), s, float("-inf"))
        m_i, l_i, acc = _online_softmax_update(m_i, l_i, acc, s, v, DOT_PRECISION)

    # Rows that saw nothing have l_i == 0 and acc == 0: they get zeros (and lse = -inf).
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = (Out + split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob
              + head[:, None].to(tl.int64) * stride_oh + query[:, None] * stride_on + dims[None, :])
    tl.store(o_ptrs, _round_to(out, Out.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
    if SPLIT:
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(Lse + split * stride_ls + b * stride_lb + head * stride_lh + query, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_queries", "stride_ps", "stride_pb", "stride_ph", "stride_ls", "stride_lb",
                               "stride_lh", "stride_ob", "stride_oh"])
def _draft_attention_combine(
    OPart, Lse, Out,
    num_splits, num_heads, num_queries,
    stride_ps, stride_pb, stride_ph, stride_pn,
    stride_ls, stride_lb, stride_lh,
    stride_ob, stride_oh, stride_on,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Merge the split-KV partials of BLOCK_Q queries of one (batch, query head).

    Grid: (B * Hq, cdiv(Nq, BLOCK_Q)). out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M).
    """
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = pid_bh // num_heads
    head = pid_bh % num_heads
    query = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = query < num_queries
    dims = tl.arange(0, BLOCK_D)
    mask = q_valid[:, None] & (dims[None, :] < HEAD_DIM)

    m = tl.full([BLOCK_Q], NO_SCORE, tl.float32)
    denom = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for split in range(num_splits):
        lse = tl.load(Lse + split * stride_ls + b * stride_lb + head * stride_lh + query,
                      mask=q_valid, other=float("-inf"))
        o = tl.load(OPart + split * stride_ps + b.to(tl.int64) * stride_pb
                    + head.to(tl.int64) * stride_ph + query[:, None] * stride_pn + dims[None, :],
                    mask=mask, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # 0 for a chunk that showed the row nothing
        denom = denom * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
              + query[:, None] * stride_on + dims[None, :])
    tl.store(o_ptrs, _round_to(out, Out.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TileTable:
    """The tile configs of one Triton release, keyed by (padded head dim BLOCK_D, element size in bytes).

    ``configs`` serves every head dim; ``ragged`` overrides it for head dims that are not a power of
    two (D < BLOCK_D), whose per-element dim mask on every load costs registers.
    """
    configs: dict
    ragged: dict


MAX_HEAD_DIM = 256
# Shipped tile configs per Triton release (kernels/_launch.py: tuned_for picks the table of the
# installed Triton; docs/decisions.md, issue 19). BLOCK_D is the head dim rounded up to a power of
# two, at least 16 (tl.dot's smallest K). Every config of the installed release's table is compiled
# for sm_80 and sm_90 by the dry-run gate (benchmarks/kernel_report.py, tests/test_dryrun.py): no
# spills, shared memory in budget; the 3.6 table is checked by the same gate in a triton 3.6 environment
# (scripts/device_stack_gate.sh). Tiles change the order of the online softmax's updates only: the
# outputs stay within the dtype tolerances of the tests under either table.
# BLOCK_M = 64 rows covers the decode case (<= 8 rows x 8 inputs) in one block per kv head; D = 256
# takes smaller row blocks (a 64 x 256 fp32 accumulator spills). From BLOCK_D = 128 up, ragged head
# dims take smaller tiles (the others stay spill-free as they are).
_T = TileConfig
# Triton 3.9 (our pin). fp32 (32, 4) has 3 stages: with 2, ptxas spills 28 bytes of its split
# variant on sm_80.
_TILES_3_9 = TileTable(
    configs={
        (16, 2): _T(64, 64, 4, 3), (32, 2): _T(64, 64, 4, 3), (64, 2): _T(64, 64, 4, 3),
        (128, 2): _T(64, 64, 8, 3), (256, 2): _T(32, 32, 8, 2),
        (16, 4): _T(32, 32, 4, 2), (32, 4): _T(32, 32, 4, 3), (64, 4): _T(32, 32, 4, 2),
        (128, 4): _T(32, 32, 8, 2), (256, 4): _T(16, 16, 4, 2),
    },
    ragged={(128, 2): _T(32, 64, 8, 3), (256, 2): _T(32, 16, 8, 2), (256, 4): _T(16, 16, 8, 2)},
)
TILE_TABLES = {
    # Triton 3.6 (torch 2.11) passes ptxas no --regAllocOptLevel: 3.9's table spills there for
    # fp16/bf16 D = 256, fp32 D = 32 and 128, and ragged fp16/bf16 D from 65 up. Those entries
    # take smaller tiles or another warp count; the rest is 3.9's.
    (3, 6): TileTable(
        configs={**_TILES_3_9.configs,
                 (256, 2): _T(32, 32, 4, 2), (32, 4): _T(32, 32, 8, 3), (128, 4): _T(16, 32, 8, 2)},
        ragged={**_TILES_3_9.ragged, (128, 2): _T(32, 16, 8, 3), (256, 2): _T(16, 16, 8, 2)},
    ),
    (3, 9): _TILES_3_9,
}
TILES = TILE_TABLES[tuned_for(TILE_TABLES, triton.__version__)]
# Compile options of every launch: FP contraction on (the outputs are compared with a tolerance;
# FMAs are faster and no less accurate). Said explicitly: Triton 3.10 changes the default.
NUMERICS = {"enable_fp_fusion": True}
COMBINE_BLOCK_Q = 16
COMBINE_NUM_WARPS = 4
MAX_GRID_YZ = 65_535  # CUDA's limit on grid axes 1 and 2
# Split-KV heuristic constants (see _num_splits).
MIN_SPLIT_KEYS = 256
SPLIT_ROW_FACTOR = 8
DEFAULT_NUM_SMS = 132  # H100 SXM; used where no CUDA device can be queried (interpreter, dry run)


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


def block_d(head_dim: int) -> int:
    """The head dim the kernel computes with: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot serve this shape (None when it can)."""
    if dtype not in TRITON_DTYPE:
        return f"draft_attention's triton kernel supports float16, bfloat16 and float32, got {dtype}"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"draft_attention's triton kernel supports head dims D in [1, {MAX_HEAD_DIM}], got D={head_dim}"
    return None


def tile_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    reason = unsupported(head_dim, dtype)
    if reason is not None:
        raise ValueError(reason)
    key = (block_d(head_dim), torch.empty((), dtype=dtype).element_size())
    return TILES.ragged.get(key, TILES.configs[key]) if head_dim != key[0] else TILES.configs[key]


def _rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernel takes any strides but unit stride on the last dim (copy only in that rare case)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def draft_attention_triton(q, k, v, q_pos, q_group, k_pos, k_group, scale: float, *, num_splits=None):
    """Triton implementation of ``pjd.ops.draft_attention`` (inputs validated by the op).

    Args:
        q: ``[B, Hq, Nq, D]`` fp16 / bf16 / fp32, 1 <= D <= 256; k, v: ``[B, Hkv, Nk, D]`` same dtype,
            Hq % Hkv == 0. Any strides (a copy is made only of a tensor whose last dim is strided).
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
    q, k, v, q_pos, q_group, k_pos, k_group = map(_rows_unit_stride, (q, k, v, q_pos, q_group, k_pos, k_group))

    rows = Nq * group_size
    row_blocks = triton.cdiv(rows, config.block_m)
    if row_blocks > MAX_GRID_YZ:
        raise ValueError(f"draft_attention's triton kernel takes at most {MAX_GRID_YZ * config.block_m} "
                         f"(query, head) rows per kv head, got Nq * Hq / Hkv = {rows}")
    if num_splits is None:
        num_splits = _num_splits(row_blocks * B * Hkv, min(rows, config.block_m), Nk, _num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # Chunks are whole tiles; recount so that no chunk is empty.
    keys_per_split = max(1, triton.cdiv(triton.cdiv(Nk, config.block_n), num_splits)) * config.block_n
    num_splits = min(max(1, triton.cdiv(Nk, keys_per_split)), MAX_GRID_YZ)
    split = num_splits > 1
    tiles = dict(HEAD_DIM=D, BLOCK_D=block_d(D))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: no TF32, as torch's default

    with device_guard(q):
        if split:
            target = torch.empty((num_splits, B, Hq, Nq, D), dtype=torch.float32, device=q.device)
            lse = torch.empty((num_splits, B, Hq, Nq), dtype=torch.float32, device=q.device)
            lse_strides = lse.stride()[:3]
        else:  # the output itself, as a 1-chunk partial; no logsumexp
            target, lse, lse_strides = out.unsqueeze(0), None, (0, 0, 0)
        _draft_attention_fwd[(B * Hkv, row_blocks, num_splits)](
            q, k, v, q_pos, q_group, k_pos, k_group, target, lse,
            scale * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *target.stride()[:4], *lse_strides,
            q_pos.stride(0), q_group.stride(0), k_pos.stride(0), k_group.stride(0),
            Hkv, group_size, Nq, Nk, keys_per_split,
            **tiles, BLOCK_M=config.block_m, BLOCK_N=config.block_n, SPLIT=split, DOT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages, **NUMERICS,
        )
        if split:
            _draft_attention_combine[(B * Hq, triton.cdiv(Nq, COMBINE_BLOCK_Q))](
                target, lse, out, num_splits, Hq, Nq,
                *target.stride()[:4], *lse.stride()[:3], *out.stride()[:3],
                **tiles, BLOCK_Q=COMBINE_BLOCK_Q, num_warps=COMBINE_NUM_WARPS, **NUMERICS,
            )
    return out
