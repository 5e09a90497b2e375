"""End-to-end decoding benchmark: steps, step compression, wall time, orchestration overhead, quality.

Sections (each prints a table; everything is saved as JSON, plus PNG plots):
  methods   ar / sjd / sjd++ / zipar / pjd at their defaults
  context   pjd and zipar over the row-activation context c (step compression and quality vs c)
  window    pjd over the draft window
  topk      pjd vs ar over top-k
  cfg       pjd vs ar over the CFG scale
  ablation  pjd with and without the row-causal mask
Quality: mean NLL per token of the samples under the model itself (teacher-forced), the shipped
classifier's accuracy on the requested classes and, for batches of >= 100 images
(pjd.demo.FID_MIN_IMAGES), FID against the Fashion-MNIST test split (pjd.quality).

--table1 instead runs the paper's Table 1 on the default model (benchmarks/_table1.py): every method
over --table1-samples images (equal per class), FID and class accuracy with bootstrap intervals.

Usage: python benchmarks/e2e.py [--model default|tiny] [--batch 16] [--sections methods,context]
       [--out bench_out/e2e] [--docs]      (--docs also refreshes docs/e2e/ and docs/performance.md)
       python benchmarks/e2e.py --table1 [--table1-samples 2000] [--table1-batch 100] [--docs]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

import pjd
from pjd.demo import FID_MIN_IMAGES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import line_chart, update_docs  # noqa: E402

SECTIONS = ("methods", "context", "window", "topk", "cfg", "ablation")
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs" / "e2e"


class Bench:
    def __init__(self, model_name: str, batch: int, seed: int, cfg_scale: float):
        if model_name == "default":
            from pjd.models import default

            dm = default()
            self.model, self.height, self.width = dm.model, dm.height, dm.width
            self.image_range = dm.image_token_range
            self.prompt = dm.prompt(torch.arange(batch) % len(dm.class_names))
            self.null = dm.null_prompt(batch)
            self.decode = dm.decode
        else:  # tiny random-weight model: exercises the code, says nothing about acceptance
            from pjd.models import tiny_llama

            self.model = tiny_llama(264, hidden_size=64, logit_scale=3.0)
            self.height = self.width = 16
            self.image_range = (0, 256)
            self.prompt = torch.randint(256, 263, (batch, 1), generator=torch.Generator().manual_seed(seed))
            self.null = torch.full((batch, 1), 263)
            self.decode = None
        self.labels = torch.arange(batch) % 10
        self.batch, self.seed, self.cfg_scale = batch, seed, cfg_scale

    def run(self, method: str, **kw) -> dict:
        from pjd.quality import class_accuracy, classifier_features, fid, nll_per_token

        cfg = kw.pop("cfg_scale", self.cfg_scale)
        with torch.no_grad():
            r = pjd.generate(self.model, self.prompt, height=self.height, width=self.width, method=method,
                             image_token_range=self.image_range, cfg_scale=cfg,
                             uncond_input_ids=self.null if cfg != 1 else None, seed=self.seed, **kw)
        nll = nll_per_token(self.model, r.tokens, self.prompt, image_token_range=self.image_range)
        row = dict(method=method, **{k: v for k, v in kw.items()}, cfg_scale=cfg, steps=r.steps,
                   step_compression=self.height * self.width / r.steps,
                   per_image_compression=self.height * self.width / float(r.steps_per_image.double().mean()),
                   seconds=r.wall_seconds,
                   forward_seconds=r.forward_seconds, overhead_share=1 - r.forward_seconds / r.wall_seconds,
                   nll_per_token=float(nll.mean()),
                   nll_sem=float(nll.std() / len(nll) ** 0.5) if len(nll) > 1 else None,
                   accepted_per_step=torch.stack(r.accepted).double().mean(1).tolist())
        if self.decode is not None:
            images = self.decode(r.tokens)
            row["class_accuracy"] = class_accuracy(images, self.labels)
            if self.batch >= FID_MIN_IMAGES:
                row["fid"] = fid(classifier_features(images))
        return row


def plot_acceptance(rows: list[dict], path: Path) -> None:
    """Image tokens committed per step over the decode (mean over the batch), one line per method."""
    line_chart({r["method"]: list(enumerate(r["accepted_per_step"], 1)) for r in rows if r["method"] != "ar"},
               path, title="image tokens committed per step (mean over batch)", xlabel="step", ylabel="tokens")


def plot_context(rows: list[dict], out: Path, grid: str) -> None:
    """Per-image step compression and NLL / token against the row-activation context c."""
    for key, name, label in (("per_image_compression", "compression_vs_context.png", "per-image step compression"),
                             ("nll_per_token", "quality_vs_context.png", "NLL / token")):
        line_chart({m: [(r["context"], r[key]) for r in rows if r["method"] == m] for m in ("pjd", "zipar")},
                   out / name, title=f"{label} vs context c ({grid})", xlabel="context c", ylabel=label, log_x=True)


def table(title: str, rows: list[dict], keys: list[str]) -> str:
    lines = [f"\n### {title}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["default", "tiny"], default="default")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--out", default="bench_out")
    p.add_argument("--docs", action="store_true", help="copy plots to docs/e2e and refresh docs/performance.md")
    p.add_argument("--table1", action="store_true", help="run the Table-1 reproduction instead of --sections")
    p.add_argument("--table1-samples", type=int, default=2000, help="images per row (multiple of 10)")
    p.add_argument("--table1-batch", type=int, default=100, help="images decoded together")
    p.add_argument("--table1-methods", default="", help="comma list: only these rows' methods (default all)")
    p.add_argument("--table1-minutes", type=float, default=None,
                   help="stop after the chunk round that passes this budget (rows keep equal sample counts)")
    args = p.parse_args(argv)
    if args.table1:
        return table1_main(args)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    out = Path(args.out) / "e2e"  # e2e_<sections>.json, so runs of different sections do not overwrite
    out.mkdir(parents=True, exist_ok=True)
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    bench = Bench(args.model, args.batch, args.seed, args.cfg_scale)
    w = bench.width
    contexts = sorted({1, 2, max(1, w // 8), max(1, w // 4), max(1, w // 2), w})
    report = dict(device=device, model=args.model, batch=args.batch, seed=args.seed, cfg_scale=args.cfg_scale,
                  grid=f"{bench.height}x{w}", sections={})
    text = (f"Command: `python benchmarks/e2e.py --model {args.model} --batch {args.batch} --sections "
            f"{','.join(sections)}`; device: {device}; grid {bench.height}x{w}, batch {args.batch}, "
            f"CFG {args.cfg_scale}, seed {args.seed}. `step_compression` = AR steps / forward passes of the batch "
            f"(the slowest image sets them); `per_image_compression` = AR steps / mean steps each image needed "
            f"(the paper's batch-1 figure); `nll_sem` = standard error of the mean NLL over the images. Wall seconds are CPU times: per-step compute on a CPU grows with the "
            f"inputs per step, so they say nothing about GPU latency.\n")
    cols = ["method", "steps", "step_compression", "per_image_compression", "seconds", "overhead_share",
            "nll_per_token", "nll_sem", "class_accuracy", "fid"]

    def section(name, rows, keys, title):
        nonlocal text
        report["sections"][name] = rows
        t = table(title, rows, keys)
        print(t, flush=True)
        text += t

    if "methods" in sections:
        rows = [bench.run(m) for m in ("ar", "sjd", "sjd++", "zipar", "pjd")]
        for r in rows:
            r["speedup"] = rows[0]["seconds"] / r["seconds"]
        section("methods", rows, cols[:5] + ["speedup"] + cols[5:], "Methods at their defaults")
        plot_acceptance(rows, out / "acceptance_per_step.png")
    if "context" in sections:
        rows = [bench.run(m, context=c) for c in contexts for m in ("pjd", "zipar")]
        section("context", rows, ["method", "context"] + cols[1:], "Row-activation context c")
        plot_context(rows, out, f"{bench.height}x{w}")
    if "window" in sections:
        section("window", [bench.run("pjd", window=k) for k in (1, 3, 7, 11, 15)], ["method", "window"] + cols[1:],
                "pjd draft window")
    if "topk" in sections:
        section("topk", [bench.run(m, top_k=k) for k in (0, 64, 8) for m in ("ar", "pjd")],
                ["method", "top_k"] + cols[1:], "top-k")
    if "cfg" in sections:
        section("cfg", [bench.run(m, cfg_scale=s) for s in (1.0, 3.0, 5.0) for m in ("ar", "pjd")],
                ["method", "cfg_scale"] + cols[1:], "CFG scale")
    if "ablation" in sections:
        section("ablation", [bench.run("pjd", context=c, row_causal=rc) for c in (contexts[1], max(1, w // 4))
                             for rc in (True, False)], ["method", "context", "row_causal"] + cols[1:],
                "Row-causal mask ablation")

    json_path = out / f"e2e_{'_'.join(sections)}.json"
    json_path.write_text(json.dumps(report, indent=2))
    print(f"\ndevice: {device}; wrote {json_path} and plots")
    if args.docs:
        DOCS_DIR.mkdir(parents=True, exist_ok=True)
        for png in out.glob("*.png"):
            shutil.copy(png, DOCS_DIR / png.name)
        update_docs("e2e " + ",".join(sections), text)
    return report


def table1_main(args) -> dict:
    from _table1 import markdown, plot_table1, run_table1

    from pjd.models import default

    out = Path(args.out) / "e2e"
    out.mkdir(parents=True, exist_ok=True)
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    methods = [m for m in args.table1_methods.split(",") if m]
    rows = run_table1(default(), samples=args.table1_samples, batch=args.table1_batch, cfg_scale=args.cfg_scale,
                      seed=args.seed, out=out, device=device, methods=methods, minutes=args.table1_minutes)
    n = rows[0]["samples"]
    budget = f" --table1-minutes {args.table1_minutes}" if args.table1_minutes is not None else ""
    text = (f"Command: `python benchmarks/e2e.py --table1 --table1-samples {args.table1_samples} --table1-batch "
            f"{args.table1_batch} --cfg-scale {args.cfg_scale}{budget}`; device: {device}; default model (Fashion-MNIST, "
            f"16x16 tokens), **{n} images per row** ({n // 10} per class, the same classes and seeds in every row"
            f"{'; stopped by the time budget before ' + str(args.table1_samples) if n < args.table1_samples else ''}), "
            f"batches of {args.table1_batch}, rows interleaved chunk by chunk, CFG {args.cfg_scale}, seed {args.seed}. "
            "Wall seconds and speed-up are CPU figures (generation only, not scoring).\n\n" + markdown(rows, device))
    print("\n" + text)
    plots = plot_table1(rows, out)
    if args.docs:
        DOCS_DIR.mkdir(parents=True, exist_ok=True)
        for png in plots:
            shutil.copy(png, DOCS_DIR / png.name)
        update_docs("e2e table1", text)
    return dict(device=device, rows=rows)


if __name__ == "__main__":
    main()
