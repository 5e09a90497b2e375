"""Steps per image of a row-parallel method on the embedded default model: mean ± s.e. and NLL.

The papers' speed figure is the batch-1 step count of each image. This script decodes n images in
chunks of ``--batch`` (image i: class i mod the number of classes; chunk c: seed ``--seed`` + c, so
two runs with the same arguments use the same prompts and seeds), at the method's defaults with
CFG, and reports the mean steps per image (``GenerationResult.steps_per_image``) and the mean NLL
per image token under the model (pjd.quality.nll_per_token), each ± its standard error over images.

It uses only the public API, so the same command run with another checkout's environment measures
that checkout (issue 12's before/after: ``/path/to/other/.venv/bin/python benchmarks/steps_per_image.py``).
It reports no time: steps and NLL do not depend on the device, and a time needs pjd.timing's
warm-up, which older checkouts lack (benchmarks/e2e.py times decoding).

Usage: python benchmarks/steps_per_image.py [--method pjd] [--n 200] [--batch 1] [--seed 0]
       [--cfg-scale 3] [--out bench_out/steps_per_image_<method>.json]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import pjd
from pjd.models import default
from pjd.quality import nll_per_token


def mean_sem(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / len(x) ** 0.5) if len(x) > 1 else float("nan")


def measure(method: str, n: int, batch: int, seed: int, cfg_scale: float, log=None) -> dict:
    """Decode n images in chunks; ``log(row)`` (if given) gets the summary so far after each chunk."""
    dm = default()
    steps, nll = [], []

    def summary() -> dict:
        all_steps, all_nll = torch.cat(steps), torch.cat(nll)
        (s, s_se), (q, q_se) = mean_sem(all_steps), mean_sem(all_nll)
        return dict(method=method, n=len(all_steps), batch=batch, seed=seed, cfg_scale=cfg_scale,
                    grid=f"{dm.height}x{dm.width}", pjd_file=pjd.__file__,
                    device=f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
                    steps_mean=s, steps_sem=s_se, per_image_compression=dm.height * dm.width / s,
                    nll_mean=q, nll_sem=q_se,
                    steps_per_image=all_steps.tolist(), nll_per_image=all_nll.tolist())

    for c, first in enumerate(range(0, n, batch)):
        classes = torch.arange(first, min(first + batch, n)) % len(dm.class_names)
        prompt = dm.prompt(classes)
        with torch.no_grad():
            r = pjd.generate(dm.model, prompt, height=dm.height, width=dm.width, method=method,
                             image_token_range=dm.image_token_range, cfg_scale=cfg_scale,
                             uncond_input_ids=dm.null_prompt(len(classes)) if cfg_scale != 1 else None,
                             seed=seed + c)
        steps.append(r.steps_per_image.cpu())
        nll.append(nll_per_token(dm.model, r.tokens, prompt, image_token_range=dm.image_token_range).cpu())
        if log is not None:
            log(summary())
    return summary()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["pjd", "zipar", "sjd", "sjd++", "ar"], default="pjd")
    p.add_argument("--n", type=int, default=200, help="images (>= 2 for a standard error)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        p.error(f"--n and --batch must be >= 1, got {args.n} and {args.batch}")
    out = Path(args.out or f"bench_out/steps_per_image_{args.method.replace('+', 'p')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(partial):  # a long run can be read (or cut short) at any chunk
        out.write_text(json.dumps(partial, indent=1))
        print(f"  {partial['n']} images: steps / image {partial['steps_mean']:.1f} ± {partial['steps_sem']:.1f}",
              flush=True)

    row = measure(args.method, args.n, args.batch, args.seed, args.cfg_scale, log)
    print(f"{row['method']} on {row['grid']} (n = {row['n']}, batch {row['batch']}, CFG {row['cfg_scale']}, "
          f"seed {row['seed']}, {row['device']}, pjd from {row['pjd_file']}):\n"
          f"  steps / image {row['steps_mean']:.1f} ± {row['steps_sem']:.1f} "
          f"(per-image compression {row['per_image_compression']:.2f}x)\n"
          f"  NLL / token   {row['nll_mean']:.3f} ± {row['nll_sem']:.3f}")
    return row


if __name__ == "__main__":
    main()
