"""Train the quality classifier: ``python -m pjd.fashion.train_classifier [--data DIR]``.

Cross-entropy, Adam, cosine learning rate, random 1-pixel shifts as augmentation. Prints the test
accuracy, writes ``classifier.safetensors`` (fp32, 1.6 MB) and the FID reference statistics of the
10,000 test images (mean and covariance of their 128 features, float64) into ``--out``. Needs the
dataset (``apt-get install dataset-fashion-mnist``); seeded; CPU.
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

from .assets import ASSETS, CLASSIFIER_FILE, REF_STATS_FILE, update_meta
from .classifier import FashionClassifier
from .idx import DEFAULT_ROOT, load_fashion_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from pjd.quality import classifier_features, classify, feature_stats

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load_fashion_mnist(args.data, "train")
    test_x, test_y = load_fashion_mnist(args.data, "test")
    x = FashionClassifier.to_input(torch.from_numpy(train_x))
    y = torch.from_numpy(train_y)
    net = FashionClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(x.shape[0] / args.batch_size)
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], args.batch_size):
            idx = perm[i:i + args.batch_size]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            batch = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(net(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0:
                print(f"epoch {epoch} step {step:5d}/{steps}  loss {loss.item():.4f}  {time.time() - start:.0f}s",
                      flush=True)
            step += 1
    net.eval()
    test = torch.from_numpy(test_x)
    feats = classifier_features(test, classifier=net)  # as pjd.quality computes generated images' features
    acc = float((classify(test, classifier=net) == torch.from_numpy(test_y)).double().mean())
    report = dict(test_accuracy=round(acc, 4), epochs=args.epochs, batch_size=args.batch_size,
                  train_seconds=round(time.time() - start, 1), threads=args.threads)
    print(report)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.detach().contiguous() for n, t in net.state_dict().items()}, args.out / CLASSIFIER_FILE)
        mu, sigma = feature_stats(feats)
        np.savez(args.out / REF_STATS_FILE, mu=mu.numpy(), sigma=sigma.numpy(), n=np.int64(feats.shape[0]))
        update_meta(args.out, classifier=report)
        print(f"wrote {args.out / CLASSIFIER_FILE} and {args.out / REF_STATS_FILE}")


if __name__ == "__main__":
    main()
