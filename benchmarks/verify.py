"""Speculative verification of one pjd step: the fused op against the torch reference pipeline.

Variants, all on the same inputs (one image with CFG: cond + uncond logits rows; every lane active
with window 7, so 8 fed inputs per lane; image tokens = the whole vocabulary; top-k 2000 and
temperature 1 as Lumina-mGPT samples):
  triton     pjd.ops.speculative_verify(backend="triton"): the three fused kernels
             (kernels/speculative_verify.py). CUDA only.
  torch      pjd.ops.speculative_verify(backend="torch"): the pure-torch reference
             (CFG, top-k via torch.topk, softmax, gathers, torch.searchsorted sampling).
  flashinfer torch target_probs (CFG, top-k, softmax) + flashinfer.sampling.chain_speculative_sampling
             (acceptance + residual/bonus of a draft chain, one chain per lane; no next-draft
             refill, no EOL rule): the nearest library kernel. "not installed" without flashinfer.
Before timing on CUDA, the Triton result is compared with the torch one (same tokens, close q):
the script stops if they disagree.

Every variant is timed after one untimed warm-up call on the same inputs (pjd.timing.time_ms), so
Triton compilation is never timed. On CUDA: triton.testing.do_bench (median). On CPU (no GPU): only
the torch reference, 1 thread, median of a few repeats; the Triton and FlashInfer columns read "not
measured on this device".

Usage: python benchmarks/verify.py [--out bench_out/verify] [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from pjd.ops import TOP, PREFIX, speculative_verify
from pjd.sampling import target_probs
from pjd.timing import graph_ms, time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import device_name  # noqa: E402

VOCABS = (8192, 16384, 65536)
LANES = (1, 2, 4, 8)
WINDOW = 7
CFG_SCALE = 3.0
SAMPLING = dict(top_k=2000, top_p=1.0, temperature=1.0)
VARIANTS = ("triton", "torch", "flashinfer")


def make_inputs(vocab: int, lanes: int, device, dtype, seed: int = 0) -> dict:
    """One step: lane l feeds inputs [8l, 8l + 8) (last committed token + 7 drafts), all active.

    Drafts: half are samples of a perturbed copy of their target (q = that softmax, as a fresh
    Jacobi draft), half uniform tokens with one-hot q (initialised slots).
    """
    g = torch.Generator().manual_seed(seed)
    B, L, W, n = 1, lanes, WINDOW, lanes * (WINDOW + 1)
    logits = torch.randn(2 * B, n, vocab, generator=g) * 4
    p = target_probs(logits, num_images=B, cfg_scale=CFG_SCALE, image_token_range=(0, vocab), **SAMPLING)
    rows = (torch.arange(L)[:, None] * (W + 1) + torch.arange(W))  # draft i of lane l checks input 8l + i
    q = torch.softmax(torch.log(p[0, rows].clamp_min(1e-30)) + torch.randn(L, W, vocab, generator=g), -1)
    tokens = torch.multinomial(q.view(-1, vocab), 1, generator=g).view(L, W)
    init = torch.rand(L, W, generator=g) < 0.5
    tokens = torch.where(init, torch.randint(0, vocab, (L, W), generator=g), tokens)
    q = torch.where(init[..., None], torch.nn.functional.one_hot(tokens, vocab).float(), q)
    lane = lambda values: torch.tensor([values], dtype=torch.int32)  # noqa: E731
    x = dict(
        logits=logits.to(dtype), lane_start=lane([l * (W + 1) for l in range(L)]), lane_drafts=lane([W] * L),
        lane_rule=lane([TOP] + [PREFIX] * (L - 1)), lane_slot=lane([l * 48 for l in range(L)]),
        lane_room=lane([48] * L), draft_tokens=tokens[None], draft_q=q[None],
        u_accept=torch.rand(B, L, W, generator=g), u_sample=torch.rand(B, L, W + 1, generator=g),
        init_tokens=torch.randint(0, vocab, (B, L, W), generator=g),
    )
    return {k: v.to(device) for k, v in x.items()}


def run_op(x: dict, backend: str):
    return speculative_verify(*x.values(), image_token_range=(0, x["draft_q"].shape[-1]), cfg_scale=CFG_SCALE,
                              reuse_threshold=0.5, backend=backend, validate=False, **SAMPLING)  # as the engine


def flashinfer_variant(x: dict):
    """(callable, note): torch target probs + FlashInfer chain speculative sampling, or why not."""
    try:
        from flashinfer.sampling import chain_speculative_sampling
    except ImportError:
        return None, "not installed"
    if x["logits"].device.type != "cuda":
        return None, "n/a (CUDA only)"
    L, W, vocab = x["draft_q"].shape[1:]

    def run(x):
        p = target_probs(x["logits"], num_images=1, cfg_scale=CFG_SCALE, image_token_range=(0, vocab), **SAMPLING)
        rows = (x["lane_start"][0].long()[:, None] + torch.arange(W + 1, device=p.device))
        return chain_speculative_sampling(x["draft_q"][0], x["draft_tokens"][0].int(), p[0, rows])

    return run, ""


# The numerics contract (docs/kernels.md): tokens may differ from the reference's only where a uniform
# lands within ~1e-7 relative of a CDF boundary, so agreement is checked over many draws, not bitwise.
AGREEMENT = 0.999
DRAWS = 256


def check(x: dict, draws: int = DRAWS) -> None:
    """The Triton op against the reference on the same inputs and ``draws`` fresh sets of uniforms;
    raises unless at least AGREEMENT of the (draw, lane) outcomes -- accepted count, committed tokens,
    next drafts -- agree, and next_q agrees wherever the outcome does."""
    g = torch.Generator().manual_seed(1)
    device = x["logits"].device
    agree = total = 0
    for _ in range(draws):
        y = {**x, **{k: torch.rand(x[k].shape, generator=g).to(device) for k in ("u_accept", "u_sample")}}
        ref, out = run_op(y, "torch"), run_op(y, "triton")
        committed = torch.arange(WINDOW + 1, device=device) < ref.num_commit[..., None]
        same = ((ref.num_accepted == out.num_accepted) & (ref.num_commit == out.num_commit)
                & ((ref.commit_tokens == out.commit_tokens) | ~committed).all(-1)
                & (ref.next_tokens == out.next_tokens).all(-1))
        if not torch.allclose(ref.next_q[same], out.next_q[same], rtol=1e-4, atol=1e-6):
            raise RuntimeError("triton's next_q disagrees with the torch reference; refusing to time it")
        agree, total = agree + int(same.sum()), total + same.numel()
    if agree < AGREEMENT * total:
        raise RuntimeError(f"triton agrees with the torch reference on {agree} of {total} lane outcomes "
                           f"(< {AGREEMENT:.1%}); refusing to time it")


def bytes_moved(vocab: int, lanes: int, logit_bytes: int) -> dict:
    """Minimum bytes of one fused call (docs/kernels.md): logits read once, draft_q read, next_q
    written, plus the fp32 scratch p written once and read back (about twice: search + copy)."""
    rows, slots = lanes * (WINDOW + 1), lanes * WINDOW
    logits = 2 * rows * vocab * logit_bytes  # CFG: cond + uncond
    q_io = 2 * slots * vocab * 4
    scratch = 3 * rows * vocab * 4
    return {"logits": logits, "q_io": q_io, "scratch": scratch, "total": logits + q_io + scratch}


def run_case(vocab: int, lanes: int, device, dtype, repeats: int) -> dict:
    x = make_inputs(vocab, lanes, device, dtype)
    row = {"vocab": vocab, "lanes": lanes, "window": WINDOW, "cfg": True, "dtype": str(dtype),
           "bytes": bytes_moved(vocab, lanes, x["logits"].element_size())["total"]}
    fns, notes = {"torch": lambda: run_op(x, "torch")}, {}
    if device.type == "cuda":
        check(x)
        fns["triton"] = lambda: run_op(x, "triton")
    else:
        notes["triton"] = "not measured on this device"
    fi, why = flashinfer_variant(x)
    if fi is None:
        notes["flashinfer"] = why
    else:
        fns["flashinfer"] = lambda: fi(x)
    for name in VARIANTS:
        if name in notes:
            row[f"{name}_ms"], row[f"{name}_note"] = float("nan"), notes[name]
        else:
            row[f"{name}_ms"], _ = time_ms(fns[name], device, repeats)
            if device.type == "cuda":  # kernel-only: graph-replayed, no L2 flush and no launch overhead
                row[f"{name}_graph_ms"], row[f"{name}_graph_note"] = graph_ms(fns[name], device)
    return row


def format_row(r: dict) -> str:
    def graph(n):
        ms = r.get(f"{n}_graph_ms")
        return f" (graph {ms:.3f} ms)" if ms is not None else ""

    cells = [f"{n} {r[f'{n}_ms']:.3f} ms{graph(n)}" if r[f"{n}_ms"] == r[f"{n}_ms"] else f"{n} {r[f'{n}_note']}"
             for n in VARIANTS]
    return f"V {r['vocab']:>6} lanes {r['lanes']} | " + " | ".join(cells)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/verify")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant on CPU (median)")
    p.add_argument("--quick", action="store_true", help="vocabulary 16,384 only, lanes 1 and 8")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU is shared: keep it to one core
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dev = device_name(device)
    print(f"device: {dev}")
    print(f"one image, CFG {CFG_SCALE}, window {WINDOW}, {SAMPLING}, logits {dtype}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    vocabs, lanes = ((16384,), (1, 8)) if args.quick else (VOCABS, LANES)
    rows = []
    for vocab in vocabs:
        for n in lanes:
            r = run_case(vocab, n, device, dtype, args.repeats)
            rows.append(r)
            print(format_row(r), flush=True)
    if device.type != "cuda":
        print(f"Triton/GPU: not measured on this device. CPU figures: torch reference, fp32, 1 thread, "
              f"median of {args.repeats} calls.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": dev, "dtype": str(dtype), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "sampling": SAMPLING, "cfg_scale": CFG_SCALE, "window": WINDOW,
            "command": " ".join(["python", "benchmarks/verify.py", *(argv if argv is not None else sys.argv[1:])])}
    (out / "verify.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    with open(out / "verify.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    from _report import bar_chart

    bar_chart([(f"V{r['vocab']} L{r['lanes']} {n}", r[f"{n}_ms"]) for r in rows for n in VARIANTS],
              out / "verify.png", title=f"speculative verification, ms per step (median) on {dev}", unit="ms",
              colors=[i for _ in rows for i in range(len(VARIANTS))])
    print(f"wrote {out / 'verify.json'}, {out / 'verify.csv'}, {out / 'verify.png'}")
    return rows


if __name__ == "__main__":
    main()
