"""Leading token of a fresh row, row 0 first, context and window of pjd / zipar on the embedded model.

Issue 21's measurement: every configuration decodes the same classes (image i: class i mod 10) in
the same chunks with the same seeds (chunk j: ``--seed`` + j), configurations interleaved chunk by
chunk, and is scored as Table 1 scores its rows (benchmarks/_table1.py: FID on the shipped
classifier's features with a 95% bootstrap interval, class accuracy, the model's NLL per token,
steps per image) plus two measures of the first column, where a wrong leading token shows: the
model's teacher-forced log-probability of the tokens (r, 0), r >= 1 (``col0_logp``, nats), and the
mean pixel of the decoded images' left border (``left_pixel``, 0-255; Fashion-MNIST borders are dark).
No time is reported (steps and quality do not depend on the device). The JSON is rewritten after
every chunk round.

A configuration is a method followed by generate() keyword arguments, configurations separated by
``;``, e.g. ``"ar; pjd context=4 row_lead=above row0_first=False; pjd context=2 window=5"``.

Usage: python benchmarks/row_lead.py --configs "..." [--samples 300] [--batch 20] [--seed 0]
       [--cfg-scale 3] [--out bench_out/row_lead.json]
       python benchmarks/row_lead.py --report bench_out/row_lead.json   (its markdown table)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pjd  # noqa: E402
from _table1 import Row, format_row  # noqa: E402


def parse_configs(text: str) -> list[tuple[str, dict]]:
    """``"pjd context=4 row0_first=False; ar"`` -> [("pjd", {"context": 4, "row0_first": False}), ("ar", {})]."""
    def value(v: str):
        if v in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[v]
        try:
            return int(v)
        except ValueError:
            return v
    configs = []
    for part in (p.split() for p in text.split(";") if p.strip()):
        if any("=" not in kv for kv in part[1:]):
            raise SystemExit(f"--configs: expected 'method key=value ...', got {' '.join(part)!r}")
        configs.append((part[0], {k: value(v) for k, v in (kv.split("=", 1) for kv in part[1:])}))
    return configs


def first_column(dm, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: mean log-probability of the tokens (r, 0), r >= 1, and mean left-border pixel."""
    lo, hi = dm.image_token_range
    ids = torch.cat([dm.prompt(labels), tokens.reshape(len(labels), -1)], 1)
    with torch.no_grad():
        logp = dm.model(input_ids=ids).logits[:, :-1, lo:hi].float().log_softmax(-1)
    logp = logp.gather(-1, (ids[:, 1:] - lo)[..., None]).view(len(labels), dm.height, dm.width)
    return logp[:, 1:, 0].mean(1).double(), dm.decode(tokens)[:, :, 0].double().mean(1)


class _Untimed:
    """Row.decode_chunk's warm-up hook, doing no warm-up: nothing here is timed."""

    @staticmethod
    def generate(*args, **kwargs):
        return pjd.generate(*args, **kwargs)


def markdown(report: dict) -> str:
    """The table of a row_lead.json: one line per configuration."""
    lines = ["| configuration | steps / image | step compression | FID [95% CI] | class accuracy [95% CI] | "
             "NLL / token | first-column log p (nats, ± s.e.) | left-border pixel |", "|" + "---|" * 8]
    for r in report["rows"]:
        config = " ".join([r["method"]] + [f"{k}={r[k]}" for k in ("context", "window", "row_lead", "row0_first")
                                           if k in r])
        lines.append(f"| {config} | {r['steps_per_image']:.1f} | {r['step_compression']:.2f}x | {r['fid']:.1f} "
                     f"[{r['fid_ci'][0]:.1f}, {r['fid_ci'][1]:.1f}] | {r['class_accuracy']:.3f} "
                     f"[{r['class_accuracy_ci'][0]:.3f}, {r['class_accuracy_ci'][1]:.3f}] | {r['nll_per_token']:.3f} | "
                     f"{r['col0_logp']:.2f} ± {r['col0_sem']:.2f} | {r['left_pixel']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs")
    p.add_argument("--report", default=None, help="print the markdown table of this row_lead.json and exit")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--out", default="bench_out/row_lead.json")
    args = p.parse_args(argv)
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())), end="")
        return []
    if not args.configs:
        p.error("--configs is required (or --report)")
    from pjd.models import default

    dm, configs = default(), parse_configs(args.configs)
    rows = [Row(method, kw) for method, kw in configs]
    extra = [dict(col0=[], left=[]) for _ in rows]
    labels = torch.arange(args.samples) % len(dm.class_names)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    summaries = []
    for j, first in enumerate(range(0, args.samples, args.batch)):
        chunk = labels[first:first + args.batch]
        for row, ex in zip(rows, extra):
            row.decode_chunk(dm, chunk, cfg_scale=args.cfg_scale, seed=args.seed + j, warm=_Untimed())
            col0, left = first_column(dm, row.tokens[-1], chunk)
            ex["col0"].append(col0)
            ex["left"].append(left)
        summaries = []
        for row, ex in zip(rows, extra):
            r = row.summary(dm, seed=args.seed)
            del r["seconds"]
            col0, left = torch.cat(ex["col0"]), torch.cat(ex["left"])
            r.update(col0_logp=float(col0.mean()), col0_sem=float(col0.std() / len(col0) ** 0.5),
                     left_pixel=float(left.mean()))
            summaries.append(r)
        out.write_text(json.dumps(dict(device=device, samples=summaries[0]["samples"], batch=args.batch,
                                       cfg_scale=args.cfg_scale, seed=args.seed, configs=args.configs,
                                       rows=summaries), indent=2))
        print(f"round {j}: {summaries[0]['samples']} images per configuration", flush=True)
        for (method, kw), r in zip(configs, summaries):
            print(f"  {method:6s} {kw}  {format_row({**r, 'seconds': 0})}  col0 {r['col0_logp']:.2f}  "
                  f"left {r['left_pixel']:.0f}", flush=True)
    return summaries


if __name__ == "__main__":
    main()
