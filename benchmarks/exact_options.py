"""Issue 22's exact options beside sjd, sjd++, pjd and ar on the embedded default model: steps and wall time.

Configurations: ar, sjd, sjd + coupled draws, sjd + continuation, sjd + both, sjd++, pjd (defaults,
CFG 3). Every configuration decodes the same images (image i: class i mod 10, chunk c of --batch-steps
images: seed --seed + c).

  steps  steps per image of --n images (an image's steps do not depend on its batch: pjd.rng), mean
         ± s.e., the mean paired difference to sjd on the same images ± its s.e., and the mean NLL
         per image token under the model (pjd.quality.nll_per_token) ± s.e.
  wall   CPU wall time per image at batch 1 (--wall-images images, one per call) and batch 8, the
         configurations interleaved call by call, --repeats rounds after an untimed warm-up of each
         configuration (pjd.timing.WarmUp): median seconds per image and ratios to sjd and ar.

Usage: OMP_NUM_THREADS=1 python benchmarks/exact_options.py [--n 200] [--batch-steps 20] [--wall-images 10]
       [--repeats 2] [--seed 0] [--out bench_out/exact_options.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

CONFIGS = {
    "ar": ("ar", {}),
    "sjd": ("sjd", {}),
    "sjd+coupled": ("sjd", {"coupled_draws": True}),
    "sjd+continuation": ("sjd", {"continuation": True}),
    "sjd+coupled+continuation": ("sjd", {"coupled_draws": True, "continuation": True}),
    "sjd++": ("sjd++", {}),
    "pjd": ("pjd", {}),
}
EXACT = {"ar", "sjd", "sjd+coupled", "sjd+continuation", "sjd+coupled+continuation"}


def _decode(dm, warm, name, classes, seed, cfg_scale):
    method, kw = CONFIGS[name]
    prompt = dm.prompt(classes)
    with torch.no_grad():
        return warm.generate(dm.model, prompt, height=dm.height, width=dm.width, method=method,
                             image_token_range=dm.image_token_range, cfg_scale=cfg_scale,
                             uncond_input_ids=dm.null_prompt(len(classes)), seed=seed, **kw), prompt


def mean_sem(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / len(x) ** 0.5)


def steps_table(dm, warm, n, batch, seed, cfg_scale) -> list[dict]:
    from pjd.quality import nll_per_token

    steps, nll = {name: [] for name in CONFIGS}, {name: [] for name in CONFIGS}
    for c, first in enumerate(range(0, n, batch)):
        classes = torch.arange(first, min(first + batch, n)) % len(dm.class_names)
        for name in CONFIGS:
            r, prompt = _decode(dm, warm, name, classes, seed + c, cfg_scale)
            steps[name].append(r.steps_per_image.double())
            nll[name].append(nll_per_token(dm.model, r.tokens, prompt, image_token_range=dm.image_token_range).double())
    base = torch.cat(steps["sjd"])
    rows = []
    for name in CONFIGS:
        s, q = torch.cat(steps[name]), torch.cat(nll[name])
        (sm, sse), (qm, qse), (dm_, dse) = mean_sem(s), mean_sem(q), mean_sem(s - base)
        rows.append(dict(config=name, exact=name in EXACT, n=len(s), steps_mean=sm, steps_sem=sse,
                         compression=dm.height * dm.width / sm, steps_minus_sjd=dm_, steps_minus_sjd_sem=dse,
                         nll_mean=qm, nll_sem=qse))
    return rows


def wall_table(dm, warm, batch, images, repeats, seed, cfg_scale) -> list[dict]:
    calls = [torch.arange(i, i + batch) % len(dm.class_names) for i in range(0, images, batch)]
    for name in CONFIGS:  # warm-up of each configuration (and the first-call costs), untimed
        _decode(dm, warm, name, calls[0], seed, cfg_scale)
    times = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for c, classes in enumerate(calls):
            for name in CONFIGS:  # interleaved: load hits every configuration alike
                t0 = time.perf_counter()
                _decode(dm, warm, name, classes, seed + c, cfg_scale)
                times[name].append((time.perf_counter() - t0) / batch)
    med = {name: statistics.median(t) for name, t in times.items()}
    return [dict(config=name, batch=batch, calls=len(times[name]), median_s_per_image=med[name],
                 vs_sjd=med["sjd"] / med[name], vs_ar=med["ar"] / med[name]) for name in CONFIGS]


def markdown(steps: list[dict], walls: dict[int, list[dict]]) -> str:
    lines = ["| config | exact | steps / image (± s.e.) | step compression | steps − sjd's, same images (± s.e.) | "
             "NLL / token (± s.e.) | " + " | ".join(f"s / image, batch {b} (vs sjd, vs ar)" for b in walls) + " |",
             "|" + "---|" * (6 + len(walls))]
    for r in steps:
        wall = [next(w for w in walls[b] if w["config"] == r["config"]) for b in walls]
        lines.append(f"| {r['config']} | {'yes' if r['exact'] else 'no'} | {r['steps_mean']:.1f} ± {r['steps_sem']:.1f} | "
                     f"{r['compression']:.2f}x | {r['steps_minus_sjd']:+.1f} ± {r['steps_minus_sjd_sem']:.1f} | "
                     f"{r['nll_mean']:.3f} ± {r['nll_sem']:.3f} | "
                     + " | ".join(f"{w['median_s_per_image']:.3f} ({w['vs_sjd']:.2f}x, {w['vs_ar']:.2f}x)" for w in wall)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="images of the steps table")
    p.add_argument("--batch-steps", type=int, default=20, help="images decoded together for the steps table")
    p.add_argument("--wall-images", type=int, default=8, help="images per round of the batch-1 timing (and batch 8)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--out", default="bench_out/exact_options.json")
    args = p.parse_args(argv)
    if args.n < 2 or args.batch_steps < 1 or args.wall_images < 8 or args.wall_images % 8 or args.repeats < 1:
        p.error("--n >= 2, --batch-steps >= 1, --wall-images a positive multiple of 8, --repeats >= 1")
    from pjd.models import default
    from pjd.timing import WarmUp

    dm, warm = default(), WarmUp()
    device = (f"CPU ({platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f} at start)")
    t0 = time.time()
    steps = steps_table(dm, warm, args.n, args.batch_steps, args.seed, args.cfg_scale)
    walls = {b: wall_table(dm, warm, b, args.wall_images, args.repeats, args.seed, args.cfg_scale) for b in (1, 8)}
    report = dict(device=device, seconds=time.time() - t0, args=vars(args), steps=steps, wall=walls,
                  load_average_end=os.getloadavg()[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"device: {device}; {time.time() - t0:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    print(markdown(steps, walls))
    return report


if __name__ == "__main__":
    main()
