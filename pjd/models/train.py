"""Train the embedded default model: ``python -m pjd.models.train``.

Fits the palette, trains a class-conditional LlamaForCausalLM on 32×32 photo crops (sequence =
[class token] + 1,024 image tokens, raster order; 10% of class tokens replaced by the null class
for classifier-free guidance), prints held-out NLL per token against a unigram baseline, and
writes the assets the loader reads (``pjd/models/assets/``). Seeded; CPU-only by design.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from pjd.quality import nll_per_token, unigram_nll_per_token

from . import data
from .default import ASSETS, CONFIG_FILE, META_FILE, PALETTE_FILE, WEIGHTS_FILE
from .palette import Palette


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--palette-size", type=int, default=512)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-crops", type=int, default=96)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass (CPU)")
    p.add_argument("--out", type=Path, default=ASSETS, help="assets directory to write")
    p.add_argument("--log", type=Path, default=Path("out/train_log.tsv"), help="loss log (TSV)")
    p.add_argument("--no-save", action="store_true", help="throughput check: train, evaluate, write nothing")
    return p.parse_args(argv)


def fit_palette(sampler: data.CropSampler, k: int, seed: int) -> Palette:
    """k-means over 200k pixels of 2,000 training crops (equal share per class in expectation)."""
    rng = np.random.default_rng(seed)
    images, _ = sampler.sample(2000, rng)
    pixels = images.reshape(-1, 3)
    pixels = pixels[rng.choice(pixels.shape[0], 200_000, replace=False)]
    return Palette.fit(pixels, k, seed=seed)


def build_config(args, num_classes: int) -> LlamaConfig:
    k = args.palette_size
    return LlamaConfig(
        vocab_size=k + num_classes + 1,  # [0, K) image, [K, K+C) classes, K+C null class
        hidden_size=args.hidden,
        intermediate_size=int(8 / 3 * args.hidden / 32 + 0.5) * 32,  # SwiGLU 8/3 ratio, multiple of 32
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1 + data.HEIGHT * data.WIDTH,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    num_classes = len(data.CLASS_NAMES)

    train = data.CropSampler("train")
    palette = fit_palette(train, args.palette_size, args.seed)
    k, null_id = palette.size, palette.size + num_classes

    config = build_config(args, num_classes)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; palette K={k}; classes={num_classes}; threads={args.threads}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    args.log.parent.mkdir(parents=True, exist_ok=True)
    log = args.log.open("w")
    log.write("step\tloss\tlr\tseconds\n")
    model.train()
    start = time.time()
    bar = tqdm(range(args.steps), desc="train", mininterval=5)
    ema = None
    for step in bar:
        images, labels = train.sample(args.batch_size, rng)
        tokens = palette.encode(images).reshape(args.batch_size, -1)
        cls = torch.from_numpy(labels) + k
        cls = torch.where(torch.from_numpy(rng.random(args.batch_size) < args.class_dropout), null_id, cls)
        input_ids = torch.cat([cls[:, None], tokens], 1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=input_ids[:, :-1]).logits
        # Every position predicts the next image token (the class token is never a target).
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        log.write(f"{step}\t{loss.item():.4f}\t{lr_at(step, args):.2e}\t{time.time() - start:.1f}\n")
        log.flush()
    train_seconds = time.time() - start
    log.close()

    model.eval()
    images, labels = data.heldout_crops(args.eval_crops, seed=args.seed)
    tokens = palette.encode(images)
    prompts = torch.from_numpy(labels)[:, None] + k
    nll = torch.cat([nll_per_token(model, t, p, image_token_range=(0, k))
                     for t, p in zip(tokens.split(8), prompts.split(8))]).mean().item()
    base = unigram_nll_per_token(tokens, palette.counts).mean().item()
    print(f"train: {args.steps} steps x {args.batch_size} crops in {train_seconds / 60:.1f} min; "
          f"final train loss (EMA) {ema:.3f} nats/token")
    print(f"held-out NLL per token: {nll:.3f} nats ({nll / math.log(2):.3f} bits); "
          f"unigram palette baseline {base:.3f} nats ({base / math.log(2):.3f} bits); "
          f"{args.eval_crops} eval crops, seed {args.seed}")
    if args.no_save:
        return

    args.out.mkdir(parents=True, exist_ok=True)
    palette.save(args.out / PALETTE_FILE)
    config.to_json_file(args.out / CONFIG_FILE)
    # fp16 storage halves the file; the loader upcasts to fp32.
    save_file({n: t.detach().half().contiguous() for n, t in model.state_dict().items()}, args.out / WEIGHTS_FILE)
    meta = {
        "class_names": list(data.CLASS_NAMES),
        "height": data.HEIGHT, "width": data.WIDTH,
        "image_token_range": [0, k], "null_class_id": null_id,
        "training": {
            "command": " ".join(["python -m pjd.models.train", *(sys.argv[1:] if argv is None else argv)]),
            # Paths are machine-specific; the command line above has them if they were given.
            "args": {key: v for key, v in vars(args).items() if key not in ("out", "log", "no_save")},
            "parameters": n_params, "seconds": round(train_seconds), "final_train_loss_ema": round(ema, 4),
            "heldout_nll_per_token": round(nll, 4), "unigram_nll_per_token": round(base, 4),
            "eval_crops": args.eval_crops,
        },
    }
    (args.out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
