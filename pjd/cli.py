"""Command line: `pjd demo` (the embedded default model) and `pjd generate` (a tiny random model)."""
from __future__ import annotations

import argparse
import sys

from pjd.ops._backend import BACKENDS
from pjd.plan import METHODS


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"methods must be a comma list of {METHODS}, got {text!r}")
    return methods


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pjd", description="Parallel Jacobi Decoding for AR image models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="decode the embedded default model with several methods")
    demo.add_argument("--methods", type=_methods, default=["ar", "sjd", "pjd"])
    demo.add_argument("--batch", type=int, default=10, help="images per method (classes in turn: 10 shows each once)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cfg-scale", type=float, default=3.0)
    demo.add_argument("--top-k", type=int, default=0)
    demo.add_argument("--backend", default="auto", choices=list(BACKENDS))
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--out", default="out/demo", help="folder for demo.png and demo.json")
    demo.add_argument("--json", dest="json_file", default=None, help="also write the per-method list here")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--no-hf", action="store_true",
                      help="skip the hf row (transformers' own model.generate, the external baseline)")

    gen = sub.add_parser("generate", help="smoke run on a tiny random-weight Llama (no weights needed)")
    gen.add_argument("--method", choices=METHODS, default="pjd")
    gen.add_argument("--height", type=int, default=8)
    gen.add_argument("--width", type=int, default=8)
    gen.add_argument("--batch", type=int, default=2)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cache", choices=["slot", "append"], default="slot")
    gen.add_argument("--backend", default="auto", choices=list(BACKENDS))

    args = parser.parse_args(argv)
    if args.command == "demo":
        from pjd.demo import run_demo

        if args.batch < 1:
            parser.error("--batch must be >= 1")
        run_demo(methods=args.methods, batch=args.batch, seed=args.seed, cfg_scale=args.cfg_scale,
                 top_k=args.top_k, backend=args.backend, out=args.out, json_file=args.json_file,
                 progress=not args.no_progress, device=args.device, hf=not args.no_hf)
        return 0
    return _generate(args)


def _generate(args) -> int:
    import torch

    import pjd
    from pjd.models import tiny_llama

    model = tiny_llama(512 + 8, hidden_size=64, layers=2, logit_scale=3.0, seed=args.seed)
    ids = torch.randint(512, 520, (args.batch, 1), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        out = pjd.generate(model, ids, height=args.height, width=args.width, method=args.method,
                           image_token_range=(0, 512), cache=args.cache, backend=args.backend, seed=args.seed)
    print(f"{args.method}: {out.tokens.shape[1]}x{out.tokens.shape[2]} grid x {args.batch} images in {out.steps} "
          f"steps ({args.height * args.width / out.steps:.2f} tokens/step), {out.wall_seconds:.2f} s "
          f"(tiny random-weight model: acceptance says nothing about real models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
