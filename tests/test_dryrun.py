"""The GPU-less gate: every Triton launch pjd makes, through Triton's real JIT path for sm_80 / sm_90.

benchmarks/kernel_report.py's matrix (pjd.generate over methods / batch / CFG / EOL / window / cache,
models of every head dim, dtype and GQA group, the ops on long caches and large vocabularies, the
benchmarks' own inputs, and `pjd demo`'s full-size configuration) runs inside
pjd.kernels.dryrun.dry_run(arch): each launch is bound, specialised on its real arguments and
compiled for that GPU, never launched. Every variant must compile with no spills, <= 255 registers
and shared memory within the per-block limit; every grid must fit CUDA's limits. Outputs come from
the references, so correctness stays with the interpreter tests.

In-process: the pytest process never sets TRITON_INTERPRET (the interpreter tests use subprocesses).
The session's one Triton cache (conftest.py) starts empty: each variant is compiled once per session,
for real, and the cases that launch it again (another group, another worker) load it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_report  # noqa: E402

from pjd.kernels.dryrun import ARCHS, dry_run  # noqa: E402

KERNELS = {"_draft_attention_fwd", "_draft_attention_combine", "_target_probs_kernel", "_accept_kernel",
           "_next_drafts_kernel"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("group", list(kernel_report.GROUPS))
def test_matrix_compiles_without_spills(group, arch):
    run = kernel_report.compile_group(group, arch)
    run.check()
    assert run.count() > 0
    compiled = {v.kernel for v in run.variants.values()}
    if group == "ops":
        assert compiled == KERNELS
    if group == "generate":  # short caches: no split-KV, so no combine
        assert compiled == KERNELS - {"_draft_attention_combine"}


def test_a_spilling_variant_fails_the_gate():
    """The gate reads registers and local memory from the cubin Triton built: a variant capped at 64
    registers that needs about 190 (two chained 64 x 64 dots) must be reported with its spill, one
    without the cap must pass."""
    import triton
    import triton.language as tl

    @triton.jit
    def _two_dots(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tile = offs[:, None] * N + offs[None, :]
        a = tl.load(x_ptr + tile)
        b = tl.dot(a, a)
        tl.store(y_ptr + tile, tl.dot(b, a) + b)

    x = torch.randn(64, 64)
    with dry_run(80) as run:
        _two_dots[(1,)](x, x, N=64)
    run.check()
    (free,) = run.variants.values()
    assert 64 < free.regs <= 255 and free.spill_bytes == 0
    with dry_run(80) as run:
        _two_dots[(1,)](x, x, N=64, maxnreg=64)
    (capped,) = run.variants.values()
    assert capped.regs == 64 and capped.spill_bytes > 0
    with pytest.raises(AssertionError, match=r"sm_80: _two_dots .*spills: \d+ bytes of local memory"):
        run.check()


def test_batch_one_and_window_one_specialise_and_compile():
    """On a GPU the JIT turns ints equal to 1 into constexprs; B = 1 and W = 1 must still compile."""
    model = kernel_report._model()
    with torch.no_grad(), dry_run(90) as run:
        kernel_report._generate(model, method="sjd", batch=1, window=1)
    run.check()
    specialised = {name for v in run.variants.values() for name, value in v.constexprs.items() if value == 1}
    assert "window" in specialised  # the case that used to fail to compile


def test_a_second_decode_compiles_nothing_new():
    """Sizes that change every step (queries, keys, inputs) are not specialised: after one decode,
    another with other draws -- other acceptance, so other sizes at every step -- reuses every variant."""
    model = kernel_report._model()
    with torch.no_grad(), dry_run(90) as run:
        kernel_report._generate(model, method="pjd", batch=2, seed=0)
        first = run.count()
        for seed in (1, 2, 3):
            kernel_report._generate(model, method="pjd", batch=2, seed=seed)
        kernel_report._generate(model, method="pjd", batch=2, seed=4, cache="append")
    assert run.count() == first, [v.constexprs for v in run.variants.values()]


def test_fixed_shape_step_compiles_nothing_after_its_first_step(monkeypatch):
    """The fixed-shape step (CUDA's default, what a CUDA graph captures): every variant is compiled by
    the end of the first decoding step, later steps compile nothing (no size specialised on a value
    that moves), the Triton wrappers read nothing back in the loop (a read would break a capture),
    and compile=True refuses a dry run (nothing there can be captured)."""
    from test_fixed_step import HostReads

    import pjd
    from pjd import engine

    model = kernel_report._model()
    counts, reads = [], HostReads()
    step, run_fixed = engine._Decoder.step, engine._Decoder.run_fixed

    def spy(self, timed=True):
        fed = step(self, timed)
        counts[-1].append(run.count())
        return fed

    def counted(self, step, bar):
        with reads:
            run_fixed(self, step, bar)

    monkeypatch.setattr(engine._Decoder, "step", spy)
    monkeypatch.setattr(engine._Decoder, "run_fixed", counted)
    with torch.no_grad(), dry_run(90) as run:
        for method, cache in (("pjd", "slot"), ("pjd", "append"), ("ar", "slot")):
            counts.append([])
            kernel_report._generate(model, method=method, batch=2, cache=cache, fixed_shapes=True)
            assert len(counts[-1]) > 3 and len(set(counts[-1])) == 1, (method, cache, counts[-1])
        assert not reads.ops, reads.ops
        with pytest.raises(ValueError, match="compile=True cannot run here: .*dry run"):
            pjd.generate(model, torch.ones(1, 1, dtype=torch.long), height=2, width=2, backend="triton",
                         compile=True)
    run.check()


def test_dry_run_returns_reference_outputs():
    """The wrappers give their references' outputs inside a dry run: triton == torch tokens."""
    import pjd

    model = kernel_report._model()
    with torch.no_grad(), dry_run(80):
        out = kernel_report._generate(model, method="pjd", batch=2, eol=True, seed=5)
    ids = torch.arange(1, 3)[:, None]
    ref = pjd.generate(model, ids, height=kernel_report.HEIGHT, width=kernel_report.WIDTH, method="pjd",
                       image_token_range=(kernel_report.LO, kernel_report.HI), eol_token_id=kernel_report.EOL,
                       cfg_scale=3.0, uncond_input_ids=torch.full((2, 1), kernel_report.HI + 1), top_k=50,
                       backend="torch", seed=5)
    assert torch.equal(out.tokens, ref.tokens) and out.steps == ref.steps


def test_grid_limits_are_checked():
    from pjd.kernels.dryrun import _check_grid

    _check_grid("k", (2**31 - 1, 65_535, 1))
    with pytest.raises(ValueError, match="grid axis 1 = 70000"):
        _check_grid("k", (1, 70_000))


def test_dry_run_restores_everything():
    import pjd.kernels.draft_attention as kernel
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from pjd.ops import _backend

    before = (kernel.draft_attention_triton, JITFunction.run, driver._active)
    with pytest.raises(RuntimeError, match="boom"), dry_run(90):
        raise RuntimeError("boom")
    assert (kernel.draft_attention_triton, JITFunction.run, driver._active) == before
    assert _backend.DRY_RUN_ARCH is None
    with pytest.raises(ValueError, match="backend='triton' got tensors on cpu"):
        _backend.resolve_backend("triton", torch.device("cpu"))


def test_shapes_the_kernels_cannot_serve_fall_back_under_auto_and_raise_under_triton(monkeypatch):
    import warnings

    from pjd.ops import _backend, draft_attention

    q = torch.randn(1, 2, 3, 300)
    meta = torch.zeros(1, 3, dtype=torch.int32)
    with torch.no_grad(), dry_run(90):
        with pytest.raises(ValueError, match="head dims D in \\[1, 256\\], got D=300"):
            draft_attention(q, q, q, meta, meta, meta, meta - 1, backend="triton")
        with pytest.raises(ValueError, match="D=300"):  # the engine asks before any decoding work
            kernel_report._generate(kernel_report._model(head_dim=300), method="ar")
    monkeypatch.setattr(_backend, "_warned", set())
    reason = "draft_attention's triton kernel supports head dims D in [1, 256], got D=300"
    with pytest.warns(RuntimeWarning, match="runs the sdpa path instead of the Triton kernels: .*D=300"):
        assert _backend.resolve_backend("auto", torch.device("cuda"), lambda: reason) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        assert _backend.resolve_backend("auto", torch.device("cuda"), lambda: reason) == "sdpa"
    assert _backend.resolve_backend("auto", torch.device("cuda"), lambda: None) == "triton"
