"""Compile report: every Triton kernel variant pjd launches, compiled for sm_80 and sm_90 without a GPU.

    python benchmarks/kernel_report.py                       # table: every variant, both archs
    python benchmarks/kernel_report.py --json                # JSON list of variants
    python benchmarks/kernel_report.py --groups ops --archs 90

Drives the public API (``pjd.generate``, ``pjd.ops``, the benchmarks' own inputs, ``pjd demo``'s
full-size configuration) over the matrix below inside ``pjd.kernels.dryrun.dry_run(arch)``: each
launch goes through Triton's real JIT path (bind, specialise on the actual arguments, compile for
that GPU) and is not launched; the wrappers return their references' outputs so decoding runs on
real values. Registers and local memory (spills) come from each cubin, shared memory from the compiled metadata.
Fails (exit 1) on any spill, more than 255 registers, shared memory over the per-block limit, or a
grid over CUDA's limits. Run without TRITON_INTERPRET. tests/test_dryrun.py runs the same matrix.

Matrix (every value that can be 1 is among them): methods ar / sjd / sjd++ / pjd / zipar, and sjd / pjd
with coupled draws, continuation and both (the verification kernel's constexpr variants); batch
1, 2, 3; CFG on / off; EOL on / off; window 1 and the default; slot and append caches; head dims
8, 16, 24, 32, 48, 64, 80, 96, 100, 128, 200, 256; fp16 / bf16 / fp32; GQA groups 1, 2, 4; split and unsplit
attention; image vocabularies 300, 8,192, 16,384, 65,536 and 65,537.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEAD_DIMS = (8, 16, 24, 32, 48, 64, 80, 96, 100, 128, 200, 256)  # a power of two and a ragged dim per tile size
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
METHODS = ("ar", "sjd", "sjd++", "pjd", "zipar")
# (batch, cfg, eol, window 1?, cache): four settings per method, together covering each value.
SETTINGS = ((1, True, False, True, "slot"), (2, False, True, False, "append"),
            (3, True, True, False, "slot"), (1, False, False, False, "append"))
EOL = 3
LO, HI = 4, 260  # image tokens of the tiny models
HEIGHT, WIDTH = 3, 4


def _model(head_dim=32, heads=2, kv_heads=1, dtype=torch.float32, layers=1):
    from pjd.models.tiny import tiny_llama

    return tiny_llama(HI + 4, hidden_size=heads * head_dim, layers=layers, heads=heads, kv_heads=kv_heads,
                      logit_scale=4.0, dtype=dtype)


def _generate(model, *, method="pjd", batch=1, cfg=True, eol=False, window=None, cache="slot", seed=0,
              fixed_shapes=None, **options):
    import pjd

    ids = torch.arange(1, batch + 1)[:, None]
    uncond = torch.full((batch, 1), HI + 1) if cfg else None
    return pjd.generate(model, ids, height=HEIGHT, width=WIDTH, method=method, window=window, cache=cache,
                        image_token_range=(LO, HI), eol_token_id=EOL if eol else None, cfg_scale=3.0 if cfg else 1.0,
                        uncond_input_ids=uncond, top_k=50, backend="triton", seed=seed, fixed_shapes=fixed_shapes,
                        **options)


def group_generate():
    """Every method under four settings (batch, CFG, EOL, window 1, cache), then the fixed-shape step
    (what CUDA runs by default and captures in a graph: whole-cache attention, padded inputs)."""
    model = _model()
    for method in METHODS:
        for batch, cfg, eol, window_one, cache in SETTINGS:
            window = 1 if window_one and method not in ("ar", "zipar") else None
            _generate(model, method=method, batch=batch, cfg=cfg, eol=eol, window=window, cache=cache)
    for method, cache in (("ar", "slot"), ("pjd", "slot"), ("pjd", "append"), ("sjd", "slot")):
        _generate(model, method=method, batch=2, cache=cache, fixed_shapes=True)
    # Coupled draws / continuation (issue 22): each kernel variant under two of the settings.
    variants = (dict(coupled_draws=True), dict(continuation=True), dict(coupled_draws=True, continuation=True))
    for i, options in enumerate(variants):
        for method in ("sjd", "pjd"):
            for batch, cfg, eol, window_one, cache in SETTINGS[i % 2::2]:
                window = 1 if window_one else None
                _generate(model, method=method, batch=batch, cfg=cfg, eol=eol, window=window, cache=cache, **options)


def group_models():
    """pjd.generate on models of every head dim, dtype and GQA group."""
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            _generate(_model(head_dim, dtype=dtype))
        for heads, kv_heads in ((2, 2), (4, 1)):
            _generate(_model(32, heads, kv_heads, dtype=dtype), batch=2)


def group_ops():
    """The ops on shapes decoding rarely reaches: long caches (split-KV), strided metadata views,
    many (batch x kv head) programs, large vocabularies (pjd.ops directly)."""
    from attention import Case, make_inputs as attention_inputs, MODELS
    from verify import LANES, VOCABS, make_inputs as verify_inputs, run_op

    from pjd.ops import draft_attention

    for model in MODELS:  # the attention benchmark's own inputs
        for case in (Case(model, 0.5, 1, heads=4), Case(model, 0.9, 8, heads=4)):
            for dtype in DTYPES:
                draft_attention(**attention_inputs(case, "cpu", dtype), backend="triton")
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:  # one query over 1,500 keys: split-KV, and its combine
            q = torch.randn(1, 4, 1, head_dim, dtype=dtype)
            k = torch.randn(1, 2, 1500, head_dim, dtype=dtype)
            meta = torch.zeros(1, 2048, dtype=torch.int32)  # strided views of a larger buffer
            pos = torch.arange(1500, dtype=torch.int32)[None]
            draft_attention(q, k, k, meta[:, :1] + 1500, meta[:, :1], pos, meta[:, :1500] - 1, backend="triton")
    # 70,000 (batch, kv head) programs: more than CUDA's 65,535 on grid axes 1 and 2.
    q = torch.randn(35_000, 2, 1, 16)
    meta = torch.zeros(35_000, 1, dtype=torch.int32)
    draft_attention(q, q, q, meta, meta, meta, meta - 1, backend="triton")  # every key committed
    for vocab in (300, *VOCABS, 65_537):  # the verification benchmark's own inputs (B = 1)
        for lanes in (LANES[0], LANES[-1]):
            for dtype in DTYPES:
                run_op(verify_inputs(vocab, lanes, "cpu", dtype), "triton")
    from verify import CFG_SCALE, SAMPLING

    from pjd.ops import speculative_verify

    for vocab in (300, 65_537):  # coupled draws / continuation (issue 22) on a ragged and a large vocabulary
        x = verify_inputs(vocab, LANES[-1], "cpu", torch.bfloat16)
        noise = torch.ones(*x["u_sample"].shape, vocab)
        for continuation, coupled in ((True, None), (False, noise), (True, noise)):
            speculative_verify(*x.values(), image_token_range=(0, vocab), cfg_scale=CFG_SCALE, reuse_threshold=None,
                               continuation=continuation, coupled_noise=coupled, backend="triton", **SAMPLING)


def group_demo():
    """`pjd demo`'s full-size configuration (embedded default model, batch 10, CFG 3, ar / sjd / pjd)."""
    from pjd.demo import run_demo

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):  # keep the report clean
        run_demo(backend="triton", out=out, progress=False, hf=False)


GROUPS = {"generate": group_generate, "models": group_models, "ops": group_ops, "demo": group_demo}


def compile_group(name: str, arch: int):
    """Run one matrix group under a dry run for sm_<arch>; returns the DryRun record."""
    from pjd.kernels.dryrun import dry_run

    with torch.no_grad(), dry_run(arch) as run:
        GROUPS[name]()
    return run


def main(argv=None) -> int:
    from pjd.kernels.dryrun import ARCHS, SMEM_LIMIT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--summary", action="store_true", help="one row per (kernel, arch) instead of per variant")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {list(GROUPS)}")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, problems = [], []
    for arch in (int(a) for a in args.archs.split(",")):
        for name in args.groups.split(","):
            if name not in GROUPS:
                parser.error(f"argument --groups: unknown group {name!r} (choose from {list(GROUPS)})")
            run = compile_group(name, arch)
            for v in run.variants.values():
                rows.append(dict(group=name, **v.row()))
                problems += [f"sm_{arch} {v.kernel}: {p}" for p in v.problems()]
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.summary:
        print("| kernel | arch | variants | launches | max regs | spill B | max smem B (limit) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for kernel, arch in sorted({(r["kernel"], r["arch"]) for r in rows}):
            mine = [r for r in rows if (r["kernel"], r["arch"]) == (kernel, arch)]
            print(f"| {kernel} | {arch} | {len(mine)} | {sum(r['launches'] for r in mine)} "
                  f"| {max(r['regs'] for r in mine)} | {sum(r['spill_bytes'] for r in mine)} "
                  f"| {max(r['smem_bytes'] for r in mine)} ({SMEM_LIMIT[int(arch[3:])]}) |")
    else:
        print("| group | kernel | arch | data | specialised | warps | stages | regs | spill B | smem B (limit) | launches |")
        print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            spec = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
            limit = SMEM_LIMIT[int(r["arch"][3:])]
            print(f"| {r['group']} | {r['kernel']} | {r['arch']} | {r['data']} | {spec} | {r['num_warps']} | {r['num_stages']} "
                  f"| {r['regs']} | {r['spill_bytes']} | {r['smem_bytes']} ({limit}) | {r['launches']} |")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
