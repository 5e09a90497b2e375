"""Roofline floors of one image's decode, `ar` vs `pjd`, for real model configs.

PURE ARITHMETIC: every figure this script prints is a model-derived floor (bytes / bandwidth or
flops / peak, whichever is larger, summed over the decode steps), never a measurement. Real
latency is higher (kernel launches, host work, imperfect overlap); the floors say how much a
perfect implementation can gain, and which resource bounds it.

Model of one decode step (bf16, one image, classifier-free guidance = 2 sequences):
  tokens       = inputs per sequence x cfg      (ar: 1 input; pjd: active rows x (window + 1))
  bytes        = streamed weights (transformer layers + output head, read once per step)
               + KV cache read (K and V of every layer, every kv head, up to the step's last
                 query position, read once per kv head: an ideal kernel)
               + KV written for this step's inputs + embedding rows gathered for the inputs
  flops        = 2 x streamed weights x tokens + 4 x layers x heads x head_dim x sum(visible keys)
  floor(step)  = max(bytes / HBM bandwidth, flops / dense bf16 peak)
Activations, norms and sampling are ignored (small next to the above at these sizes).

Step counts: `ar` = the paper's AR step count where the PJD paper measured one (Lumina-mGPT 2357,
LlamaGen-XL 1024), otherwise one step per grid slot (EOL slots included). `pjd` = ar / compression,
with the paper's measured compression (Lumina-mGPT 2357 -> 371, LlamaGen-XL 1024 -> 213) or, for
models the paper did not measure, the anchor of the closest layout (marked "assumed"), or
`--compression` for all. The per-step shape of a pjd decode (how many rows are active, how far
the cache reaches) comes from a fluid schedule: every active row commits `rate` tokens per step
(the top row at least 1), rows activate at `context` committed tokens of the row above and never
overtake it, and `rate` is solved so the schedule takes the target number of steps.

Usage:
    python benchmarks/roofline.py [--out bench_out] [--compression X] [--window 7]
        [--no-docs]     # do not rewrite the table in docs/performance.md
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

BYTES_BF16 = 2


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # bytes / s
    peak_flops: float  # dense bf16 flop / s


DEVICES = (  # datasheet ceilings: used only where no measured ones are given (--ceilings / --measure)
    Device("H100 SXM", 3.35e12, 989e12),
    Device("H200 SXM", 4.8e12, 989e12),
)


def measure_ceilings(device, *, copy_bytes: int = 1 << 30, matmul_n: int = 8192, iters: int = 20) -> dict:
    """The two ceilings every GPU ratio uses, measured on ``device`` (CUDA) in this process.

    copy_bytes_per_s: a device-to-device copy of ``copy_bytes`` (read + write counted), median of
    ``iters`` copies timed with CUDA events; bf16_flops_per_s: ``matmul_n``^3 bf16 matmuls of random
    data (2 n^3 flops each), median. Datasheet values (DEVICES) are upper bounds these rarely reach.
    """
    import statistics

    import torch

    def median_ms(fn):
        fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    mm_ms = median_ms(lambda: a @ b)
    return dict(copy_bytes_per_s=2 * copy_bytes / (copy_ms * 1e-3), copy_bytes=copy_bytes, copy_ms=copy_ms,
                bf16_flops_per_s=2 * matmul_n ** 3 / (mm_ms * 1e-3), matmul_n=matmul_n, matmul_ms=mm_ms)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and image layout of one model. Counts are the published configs."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # SwiGLU MLP width
    head_params: int  # output head(s) read every step (lm_head, or Janus' generation head)
    embed_params: int  # input embedding tables: gathered per token, not streamed
    height: int
    width: int
    eol: bool  # an end-of-line slot after every row
    prefix: int  # tokens before the first image slot (prompt, class token, image-start tokens)
    ar_steps: int | None = None  # measured AR steps (paper), else one per grid slot
    pjd_steps: int | None = None  # measured PJD steps (paper)
    context: int | None = None  # the paper's c for measured step counts, else width // 4
    compression: float | None = None  # assumed compression when the paper has no figure
    note: str = ""

    @property
    def row_slots(self) -> int:
        return self.width + (1 if self.eol else 0)

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o, k, v
        return attn + 3 * self.hidden * self.intermediate

    @property
    def streamed_params(self) -> int:
        return self.layers * self.layer_params + self.head_params

    @property
    def total_params(self) -> int:
        return self.streamed_params + self.embed_params

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one position, all layers, one sequence."""
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES_BF16

    def default_ar_steps(self) -> int:
        return self.ar_steps or self.height * self.row_slots


MODELS = (
    # Chameleon-7B text model; 768 px -> 48 x 48 VQ grid, EOL after each row. AR steps: the PJD paper.
    ModelConfig("Lumina-mGPT 7B", 32, 4096, 32, 32, 128, 11008, 4096 * 65536, 4096 * 65536,
                48, 48, True, 100, ar_steps=2357, pjd_steps=371, context=11,
                note="prompt ~100 tokens; ar/pjd steps measured by the PJD paper (c=11)"),
    # LlamaGen GPT-XL c2i: dim 1280, FFN 3584 (8/3 x dim rounded to 256), VQ vocab 16384, 1 class token.
    ModelConfig("LlamaGen-XL", 36, 1280, 20, 20, 64, 3584, 1280 * 16384, 1280 * 16384 + 1001 * 1280,
                32, 32, False, 1, ar_steps=1024, pjd_steps=213, context=6,
                note="class-token prefix; ar/pjd steps measured by the PJD paper (c=6)"),
    # Janus-Pro 7B: 30-layer LLaMA; generation head 4096->4096->16384 replaces lm_head while decoding.
    ModelConfig("Janus-Pro 7B", 30, 4096, 32, 32, 128, 11008, 4096 * 4096 + 4096 * 16384,
                4096 * 102400 + 4096 * 102400 + 16384 * 8, 24, 24, False, 50, compression=4.81,
                note="~50 prompt tokens; compression ASSUMED = LlamaGen anchor (no EOL, no paper figure)"),
    # Emu3-Gen 8B: GQA 32/8, FFN 14336, vocab 184622 (lm_head over the full vocabulary).
    ModelConfig("Emu3 8B", 32, 4096, 32, 8, 128, 14336, 4096 * 184622, 4096 * 184622,
                90, 90, True, 64, compression=6.35,
                note="720 px -> 90x90 (8x tokenizer) + EOL, ~64 prompt tokens; compression ASSUMED = "
                     "Lumina-mGPT anchor (EOL layout, no paper figure; the paper reports 6.9x at 1024 px)"),
)


@dataclass(frozen=True)
class Step:
    """One decode step of one image: query positions per sequence (CFG handled by the caller)."""

    tokens: int  # inputs per sequence
    keys: int  # cache positions read: 0 .. the step's last query position
    visible_keys: int  # sum over queries of keys each one attends to


def ar_steps(cfg: ModelConfig, n_steps: int) -> list[Step]:
    """AR: step t feeds position prefix - 1 + t (step 0 feeds the last prefix token) and reads the
    cache up to it: prefix + t keys."""
    return [Step(1, cfg.prefix + t, cfg.prefix + t) for t in range(n_steps)]


def pjd_schedule(cfg: ModelConfig, rate: float, context: int, window: int) -> list[list[tuple[int, float]]]:
    """Fluid schedule: per step, the (row, committed tokens) of every active row, before the step."""
    done = [0.0] * cfg.height
    steps = []
    while done[-1] < cfg.width:
        active = [r for r in range(cfg.height) if done[r] < cfg.width
                  and (r == 0 or done[r - 1] >= min(context, cfg.width))]
        steps.append([(r, done[r]) for r in active])
        for i, r in enumerate(active):
            gain = max(1.0, rate) if i == 0 else rate
            limit = cfg.width if i == 0 or done[r - 1] >= cfg.width else done[r - 1] - 1
            done[r] = max(done[r], min(done[r] + min(gain, window + 1), limit, cfg.width))
    return steps


def pjd_steps(cfg: ModelConfig, n_steps: int, context: int, window: int) -> tuple[list[Step], float]:
    """Steps of a pjd decode with n_steps steps; returns them and the solved rate."""
    lo, hi = 0.0, float(window + 1)
    for _ in range(40):  # bisection: the schedule length is non-increasing in rate
        mid = (lo + hi) / 2
        if len(pjd_schedule(cfg, mid, context, window)) > n_steps:
            lo = mid
        else:
            hi = mid
    # The fluid schedule's length jumps with rate; keep its profile but resample it to exactly
    # n_steps so the step count is the anchor's.
    profile = pjd_schedule(cfg, hi, context, window)
    schedule = [profile[i * len(profile) // n_steps] for i in range(n_steps)]
    inputs = window + 1
    out = []
    for rows in schedule:
        # row r feeds its last committed token (position start), then `window` drafts; the query
        # at position p sees about p + 1 keys (its row's other drafts aside)
        starts = [cfg.prefix + r * cfg.row_slots + int(c) - 1 for r, c in rows]
        keys = max(starts) + inputs
        visible = sum(inputs * s + inputs * (inputs + 1) // 2 for s in starts)
        out.append(Step(inputs * len(rows), keys, visible))
    return out, hi


def step_cost(cfg: ModelConfig, step: Step, cfg_scale_batch: int = 2) -> tuple[float, float]:
    """(bytes, flops) of one step for one image (cfg_scale_batch sequences)."""
    n = cfg_scale_batch * step.tokens
    weights = cfg.streamed_params * BYTES_BF16
    kv_read = cfg_scale_batch * step.keys * cfg.kv_bytes_per_token
    kv_write = n * cfg.kv_bytes_per_token
    embed = n * cfg.hidden * BYTES_BF16
    flops = 2 * cfg.streamed_params * n
    flops += cfg_scale_batch * 4 * cfg.layers * cfg.heads * cfg.head_dim * step.visible_keys
    return weights + kv_read + kv_write + embed, flops


def floor_seconds(cfg: ModelConfig, steps: list[Step], dev: Device) -> tuple[float, int]:
    """Summed per-step floors and how many steps are compute-bound."""
    total, compute_bound = 0.0, 0
    for s in steps:
        b, f = step_cost(cfg, s)
        t_mem, t_flop = b / dev.bandwidth, f / dev.peak_flops
        total += max(t_mem, t_flop)
        compute_bound += t_flop > t_mem
    return total, compute_bound


def analyse(cfg: ModelConfig, *, compression: float | None, window: int, context: int | None,
            devices=DEVICES) -> dict:
    n_ar = cfg.default_ar_steps()
    if compression is not None:
        n_pjd, source = max(1, round(n_ar / compression)), f"--compression {compression}"
    elif cfg.pjd_steps is not None:
        n_pjd, source = cfg.pjd_steps, "PJD paper (measured)"
    else:
        n_pjd, source = round(n_ar / cfg.compression), f"assumed {cfg.compression}x"
    context = context or cfg.context or cfg.width // 4
    ar = ar_steps(cfg, n_ar)
    pjd, rate = pjd_steps(cfg, n_pjd, context, window)
    row = {
        "model": cfg.name, "grid": f"{cfg.height}x{cfg.width}" + ("+EOL" if cfg.eol else ""),
        "prefix": cfg.prefix, "params_total_B": cfg.total_params / 1e9,
        "streamed_weights_GB": cfg.streamed_params * BYTES_BF16 / 1e9,
        "ar_steps": n_ar, "pjd_steps": len(pjd),
        "compression": n_ar / len(pjd), "compression_source": source, "context": context,
        "window": window, "rate_per_row": rate,
        "pjd_mean_active_rows": sum(s.tokens for s in pjd) / len(pjd) / (window + 1),
        "pjd_mean_tokens_per_step_cfg": 2 * sum(s.tokens for s in pjd) / len(pjd),
        "ar_mean_bytes_GB": sum(step_cost(cfg, s)[0] for s in ar) / len(ar) / 1e9,
        "pjd_mean_bytes_GB": sum(step_cost(cfg, s)[0] for s in pjd) / len(pjd) / 1e9,
        "ar_mean_gflops": sum(step_cost(cfg, s)[1] for s in ar) / len(ar) / 1e9,
        "pjd_mean_gflops": sum(step_cost(cfg, s)[1] for s in pjd) / len(pjd) / 1e9,
        "note": cfg.note, "devices": {},
    }
    for dev in devices:
        t_ar, _ = floor_seconds(cfg, ar, dev)
        t_pjd, cb = floor_seconds(cfg, pjd, dev)
        row["devices"][dev.name] = {
            "ar_floor_ms": t_ar * 1e3, "pjd_floor_ms": t_pjd * 1e3, "ideal_speedup": t_ar / t_pjd,
            "pjd_compute_bound_steps": cb,
        }
    return row


def markdown(rows: list[dict], args_line: str, devices=DEVICES) -> str:
    devs = [d.name for d in devices]
    head = ["model", "grid", "streamed weights", "ar steps", "pjd steps", "compression",
            "pjd tokens/step (CFG)", "GB/step ar → pjd", "GFLOP/step ar → pjd"]
    for d in devs:
        head += [f"{d} ar ms/img", f"{d} pjd ms/img", f"{d} ideal speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["grid"], f"{r['streamed_weights_GB']:.2f} GB", str(r["ar_steps"]),
                 str(r["pjd_steps"]), f"{r['compression']:.2f}× ({r['compression_source']})",
                 f"{r['pjd_mean_tokens_per_step_cfg']:.0f}",
                 f"{r['ar_mean_bytes_GB']:.2f} → {r['pjd_mean_bytes_GB']:.2f}",
                 f"{r['ar_mean_gflops']:.0f} → {r['pjd_mean_gflops']:.0f}"]
        for d in devs:
            x = r["devices"][d]
            cells += [f"{x['ar_floor_ms']:.0f}", f"{x['pjd_floor_ms']:.0f}", f"{x['ideal_speedup']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = "\n".join(f"- {r['model']}: {r['note']}; context {r['context']}, window {r['window']}, "
                      f"mean active rows {r['pjd_mean_active_rows']:.2f}; compute-bound pjd steps: "
                      + ", ".join(f"{d} {x['pjd_compute_bound_steps']}" for d, x in r["devices"].items())
                      for r in rows)
    ceilings = ", ".join(f"{d.name} {d.bandwidth / 1e12:.2f} TB/s, {d.peak_flops / 1e12:.0f} TFLOP/s" for d in devices)
    return (f"Model-derived floors, NOT measurements (generated by `{args_line}`; bf16, one image, "
            f"CFG = 2 sequences; ceilings: {ceilings} dense bf16).\n\n"
            + "\n".join(lines) + "\n\n" + notes + "\n")


def plot(rows: list[dict], path: Path) -> None:
    from _report import bar_chart

    bars = [(f"{r['model']} {d}", r["devices"][d]["ideal_speedup"]) for r in rows for d in r["devices"]]
    bar_chart(bars, path, title="Roofline ideal latency speed-up pjd vs ar (model-derived, not measured)",
              unit="x")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out", help="folder for roofline.json / roofline.png")
    p.add_argument("--compression", type=float, default=None, help="step compression for every model")
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--context", type=int, default=None,
                   help="rows activate at this many committed tokens of the row above; default: the "
                        "paper's c where its step counts are used, else width // 4")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/performance.md")
    p.add_argument("--ceilings", default=None,
                   help="JSON with measured copy_bytes_per_s / bf16_flops_per_s (gpu_check's env.json): use them "
                        "instead of the datasheet ceilings")
    p.add_argument("--measure", action="store_true", help="measure the ceilings on this CUDA device and use them")
    args = p.parse_args(argv)
    devices = DEVICES
    if args.ceilings or args.measure:
        if args.ceilings:
            measured = json.loads(Path(args.ceilings).read_text())
            name = measured.get("gpu", "GPU")
        else:
            import torch

            if not torch.cuda.is_available():
                p.error("--measure needs a CUDA device")
            measured, name = measure_ceilings(torch.device("cuda")), torch.cuda.get_device_name()
        devices = (Device(f"{name} (measured)", measured["copy_bytes_per_s"], measured["bf16_flops_per_s"]),)
    if args.compression is not None and args.compression < 1:
        raise ValueError(f"--compression must be >= 1, got {args.compression}")
    if args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    rows = [analyse(m, compression=args.compression, window=args.window, context=args.context, devices=devices)
            for m in MODELS]
    args_line = "python benchmarks/roofline.py" + "".join(
        f" --{k} {v}" for k, v in (("compression", args.compression), ("window", args.window),
                                    ("context", args.context)) if v is not None and (k, v) != ("window", 7))
    table = markdown(rows, args_line, devices)
    print("ROOFLINE: model-derived floors (pure arithmetic), not measurements\n")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline.json").write_text(json.dumps(
        {"kind": "model-derived floor, not a measurement", "devices": [asdict(d) for d in devices],
         "models": [asdict(m) for m in MODELS], "results": rows}, indent=2))
    plot(rows, out / "roofline.png")
    if not args.no_docs:
        from _report import update_docs

        update_docs("roofline", table)
    print(f"wrote {out / 'roofline.json'}, {out / 'roofline.png'}" + ("" if args.no_docs else ", docs/performance.md"))
    return rows


if __name__ == "__main__":
    main()
