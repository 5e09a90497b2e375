"""Sanity values of the quality measures on real data: ``python -m pjd.fashion.evaluate [--data DIR]``.

Prints, and stores under ``reference`` in the assets' ``meta.json`` (docs/default_model.md quotes them):

- the classifier's accuracy on the 10,000 test images;
- FID against the shipped test statistics of: all 60,000 training images; ``--n`` random training
  images (the floor a perfect generator reaches at Table 1's sample count, since FID is biased
  upward at small N), with a bootstrap interval; the VQ reconstructions of the test split (10,000)
  and of ``--n`` random training images;
- the VQ round trip's PSNR on the test split and the classifier's accuracy on the reconstructions.

Needs the dataset (``apt-get install dataset-fashion-mnist``); CPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pjd.quality import bootstrap_ci, class_accuracy, classifier_features, fid

from .assets import ASSETS, update_meta
from .default import load_tokenizer
from .idx import DEFAULT_ROOT, load_fashion_mnist
from .train_vq import psnr


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--n", type=int, default=2000, help="sample count of the N-matched floors (Table 1's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ASSETS, help="assets folder whose meta.json gets the values")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_x, _ = (torch.from_numpy(a) for a in load_fashion_mnist(args.data, "train"))
    test_x, test_y = (torch.from_numpy(a) for a in load_fashion_mnist(args.data, "test"))
    subset = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.n]
    vq = load_tokenizer(args.out)
    test_rec = vq.images(vq.encode(test_x))
    train_feats = classifier_features(train_x)
    sub_feats = train_feats[subset]
    sub_rec_feats = classifier_features(vq.images(vq.encode(train_x[subset])))
    ref = dict(
        classifier_test_accuracy=class_accuracy(test_x, test_y),
        fid_train_all=fid(train_feats),
        fid_train_n=fid(sub_feats), fid_train_n_ci=bootstrap_ci(sub_feats, fid, seed=args.seed),
        fid_vq_test=fid(classifier_features(test_rec)),
        fid_vq_train_n=fid(sub_rec_feats), fid_vq_train_n_ci=bootstrap_ci(sub_rec_feats, fid, seed=args.seed),
        vq_test_psnr_db=psnr(test_rec, test_x),
        classifier_accuracy_on_vq_test=class_accuracy(test_rec, test_y),
        n=args.n)
    for k, v in ref.items():
        print(f"{k}: {v}")
    if not args.no_save:
        update_meta(args.out, reference={k: (round(v, 4) if isinstance(v, float) else v) for k, v in ref.items()})
    return ref


if __name__ == "__main__":
    main()
