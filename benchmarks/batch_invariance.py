"""Is an image independent of its batch? The model forward's numerics, then pjd.generate's tokens.

pjd's randomness is per image (pjd.rng), so an image decoded in a batch and alone gets the same
random numbers; its tokens are then equal exactly when the model gives it bit-identical logits in
both batches. This prints, for one model on this device:

1. the largest |logit difference| of each sequence between a batch-B forward and a batch-1 forward
   (plain Hugging Face forward, random image tokens);
2. for each image of a batch decoded by ``pjd.generate``, how many tokens differ from the same image
   decoded alone (same seed and image index).

    python benchmarks/batch_invariance.py --model default --batch 8 --method pjd
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

import pjd


def logit_differences(model, prompt: torch.Tensor, lo: int, hi: int, length: int, seed: int) -> list[float]:
    """Per sequence: max |logits(batch) - logits(alone)| over ``prompt + length`` random image tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([prompt.cpu(), torch.randint(lo, hi, (prompt.shape[0], length), generator=g)], 1).to(prompt.device)
    with torch.no_grad():
        batch = model(input_ids=ids).logits
        return [float((model(input_ids=ids[i:i + 1]).logits[0] - batch[i]).abs().max()) for i in range(ids.shape[0])]


def token_differences(dm, batch: int, method: str, cfg_scale: float, seed: int) -> list[dict]:
    index = torch.arange(batch)
    classes = index % len(dm.class_names)
    kw = dict(height=dm.height, width=dm.width, image_token_range=dm.image_token_range, method=method,
              cfg_scale=cfg_scale, seed=seed)

    def run(sel):
        uncond = dm.null_prompt(len(sel)) if cfg_scale != 1 else None
        with torch.no_grad():
            return pjd.generate(dm.model, dm.prompt(classes[sel]), uncond_input_ids=uncond, image_index=index[sel], **kw)

    together = run(index)
    rows = []
    for i in range(batch):
        alone = run(index[i:i + 1])
        rows.append(dict(image=i, tokens_differing=int((alone.tokens[0] != together.tokens[i]).sum()),
                         steps_in_batch=int(together.steps_per_image[i]), steps_alone=alone.steps))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", choices=["default", "tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--method", default="pjd", choices=pjd.METHODS)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.batch < 2:
        p.error("--batch must be >= 2")
    torch.set_num_threads(args.threads)
    from pjd.sample import load_model

    dm = load_model(args.model, torch.device("cpu"))
    lo, hi = dm.image_token_range
    logits = logit_differences(dm.model, dm.prompt(torch.arange(args.batch) % len(dm.class_names)), lo, hi,
                               dm.height * dm.width, args.seed)
    tokens = token_differences(dm, args.batch, args.method, args.cfg_scale, args.seed)
    device = f"CPU ({platform.machine()}, {args.threads} threads)"
    print(f"{args.model} model, {device}, batch {args.batch} vs 1")
    print(f"forward: max |logit difference| {max(logits):.3g}; sequences with any difference: "
          f"{sum(d > 0 for d in logits)}/{args.batch}")
    print(f"pjd.generate ({args.method}, cfg {args.cfg_scale}): images with any token differing: "
          f"{sum(r['tokens_differing'] > 0 for r in tokens)}/{args.batch}")
    result = dict(model=args.model, device=device, batch=args.batch, method=args.method, logit_max_abs_diff=logits,
                  images=tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
