"""Draft attention of one pjd decode step: pjd.ops.draft_attention against attention baselines.

Variants, all on the same inputs (q, k, v + pjd's row-causal metadata, batch 2 = CFG):
  pjd       pjd.ops.draft_attention, backend auto (the Triton kernel on CUDA, the torch reference
            on CPU); the metadata is four int32 arrays, no mask tensor.
  flash     flash_attn_with_kvcache(causal=True): single-row steps only (one row's drafts are plain
            causal attention over the cache); "not installed" when flash_attn is missing.
  flex      torch.nn.attention.flex_attention with a prebuilt BlockMask of the same row-causal
            mask (compiled on CUDA; eager on CPU, where compiling is slow and no faster).
  sdpa      F.scaled_dot_product_attention with the prebuilt dense boolean mask.
Mask construction is excluded from the timed calls (a pjd step must rebuild it every step:
`flex_mask_ms` reports what one BlockMask build costs).

Before timing, every baseline's output is compared with pjd's: the script stops with an error if
one disagrees, so it can never time a wrong mask.

Shapes: Lumina-mGPT 7B, LlamaGen-XL and Janus-Pro 7B attention layers, at 25% / 50% / 90% of the
image, with 1 / 4 / 8 active rows, window 7. Keys are laid out as pjd's slot cache: key index =
raster position; the prompt and finished rows committed (-1); active rows committed up to their
column, then this step's drafts (group = row), then empty (-2); the unconditional CFG sequence's
prompt is left-padded (-2) for half its length. Keys end at the step's last query position.

Every timed figure (each variant, the BlockMask build, the copy bandwidth) comes after one untimed
warm-up call of the same callable on the same shapes (pjd.timing.time_ms), so compilation is never
timed. On CUDA: triton.testing.do_bench (median; inputs rotated over copies larger than L2) and
achieved bandwidth against the measured device copy bandwidth. On CPU (no GPU): only the CPU-capable
variants, at scaled-down head counts (flagged in the table), 1 thread, median of a few repeats.

Usage: python benchmarks/attention.py [--out bench_out] [--quick] [--repeats 5]
    [--docs]   # write the table into docs/performance.md (block attention-cpu / attention-cuda)
"""
from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pjd.ops import draft_attention, visibility_mask
from pjd.timing import graph_ms, time_ms

COMMITTED, HIDDEN = -1, -2


@dataclass(frozen=True)
class AttnModel:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    height: int
    width: int
    eol: bool
    prefix: int


MODELS = (
    AttnModel("Lumina-mGPT 7B", 32, 32, 128, 48, 48, True, 100),
    AttnModel("LlamaGen-XL", 20, 20, 64, 32, 32, False, 1),
    AttnModel("Janus-Pro 7B", 32, 32, 128, 24, 24, False, 50),
)


@dataclass(frozen=True)
class Case:
    model: AttnModel
    fraction: float  # how far the decode is: rows above the top active row / height
    rows: int  # active rows
    window: int = 7
    heads: int | None = None  # scaled-down head count (CPU), None = the model's
    batch: int = 2  # CFG: conditional + unconditional sequence

    @property
    def hq(self) -> int:
        return self.heads or self.model.heads

    @property
    def hkv(self) -> int:
        return max(1, self.hq * self.model.kv_heads // self.model.heads)

    @property
    def label(self) -> str:
        scaled = f" [scaled H{self.model.heads}->{self.hq}]" if self.heads else ""
        return f"{self.model.name} {int(self.fraction * 100)}% rows={self.rows}{scaled}"


def build_metadata(case: Case) -> tuple[torch.Tensor, ...]:
    """q_pos, q_group, k_pos, k_group (int32, [B, Nq] / [B, Nk]) of one pjd step, as the slot cache has them."""
    m, w = case.model, case.window
    row_slots = m.width + (1 if m.eol else 0)
    rows = min(case.rows, m.height)
    # Rows activate at `context` committed tokens of the row above; use width // 4 unless that many
    # rows would not fit in one row's width.
    lag = min(m.width // 4, (m.width - 1) // rows) if rows > 1 else 0
    top = min(int(case.fraction * m.height), m.height - rows)
    committed_top = min(m.width - 1, max((rows - 1) * lag + 1, m.width // 2))
    q_pos, q_group, drafts = [], [], []
    committed = []
    for k in range(rows):
        r = top + k
        c = committed_top - k * lag  # committed tokens of row r, >= 1
        # row r may draft column j only once the row above has committed column j + 1
        last_col = m.width - 1 if k == 0 else committed[-1] - 2
        cols = list(range(c, min(c + w, last_col + 1)))
        start = m.prefix + r * row_slots
        committed.append(c)
        if not cols:
            continue  # a row with nothing to draft contributes no inputs this step
        q_pos += [start + c - 1] + [start + j for j in cols]  # re-fed last committed token, drafts
        q_group += [r] * (1 + len(cols))
        drafts += [(start + j, r) for j in cols]
    n_k = max(q_pos) + 1
    k_group = torch.full((n_k,), HIDDEN, dtype=torch.int32)
    k_group[: m.prefix + top * row_slots] = COMMITTED  # prompt + finished rows (EOLs included)
    for k, c in enumerate(committed):
        start = m.prefix + (top + k) * row_slots
        k_group[start: start + c] = COMMITTED
    for pos, r in drafts:
        k_group[pos] = r
    b = case.batch
    k_group = k_group.expand(b, n_k).clone()
    if b > 1:
        k_group[1, : m.prefix // 2] = HIDDEN  # unconditional prompt: left padding
    k_pos = torch.arange(n_k, dtype=torch.int32).expand(b, n_k).contiguous()
    q_pos = torch.tensor(q_pos, dtype=torch.int32).expand(b, -1).contiguous()
    q_group = torch.tensor(q_group, dtype=torch.int32).expand(b, -1).contiguous()
    return q_pos, q_group, k_pos, k_group


def make_inputs(case: Case, device, dtype, seed: int = 0) -> dict:
    q_pos, q_group, k_pos, k_group = (t.to(device) for t in build_metadata(case))
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = case.model.head_dim
    q = torch.randn(case.batch, case.hq, q_pos.shape[1], d, generator=g).to(device, dtype)
    k = torch.randn(case.batch, case.hkv, k_pos.shape[1], d, generator=g).to(device, dtype)
    v = torch.randn(case.batch, case.hkv, k_pos.shape[1], d, generator=g).to(device, dtype)
    return dict(q=q, k=k, v=v, q_pos=q_pos, q_group=q_group, k_pos=k_pos, k_group=k_group)


def pjd_backend(device: torch.device) -> tuple[str, str]:
    """(backend, label): the Triton kernel on CUDA once it exists, else the torch reference."""
    if device.type != "cuda":
        return "torch", "pjd (torch reference)"
    try:
        from pjd.kernels.draft_attention import draft_attention_triton  # noqa: F401
    except ImportError:
        return "torch", "pjd (torch reference; Triton kernel not importable)"
    return "triton", "pjd (Triton)"


def flash_leftpad(x: dict) -> torch.Tensor | None:
    """Leading -2 keys per sequence (FlashAttention can only hide keys as left padding)."""
    hidden = (x["k_group"] == HIDDEN).int()
    lead = hidden.cumprod(dim=1).sum(dim=1).int()
    return lead if bool(lead.any()) else None


def variants(case: Case, x: dict, device: torch.device) -> tuple[dict, dict]:
    """name -> zero-argument callable on input dict `x`; and name -> reason for what cannot run."""
    scale = case.model.head_dim ** -0.5
    backend, _ = pjd_backend(device)
    run, skip = {}, {}
    run["pjd"] = lambda x: draft_attention(x["q"], x["k"], x["v"], x["q_pos"], x["q_group"],
                                           x["k_pos"], x["k_group"], scale=scale, backend=backend)

    mask = visibility_mask(x["q_pos"], x["q_group"], x["k_pos"], x["k_group"])[:, None]
    run["sdpa"] = lambda x: F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], attn_mask=mask, scale=scale, enable_gqa=case.hkv != case.hq)

    from torch.nn.attention.flex_attention import flex_attention

    block_mask = flex_block_mask(x)
    # eager flex on CPU is deliberate (compiling takes ~35 s per shape and is no faster there)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    flex = compiled_flex() if device.type == "cuda" else flex_attention
    run["flex"] = lambda x: flex(x["q"], x["k"], x["v"], block_mask=block_mask, scale=scale,
                                 enable_gqa=case.hkv != case.hq)

    if case.rows != 1:
        skip["flash"] = "n/a (several rows: not expressible as causal)"
    elif device.type != "cuda" or x["q"].dtype == torch.float32:
        skip["flash"] = "n/a (needs CUDA fp16/bf16)"
    else:
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError:
            skip["flash"] = "not installed"
        else:
            # FlashAttention's layout is [B, N, H, D]; bottom-right-aligned causal = the row's drafts.
            t = {n: x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v")}
            seqlens = torch.full((case.batch,), x["k"].shape[2], dtype=torch.int32, device=device)
            leftpad = flash_leftpad(x)
            extra = {} if leftpad is None else {"cache_leftpad": leftpad}
            run["flash"] = lambda x: flash_attn_with_kvcache(
                t["q"], t["k"], t["v"], cache_seqlens=seqlens, softmax_scale=scale, causal=True,
                **extra).transpose(1, 2)
    return run, skip


@functools.cache
def compiled_flex():
    """One compiled FlexAttention for the whole run: each shape set compiles once and every case of
    that shape reuses it. The recompile limit is raised so that a run's many shapes never make
    dynamo fall back to eager (which would time uncompiled flex as "compiled")."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(x: dict):
    from torch.nn.attention.flex_attention import create_block_mask

    q_pos, q_group, k_pos, k_group = x["q_pos"], x["q_group"], x["k_pos"], x["k_group"]

    def row_causal(b, h, qi, ki):
        g = k_group[b, ki]
        return (g != HIDDEN) & (k_pos[b, ki] <= q_pos[b, qi]) & ((g == COMMITTED) | (g == q_group[b, qi]))

    return create_block_mask(row_causal, q_pos.shape[0], None, q_pos.shape[1], k_pos.shape[1],
                             device=q_pos.device)


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=2e-4, rtol=2e-4)}.get(dtype, dict(atol=2e-2, rtol=2e-2))


def check(case: Case, x: dict, run: dict) -> dict:
    """Every variant's output against pjd's; raises if one disagrees. Returns max |diff| per variant."""
    ref = run["pjd"](x).float()
    errs = {}
    for name, fn in run.items():
        out = fn(x).float()
        errs[name] = (out - ref).abs().max().item()
        if not torch.allclose(out, ref, **tolerance(x["q"].dtype)):
            raise RuntimeError(f"{name} disagrees with pjd on {case.label}: max |diff| {errs[name]:.3g}; "
                               "refusing to time a wrong mask")
    return errs


def time_rotating(fn, inputs: list[dict], device, repeats: int) -> float:
    """Median ms of ``fn`` called on the input copies in turn (pjd.timing.time_ms: warm-up first)."""
    turn = itertools.count()
    return time_ms(lambda: fn(inputs[next(turn) % len(inputs)]), device, repeats)[0]


def copy_bandwidth(device) -> float:
    """Device memory bandwidth (bytes/s): a 1 GiB device copy (read + write), roofline.measure_ceilings."""
    from roofline import measure_ceilings

    return measure_ceilings(device, matmul_n=256)["copy_bytes_per_s"]


def bytes_moved(x: dict) -> int:
    """Minimum traffic of one call: q, k, v read once, the output written, metadata read."""
    t = sum(x[n].numel() * x[n].element_size() for n in x)
    return t + x["q"].numel() * x["q"].element_size()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU {model}"


def cases_for(device: torch.device, quick: bool) -> list[Case]:
    fractions, rows = ((0.5,), (1, 4)) if quick else ((0.25, 0.5, 0.9), (1, 4, 8))
    heads = None if device.type == "cuda" else 4  # CPU: scaled-down heads, flagged in the labels
    return [Case(m, f, r, heads=heads) for m in MODELS for f in fractions for r in rows]


def run_case(case: Case, device, dtype, repeats: int) -> dict:
    x = make_inputs(case, device, dtype)
    run, skip = variants(case, x, device)
    errs = check(case, x, run)
    # rotate over enough input copies that consecutive calls do not hit a warm L2 (50 MB on H100)
    n_copies = 1 if device.type != "cuda" else max(2, -(-4 * 50 * 2**20 // bytes_moved(x)))
    inputs = [x] + [make_inputs(case, device, dtype, seed=i) for i in range(1, n_copies)]
    row = {"case": case.label, "model": case.model.name, "fraction": case.fraction, "rows": case.rows,
           "heads": case.hq, "kv_heads": case.hkv, "head_dim": case.model.head_dim,
           "batch": case.batch, "nq": x["q"].shape[2], "nk": x["k"].shape[2], "dtype": str(dtype),
           "scaled": case.heads is not None, "bytes": bytes_moved(x)}
    for name in ("pjd", "flash", "flex", "sdpa"):
        if name in skip:
            row[f"{name}_ms"], row[f"{name}_note"] = float("nan"), skip[name]
            continue
        row[f"{name}_ms"] = time_rotating(run[name], inputs, device, repeats)
        row[f"{name}_maxdiff_vs_pjd"] = errs[name]
        if device.type == "cuda":  # kernel-only: graph-replayed, no L2 flush and no launch overhead
            row[f"{name}_graph_ms"], row[f"{name}_graph_note"] = graph_ms(lambda: run[name](x), device)
    row["flex_mask_ms"], _ = time_ms(lambda: flex_block_mask(x), device, repeats)
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--quick", action="store_true", help="one cache point, rows 1 and 4")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant on CPU (median)")
    p.add_argument("--docs", action="store_true",
                   help="write the results table into docs/performance.md (attention-<device> block)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU is shared: keep it to one core
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dev = device_name(device)
    _, pjd_label = pjd_backend(device)
    print(f"device: {dev}")
    print(f"pjd variant: {pjd_label}; dtype {dtype}; CFG batch 2; window 7; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    if copy_bw:
        print(f"measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for case in cases_for(device, args.quick):
        r = run_case(case, device, dtype, args.repeats)
        if copy_bw:
            for n in ("pjd", "flash", "flex", "sdpa"):
                r[f"{n}_bw_frac"] = r["bytes"] / (r[f"{n}_ms"] * 1e-3) / copy_bw
        rows.append(r)
        print(format_row(r, bool(copy_bw)), flush=True)
    if device.type != "cuda":
        print("GPU sections: not measured on this device (Triton kernel, FlashAttention, compiled "
              "FlexAttention, bandwidth vs copy). CPU figures: scaled heads, fp32, 1 thread, "
              f"median of {args.repeats} calls — indicative only.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": dev, "pjd_variant": pjd_label, "dtype": str(dtype), "copy_bandwidth_Bps": copy_bw,
            "threads": torch.get_num_threads(), "command": " ".join(["python", "benchmarks/attention.py", *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__}
    (out / "attention.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    with open(out / "attention.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    plot(rows, out / "attention.png", dev)
    if args.docs:
        from _report import update_docs

        update_docs(f"attention-{device.type}", markdown(rows, meta))
    print(f"wrote {out / 'attention.json'}, {out / 'attention.csv'}, {out / 'attention.png'}")
    return rows


def format_row(r: dict, with_bw: bool) -> str:
    def cell(n):
        ms = r[f"{n}_ms"]
        if ms != ms:
            return f"{n} {r[f'{n}_note']}"
        bw = f" ({r[f'{n}_bw_frac']:.0%} of copy BW)" if with_bw else ""
        graph = f", graph {r[f'{n}_graph_ms']:.3f} ms" if r.get(f"{n}_graph_ms") is not None else ""
        return f"{n} {ms:.3f} ms{graph}{bw}"

    return (f"{r['case']:<44} Nq {r['nq']:>3} Nk {r['nk']:>5} | " + " | ".join(
        cell(n) for n in ("pjd", "flash", "flex", "sdpa")) + f" | flex mask build {r['flex_mask_ms']:.1f} ms")


def markdown(rows: list[dict], meta: dict) -> str:
    """Results table (ms per call, median) with the device and command it came from."""
    names = ("pjd", "flash", "flex", "sdpa")
    lines = [f"Measured: `{meta['command']}` on {meta['device']} (torch {meta['torch']}, "
             f"{meta['threads']} thread(s), {meta['dtype']}; pjd = {meta['pjd_variant']}).", "",
             "| case | Nq | Nk | " + " | ".join(f"{n} ms" for n in names) + " | flex mask build ms |",
             "|" + "---|" * (len(names) + 4)]
    for r in rows:
        cells = [f"{r[f'{n}_ms']:.3f}" if r[f"{n}_ms"] == r[f"{n}_ms"] else r[f"{n}_note"] for n in names]
        lines.append(f"| {r['case']} | {r['nq']} | {r['nk']} | " + " | ".join(cells)
                     + f" | {r['flex_mask_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, dev: str) -> None:
    from _report import bar_chart

    names = ("pjd", "flash", "flex", "sdpa")
    bars, colors = [], []
    for r in rows:
        for i, n in enumerate(names):
            bars.append((f"{r['case']} {n}", r[f"{n}_ms"]))
            colors.append(i)
    bar_chart(bars, path, title=f"draft attention, ms per call (median) on {dev}", unit="ms", colors=colors)


if __name__ == "__main__":
    main()
