"""The paper's Table 1 on the embedded Fashion-MNIST model: speed and quality of every method.

Rows: ar, sjd, sjd with coupled draws / continuation / both (issue 22; named "sjd+coupled",
"sjd+continuation", "sjd+coupled+continuation"), sjd++, zipar (its default c = width/4) and pjd over
several contexts c (its default c = width/8, width/4, width/2 and width). Every row decodes the same classes (``samples`` images, equal count per class, class
i % 10) in the same chunks with the same seeds, the rows interleaved chunk by chunk. Columns: steps per image, step compression
(``H*W / steps per image``, the paper's batch-1 figure), wall-clock seconds and speed-up over ar
(CPU here: labelled with the device), FID against the test split and class accuracy (the shipped
classifier, pjd.quality) each with a 95% percentile-bootstrap interval, and the model's own NLL per
token (mean ± standard error). The JSON is rewritten after every chunk round, so a run cut short
(or stopped by its time budget) keeps every row at the same sample count. Wall seconds are those of
the timed decodes only: each row's configuration (and a smaller last chunk's) runs once untimed
first (pjd.timing.WarmUp; listed under "warm_up" in the JSON), so compilation is never counted.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pjd.plan import DEFAULT_CONTEXT_FRACTION
from pjd.timing import WarmUp

from _report import pyplot  # benchmarks/ is on sys.path (e2e.py puts it there)


def default_context(method: str, width: int) -> int:
    """The context pjd.generate uses for ``method`` when none is given (pjd.plan)."""
    return max(1, round(width * DEFAULT_CONTEXT_FRACTION[method]))


def table1_rows(width: int, contexts=None) -> list[tuple[str, dict]]:
    """(method, extra generate() kwargs) of each row, in run order: pjd at its default context comes
    right after the baselines, so a run cut short still has the main comparison."""
    default_c = default_context("pjd", width)
    contexts = contexts or [default_c] + sorted({2, width // 4, width // 2, width} - {default_c})
    exact_options = [{"coupled_draws": True}, {"continuation": True}, {"coupled_draws": True, "continuation": True}]
    return ([("ar", {}), ("sjd", {})] + [("sjd", kw) for kw in exact_options]
            + [("sjd++", {}), ("zipar", {"context": default_context("zipar", width)})]
            + [("pjd", {"context": c}) for c in contexts])


def row_name(method: str, kw: dict) -> str:
    """A row's name: the method, then "+coupled" / "+continuation" for the issue-22 options it sets."""
    return method + "".join(f"+{tag}" for key, tag in (("coupled_draws", "coupled"), ("continuation", "continuation"))
                            if kw.get(key))


class Row:
    """One table row's accumulated samples: tokens, per-image steps, NLL, classifier features and
    class hits (scored once per chunk, so a round's summary costs no more as the row grows),
    generation seconds."""

    def __init__(self, method: str, kw: dict):
        self.method, self.kw, self.name = method, kw, row_name(method, kw)
        self.tokens, self.steps, self.nll, self.feats, self.correct, self.seconds = [], [], [], [], [], 0.0

    def decode_chunk(self, dm, labels: torch.Tensor, *, cfg_scale: float, seed: int, warm: WarmUp) -> None:
        from pjd.quality import class_correct, classifier_features, nll_per_token

        prompt = dm.prompt(labels)
        with torch.no_grad():
            r = warm.generate(dm.model, prompt, height=dm.height, width=dm.width, method=self.method,
                              image_token_range=dm.image_token_range, cfg_scale=cfg_scale,
                              uncond_input_ids=dm.null_prompt(len(labels)) if cfg_scale != 1 else None,
                              seed=seed, progress=False, **self.kw)
        self.seconds += r.wall_seconds
        self.tokens.append(r.tokens.cpu())
        self.steps.append(r.steps_per_image.double().cpu())
        self.nll.append(nll_per_token(dm.model, r.tokens, prompt, image_token_range=dm.image_token_range).double())
        images = dm.decode(r.tokens)
        self.feats.append(classifier_features(images))
        self.correct.append(class_correct(images, labels).double())

    def summary(self, dm, *, seed: int, n_boot: int = 200) -> dict:
        from pjd.quality import bootstrap_ci, fid

        tokens, steps, nll = torch.cat(self.tokens), torch.cat(self.steps), torch.cat(self.nll)
        feats, correct = torch.cat(self.feats), torch.cat(self.correct)
        per_image = float(steps.mean())
        return dict(method=self.name, **self.kw, samples=len(tokens), steps_per_image=per_image,
                    step_compression=dm.height * dm.width / per_image, seconds=self.seconds,
                    fid=fid(feats), fid_ci=bootstrap_ci(feats, fid, n_boot=n_boot, seed=seed),
                    class_accuracy=float(correct.mean()),
                    class_accuracy_ci=bootstrap_ci(correct, lambda v: float(v.mean()), n_boot=n_boot, seed=seed),
                    nll_per_token=float(nll.mean()), nll_sem=float(nll.std() / len(nll) ** 0.5))


def row_key(name: str, kw: dict) -> str:
    """A row's key in --table1-methods and in the tokens file: ``pjd:4`` (name:context) or ``sjd+coupled``."""
    return f"{name}:{kw['context']}" if "context" in kw else name


def selected(method: str, kw: dict, methods) -> bool:
    """Whether --table1-methods (row names, every context of pjd with ``pjd``, or ``name:context`` for
    one row) selects the row."""
    name = row_name(method, kw)
    return not methods or name in methods or row_key(name, kw) in methods


def merge_rows(previous: list[dict], new: list[dict], note: str, width: int) -> list[dict]:
    """The rows of this run, plus the rows of a previous table1.json that this run did not decode
    (same method and context), those marked ``reused: note`` (their figures, speed-up included,
    are the previous run's). Order: Table 1's (table1_rows), then any other previous rows."""
    ran = {row_key(r["method"], r): r for r in new}
    kept = {row_key(r["method"], r): {**r, "reused": r.get("reused") or note}
            for r in previous if row_key(r["method"], r) not in ran}
    merged = {**kept, **ran}
    default_c = default_context("pjd", width)
    contexts = [default_c] + sorted({r["context"] for r in merged.values() if r["method"] == "pjd"} - {default_c})
    order = [row_key(row_name(m, kw), kw) for m, kw in table1_rows(width, contexts)]
    return [merged[k] for k in order if k in merged] + [r for k, r in merged.items() if k not in order]


def run_table1(dm, *, samples: int, batch: int, cfg_scale: float, seed: int, out: Path, device: str,
               contexts=None, methods=None, minutes: float | None = None) -> list[dict]:
    """Decode chunk by chunk, every row in turn within a chunk (chunk i: classes i*batch.. % 10,
    seed ``seed + i``), so all rows always hold the same images' worth of samples and share the
    machine's load alike. ``minutes``: stop after the chunk round that passes this budget (the
    sample count actually reached is in every row). The JSON and tokens are rewritten per round."""
    if samples % 10 or samples < 10 or batch % 10 or batch < 10:
        raise ValueError(f"samples and batch must be positive multiples of 10 (equal count per class), "
                         f"got samples={samples}, batch={batch}")
    labels = torch.arange(samples) % len(dm.class_names)
    rows = [Row(m, kw) for m, kw in table1_rows(dm.width, contexts) if selected(m, kw, methods)]
    if not rows:
        raise ValueError(f"--table1-methods {methods} selects no Table-1 row")
    start, summaries, warm = time.time(), [], WarmUp()
    for i, first in enumerate(range(0, samples, batch)):
        for row in rows:
            row.decode_chunk(dm, labels[first:first + batch], cfg_scale=cfg_scale, seed=seed + i, warm=warm)
        summaries = [row.summary(dm, seed=seed) for row in rows]
        ar = next((r["seconds"] for r in summaries if r["method"] == "ar"), None)
        for r in summaries:
            r["speedup"] = ar / r["seconds"] if ar else None
        (out / "table1.json").write_text(json.dumps(dict(device=device, samples=summaries[0]["samples"], batch=batch,
                                                         cfg_scale=cfg_scale, seed=seed, rows=summaries,
                                                         warm_up=warm.log), indent=2))
        torch.save({row_key(r.name, r.kw): torch.cat(r.tokens).short() for r in rows},
                   out / "table1_tokens.pt")
        print(f"round {i}: {summaries[0]['samples']} images per row, {time.time() - start:.0f}s", flush=True)
        for r in summaries:
            print(f"  {r['method']:24s} {r.get('context', ''):>3}  {format_row(r)}", flush=True)
        if minutes is not None and time.time() - start > minutes * 60:
            break
    return summaries


def format_row(r: dict) -> str:
    return (f"steps/img {r['steps_per_image']:.1f}  compression {r['step_compression']:.2f}  "
            f"FID {r['fid']:.2f} [{r['fid_ci'][0]:.2f}, {r['fid_ci'][1]:.2f}]  "
            f"acc {r['class_accuracy']:.3f} [{r['class_accuracy_ci'][0]:.3f}, {r['class_accuracy_ci'][1]:.3f}]  "
            f"NLL {r['nll_per_token']:.3f}±{r['nll_sem']:.3f}  {r['seconds']:.0f}s")


def markdown(rows: list[dict], device: str) -> str:
    head = ("| method | c | samples | steps / image | step compression | wall s | speed-up (" + device + ") | "
            "FID [95% CI] | class accuracy [95% CI] | NLL / token (± s.e.) |\n|" + "---|" * 10 + "\n")
    lines = []
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(f"| {r['method']}{' †' if r.get('reused') else ''} | {r.get('context', '-')} | {r['samples']} | {r['steps_per_image']:.1f} | "
                     f"{r['step_compression']:.2f}x | {r['seconds']:.0f} | {speed} | {r['fid']:.2f} "
                     f"[{r['fid_ci'][0]:.2f}, {r['fid_ci'][1]:.2f}] | {r['class_accuracy']:.3f} "
                     f"[{r['class_accuracy_ci'][0]:.3f}, {r['class_accuracy_ci'][1]:.3f}] | "
                     f"{r['nll_per_token']:.3f} ± {r['nll_sem']:.3f} |")
    notes = sorted({r["reused"] for r in rows if r.get("reused")})
    return head + "\n".join(lines) + "\n" + "".join(f"\n† {note}\n" for note in notes)


def plot_table1(rows: list[dict], out: Path) -> list[Path]:
    """Step compression vs c (pjd, zipar) and FID vs step compression (every row), as PNG (matplotlib:
    the optional ``bench`` extra; without it, no plots and a message)."""
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in ("pjd", "zipar"):
        pts = sorted((r["context"], r["step_compression"]) for r in rows if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    for m in ("sjd", "sjd++"):
        r = next((r for r in rows if r["method"] == m), None)
        if r:
            ax.axhline(r["step_compression"], ls="--", lw=1, color="gray")
            ax.annotate(m, (ax.get_xlim()[0], r["step_compression"]), fontsize=8, va="bottom")
    ax.set(xlabel="context c (committed tokens before the next row starts)", ylabel="step compression (x)",
           title="Step compression vs context c")
    if ax.get_legend_handles_labels()[0]:  # no pjd / zipar row: nothing to label
        ax.legend()
    fig.tight_layout()
    paths.append(out / "table1_compression_vs_context.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        label = r["method"] + (f" c={r['context']}" if "context" in r else "")
        # The bootstrap interval need not contain the point estimate (FID of a resample with
        # duplicates is biased up), so it is drawn as its own segment, not as +- error bars.
        ax.vlines(r["step_compression"], *r["fid_ci"], color="gray", lw=2)
        ax.plot(r["step_compression"], r["fid"], "o")
        ax.annotate(label, (r["step_compression"], r["fid"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="step compression (x)", ylabel="FID (classifier features; 95% CI)", title="FID vs step compression")
    fig.tight_layout()
    paths.append(out / "table1_fid_vs_compression.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
