"""On a CUDA GPU: every Triton kernel compiled for this GPU against its torch reference, on the
interpreter suites' shapes, plus end-to-end token parity and the CUDA compaction op under graph replay.

Skipped without CUDA (the interpreter suites and the dry-run gate cover the kernels there).
scripts/gpu_check.sh runs this file as its parity stage. Outputs the kernels allocate are
pre-poisoned (NaN, or -7 for integers) so an element a kernel fails to write cannot pass as a
stale zero. At the end the registers and spills of every variant compiled in this process are
written to $PJD_GPU_REPORT (JSON, one file per pytest-xdist worker) when set, and checked: no
variant may spill.
"""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

import pjd
from pjd.ops import compact_kv, compact_kv_reference, draft_attention_reference, speculative_verify
from pjd.ops import speculative_verify_reference, visibility_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / empty_like inside the block return tensors filled with NaN (floats) or -7."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


# ---------------------------------------------------------------- draft_attention
def _attention_cases():
    from test_draft_attention import CASES

    return [case for group in ("fp32", "fp16", "bf16", "head_dims") for case in CASES[group]]


@pytest.mark.parametrize("case", _attention_cases(), ids=str)
def test_draft_attention_matches_reference(case):
    from test_draft_attention import make_inputs

    from pjd.kernels.draft_attention import draft_attention_triton

    B, Hq, Hkv, Nq, Nk, D, dtype, layout, num_splits = case
    q, k, v, *meta = _to(make_inputs(B, Hq, Hkv, Nq, Nk, D, getattr(torch, dtype), layout, seed=1), CUDA)
    ref = draft_attention_reference(q, k, v, *meta, D ** -0.5)
    with poisoned_allocations():
        if num_splits is None:
            out = pjd.ops.draft_attention(q, k, v, *meta, backend="triton")
        else:
            out = draft_attention_triton(q, k, v, *meta, D ** -0.5, num_splits=num_splits)
    sees = visibility_mask(*meta).any(-1)
    assert not out.isnan().any(), "an output element was never written"
    assert (out.transpose(1, 2)[~sees] == 0).all(), "a query that sees nothing must get zeros"
    # fp32: no TF32 (ieee dots); fp16 / bf16: P rounded to the dtype before P @ V
    tol = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("D", [32, 80, 100, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_draft_attention_long_cache_split_and_gqa(D, dtype):
    """A decode-like step on a long cache: the split-KV heuristic fires (few rows), GQA 4, and a fully
    masked row; the output equals the reference and a second call is bit-identical."""
    from test_draft_attention import make_inputs

    q, k, v, *meta = _to(make_inputs(2, 8, 2, 16, 3000, D, dtype, "rows", seed=2), CUDA)
    with poisoned_allocations():
        out = pjd.ops.draft_attention(q, k, v, *meta, backend="triton")
    ref = draft_attention_reference(q, k, v, *meta, D ** -0.5)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.equal(out, pjd.ops.draft_attention(q, k, v, *meta, backend="triton")), "not deterministic"


# ---------------------------------------------------------------- speculative_verify
def _verify_cases():
    from test_speculative_verify import CASES

    return [(name, i) for name in CASES for i in range(len(CASES[name]))]  # every group the interpreter runs


@pytest.mark.parametrize("group,index", _verify_cases())
def test_speculative_verify_matches_reference(group, index):
    from test_speculative_verify import _parity_cases, compare, public_kwargs

    from pjd.kernels.speculative_verify import speculative_verify_triton

    kwargs, args, tiles = _parity_cases(group)[index]
    args = _to(args, CUDA)
    ref = speculative_verify_reference(*args)
    with poisoned_allocations():
        if tiles is None:
            out = speculative_verify(*args[:11], **public_kwargs(args), backend="triton")
        else:
            out = speculative_verify_triton(*args, tiles=tiles)
    assert not out[4].isnan().any(), "next_q has elements no kernel wrote"
    assert not compare(ref, out), f"{kwargs}: {compare(ref, out)}"


@pytest.mark.parametrize("vocab,lanes", [(8192, 8), (16384, 4), (65536, 2)])
def test_speculative_verify_agrees_over_many_draws(vocab, lanes):
    """Committed tokens and next drafts of the kernels vs the reference over 64 independent draws
    (top-k 2000, CFG, window 7). Last-bit differences of exp can flip a draw whose uniform lands
    within ~1e-7 of a boundary: at most 1 % of the tokens may differ, and the count is printed."""
    from test_speculative_verify import make_case, public_kwargs

    agree = total = 0
    for seed in range(64):
        args = _to(make_case(seed, 1, lanes, 7, vocab, cfg=True, top_k=2000, scale=3.0), CUDA)
        ref = speculative_verify_reference(*args)
        out = speculative_verify(*args[:11], **public_kwargs(args), backend="triton", validate=False)
        committed = torch.arange(8, device=CUDA) < ref.num_commit[..., None]
        same = (out.commit_tokens == ref.commit_tokens) | ~committed
        agree += int(same.all(-1).sum()) + int((out.next_tokens == ref.next_tokens).all(-1).sum())
        total += 2 * lanes
    print(f"V={vocab} lanes={lanes}: {agree}/{total} lane results identical")
    assert agree >= 0.99 * total


# ---------------------------------------------------------------- generate end to end
@pytest.mark.parametrize("method", ["ar", "sjd", "sjd++", "pjd", "zipar"])
def test_generate_triton_equals_torch(method):
    from pjd.models import tiny_llama

    model = tiny_llama(40, hidden_size=128, layers=2, heads=2, kv_heads=1, logit_scale=3.0, seed=3).to(CUDA)
    ids = torch.randint(32, 38, (2, 3), generator=torch.Generator().manual_seed(0)).to(CUDA)
    kw = dict(height=4, width=6, method=method, image_token_range=(0, 32), cfg_scale=3.0,
              uncond_input_ids=torch.full_like(ids[:, :1], 39), top_k=12, seed=5)
    with torch.no_grad():
        torch_ = pjd.generate(model, ids, backend="torch", **kw)
        triton_ = pjd.generate(model, ids, backend="triton", **kw)
    assert torch.equal(torch_.tokens.cpu(), triton_.tokens.cpu()) and torch_.steps == triton_.steps


# ---------------------------------------------------------------- compact_kv on CUDA
def test_compact_kv_cuda_and_graph_replay():
    """The native CUDA op (where built) equals the reference, and replays from a CUDA graph with new
    keep masks copied into the captured tensors."""
    if pjd.ops.compact_kv_backend(CUDA) != "cuda":
        pytest.skip(f"the CUDA extension is not built here (compact_kv runs {pjd.ops.compact_kv_backend(CUDA)})")
    g = torch.Generator(device=CUDA).manual_seed(0)
    B, H, S, D, T, tail = 3, 4, 64, 32, 12, 40
    caches = [torch.randn(B, H, S, D, device=CUDA, generator=g, dtype=torch.bfloat16) for _ in range(4)]
    meta = [torch.randint(0, 100, (B, S), device=CUDA, generator=g, dtype=torch.int32)]
    keep = torch.rand(B, T, device=CUDA, generator=g) < 0.5
    dst = torch.tensor([tail, tail - 5, tail - 12], device=CUDA, dtype=torch.int32)

    def expected():
        ref_caches, ref_meta = [c.clone() for c in caches], [m.clone() for m in meta]
        return compact_kv_reference(ref_caches, keep, tail, dst, ref_meta), ref_caches, ref_meta

    lengths_ref, caches_ref, meta_ref = expected()
    lengths = compact_kv(caches, keep, tail, dst, meta=meta, backend="native")
    assert torch.equal(lengths, lengths_ref)
    assert all(torch.equal(a, b) for a, b in zip(caches + meta, caches_ref + meta_ref))

    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compact_kv(caches, keep, tail, dst, meta=meta, backend="native")
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = compact_kv(caches, keep, tail, dst, meta=meta, backend="native")
    for seed in range(3):
        keep.copy_(torch.rand(B, T, device=CUDA, generator=g.manual_seed(seed + 1)) < 0.5)
        lengths_ref, caches_ref, meta_ref = expected()
        out.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, lengths_ref)
        assert all(torch.equal(a, b) for a, b in zip(caches + meta, caches_ref + meta_ref))


# ---------------------------------------------------------------- what was compiled here (runs last)
def compiled_variants() -> list[dict]:
    """Registers and spills of every kernel variant compiled (and loaded) in this process."""
    import pjd.kernels.draft_attention as attention
    import pjd.kernels.speculative_verify as verify

    rows = []
    for module in (attention, verify):
        for name, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            for entry in caches.values():
                for kernel in entry[0].values():
                    rows.append(dict(kernel=name, regs=getattr(kernel, "n_regs", None),
                                     spills=getattr(kernel, "n_spills", None),
                                     smem=getattr(kernel.metadata, "shared", None),
                                     num_warps=getattr(kernel.metadata, "num_warps", None)))
    return rows


@pytest.fixture(scope="session", autouse=True)
def _report_compiled_variants():
    """At the end of the session: every variant this process compiled into $PJD_GPU_REPORT (one file
    per pytest-xdist worker: <name>.<worker>.json), for scripts/gpu_check.sh's summary."""
    yield
    base = os.environ.get("PJD_GPU_REPORT")
    if base:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(f"{base.removesuffix('.json')}.{worker}.json", "w") as f:
            json.dump(compiled_variants(), f, indent=1)


def test_zz_compiled_variants_do_not_spill():
    """Runs last in its process (file order): the variants this process compiled (all of them without
    pytest-xdist; the summary of scripts/gpu_check.sh adds up every worker's)."""
    rows = compiled_variants()
    assert rows, "no kernel variant was compiled in this process"
    spilling = [r for r in rows if r["spills"]]
    assert not spilling, f"variants that spill on this GPU: {spilling}"
