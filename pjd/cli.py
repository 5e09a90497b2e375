"""Command line: `pjd demo` (the embedded default model), `pjd generate` (a tiny random model),
`pjd sample` (N images, sharded under torchrun, resumable) and `pjd eval` (their quality).

Parsing imports neither torch nor the rest of pjd (``pjd --help`` answers at once); a command
imports what it needs when it runs. Bad input ends in one ``pjd <command>: error: ...`` line
(exit 2) naming the option, never a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from pjd import __version__
from pjd._choices import BACKENDS, CACHES, METHODS, ROW_LEADS

# Intra-op threads of the CPU work. One: pjd's CPU path runs many small ops per step, where a second
# thread adds synchronisation without work to share, and any other load on the cores turns its
# spinning into waiting (docs/performance.md: `pjd sample -n 40` 1 vs 2 threads, quiet and loaded).
DEFAULT_THREADS = 1
METHODS_HELP = f"comma-separated methods from {', '.join(METHODS)}"
BACKEND_HELP = ("attention and verification: auto (Triton kernels on CUDA, sdpa on a CPU), torch (the pure-torch "
                "reference), sdpa, triton")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" after every option with a default worth printing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


def _reuse_threshold(text: str) -> float | str | None:
    word = text.lower()
    return None if word == "none" else "auto" if word == "auto" else _finite(text)


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


def _check_outputs(parser, out: str, json_file: str | None = None) -> None:
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


def _check_device(parser, text: str, backend: str | None = None):
    """The torch device of --device, and that --backend can run on it (before any work)."""
    from pjd._checks import check_device
    from pjd.ops._backend import resolve_backend

    try:
        device = check_device(text, "--device")
    except ValueError as err:
        parser.error(f"argument {err}")
    if backend is not None:
        try:
            resolve_backend(backend, device)
        except (ValueError, RuntimeError) as err:
            parser.error(f"argument --backend: {err}")
    return device


def _common(parser, *, device: bool = True) -> None:
    parser.add_argument("--threads", type=_int_at_least(1), default=DEFAULT_THREADS,
                        help="CPU threads per process (torch intra-op); more rarely helps pjd's small ops")
    if device:
        parser.add_argument("--device", default="cpu",
                            help="cpu, cuda or cuda:N (under torchrun: cuda = cuda:LOCAL_RANK)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pjd", description="Parallel Jacobi Decoding for AR image models")
    parser.add_argument("--version", action="version", version=f"pjd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,sample,eval}")

    demo = sub.add_parser("demo", formatter_class=_Help,
                          help="decode the embedded default model with several methods: grid, table, JSON",
                          description="Decode the embedded Fashion-MNIST model (16x16 tokens) with each method "
                          "from the same seeds; write a PNG grid (one column per method) and demo.json, print a "
                          "table. Table: steps = forward passes for the batch; compression = 256 / steps (the "
                          "batch finishes when its slowest image does); per image = 256 / the mean steps each "
                          "image needed (the paper's figure); wall s after an untimed warm-up; vs ar / vs hf = "
                          "speed-up over ar / transformers' model.generate; NLL/token under the model; class acc "
                          "= the shipped classifier agrees with the requested class; FID needs at least 100 "
                          "images (--batch 100), shown as - below that.")
    demo.add_argument("--methods", type=_methods, default=["ar", "sjd", "pjd"],
                      help=f"{METHODS_HELP} (default: ar,sjd,pjd)")
    demo.add_argument("--batch", type=_int_at_least(1), default=10,
                      help="images per method, classes in turn: 10 shows each class once; >= 100 adds FID")
    demo.add_argument("--seed", type=_int_at_least(0, 2**64), default=0,
                      help="image i draws from the stream (seed, i): the same images for every method")
    demo.add_argument("--cfg-scale", type=_finite, default=3.0, help="classifier-free guidance (1: off)")
    demo.add_argument("--top-k", type=_int_at_least(0), default=0,
                      help="sample among the k likeliest image tokens (0: all 512, 1: greedy)")
    demo.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    demo.add_argument("--out", default="out/demo", help="folder for demo.png and demo.json")
    demo.add_argument("--json", dest="json_file", default=None, help="also write the per-method list here")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--no-hf", action="store_true",
                      help="skip the hf row (transformers' own model.generate, the external baseline)")
    _common(demo)

    gen = sub.add_parser("generate", formatter_class=_Help,
                         help="smoke run on a tiny random-weight Llama (no weights needed)",
                         description="Decode random prompts with a tiny random-weight Llama and print steps and "
                         "time: checks that the engine runs here (its acceptance says nothing about real models).")
    gen.add_argument("--method", choices=METHODS, default="pjd", help="decoding method")
    gen.add_argument("--height", type=_int_at_least(1), default=8, help="token rows")
    gen.add_argument("--width", type=_int_at_least(1), default=8, help="token columns")
    gen.add_argument("--batch", type=_int_at_least(1), default=2, help="images")
    gen.add_argument("--seed", type=_int_at_least(0, 2**64), default=0, help="weights, prompts and draws")
    gen.add_argument("--cache", choices=CACHES, default="slot", help="KV-cache layout")
    gen.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    _common(gen, device=False)

    sample = sub.add_parser("sample", formatter_class=_Help,
                            help="N images into a directory (PNG + npz), one process or torchrun",
                            description="Decode N images of a class-conditional model into --out (images/*.png, "
                            "samples.npz, manifest.json, summary.json). Re-running the same command resumes an "
                            "interrupted run; any number of torchrun processes gives the same files.")
    what = sample.add_mutually_exclusive_group()
    what.add_argument("--classes", default=None,
                      help="comma list of class ids or names; image i gets the (i mod len)-th (default: all classes)")
    what.add_argument("--prompts", default=None, help="file with one prompt per line (class names or ids)")
    sample.add_argument("--num-images", "-n", type=_int_at_least(1), default=None,
                        help="images to decode (required without --prompts; default with it: one per line)")
    sample.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    sample.add_argument("--model", default="default", choices=["default", "tiny"],
                        help="the embedded Fashion-MNIST model, or a tiny random-weight one for smoke runs")
    sample.add_argument("--method", choices=METHODS, default="pjd", help="decoding method")
    sample.add_argument("--window", type=_int_at_least(1), default=None,
                        help="drafts per row (default: sjd / sjd++ 15, pjd 7)")
    sample.add_argument("--context", type=_int_at_least(1), default=None,
                        help="pjd / zipar: tokens of a row that start the next (default: round(width / 4))")
    sample.add_argument("--top-k", type=_int_at_least(0), default=0,
                        help="sample among the k likeliest image tokens (0: all, 1: greedy)")
    sample.add_argument("--top-p", type=_finite, default=1.0, help="nucleus mass (1: off)")
    sample.add_argument("--temperature", type=_finite, default=1.0, help="softmax temperature")
    sample.add_argument("--cfg-scale", type=_finite, default=3.0, help="classifier-free guidance (1: off)")
    sample.add_argument("--reuse-threshold", type=_reuse_threshold, default="auto",
                        help="pjd / sjd++ draft reuse: auto (0.5), a number, or none (off)")
    sample.add_argument("--draft-init", choices=["random", "repeat_left"], default="random",
                        help="initial drafts of the methods that feed drafts")
    sample.add_argument("--no-row-causal", action="store_true",
                        help="pjd: let drafts see other rows' drafts (the paper's ablation)")
    sample.add_argument("--row0-first", choices=["auto", "on", "off"], default="auto",
                        help="pjd / zipar: decode row 0 before row 1 starts (auto: on without EOL)")
    sample.add_argument("--row-lead", choices=ROW_LEADS, default=ROW_LEADS[0],
                        help="pjd / zipar without EOL: the row a fresh row's leading token is copied from")
    sample.add_argument("--seed", type=_int_at_least(0, 2**64), default=0,
                        help="image i draws from the stream (seed, i), whatever its batch or process")
    sample.add_argument("--batch-size", type=_int_at_least(1), default=16, help="images decoded together")
    sample.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    sample.add_argument("--cache", default="slot", choices=CACHES, help="KV-cache layout")
    sample.add_argument("--no-npz", action="store_true", help="PNGs only, no samples.npz")
    sample.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common(sample)

    ev = sub.add_parser("eval", formatter_class=_Help,
                        help="FID and class accuracy of a sample directory or npz",
                        description="FID on the shipped classifier's features against the Fashion-MNIST test "
                        "split, and class accuracy (with a manifest.json giving each image's class). FID is "
                        "biased upward at small N (2,000 real training images score 1.05, 100 score far "
                        "more): compare FIDs at the same N only.")
    ev.add_argument("samples", help="a `pjd sample` directory or an .npz (arr_0: uint8 [N, 28, 28, 3])")
    ev.add_argument("--batch-size", type=_int_at_least(1), default=500, help="images per classifier call")
    ev.add_argument("--bootstrap", type=_int_at_least(0), default=200,
                    help="resamples for the accuracy's 95%% interval (0: none)")
    ev.add_argument("--no-write", action="store_true", help="print only, do not write eval.json")
    _common(ev, device=False)
    parser.commands = {"demo": demo, "generate": gen, "sample": sample, "eval": ev}
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = parser.commands[args.command]
    import torch

    torch.set_num_threads(args.threads)
    try:
        return RUN[args.command](command, args)
    except KeyboardInterrupt:
        resume = "; the images written so far are kept: re-run the same command to resume" \
            if args.command == "sample" else ""
        print(f"\npjd {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except ValueError as err:  # pjd's argument checks (pjd.generate's, SampleError, EvalError)
        command.error(str(err))
    except OSError as err:  # writing the outputs (disk full, a folder removed meanwhile)
        command.exit(1, f"pjd {args.command}: error: {err}\n")


def _demo(parser, args) -> int:
    from pjd.demo import run_demo

    device = _check_device(parser, args.device, args.backend)
    _check_outputs(parser, args.out, args.json_file)
    run_demo(methods=args.methods, batch=args.batch, seed=args.seed, cfg_scale=args.cfg_scale,
             top_k=args.top_k, backend=args.backend, out=args.out, json_file=args.json_file,
             progress=not args.no_progress, device=str(device), hf=not args.no_hf)
    return 0


TINY_POSITIONS = 4096  # max_position_embeddings of `pjd generate`'s tiny model


def _generate(parser, args) -> int:
    import torch

    from pjd.models import tiny_llama
    from pjd.timing import WarmUp

    if 1 + args.height * args.width > TINY_POSITIONS:
        parser.error(f"argument --height/--width: a {args.height}x{args.width} grid needs more than the tiny "
                     f"model's {TINY_POSITIONS} positions")
    _check_device(parser, "cpu", args.backend)
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


def _sample(parser, args) -> int:
    from pjd import sample

    _check_device(parser, args.device)
    _check_outputs(parser, args.out)
    return sample.main(args)


def _eval(parser, args) -> int:
    from pjd import evaluate

    return evaluate.main(args)


RUN = {"demo": _demo, "generate": _generate, "sample": _sample, "eval": _eval}


if __name__ == "__main__":
    sys.exit(main())
