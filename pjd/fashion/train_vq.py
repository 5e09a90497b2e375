"""Train the VQ tokenizer of the default model: ``python -m pjd.fashion.train_vq [--data DIR]``.

Reconstruction loss (MSE + L1 on pixels in [-1, 1]) plus the VQ codebook/commitment loss, Adam,
cosine learning rate, bf16 autocast for the convolutions. Every ``--restart-every`` steps, codes no batch used since the last restart
are moved onto random encoder outputs of the current batch (dead-code restart). Prints the test
split's reconstruction PSNR and codebook usage, writes ``vq.safetensors`` (fp16) and the config
into ``meta.json`` under ``--out``. Needs the dataset (``apt-get install dataset-fashion-mnist``);
seeded; CPU.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .assets import ASSETS, VQ_FILE, update_meta
from .idx import DEFAULT_ROOT, load_fashion_mnist
from .vq import VQConfig, VQTokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--codebook-size", type=int, default=VQConfig.codebook_size)
    p.add_argument("--embed-dim", type=int, default=VQConfig.embed_dim)
    p.add_argument("--channels", type=int, default=VQConfig.channels)
    p.add_argument("--res-blocks", type=int, default=VQConfig.res_blocks)
    p.add_argument("--restart-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast for the convolutions (slower on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write")
    p.add_argument("--no-save", action="store_true", help="throughput check: train and evaluate only")
    return p.parse_args(argv)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) between two uint8 image sets, over all pixels."""
    mse = ((a.float() - b.float()) ** 2).mean()
    return float(10 * torch.log10(255.0 ** 2 / mse))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x, _ = load_fashion_mnist(args.data, "train")
    test_x, _ = load_fashion_mnist(args.data, "test")
    config = VQConfig(args.codebook_size, args.embed_dim, args.channels, args.res_blocks)
    vq = VQTokenizer(config)
    opt = torch.optim.Adam(vq.parameters(), lr=args.lr)
    train = VQTokenizer.to_input(torch.from_numpy(train_x))
    used = torch.zeros(config.codebook_size, dtype=torch.bool)
    start = time.time()
    for step in range(args.steps):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = train[torch.from_numpy(rng.integers(0, train.shape[0], args.batch_size))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            z = vq.encoder(x)
        q, idx, vq_loss = vq.quantize(z.float())  # the code lookup in fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            recon = vq.decoder(q).float()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used[idx.unique()] = True
        if (step + 1) % args.restart_every == 0 and step + 1 < args.steps * 0.9:
            dead = (~used).nonzero().squeeze(1)
            if dead.numel():  # move dead codes onto encoder outputs of this batch
                flat = F.normalize(z.detach().float(), dim=1).permute(0, 2, 3, 1).reshape(-1, config.embed_dim)
                with torch.no_grad():
                    vq.codebook[dead] = flat[torch.randint(0, flat.shape[0], (dead.numel(),))]
            used.zero_()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  vq {vq_loss.item():.4f}  lr {lr:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
    vq.eval()
    test = torch.from_numpy(test_x)
    tokens = vq.encode(test)
    recon = vq.images(tokens)
    counts = torch.bincount(tokens.flatten(), minlength=config.codebook_size).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    report = dict(test_psnr_db=round(psnr(recon, test), 3), codes_used=int((counts > 0).sum()),
                  code_perplexity=round(perplexity, 2), train_steps=args.steps, batch_size=args.batch_size,
                  train_seconds=round(time.time() - start, 1), threads=args.threads)
    print(report)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.detach().half().contiguous() for n, t in vq.state_dict().items()}, args.out / VQ_FILE)
        update_meta(args.out, vq=dict(config=config.to_dict(), **report))
        print(f"wrote {args.out / VQ_FILE}")


if __name__ == "__main__":
    main()
