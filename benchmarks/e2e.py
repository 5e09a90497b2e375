"""End-to-end decoding benchmark: steps, step compression, wall time, orchestration overhead, quality.

Sections (each prints a table; everything is saved as JSON, plus PNG plots):
  speed     wall time per image of every method beside transformers' own model.generate ("hf", same
            CFG, top-k / temperature, image tokens, sampling) and, given the official checkout
            (--llamagen-repo or $PJD_LLAMAGEN_REPO), LlamaGen's own sampler on the same checkpoint
            ("llamagen": its generate(), eager; "llamagen-compiled": its model compiled as its sample
            scripts' --compile; pjd.baseline.OfficialLlamaGen), runs interleaved (ar, hf, ..., pjd,
            repeated, after an untimed pass) so load hits all alike: median and min wall time,
            median CPU time of the process, speed-ups vs hf, ar and llamagen, step compression, torch ops dispatched per decoding step outside the model forward, and the
            compile time of llamagen-compiled apart (its first call minus its median call).
            A pjd method name may carry a suffix: "-compiled" (generate(compile=True): the whole step
            compiled, its compile time apart as compile_s, its tokens compared with eager's) or
            "-fixed" (generate(fixed_shapes=True): the eager fixed-shape step), e.g. pjd-compiled
  methods   ar / sjd / sjd++ / zipar / pjd at their defaults
  context   pjd and zipar over the row-activation context c (step compression and quality vs c)
  window    pjd over the draft window
  topk      pjd vs ar over top-k
  cfg       pjd vs ar over the CFG scale
  ablation  pjd with and without the row-causal mask
Every timed call (each method's configuration, each hf mode) follows an untimed warm-up of the same
configuration (pjd.timing.WarmUp: the identical call where Triton kernels compile, one row of the grid
where nothing does), so kernel compilation and first-call costs are never counted; the JSON lists the warmed configurations under "warm_up".
Quality: mean NLL per token of the samples under the model itself (teacher-forced), the shipped
classifier's accuracy on the requested classes and, for batches of >= 100 images
(pjd.demo.FID_MIN_IMAGES), FID against the Fashion-MNIST test split (pjd.quality).

--table1 instead runs the paper's Table 1 on the default model (benchmarks/_table1.py): every method
over --table1-samples images (equal per class), FID and class accuracy with bootstrap intervals.

Usage: python benchmarks/e2e.py [--model default|tiny] [--batch 16] [--sections methods,context]
       [--speed-methods ar,sjd,pjd,pjd-compiled,llamagen,llamagen-compiled] [--llamagen-repo PATH] [--repeats 3]
       [--hf-cfg both|batched|guidance]
       [--out bench_out/e2e] [--docs]      (--docs also refreshes docs/e2e/ and docs/performance.md)
       python benchmarks/e2e.py --quick    (the speed section at batch 1: ar, hf, pjd, 3 repeats; about a
                                        minute of CPU time)
       python benchmarks/e2e.py --table1 [--table1-samples 2000] [--table1-batch 100] [--docs]
Run with OMP_NUM_THREADS=1 (or --threads) for the one-thread figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from pjd.baseline import llamagen_repo
from pjd.demo import FID_MIN_IMAGES, device_name
from pjd.plan import METHODS
from pjd.timing import WarmUp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import line_chart, update_docs  # noqa: E402

SECTIONS = ("speed", "methods", "context", "window", "topk", "cfg", "ablation")
LLAMAGEN = {"llamagen": False, "llamagen-compiled": True}  # speed-section baseline -> compiled
# Speed-section variants of a pjd method (e.g. pjd-compiled): generate() options (issue 20).
VARIANTS = {"compiled": dict(compile=True), "fixed": dict(fixed_shapes=True)}


def variant(name: str) -> tuple[str, dict]:
    """"pjd-compiled" -> ("pjd", {"compile": True}); a plain method -> (method, {})."""
    method, _, suffix = name.rpartition("-")
    return (method, VARIANTS[suffix]) if method in METHODS and suffix in VARIANTS else (name, {})


def method_spec(name: str) -> tuple[str, dict]:
    """A speed-section method: ``pjd``, a variant (``pjd-compiled``), then generate() settings after
    colons (``pjd:window=3``, ``pjd-compiled:context=4``; ints)."""
    base, *settings = name.split(":")
    if any("=" not in kv for kv in settings):
        raise ValueError(f"--speed-methods: expected method[:key=value...], got {name!r}")
    method, options = variant(base)
    return method, {**options, **{k: int(v) for k, v in (kv.split("=", 1) for kv in settings)}}
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs" / "e2e"


class Bench:
    def __init__(self, model_name: str, batch: int, seed: int, cfg_scale: float, llamagen_repo=None, device="cpu"):
        self.device = torch.device(device)
        if model_name == "default":
            from pjd.models import default

            dm = default(device=self.device)
            self.model, self.height, self.width = dm.model, dm.height, dm.width
            self.image_range = dm.image_token_range
            self.prompt = dm.prompt(torch.arange(batch) % len(dm.class_names))
            self.null = dm.null_prompt(batch)
            self.decode = dm.decode
        else:  # tiny random-weight model: exercises the code, says nothing about acceptance
            from pjd.models import tiny_llama

            self.model = tiny_llama(264, hidden_size=64, logit_scale=3.0).to(self.device)
            self.height = self.width = 16
            self.image_range = (0, 256)
            self.prompt = torch.randint(256, 263, (batch, 1), generator=torch.Generator().manual_seed(seed))
            self.prompt = self.prompt.to(self.device)
            self.null = torch.full((batch, 1), 263, device=self.device)
            self.decode = None
        self.labels = torch.arange(batch) % 10
        self.batch, self.seed, self.cfg_scale = batch, seed, cfg_scale
        self.warm = WarmUp()
        self.llamagen_repo, self.official = llamagen_repo, None
        self.first_call_s: dict[str, float] = {}  # LlamaGen's warm-up calls, timed: compile + one decode

    def generate(self, method: str, cfg_scale: float | None = None, **kw):
        """pjd.generate on the bench's prompts, after a warm-up call of this configuration."""
        cfg = self.cfg_scale if cfg_scale is None else cfg_scale
        with torch.no_grad():
            return self.warm.generate(self.model, self.prompt, height=self.height, width=self.width, method=method,
                                      image_token_range=self.image_range, cfg_scale=cfg,
                                      uncond_input_ids=self.null if cfg != 1 else None, seed=self.seed, **kw)

    def generate_spec(self, name: str):
        """``generate`` of a speed-section method name (method_spec: ``pjd:window=3``)."""
        method, kw = method_spec(name)
        return self.generate(method, **kw)

    def hf(self, cfg_mode: str):
        """hf_generate on the bench's prompts, after a warm-up call of this configuration."""
        return self.warm.hf_generate(self.model, self.prompt, height=self.height, width=self.width,
                                     image_token_range=self.image_range, cfg_scale=self.cfg_scale,
                                     uncond_input_ids=self.null if self.cfg_scale != 1 else None, seed=self.seed,
                                     cfg_mode=cfg_mode)

    def llamagen(self, name: str):
        """LlamaGen's own generate() on the bench's classes (default model only), after a warm-up call of this
        configuration: the identical call (where "llamagen-compiled" compiles), timed into ``first_call_s``."""
        if self.official is None:
            from pjd.baseline import OfficialLlamaGen

            self.official = OfficialLlamaGen.default(self.llamagen_repo)
        kw = dict(cfg_scale=self.cfg_scale, seed=self.seed, compiled=LLAMAGEN[name])
        if name not in self.first_call_s:
            t0 = time.perf_counter()
            self.warm("llamagen.generate", self.official.generate, self.labels, **kw)
            self.first_call_s[name] = time.perf_counter() - t0
        return self.official.generate(self.labels, **kw)

    def run(self, method: str, **kw) -> dict:
        from pjd.quality import class_accuracy, classifier_features, fid, nll_per_token

        cfg = kw.pop("cfg_scale", self.cfg_scale)
        r = self.generate(method, cfg, **kw)
        nll = nll_per_token(self.model, r.tokens, self.prompt, image_token_range=self.image_range)
        row = dict(method=method, **{k: v for k, v in kw.items()}, cfg_scale=cfg, steps=r.steps,
                   step_compression=self.height * self.width / r.steps,
                   per_image_compression=self.height * self.width / float(r.steps_per_image.double().mean()),
                   seconds=r.wall_seconds,
                   forward_seconds=r.forward_seconds, overhead_share=1 - r.forward_seconds / r.wall_seconds,
                   nll_per_token=float(nll.mean()),
                   nll_sem=float(nll.std() / len(nll) ** 0.5) if len(nll) > 1 else None,
                   accepted_per_step=torch.stack(r.accepted).double().mean(1).tolist())
        if self.decode is not None:
            images = self.decode(r.tokens)
            row["class_accuracy"] = class_accuracy(images, self.labels)
            if self.batch >= FID_MIN_IMAGES:
                row["fid"] = fid(classifier_features(images))
        return row


class _CountTorchCalls(torch.overrides.TorchFunctionMode):
    """Counts torch functions, tensor methods and indexing called from Python (attribute reads such as
    ``.shape`` excluded): each is at least one op dispatch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") != "__get__"
        return func(*args, **(kwargs or {}))


def ops_outside_forward(model, fn) -> int:
    """Torch ops dispatched from Python by ``fn()`` outside ``model``'s forward passes: a
    device-independent measure of orchestration overhead. Counted with a TorchFunctionMode rather
    than the torch profiler, whose event tree of a whole decode takes gigabytes (on the tiny test
    model the profiler's top-level aten ops agree within 10%: ar 38 vs 35, pjd 435 vs 447 per step)."""
    forward = model.forward

    def uncounted(*args, **kwargs):
        with torch._C.DisableTorchFunction():
            return forward(*args, **kwargs)

    model.forward = uncounted  # instance attribute: nn.Module.__call__ looks it up first
    try:
        with _CountTorchCalls() as counter:
            fn()
    finally:
        del model.forward
    return counter.count


def speed_section(bench: "Bench", methods: list[str], repeats: int, hf_modes: list[str]) -> list[dict]:
    """Interleaved wall-time runs of every method and of hf, plus op counts (see the module docstring)."""
    import statistics

    cells = {f"hf-{m}": (lambda m=m: bench.hf(m)[1]) for m in hf_modes}
    cells.update({m: (lambda m=m: bench.llamagen(m)[1]) if m in LLAMAGEN else
                  (lambda m=m: bench.generate_spec(m).wall_seconds) for m in methods})
    order = [m for m in methods if m == "ar"] + list(cells)[:len(hf_modes)] + [m for m in methods if m != "ar"]
    for name in order:  # untimed: a cell's first call runs its warm-up (bench.warm) before the call itself
        cells[name]()
    times, cpu_times = {name: [] for name in order}, {name: [] for name in order}
    for _ in range(repeats):
        for name in order:
            cpu = time.process_time()
            times[name].append(cells[name]() / bench.batch)
            cpu_times[name].append((time.process_time() - cpu) / bench.batch)
    rows = []
    for name in order:
        extra = {}  # baseline-specific columns
        if name.startswith("hf-"):
            mode = name[3:]
            tokens, _, forwards = bench.hf(mode)
            steps, ops = bench.height * bench.width, ops_outside_forward(bench.model, lambda: bench.hf(mode))
            steps_per_image = steps
        elif name in LLAMAGEN:
            tokens, _ = bench.llamagen(name)
            steps = steps_per_image = bench.height * bench.width
            # the compiled model's forward is a dynamo frame: counting around it would change what runs
            ops = None if LLAMAGEN[name] else ops_outside_forward(bench.official.model, lambda: bench.llamagen(name))
            extra = dict(first_call_s=bench.first_call_s[name] / bench.batch)
            if LLAMAGEN[name]:
                extra["compile_s"] = bench.first_call_s[name] - statistics.median(times[name]) * bench.batch
                if "llamagen" in times:  # same seed, same draws: only the compiled logits' rounding may differ
                    extra["tokens_equal_to_eager"] = float((tokens == bench.llamagen("llamagen")[0]).double().mean())
        else:
            method, options = method_spec(name)
            r = bench.generate(method, **options)
            steps, steps_per_image = r.steps, float(r.steps_per_image.double().mean())
            # a compiled step is one dynamo frame: counting around it would change what runs
            ops = None if r.compiled else ops_outside_forward(bench.model, lambda: bench.generate(method, **options))
            if r.compiled:
                # the same settings, eager (a pjd:window=3-compiled compares with pjd:window=3)
                eager = {k: v for k, v in options.items() if k not in VARIANTS["compiled"]}
                # compiled by the warm-up call (the identical call), never timed
                compile_s = [e["compile_seconds"] for e in bench.warm.log
                             if e.get("method") == method and e.get("compile") and "compile_seconds" in e]
                same = (r.tokens == bench.generate(method, **eager).tokens).double().mean()
                extra = dict(compile_s=compile_s[0] if compile_s else None, compiled=r.compiled,
                             tokens_equal_to_eager=float(same))
        ar_steps = bench.height * bench.width  # image tokens; EOL-free grids only here (default / tiny)
        rows.append(dict(method=name, steps=steps, step_compression=ar_steps / steps,
                         per_image_compression=ar_steps / steps_per_image,
                         median_s_per_image=statistics.median(times[name]), min_s_per_image=min(times[name]),
                         median_cpu_s_per_image=statistics.median(cpu_times[name]),
                         ops_per_step=None if ops is None else ops / steps, **extra))
    hf = min((r for r in rows if r["method"].startswith("hf-")), key=lambda r: r["median_s_per_image"], default=None)
    refs = dict(hf=hf, **{m: next((r for r in rows if r["method"] == m), None) for m in ("ar", *LLAMAGEN)})
    for r in rows:
        for ref_name, ref in refs.items():
            for prefix, key in (("", "median_s_per_image"), ("cpu_", "median_cpu_s_per_image")):
                r[f"{prefix}speedup_vs_{ref_name.replace('-', '_')}"] = ref[key] / r[key] if ref else None
    return rows


def plot_acceptance(rows: list[dict], path: Path) -> None:
    """Image tokens committed per step over the decode (mean over the batch), one line per method."""
    line_chart({r["method"]: list(enumerate(r["accepted_per_step"], 1)) for r in rows if r["method"] != "ar"},
               path, title="image tokens committed per step (mean over batch)", xlabel="step", ylabel="tokens")


def plot_context(rows: list[dict], out: Path, grid: str) -> None:
    """Per-image step compression and NLL / token against the row-activation context c."""
    for key, name, label in (("per_image_compression", "compression_vs_context.png", "per-image step compression"),
                             ("nll_per_token", "quality_vs_context.png", "NLL / token")):
        line_chart({m: [(r["context"], r[key]) for r in rows if r["method"] == m] for m in ("pjd", "zipar")},
                   out / name, title=f"{label} vs context c ({grid})", xlabel="context c", ylabel=label, log_x=True)


def table(title: str, rows: list[dict], keys: list[str]) -> str:
    lines = [f"\n### {title}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["default", "tiny"], default="default")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--out", default="bench_out")
    p.add_argument("--docs", action="store_true", help="copy plots to docs/e2e and refresh docs/performance.md")
    p.add_argument("--speed-methods", default="ar,sjd,sjd++,zipar,pjd",
                   help="pjd methods of the speed section (settings after colons: pjd:window=3), and the "
                        "LlamaGen baselines llamagen, llamagen-compiled")
    p.add_argument("--llamagen-repo", default=None,
                   help="checkout of github.com/FoundationVision/LlamaGen for the llamagen baselines "
                        "(default: $PJD_LLAMAGEN_REPO)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats of the speed section")
    p.add_argument("--hf-cfg", choices=["both", "batched", "guidance"], default="both",
                   help="hf's CFG: one doubled batch, generate's own guidance_scale, or both (the faster is hf)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as OMP_NUM_THREADS)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where the model and every decode run")
    p.add_argument("--quick", action="store_true",
                   help="speed section only, batch 1, methods ar,pjd, hf batched: --sections speed --batch 1 "
                        "--speed-methods ar,pjd --hf-cfg batched")
    p.add_argument("--table1", action="store_true", help="run the Table-1 reproduction instead of --sections")
    p.add_argument("--table1-samples", type=int, default=2000, help="images per row (multiple of 10)")
    p.add_argument("--table1-batch", type=int, default=100, help="images decoded together")
    p.add_argument("--table1-methods", default="",
                   help="comma list: only these rows, by name (ar, sjd, sjd+coupled, sjd+continuation, "
                        "sjd+coupled+continuation, sjd++, zipar, pjd: every context) or name:context (default all)")
    p.add_argument("--table1-merge", default=None,
                   help="a previous table1.json: its rows that this run does not decode are kept (marked reused)")
    p.add_argument("--table1-minutes", type=float, default=None,
                   help="stop after the chunk round that passes this budget (rows keep equal sample counts)")
    args = p.parse_args(argv)
    if args.quick:
        args.sections, args.batch, args.speed_methods, args.hf_cfg = "speed", 1, "ar,pjd", "batched"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table1:
        return table1_main(args)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    speed_methods = [m for m in args.speed_methods.split(",") if m]
    try:
        unknown = {m for m in speed_methods if method_spec(m)[0] not in METHODS} - set(LLAMAGEN)
    except ValueError as e:
        p.error(str(e))
    if unknown:
        p.error(f"--speed-methods: unknown {sorted(unknown)}; choose from {METHODS + tuple(LLAMAGEN)}, or a method "
                f"followed by one of {['-' + v for v in VARIANTS]} (e.g. pjd-compiled)")
    if "speed" in sections and set(speed_methods) & set(LLAMAGEN):
        if args.model != "default":
            p.error("--speed-methods llamagen / llamagen-compiled: LlamaGen's sampler runs the default model only")
        try:
            llamagen_repo(args.llamagen_repo)
        except FileNotFoundError as e:
            p.error(f"--speed-methods llamagen / llamagen-compiled: {e}")
    out = Path(args.out) / "e2e"  # e2e_<sections>.json, so runs of different sections do not overwrite
    out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"argument --device: {args.device} requested but CUDA is not available")
    device = device_name(torch.device(args.device))
    bench = Bench(args.model, args.batch, args.seed, args.cfg_scale, args.llamagen_repo, device=args.device)
    w = bench.width
    contexts = sorted({1, 2, max(1, w // 8), max(1, w // 4), max(1, w // 2), w})
    report = dict(device=device, model=args.model, batch=args.batch, seed=args.seed, cfg_scale=args.cfg_scale,
                  grid=f"{bench.height}x{w}", sections={})
    text = (f"Command: `python benchmarks/e2e.py --model {args.model} --batch {args.batch} --sections "
            f"{','.join(sections)}`; device: {device}; grid {bench.height}x{w}, batch {args.batch}, "
            f"CFG {args.cfg_scale}, seed {args.seed}. `step_compression` = AR steps / forward passes of the batch "
            f"(the slowest image sets them); `per_image_compression` = AR steps / mean steps each image needed "
            f"(the paper's batch-1 figure); `nll_sem` = standard error of the mean NLL over the images. Every timed "
            f"call follows an untimed warm-up call of its configuration. "
            + ("Wall seconds are CPU times: per-step compute on a CPU grows with the inputs per step, so they say "
               "nothing about GPU latency.\n" if bench.device.type == "cpu" else "Wall seconds are GPU times.\n"))
    cols = ["method", "steps", "step_compression", "per_image_compression", "seconds", "overhead_share",
            "nll_per_token", "nll_sem", "class_accuracy", "fid"]

    def section(name, rows, keys, title):
        nonlocal text
        report["sections"][name] = rows
        t = table(title, rows, keys)
        print(t, flush=True)
        text += t

    if "speed" in sections:
        hf_modes = ["batched", "guidance"] if args.hf_cfg == "both" else [args.hf_cfg]
        if args.cfg_scale == 1:
            hf_modes = hf_modes[:1]  # no CFG: both modes are the same plain sampling
        rows = speed_section(bench, speed_methods, args.repeats, hf_modes)
        llamagen = [m for m in LLAMAGEN if m in speed_methods]
        text += (f"\nSpeed (`--speed-methods {','.join(speed_methods)}`): {args.repeats} interleaved repeats after a "
                 f"warm-up pass, seconds per image (wall time of the call / batch; `median_cpu_s_per_image`: the "
                 f"process's CPU time around the call, which a shared machine's load distorts less, and "
                 f"`cpu_speedup_*` its ratios); hf = transformers' `model.generate` "
                 f"(sdpa attention), the faster CFG mode by median; `ops_per_step` = torch ops called from Python per "
                 f"decoding step outside the model forward (a TorchFunctionMode count; hf, llamagen: per generated "
                 f"token).\n")
        if llamagen:
            text += ("llamagen = LlamaGen's own `generate()` from the official repository (batched CFG, static KV "
                     "cache) on the same checkpoint, eager; llamagen-compiled = the same with its model "
                     "`torch.compile(mode=\"reduce-overhead\", fullgraph=True)` as its sample scripts' `--compile` "
                     "(no CUDA graphs on a CPU); `compile_s` = its first call minus its median call (batch "
                     "seconds), never in the timed figures.\n")
        section("speed", rows, ["method", "steps", "step_compression", "per_image_compression",
                                "median_s_per_image", "min_s_per_image", "speedup_vs_hf", "speedup_vs_ar",
                                *[f"speedup_vs_{m.replace('-', '_')}" for m in llamagen], "median_cpu_s_per_image",
                                *[f"cpu_speedup_vs_{m.replace('-', '_')}" for m in llamagen], "ops_per_step",
                                *(["compile_s"] if "llamagen-compiled" in llamagen or
                                  any(m.endswith("-compiled") for m in speed_methods) else [])],
                f"Wall time per image beside hf{' and LlamaGen' if llamagen else ''} (batch {args.batch})")
        for r in rows:
            if "tokens_equal_to_eager" in r:
                eager = "llamagen" if r["method"] in LLAMAGEN else method_spec(r["method"])[0]
                line = f"{r['method']}'s tokens equal to eager {eager}'s (same seed): {r['tokens_equal_to_eager']:.4f}\n"
                print(line, flush=True)
                text += line
    if "methods" in sections:
        rows = [bench.run(m) for m in ("ar", "sjd", "sjd++", "zipar", "pjd")]
        for r in rows:
            r["speedup"] = rows[0]["seconds"] / r["seconds"]
        section("methods", rows, cols[:5] + ["speedup"] + cols[5:], "Methods at their defaults")
        plot_acceptance(rows, out / "acceptance_per_step.png")
    if "context" in sections:
        rows = [bench.run(m, context=c) for c in contexts for m in ("pjd", "zipar")]
        section("context", rows, ["method", "context"] + cols[1:], "Row-activation context c")
        plot_context(rows, out, f"{bench.height}x{w}")
    if "window" in sections:
        section("window", [bench.run("pjd", window=k) for k in (1, 3, 7, 11, 15)], ["method", "window"] + cols[1:],
                "pjd draft window")
    if "topk" in sections:
        section("topk", [bench.run(m, top_k=k) for k in (0, 64, 8) for m in ("ar", "pjd")],
                ["method", "top_k"] + cols[1:], "top-k")
    if "cfg" in sections:
        section("cfg", [bench.run(m, cfg_scale=s) for s in (1.0, 3.0, 5.0) for m in ("ar", "pjd")],
                ["method", "cfg_scale"] + cols[1:], "CFG scale")
    if "ablation" in sections:
        section("ablation", [bench.run("pjd", context=c, row_causal=rc) for c in (contexts[1], max(1, w // 4))
                             for rc in (True, False)], ["method", "context", "row_causal"] + cols[1:],
                "Row-causal mask ablation")

    report["warm_up"] = bench.warm.log
    report["warm_up_reruns"] = bench.warm.reruns
    json_path = out / f"e2e_{'_'.join(sections)}.json"
    json_path.write_text(json.dumps(report, indent=2))
    print(f"\ndevice: {device}; wrote {json_path} and plots")
    if args.docs:
        DOCS_DIR.mkdir(parents=True, exist_ok=True)
        for png in out.glob("*.png"):
            shutil.copy(png, DOCS_DIR / png.name)
        update_docs("e2e " + ",".join(sections), text)
    return report


def table1_main(args) -> dict:
    from _table1 import markdown, merge_rows, plot_table1, run_table1

    from pjd.models import default

    out = Path(args.out) / "e2e"
    out.mkdir(parents=True, exist_ok=True)
    device = device_name(torch.device("cpu"))
    methods = [m for m in args.table1_methods.split(",") if m]
    previous = json.loads(Path(args.table1_merge).read_text()) if args.table1_merge else None
    dm = default()
    rows = run_table1(dm, samples=args.table1_samples, batch=args.table1_batch, cfg_scale=args.cfg_scale,
                      seed=args.seed, out=out, device=device, methods=methods, minutes=args.table1_minutes)
    n = rows[0]["samples"]
    budget = f" --table1-minutes {args.table1_minutes}" if args.table1_minutes is not None else ""
    subset = f" --table1-methods {args.table1_methods}" if methods else ""
    command = (f"python benchmarks/e2e.py --table1 --table1-samples {args.table1_samples} --table1-batch "
               f"{args.table1_batch} --cfg-scale {args.cfg_scale}{budget}{subset}")
    if previous is not None:
        rows = merge_rows(previous["rows"], rows, f"reused from a previous run: `{previous.get('command', '?')}` "
                          f"({previous.get('device', '?')}); the speed-up is against that run's ar", dm.width)
    (out / "table1.json").write_text(json.dumps({**json.loads((out / "table1.json").read_text()),
                                                 "command": command, "rows": rows}, indent=2))
    text = (f"Command: `{command}`; device: {device}; default model (Fashion-MNIST, "
            f"16x16 tokens), **{n} images per row** ({n // 10} per class, the same classes and seeds in every row"
            f"{'; stopped by the time budget before ' + str(args.table1_samples) if n < args.table1_samples else ''}), "
            f"batches of {args.table1_batch}, rows interleaved chunk by chunk, CFG {args.cfg_scale}, seed {args.seed}. "
            "Wall seconds and speed-up are CPU figures (generation only, not scoring).\n\n" + markdown(rows, device))
    print("\n" + text)
    plots = plot_table1(rows, out)
    if args.docs:
        DOCS_DIR.mkdir(parents=True, exist_ok=True)
        for png in plots:
            shutil.copy(png, DOCS_DIR / png.name)
        update_docs("e2e table1", text)
    return dict(device=device, rows=rows)


if __name__ == "__main__":
    main()
