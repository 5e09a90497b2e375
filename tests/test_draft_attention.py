"""draft_attention: reference vs SDPA, input validation, Triton kernel (interpreter) vs reference.

The Triton part runs this file as a script in a subprocess with TRITON_INTERPRET=1 set before any
import (an out-of-bounds load kills the interpreter process, and the AOT compile elsewhere needs a
process without it). The script runs a list of cases and prints one line per failing case.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pjd.ops
from pjd.ops import draft_attention, draft_attention_reference, visibility_mask

HIDDEN, COMMITTED = -2, -1


def make_metadata(B, Nq, Nk, layout, gen, num_groups=3):
    """Random int32 metadata. Every layout has at least one query that sees nothing.

    random:        uniform positions and states (-2, -1 and groups 0..num_groups-1); with B >= 2 the
                   last batch entry has every key hidden.
    rows:          a pjd-like step: a committed prefix before every query (full tiles), a few committed
                   keys among the queries' positions (lower rows), one draft key per query (its own
                   slot), hidden padding.
    rows_unsorted: rows with three scratch slots first (arbitrary positions/states) and the committed
                   keys in a random (commit) order.
    """
    q_pos = torch.empty(B, Nq, dtype=torch.int32)
    q_group = torch.empty(B, Nq, dtype=torch.int32)
    k_pos = torch.empty(B, Nk, dtype=torch.int32)
    k_group = torch.empty(B, Nk, dtype=torch.int32)
    for b in range(B):
        if layout == "random":
            q_pos[b] = torch.randint(0, Nk, (Nq,), generator=gen)
            q_group[b] = torch.randint(0, num_groups, (Nq,), generator=gen)
            k_pos[b] = torch.randint(0, Nk, (Nk,), generator=gen)
            k_group[b] = torch.randint(HIDDEN, num_groups, (Nk,), generator=gen)
            if B >= 2 and b == B - 1:
                k_group[b] = HIDDEN
            continue
        prefix = max(1, int(0.6 * Nk))
        qp = (prefix + torch.randperm(2 * Nq, generator=gen)[:Nq]).sort().values
        qg = torch.arange(Nq) * min(num_groups, Nq) // Nq  # each group a run of consecutive queries
        scratch_pos = torch.randint(0, 3 * Nk, (3,), generator=gen)
        scratch_group = torch.randint(HIDDEN, 1, (3,), generator=gen)
        committed_pos = torch.arange(prefix)
        if layout == "rows_unsorted":
            committed_pos = committed_pos[torch.randperm(prefix, generator=gen)]
        lower_rows_pos = prefix + torch.randperm(2 * Nq, generator=gen)[: max(1, Nq // 4)]
        kp = torch.cat([scratch_pos if layout == "rows_unsorted" else scratch_pos[:0], committed_pos,
                        lower_rows_pos, qp, torch.randint(0, 3 * Nk, (Nk,), generator=gen)])[:Nk]
        kg = torch.cat([scratch_group if layout == "rows_unsorted" else scratch_group[:0],
                        torch.full((prefix + len(lower_rows_pos),), COMMITTED), qg,
                        torch.full((Nk,), HIDDEN)])[:Nk]
        q_pos[b], q_group[b], k_pos[b], k_group[b] = qp, qg, kp, kg
    q_pos[0, -1] = -1  # sees nothing: every key position is >= 0
    return q_pos, q_group, k_pos, k_group


def make_inputs(B, Hq, Hkv, Nq, Nk, D, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    return (q, k, v, *make_metadata(B, Nq, Nk, layout, gen))


# ---------------------------------------------------------------- (a) reference vs SDPA, in process
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D", [
    (1, 1, 1, 1, 1, 16), (2, 4, 4, 9, 77, 32), (2, 8, 2, 33, 130, 64), (1, 6, 3, 64, 300, 128),
])
@pytest.mark.parametrize("layout", ["random", "rows_unsorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_sdpa(B, Hq, Hkv, Nq, Nk, D, layout, dtype):
    q, k, v, q_pos, q_group, k_pos, k_group = make_inputs(B, Hq, Hkv, Nq, Nk, D, dtype, layout, seed=Nk)
    mask = visibility_mask(q_pos, q_group, k_pos, k_group)
    out = draft_attention(q, k, v, q_pos, q_group, k_pos, k_group, backend="torch")
    assert out.shape == q.shape and out.dtype == dtype
    sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None],
                                          enable_gqa=True)
    sees = mask.any(-1)  # [B, Nq]
    assert (~sees).any(), "every layout must contain a query that sees nothing"
    assert torch.equal(out.transpose(1, 2)[~sees], torch.zeros_like(out.transpose(1, 2)[~sees]))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.transpose(1, 2)[sees].float(), sdpa.transpose(1, 2)[sees].to(dtype).float(),
                               atol=tol, rtol=tol)


def test_visibility_rule_by_hand():
    """The four clauses of the rule on hand-picked keys (one query at position 5, group 1)."""
    q_pos, q_group = torch.tensor([[5]], dtype=torch.int32), torch.tensor([[1]], dtype=torch.int32)
    k_pos = torch.tensor([[0, 5, 6, 3, 3, 3, 2]], dtype=torch.int32)
    k_group = torch.tensor([[-1, -1, -1, 1, 0, -2, 2]], dtype=torch.int32)
    expected = torch.tensor([[[True, True, False, True, False, False, False]]])
    assert torch.equal(visibility_mask(q_pos, q_group, k_pos, k_group), expected)


def test_scale_default_and_explicit():
    q, k, v, *meta = make_inputs(1, 2, 1, 5, 20, 64, torch.float32, "rows", seed=3)
    default = draft_attention(q, k, v, *meta, backend="torch")
    assert torch.equal(default, draft_attention(q, k, v, *meta, scale=64 ** -0.5, backend="torch"))
    assert not torch.allclose(default, draft_attention(q, k, v, *meta, scale=1.0, backend="torch"))


def _permuted(t):
    """t's values in reversed memory order (non-contiguous)."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def _heads_second(t):
    """[B, H, N, D] viewed from a [B, N, H, D] buffer, as transformers hands q, k and v over."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


LAYOUTS = {
    "contiguous": lambda q, k, v, *meta: (q, k, v, *meta),
    "hf": lambda q, k, v, *meta: (_heads_second(q), _heads_second(k), _heads_second(v), *meta),
    "permuted": lambda *args: tuple(_permuted(t) for t in args),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_opcheck(dtype, backend, layout):
    """Fake kernel == real output (q's dtype, q's shape, contiguous), schema, autograd and AOT dispatch."""
    q, k, v, *meta = LAYOUTS[layout](*make_inputs(2, 4, 2, 5, 12, 16, dtype, "rows", seed=1))
    args = (q, k, v, *meta, 0.25, backend)
    out = torch.ops.pjd.draft_attention(*args)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    torch.library.opcheck(torch.ops.pjd.draft_attention.default, args)


# ---------------------------------------------------------------- (b) bad inputs
def _good():
    return list(make_inputs(1, 4, 2, 3, 10, 64, torch.float16, "random", seed=0))


def _with(index, value, *more):
    """Good arguments with args[index] replaced by value (or value(args[index])); more index/value pairs."""
    args = _good()
    for i, val in zip((index, *more[::2]), (value, *more[1::2])):
        args[i] = val(args[i]) if callable(val) else val
    return args


@pytest.mark.parametrize("args,kwargs,error,needle", [
    (_with(0, lambda t: t[0]), {}, ValueError, "q must be 4-D"),
    (_with(1, lambda t: t[..., 0]), {}, ValueError, "k must be 4-D"),
    (_with(1, lambda t: t.float()), {}, TypeError, "k must have q's dtype"),
    (_with(2, lambda t: t.bfloat16()), {}, TypeError, "v must have q's dtype"),
    (_with(0, lambda t: t.double()), {}, TypeError, "q must be float16, bfloat16 or float32"),
    (_with(3, lambda t: t.long()), {}, TypeError, "q_pos must be int32"),
    (_with(6, lambda t: t.long()), {}, TypeError, "k_group must be int32"),
    (_with(5, lambda t: t[:, :-1]), {}, ValueError, "k_pos must have shape [1, 10]"),
    (_with(4, lambda t: t[None]), {}, ValueError, "q_group must have shape [1, 3]"),
    (_with(0, lambda t: t[:, :3]), {}, ValueError, "q has 3 heads, not a multiple of k/v's 2 heads"),
    (_with(2, lambda t: t[:, :, :-1]), {}, ValueError, "k and v must have the same shape"),
    (_with(1, lambda t: torch.cat([t, t]), 2, lambda t: torch.cat([t, t])), {}, ValueError, "k must be [B=1"),
    (_with(1, lambda t: t[..., :32], 2, lambda t: t[..., :32]), {}, ValueError, "k must be [B=1, Hkv, Nk, D=64]"),
    (_with(3, [[0, 1, 2]]), {}, TypeError, "q_pos must be a torch.Tensor"),
    (_good(), {"backend": "cuda"}, ValueError, "backend must be one of"),
])
def test_bad_inputs(args, kwargs, error, needle):
    with pytest.raises(error) as info:
        draft_attention(*args, **kwargs)
    assert needle in str(info.value)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' got tensors on cpu"):
        draft_attention(*_good(), backend="triton")


def test_triton_tiles_cover_every_head_dim_up_to_256():
    from pjd.kernels.draft_attention import block_d, tile_config

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in range(1, 257):
            assert tile_config(D, dtype).block_m > 0 and block_d(D) >= max(D, 16)
        with pytest.raises(ValueError, match="D=257"):
            tile_config(257, dtype)


def test_split_heuristic():
    from pjd.kernels.draft_attention import _num_splits

    # Lumina-mGPT decode with CFG: B=2, 32 kv heads, 64 rows, 2,400 keys, 132 SMs -> split.
    assert _num_splits(programs=64, rows_per_program=64, num_keys=2400, num_sms=132) == 4
    # Enough programs to fill the GPU, or too few keys to be worth a combine pass -> no split.
    assert _num_splits(programs=160, rows_per_program=64, num_keys=4096, num_sms=132) == 1
    assert _num_splits(programs=8, rows_per_program=64, num_keys=500, num_sms=132) == 1
    # Few programs and many keys: about two programs per SM.
    assert _num_splits(programs=8, rows_per_program=1, num_keys=100_000, num_sms=132) == 33


# ---------------------------------------------------------------- (c) Triton interpreter parity
# (B, Hq, Hkv, Nq, Nk, D, dtype, layout, num_splits); num_splits None = the wrapper's heuristic.
CASES = {
    "fp32": [
        (1, 1, 1, 1, 1, 64, "float32", "random", None),
        (2, 4, 2, 13, 100, 64, "float32", "rows", 1),
        (1, 8, 2, 70, 600, 64, "float32", "rows_unsorted", None),
        (1, 4, 1, 33, 257, 128, "float32", "random", 3),
    ],
    "fp16": [
        (2, 4, 4, 9, 600, 128, "float16", "rows_unsorted", None),
        (1, 2, 1, 64, 300, 64, "float16", "rows", 1),
        (2, 4, 1, 16, 513, 64, "float16", "random", 4),
        (2, 6, 3, 5, 77, 128, "float16", "rows", 2),
    ],
    "bf16": [
        (1, 4, 2, 24, 200, 64, "bfloat16", "rows_unsorted", 1),
        (2, 8, 2, 40, 450, 128, "bfloat16", "random", None),
        (2, 2, 2, 1, 64, 64, "bfloat16", "rows", 2),
        (1, 4, 4, 8, 130, 64, "bfloat16", "rows_unsorted", 3),
    ],
}
# Every head dim the kernel serves differently: padded (1, 7, 24, 48, 80, 100, 200) and powers of two
# (16, 32, 256), each with its dtype, GQA and split.
CASES["head_dims"] = [
    (2, 4, 2, 5, 90, 1, "float32", "rows", 1),
    (1, 2, 1, 7, 70, 7, "float16", "random", 2),
    (2, 2, 2, 9, 100, 16, "bfloat16", "rows_unsorted", None),
    (1, 4, 1, 6, 120, 24, "float32", "rows", 2),
    (2, 8, 2, 4, 200, 32, "float16", "rows", 1),
    (1, 4, 2, 3, 80, 48, "bfloat16", "random", 2),
    (2, 4, 4, 5, 150, 80, "float16", "rows_unsorted", 1),
    (1, 4, 1, 4, 90, 100, "bfloat16", "rows", 2),
    (1, 2, 2, 3, 70, 100, "float32", "random", 1),
    (1, 2, 1, 3, 60, 200, "float16", "rows", 2),
    (1, 2, 2, 2, 50, 256, "bfloat16", "rows", 1),
    (1, 2, 1, 2, 40, 256, "float32", "random", None),
]
# Interpreter: fp32 dots are exact up to summation order; fp16 and bf16 P are rounded (to nearest even)
# before P@V as on a GPU, so the output differs from the fp32 reference by about an ulp of the dtype:
# 2 ulps of tolerance.
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def _run_case(case, seed):
    from pjd.kernels.draft_attention import draft_attention_triton

    B, Hq, Hkv, Nq, Nk, D, dtype, layout, num_splits = case
    q, k, v, *meta = make_inputs(B, Hq, Hkv, Nq, Nk, D, getattr(torch, dtype), layout, seed)
    ref = draft_attention_reference(q, k, v, *meta, D ** -0.5)
    if num_splits is None:  # heuristic path, through the public op
        out = pjd.ops.draft_attention(q, k, v, *meta, backend="triton")
    else:
        out = draft_attention_triton(q, k, v, *meta, D ** -0.5, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    sees = visibility_mask(*meta).any(-1)
    assert (~sees).any() and (out.transpose(1, 2)[~sees] == 0).all(), "a query that sees nothing must get zeros"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def _p_rounding_case(dtype):
    """One query over 64 keys (one full tile), V = identity: output j is P_j / l, so it shows how P
    was rounded before P·V. Returns the fraction of outputs equal to the GPU's arithmetic (P rounded
    to the input dtype first) and to unrounded P."""
    from pjd.kernels.draft_attention import LOG2E, draft_attention_triton

    g = torch.Generator().manual_seed(7)
    D = Nk = 64
    q = torch.randn(1, 1, 1, D, generator=g).to(dtype)
    k = (torch.randn(1, 1, Nk, D, generator=g) * 0.3).to(dtype)
    v = torch.eye(Nk, D).to(dtype)[None, None]
    q_meta = torch.tensor([[Nk]], dtype=torch.int32)
    k_pos = torch.arange(Nk, dtype=torch.int32)[None]
    out = draft_attention_triton(q, k, v, q_meta, q_meta * 0 - 1, k_pos, k_pos * 0 - 1, D ** -0.5, num_splits=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * (D ** -0.5 * LOG2E)
    p = torch.exp2(s - s.max())
    gpu = (p.to(dtype).float() / p.sum()).to(dtype)
    plain = (p / p.sum()).to(dtype)
    return (out == gpu).float().mean().item(), (out == plain).float().mean().item()


def _interpreter_main(names):
    failures = []
    if "numerics" in names:
        for dtype in (torch.bfloat16, torch.float16):
            gpu, plain = _p_rounding_case(dtype)
            if not (gpu >= 0.95 and plain <= 0.9):
                failures.append(f"{dtype}: {gpu:.3f} of outputs equal GPU arithmetic, {plain:.3f} unrounded P")
        names = [n for n in names if n != "numerics"]
    for name in names:
        for i, case in enumerate(CASES[name]):
            try:
                _run_case(case, seed=1000 + i)
            except Exception as exc:  # report every failing case, not just the first
                failures.append(f"{case}: {type(exc).__name__}: {exc}")
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


@pytest.mark.slow
@pytest.mark.parametrize("names", [["fp32"], ["fp16"], ["bf16", "numerics"], ["head_dims"]])
def test_triton_interpreter_matches_reference(names):
    """Interpreter vs reference; "numerics": P is rounded to the input dtype before P·V, and bf16 is
    rounded to nearest even, exactly as the compiled kernel does (not as the interpreter would)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, *names], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"interpreter subprocess printed nothing (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    failures = json.loads(lines[-1])["failures"]
    assert not failures, "\n".join(failures)
    assert proc.returncode == 0, proc.stderr[-4000:]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the test (sets TRITON_INTERPRET=1)"
    torch.set_num_threads(1)
    sys.exit(_interpreter_main(sys.argv[1:]))
