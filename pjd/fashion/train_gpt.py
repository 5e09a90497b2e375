"""Train the default model's GPT: ``python -m pjd.fashion.train_gpt [--data DIR]``.

Tokenizes the Fashion-MNIST training split once with the shipped VQ tokenizer (``vq.safetensors``,
train it first), then trains a class-conditional LlamaGen GPT (``pjd.models.llamagen``'s
``LlamaGenForCausalLM``: LlamaGen's architecture with its 2-D RoPE) on ``[class token] + 256 image
tokens`` in raster order: cross-entropy on every image token, 10% of class labels replaced by the
null class (classifier-free guidance), AdamW, linear warm-up then cosine decay to 10%, gradient
clipping, fp32 (``--bf16`` for autocast), LlamaGen's zero-initialised output layer. Prints the held-out NLL
per token on test images and writes ``gpt.pt`` in LlamaGen's release layout
(``{"model": state_dict}``, fp16) through ``llamagen_state_dict``, which ``load_llamagen`` reads
back like any release checkpoint.

``--minutes M`` sizes the schedule to a time budget: steps 3-7 are timed and ``--steps``
becomes what fits in M minutes. The number used is printed and stored in ``meta.json``;
``--steps N`` (without ``--minutes``) repeats that run exactly. Needs the dataset
(``apt-get install dataset-fashion-mnist``); seeded; CPU.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .assets import ASSETS, GPT_FILE, update_meta
from .idx import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist

NUM_CLASSES = len(CLASS_NAMES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--minutes", type=float, default=None, help="fit --steps to this time budget (see above)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (was slower than fp32 at these sizes here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=1000, help="test images for the held-out NLL")
    p.add_argument("--tokens-cache", type=Path, default=Path("out/fashion_tokens.pt"),
                   help="where the tokenized splits are cached (rebuilt when the VQ weights change)")
    p.add_argument("--out", type=Path, default=ASSETS, help="assets folder: reads vq.safetensors, writes gpt.pt")
    p.add_argument("--resume", type=Path, default=None,
                   help="start from this gpt.pt (LlamaGen layout, same --dim/--layers/--heads), e.g. the shipped "
                        "pjd/fashion/assets/gpt.pt; the optimizer and schedule start afresh")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def tokenized_splits(data: Path, assets: Path, cache: Path) -> dict:
    """``{"train": (tokens int16 [60000, 256], labels), "test": (...)}`` with the shipped VQ tokenizer."""
    from .default import load_tokenizer

    vq_stamp = (assets / "vq.safetensors").stat().st_mtime_ns
    if cache.exists():
        cached = torch.load(cache)
        if cached.get("vq_stamp") == vq_stamp:
            return cached
    vq = load_tokenizer(assets)
    out = {"vq_stamp": vq_stamp}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(data, split)
        start = time.time()
        tokens = vq.encode(torch.from_numpy(images)).reshape(len(images), -1).short()
        print(f"tokenized {split}: {tuple(tokens.shape)} in {time.time() - start:.0f}s", flush=True)
        out[split] = (tokens, torch.from_numpy(labels))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def inputs(tokens: torch.Tensor, labels: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``[class token] + tokens[:-1]`` (class c is vocabulary id ``codebook_size + c``): the output at
    position t predicts image token t."""
    return torch.cat([codebook_size + labels[:, None], tokens[:, :-1]], dim=1)


@torch.no_grad()
def heldout_nll(model, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean NLL (nats/token) of test token grids given their class (teacher-forced, fp32)."""
    model.eval()
    total, k = 0.0, model.config.codebook_size
    for i in range(0, tokens.shape[0], 100):
        t, y = tokens[i:i + 100].long(), labels[i:i + 100]
        logits = model(input_ids=inputs(t, y, k)).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum").item()
    model.train()
    return total / tokens.numel()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    splits = tokenized_splits(args.data, args.out, args.tokens_cache)
    train_t, train_y = splits["train"]
    test_t, test_y = (t[:args.eval_images] for t in splits["test"])
    from pjd.models.llamagen import LlamaGenForCausalLM, llamagen_config, llamagen_state_dict

    arch = dict(n_layer=args.layers, n_head=args.heads, dim=args.dim)
    k = _codebook_size(args.out)
    config = llamagen_config(arch, codebook_size=k, num_classes=NUM_CLASSES, grid_size=16)
    model = LlamaGenForCausalLM(config).train()
    torch.nn.init.zeros_(model.lm_head.weight)  # LlamaGen's initialisation of its output layer
    if args.resume is not None:
        from pjd.models.llamagen import load_llamagen

        start_from = load_llamagen(args.resume, gpt_model=arch, image_size=32, downsample=2)
        model.load_state_dict(start_from.state_dict())
        print(f"resumed from {args.resume}: held-out NLL {heldout_nll(model, test_t, test_y):.4f}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    print(f"GPT {arch}, codebook {k}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    start, steps = time.time(), args.steps
    step = 0
    while step < steps:
        if args.minutes is not None and step == 3:
            timed = time.time()  # steps 0-2 include one-time warm-up costs
        if args.minutes is not None and step == 8:
            per_step = (time.time() - timed) / 5
            steps = max(9, int((args.minutes * 60 - (time.time() - start)) / per_step) + 8)
            print(f"--minutes {args.minutes}: {per_step:.2f} s/step -> {steps} steps", flush=True)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, train_t.shape[0], (args.batch_size,), generator=gen)
        tokens, labels = train_t[idx].long(), train_y[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.class_dropout
        labels[drop] = NUM_CLASSES  # the null class
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=inputs(tokens, labels, k)).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  lr {lr:.2e}  {time.time() - start:.0f}s", flush=True)
        step += 1
    train_seconds = time.time() - start
    nll = heldout_nll(model, test_t, test_y)
    counts = torch.bincount(train_t.flatten().long(), minlength=k).double() + 1
    unigram = float(-(counts / counts.sum()).log()[test_t.flatten().long()].mean())
    report = dict(heldout_nll_per_token=round(nll, 4), unigram_nll_per_token=round(unigram, 4),
                  eval_images=int(test_t.shape[0]), train_steps=steps, batch_size=args.batch_size,
                  images_seen=steps * args.batch_size, lr=args.lr, class_dropout=args.class_dropout,
                  train_seconds=round(train_seconds, 1), threads=args.threads,
                  parameters=sum(p.numel() for p in model.parameters()),
                  **({"resumed_from": str(args.resume)} if args.resume is not None else {}))
    print(report)
    if not args.no_save:
        torch.save({"model": {n: t.half() for n, t in llamagen_state_dict(model).items()}}, args.out / GPT_FILE)
        update_meta(args.out, gpt=dict(arch=arch, codebook_size=k, num_classes=NUM_CLASSES, image_size=32,
                                       downsample=2, **report))
        print(f"wrote {args.out / GPT_FILE}")


def _codebook_size(assets: Path) -> int:
    from .assets import read_meta

    return int(read_meta(assets)["vq"]["config"]["codebook_size"])


if __name__ == "__main__":
    main()
