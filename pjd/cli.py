"""Command line: `pjd demo` (the embedded default model), `pjd generate` (a tiny random model),
`pjd sample` (N images, sharded under torchrun, resumable) and `pjd eval` (their quality)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from pjd.ops._backend import BACKENDS
from pjd.plan import METHODS


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"methods must be a comma list of {METHODS}, got {text!r}")
    return methods


def _int_at_least(low: int, high: int | None = None):
    """argparse type: an int in [low, high) (the flag name is added by argparse)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            bound = f">= {low}" if high is None else f"in [{low}, {high})"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda:0, got {text!r}") from None
    return text


def _writable_dir(path: Path) -> str | None:
    """Create the folder if needed; the reason it cannot hold output files, or None."""
    if path.exists() and not path.is_dir():
        return f"{str(path)!r} exists and is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create {str(path)!r} ({err.strerror})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{str(path)!r} is not writable"
    return None


def _check_outputs(parser, out: str, json_file: str | None) -> None:
    """Fail before generating when an output cannot be written (folders are created)."""
    reason = _writable_dir(Path(out))
    if reason:
        parser.error(f"argument --out: {reason}")
    if json_file:
        path = Path(json_file)
        if path.is_dir():
            parser.error(f"argument --json: {json_file!r} is a folder, expected a file path")
        reason = _writable_dir(path.parent)
        if reason or (path.exists() and not os.access(path, os.W_OK)):
            parser.error(f"argument --json: {reason or repr(json_file) + ' is not writable'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pjd", description="Parallel Jacobi Decoding for AR image models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="decode the embedded default model with several methods")
    demo.add_argument("--methods", type=_methods, default=["ar", "sjd", "pjd"])
    demo.add_argument("--batch", type=_int_at_least(1), default=10,
                      help="images per method (classes in turn: 10 shows each once)")
    demo.add_argument("--seed", type=_int_at_least(0, 2**64), default=0)
    demo.add_argument("--cfg-scale", type=_finite, default=3.0)
    demo.add_argument("--top-k", type=_int_at_least(0), default=0)
    demo.add_argument("--backend", default="auto", choices=list(BACKENDS))
    demo.add_argument("--device", type=_device, default="cpu")
    demo.add_argument("--out", default="out/demo", help="folder for demo.png and demo.json")
    demo.add_argument("--json", dest="json_file", default=None, help="also write the per-method list here")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--no-hf", action="store_true",
                      help="skip the hf row (transformers' own model.generate, the external baseline)")

    gen = sub.add_parser("generate", help="smoke run on a tiny random-weight Llama (no weights needed)")
    gen.add_argument("--method", choices=METHODS, default="pjd")
    gen.add_argument("--height", type=_int_at_least(1), default=8)
    gen.add_argument("--width", type=_int_at_least(1), default=8)
    gen.add_argument("--batch", type=_int_at_least(1), default=2)
    gen.add_argument("--seed", type=_int_at_least(0, 2**64), default=0)
    gen.add_argument("--cache", choices=["slot", "append"], default="slot")
    gen.add_argument("--backend", default="auto", choices=list(BACKENDS))

    from pjd import evaluate, sample

    sample.add_arguments(sub.add_parser("sample", help="N images into a directory (PNG + npz), one process or torchrun"))
    evaluate.add_arguments(sub.add_parser("eval", help="FID and class accuracy of a sample directory or npz"))

    args = parser.parse_args(argv)
    if args.command in ("sample", "eval"):
        verb = sample if args.command == "sample" else evaluate
        try:
            return verb.main(args)
        except (sample.SampleError, evaluate.EvalError) as e:
            parser.error(f"{args.command}: {e}")
    if args.command == "demo":
        from pjd.demo import run_demo

        _check_outputs(demo, args.out, args.json_file)
        run_demo(methods=args.methods, batch=args.batch, seed=args.seed, cfg_scale=args.cfg_scale,
                 top_k=args.top_k, backend=args.backend, out=args.out, json_file=args.json_file,
                 progress=not args.no_progress, device=args.device, hf=not args.no_hf)
        return 0
    return _generate(gen, args)


TINY_POSITIONS = 4096  # max_position_embeddings of `pjd generate`'s tiny model


def _generate(parser, args) -> int:
    import torch

    from pjd.models import tiny_llama
    from pjd.ops._backend import resolve_backend
    from pjd.timing import WarmUp

    if 1 + args.height * args.width > TINY_POSITIONS:
        parser.error(f"argument --height/--width: a {args.height}x{args.width} grid needs more than the tiny "
                     f"model's {TINY_POSITIONS} positions")
    try:
        resolve_backend(args.backend, torch.device("cpu"))
    except (ValueError, RuntimeError) as err:
        parser.error(f"argument --backend: {err}")
    model = tiny_llama(512 + 8, hidden_size=64, layers=2, logit_scale=3.0, seed=args.seed,
                       max_positions=TINY_POSITIONS)
    ids = torch.randint(512, 520, (args.batch, 1), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        out = WarmUp().generate(model, ids, height=args.height, width=args.width, method=args.method,
                                image_token_range=(0, 512), cache=args.cache, backend=args.backend, seed=args.seed)
    print(f"{args.method}: {out.tokens.shape[1]}x{out.tokens.shape[2]} grid x {args.batch} images in {out.steps} "
          f"steps ({args.height * args.width / out.steps:.2f} tokens/step), {out.wall_seconds:.2f} s after an "
          f"untimed warm-up call (tiny random-weight model: acceptance says nothing about real models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
