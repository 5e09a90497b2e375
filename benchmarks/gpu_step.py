"""One decoding step of real-size models on a GPU: forward + verification, eager and graph-replayed.

    python benchmarks/gpu_step.py --out step.json          # CUDA: LlamaGen-XL and Lumina-mGPT 7B shapes
    python benchmarks/gpu_step.py --toy --out step.json    # any device: a toy model (exercises the code;
                                                           # its times are not GPU figures)

The step is built here, not taken from ``pjd.generate``: a Llama-style model with random bf16
weights (the shapes of ``roofline.MODELS``' "LlamaGen-XL" -- 775 M parameters, 32 x 32 tokens --
and "Lumina-mGPT 7B" -- Chameleon-7B, 48 x 48 tokens + EOL), a preallocated KV cache, and static
row-causal metadata. One step = the forward of the step's inputs for the CFG batch (2 sequences:
conditional, unconditional) through ``pjd.ops.draft_attention`` over the whole cache (the inputs'
K/V written into scratch slots first), then ``pjd.ops.speculative_verify`` on the logits (CFG,
top-k, acceptance, next drafts; ``validate=False``: no host read). Every shape and every input
tensor is fixed, so the step is captured once in a CUDA graph (warm-up on a side stream) and
replayed; eager and replayed times are both reported.

Configurations per model: ``ar`` (1 input, 1 lane, no drafts) and ``pjd`` with 1 / 4 / 8 active
rows x 8 inputs (the last committed token + 7 drafts per row), each with 25 / 50 / 90 % of the
image's slots committed to the cache. Reported per configuration: ms per step (CUDA events, median
of the timed calls), t(N) / t(ar) at the same fill, bytes moved per step (weights streamed once,
the K/V of the committed keys of both sequences, the K/V written, the logits written and read:
a lower bound) and bytes / s against the device's copy bandwidth measured in the same process
(``roofline.measure_ceilings``). The graph replay's outputs are pre-poisoned and compared with
the eager step's (same inputs, same tokens).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pjd.timing import capture_graph, replay_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = (1, 4, 8)  # active rows of the pjd configurations
INPUTS_PER_ROW = 8  # the last committed token + 7 drafts
WINDOW = INPUTS_PER_ROW - 1
FILLS = (0.25, 0.5, 0.9)  # fraction of the image's slots committed to the cache


@dataclass(frozen=True)
class Shape:
    """What the step needs of a model: architecture, vocabulary and image layout."""
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    image_range: tuple[int, int]
    height: int
    width: int
    eol: int | None  # end-of-line token id (one extra slot per row), or None
    prefix: int  # prompt tokens before the first image slot
    cfg_scale: float
    top_k: int

    @property
    def row_slots(self) -> int:
        return self.width + (self.eol is not None)

    @property
    def image_slots(self) -> int:
        return self.height * self.row_slots

    @property
    def params(self) -> int:
        """Parameters streamed every step (layers + output head; the embedding is gathered)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * self.hidden * self.intermediate + 2 * self.hidden) + self.hidden * self.vocab


def real_shapes() -> list[Shape]:
    """LlamaGen-XL and Lumina-mGPT 7B (Chameleon-7B) from roofline.MODELS, the published configs."""
    from roofline import MODELS

    by_name = {m.name: m for m in MODELS}
    llamagen, lumina = by_name["LlamaGen-XL"], by_name["Lumina-mGPT 7B"]
    return [
        Shape("LlamaGen-XL (775M)", llamagen.layers, llamagen.hidden, llamagen.heads, llamagen.kv_heads,
              llamagen.head_dim, llamagen.intermediate, 16384, (0, 16384), llamagen.height, llamagen.width,
              None, llamagen.prefix, cfg_scale=4.0, top_k=2000),
        # Chameleon's vocabulary: 65,536 ids, image tokens 4 .. 8195, EOL 8803 (Lumina-mGPT's layout).
        Shape("Lumina-mGPT 7B (Chameleon-7B)", lumina.layers, lumina.hidden, lumina.heads, lumina.kv_heads,
              lumina.head_dim, lumina.intermediate, 65536, (4, 8196), lumina.height, lumina.width, 8803,
              lumina.prefix, cfg_scale=3.0, top_k=2000),
    ]


TOY = Shape("toy", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=300,
            image_range=(4, 260), height=6, width=6, eol=3, prefix=3, cfg_scale=3.0, top_k=50)


class Weights:
    """Random weights of a Llama-style model of ``shape``: N(0, 1/fan_in), drawn on the device."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        s = shape
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim

        def weight(*size, fan_in):
            return torch.empty(size, device=device, dtype=dtype).normal_(0.0, fan_in ** -0.5, generator=gen)

        self.embed = weight(s.vocab, s.hidden, fan_in=1)
        self.wqkv = [weight(s.hidden, qkv, fan_in=s.hidden) for _ in range(s.layers)]
        self.wo = [weight(s.heads * s.head_dim, s.hidden, fan_in=s.heads * s.head_dim) for _ in range(s.layers)]
        self.w13 = [weight(s.hidden, 2 * s.intermediate, fan_in=s.hidden) for _ in range(s.layers)]
        self.w2 = [weight(s.intermediate, s.hidden, fan_in=s.intermediate) for _ in range(s.layers)]
        self.norms = torch.ones(2 * s.layers + 1, s.hidden, device=device, dtype=dtype)
        self.lm_head = weight(s.hidden, s.vocab, fan_in=s.hidden)


class StaticStep:
    """One configuration's preallocated cache and fixed step inputs over shared ``Weights``.

    ``__call__()`` runs one step (forward of ``tokens`` + verification) on those fixed tensors and
    returns the VerifyResult; it reads nothing back to the host, so it can be graph-captured.
    """

    def __init__(self, shape: Shape, weights: Weights, *, rows: int, inputs_per_row: int, fill: float,
                 backend: str, seed: int = 0):
        self.shape, self.w, self.backend = shape, weights, backend
        device, dtype = weights.embed.device, weights.embed.dtype
        gen = torch.Generator(device=device).manual_seed(seed)
        s = shape

        # Step layout: lane l (row r0 + l) feeds inputs_per_row inputs at slots F + l * row_slots + k.
        # ar: one lane, one input (no drafts) at slot F.
        self.lanes = rows
        self.inputs = rows * inputs_per_row
        self.window = max(1, inputs_per_row - 1)
        B, Bx, N = 1, 2, self.inputs  # one image, CFG batch of 2 sequences
        committed = int(fill * s.image_slots)
        capacity = s.prefix + s.image_slots + N  # prompt, image slots, scratch slots of the step's inputs
        self.capacity, self.committed = capacity, committed
        lane = torch.arange(N, device=device) // inputs_per_row
        offset = torch.arange(N, device=device) % inputs_per_row
        image_slot = committed + lane * s.row_slots + offset
        q_pos = (s.prefix + image_slot).to(torch.int32)
        self.positions = q_pos.long().expand(Bx, N).contiguous()
        self.q_pos = q_pos.expand(Bx, N).contiguous()
        self.q_group = (committed // s.row_slots + lane).to(torch.int32).expand(Bx, N).contiguous()
        k_pos = torch.arange(capacity, device=device, dtype=torch.int32)
        k_group = torch.full((capacity,), -2, device=device, dtype=torch.int32)  # hidden
        k_group[: s.prefix + committed] = -1  # the prompt and the committed image slots
        self.slots = torch.arange(capacity - N, capacity, device=device)  # scratch slots of the inputs
        k_pos[self.slots] = q_pos
        k_group[self.slots] = self.q_group[0]
        self.k_pos, self.k_group = k_pos.expand(Bx, capacity).contiguous(), k_group.expand(Bx, capacity).contiguous()
        cache = (s.layers, Bx, s.kv_heads, capacity, s.head_dim)
        self.k_cache = torch.empty(cache, device=device, dtype=dtype).normal_(generator=gen)
        self.v_cache = torch.empty(cache, device=device, dtype=dtype).normal_(generator=gen)
        half = s.head_dim // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(half, device=device, dtype=torch.float32) / half))
        angles = torch.arange(s.prefix + s.image_slots + N + s.image_slots, device=device)[:, None] * inv_freq
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

        lo, hi = s.image_range
        vi = hi - lo
        self.tokens = torch.randint(lo, hi, (Bx, N), device=device, generator=gen)
        if s.eol is not None:  # EOL where an input sits on a row's last slot
            self.tokens[:, image_slot % s.row_slots == s.width] = s.eol
        L, W = rows, self.window
        int32 = dict(device=device, dtype=torch.int32)
        self.lane_start = (torch.arange(L, **int32) * inputs_per_row)[None]
        self.lane_drafts = torch.full((B, L), inputs_per_row - 1, **int32)
        self.lane_rule = torch.ones((B, L), **int32)  # PREFIX, the top row TOP
        self.lane_rule[:, 0] = 0
        self.lane_slot = (committed + torch.arange(L, **int32) * s.row_slots)[None]
        self.lane_room = (s.row_slots - self.lane_slot % s.row_slots).clamp(min=1).to(torch.int32)
        self.draft_tokens = torch.randint(lo, hi, (B, L, W), device=device, generator=gen)
        forced = (self.lane_slot[..., None] + torch.arange(W, device=device)) % s.row_slots == s.width
        if s.eol is not None:
            self.draft_tokens[forced] = s.eol
        self.draft_q = torch.softmax(torch.randn((B, L, W, vi), device=device, generator=gen), -1)
        self.u_accept = torch.rand((B, L, W), device=device, generator=gen)
        self.u_sample = torch.rand((B, L, W + 1), device=device, generator=gen)
        self.init_tokens = torch.randint(lo, hi, (B, L, W), device=device, generator=gen)

    def bytes_per_step(self) -> int:
        """Lower bound of the bytes a step moves (module docstring)."""
        s = self.shape
        elt = self.w.embed.element_size()
        visible_keys = s.prefix + self.committed + self.inputs
        kv = 2 * s.layers * 2 * s.kv_heads * s.head_dim * elt  # K and V, every layer, per (sequence, key)
        logits = 2 * self.inputs * s.vocab * elt
        return s.params * elt + kv * visible_keys + kv * self.inputs + 2 * logits

    def forward(self) -> torch.Tensor:
        from pjd.ops import draft_attention

        s = self.shape
        Bx, N = self.tokens.shape
        w = self.w
        x = w.embed[self.tokens]
        cos, sin = self.cos[self.positions][:, None], self.sin[self.positions][:, None]  # [Bx, 1, N, D/2]

        def rope(t):  # rotate-half RoPE on [Bx, H, N, D]
            a, b = t.chunk(2, -1)
            return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)

        def norm(t, i):
            return torch.nn.functional.rms_norm(t, (s.hidden,), w.norms[i], 1e-5)

        for layer in range(s.layers):
            qkv = norm(x, 2 * layer) @ w.wqkv[layer]
            q, k, v = qkv.view(Bx, N, -1, s.head_dim).transpose(1, 2).split((s.heads, s.kv_heads, s.kv_heads), 1)
            self.k_cache[layer].index_copy_(2, self.slots, rope(k))
            self.v_cache[layer].index_copy_(2, self.slots, v)
            a = draft_attention(rope(q), self.k_cache[layer], self.v_cache[layer], self.q_pos, self.q_group,
                                self.k_pos, self.k_group, backend=self.backend)
            x = x + a.transpose(1, 2).reshape(Bx, N, -1) @ w.wo[layer]
            gate, up = (norm(x, 2 * layer + 1) @ w.w13[layer]).chunk(2, -1)
            x = x + (torch.nn.functional.silu(gate) * up) @ w.w2[layer]
        return norm(x, 2 * s.layers) @ w.lm_head

    def __call__(self):
        from pjd.ops import speculative_verify

        s = self.shape
        return speculative_verify(
            self.forward(), self.lane_start, self.lane_drafts, self.lane_rule, self.lane_slot, self.lane_room,
            self.draft_tokens, self.draft_q, self.u_accept, self.u_sample, self.init_tokens,
            image_token_range=s.image_range, cfg_scale=s.cfg_scale, top_k=s.top_k,
            reuse_threshold=0.5 if self.inputs > 1 else None, eol_token_id=s.eol, row_slots=s.row_slots,
            width=s.width, backend=self.backend, validate=False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_eager(step, device, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls (CUDA events on a GPU, perf_counter elsewhere)."""
    step()  # compiles Triton variants, first-call costs: never timed
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def _poison(t: torch.Tensor) -> None:
    t.fill_(float("nan") if t.is_floating_point() else (True if t.dtype == torch.bool else -7))


def run_config(shape: Shape, weights: Weights, *, method: str, rows: int, fill: float, backend: str, iters: int,
               graphs: bool) -> dict:
    inputs_per_row = 1 if method == "ar" else INPUTS_PER_ROW
    step = StaticStep(shape, weights, rows=rows, inputs_per_row=inputs_per_row, fill=fill, backend=backend)
    device = weights.embed.device
    row = dict(model=shape.name, method=method, rows=rows, inputs=step.inputs, fill=fill,
               keys=shape.prefix + step.committed, capacity=step.capacity, bytes_per_step=step.bytes_per_step())
    with torch.no_grad():
        eager = time_eager(step, device, iters)
        row.update(eager_ms=statistics.median(eager), eager_min_ms=min(eager))
        reference = step()  # same fixed inputs: every call commits the same tokens
        row["commit_tokens"] = reference.num_commit.tolist()
        if not graphs:
            row["graph"] = "skipped: no CUDA" if device.type != "cuda" else "skipped"
        else:
            try:
                graph, out = capture_graph(step, device)
                for t in out:
                    _poison(t)
                replays = replay_ms(graph, device, iters)
                same = all(torch.equal(a, b) for a, b in zip(out, reference))
                row.update(graph_ms=statistics.median(replays), graph_min_ms=min(replays),
                           graph="ok" if same else "MISMATCH: replayed outputs differ from the eager step's")
                del graph, out
            except Exception as err:  # noqa: BLE001 -- recorded, the other configurations still run
                row["graph"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict], copy_bytes_per_s: float | None) -> None:
    """t(N) / t(ar) at the same model and fill; bytes / s and its share of the copy bandwidth."""
    for r in rows:
        ar = next(a for a in rows if a["model"] == r["model"] and a["fill"] == r["fill"] and a["method"] == "ar")
        for kind in ("eager", "graph"):
            ms = r.get(f"{kind}_ms")
            if ms is None or ar.get(f"{kind}_ms") is None:
                continue
            r[f"{kind}_vs_ar"] = ms / ar[f"{kind}_ms"]
            r[f"{kind}_bytes_per_s"] = r["bytes_per_step"] / (ms * 1e-3)
            if copy_bytes_per_s:
                r[f"{kind}_of_copy_bandwidth"] = r[f"{kind}_bytes_per_s"] / copy_bytes_per_s


def projections(rows: list[dict]) -> list[dict]:
    """PROJECTIONS, not measurements: image latency = the PJD paper's step counts (roofline.MODELS) x
    the measured graph-replayed ms per step, averaged over the KV fills (ar: 1 input; pjd: 4 rows x 8)."""
    from roofline import MODELS

    steps = {m.name: (m.ar_steps, m.pjd_steps) for m in MODELS}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        key = next((name for name in steps if model.startswith(name)), None)

        def mean_ms(method, n_rows):
            ms = [r["graph_ms"] for r in rows if r["model"] == model and r["method"] == method
                  and r["rows"] == n_rows and r.get("graph_ms") is not None]
            return sum(ms) / len(ms) if ms else None

        ar_ms, pjd_ms = mean_ms("ar", 1), mean_ms("pjd", 4)
        if key is None or None in steps[key] or ar_ms is None or pjd_ms is None:
            continue
        ar_steps, pjd_steps = steps[key]
        out.append(dict(model=model, kind="PROJECTION (paper step counts x measured ms/step)",
                        ar_steps=ar_steps, pjd_steps=pjd_steps, ar_ms_per_step=ar_ms, pjd_ms_per_step=pjd_ms,
                        ar_image_ms=ar_steps * ar_ms, pjd_image_ms=pjd_steps * pjd_ms,
                        speedup=ar_steps * ar_ms / (pjd_steps * pjd_ms)))
    return out


def markdown(rows: list[dict], device: str, copy_bytes_per_s: float | None) -> str:
    bw = f"{copy_bytes_per_s / 1e12:.2f} TB/s measured" if copy_bytes_per_s else "not measured"
    lines = [f"One step (forward of the CFG batch + verification) on {device}; copy bandwidth {bw}.",
             "", "| model | method | rows x inputs | KV fill | keys | eager ms | graph ms | t/t(ar) eager | "
             "t/t(ar) graph | GB/step | graph share of copy BW | graph check |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        shape = "1 x 1" if r["method"] == "ar" else f"{r['rows']} x {INPUTS_PER_ROW}"
        lines.append(f"| {r['model']} | {r['method']} | {shape} | {r['fill']:.0%} | {r['keys']} | {f(r.get('eager_ms'), '.3f')} "
                     f"| {f(r.get('graph_ms'), '.3f')} | {f(r.get('eager_vs_ar'), '.2f')} | {f(r.get('graph_vs_ar'), '.2f')} "
                     f"| {r['bytes_per_step'] / 1e9:.3f} | {f(r.get('graph_of_copy_bandwidth'), '.0%')} | {r.get('graph', '-')} |")
    for p in projections(rows):
        lines.append(f"\n{p['model']}: PROJECTION, not a measurement: ar {p['ar_steps']} steps x {p['ar_ms_per_step']:.2f} ms "
                     f"= {p['ar_image_ms']:.0f} ms/image; pjd {p['pjd_steps']} steps x {p['pjd_ms_per_step']:.2f} ms (4 rows x 8) "
                     f"= {p['pjd_image_ms']:.0f} ms/image; {p['speedup']:.2f}x (step counts: the PJD paper's)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", action="store_true", help="a toy model on any device (exercises the code paths)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--models", default=None, help="comma-separated indices into the real shapes (default all)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per configuration (default GPU 20, CPU 3)")
    p.add_argument("--backend", default="auto", help="pjd backend of the ops (auto: triton on CUDA, sdpa on CPU)")
    p.add_argument("--ceilings", default=None, help="JSON with copy_bytes_per_s (e.g. gpu_check's env stage)")
    p.add_argument("--budget-s", type=float, default=None, help="start no configuration after this many seconds")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.toy:
        p.error("the real-size shapes need a CUDA device (random 7B weights); use --toy elsewhere")
    from pjd.demo import device_name

    shapes = [TOY] if args.toy else real_shapes()
    if args.models and not args.toy:
        shapes = [shapes[int(i)] for i in args.models.split(",")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    iters = args.iters or (20 if device.type == "cuda" else 3)
    copy_bw = None
    if args.ceilings and Path(args.ceilings).exists():
        copy_bw = json.loads(Path(args.ceilings).read_text()).get("copy_bytes_per_s")
    if copy_bw is None and device.type == "cuda":
        from roofline import measure_ceilings

        copy_bw = measure_ceilings(device)["copy_bytes_per_s"]
    start = time.monotonic()
    rows, skipped = [], []
    for shape in shapes:
        weights = Weights(shape, device, dtype)
        row_counts = [r for r in ROWS if r <= shape.height]
        configs = [("ar", 1)] + [("pjd", r) for r in row_counts]
        for fill in FILLS:
            for method, rows_ in configs:
                if args.budget_s is not None and time.monotonic() - start > args.budget_s:
                    skipped.append(f"{shape.name} {method} {rows_} rows, fill {fill:.0%}")
                    continue
                row = run_config(shape, weights, method=method, rows=rows_, fill=fill, backend=args.backend,
                                 iters=iters, graphs=device.type == "cuda")
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "commit_tokens"}), flush=True)
        del weights
    add_ratios(rows, copy_bw)
    name = device_name(device)
    report = dict(device=name, dtype=str(dtype).removeprefix("torch."), toy=args.toy, iters=iters,
                  copy_bytes_per_s=copy_bw, rows=rows, not_run_for_budget=skipped, projections=projections(rows),
                  note=("toy model: code-path check, its times are not GPU figures" if device.type != "cuda"
                        else "random bf16 weights; one step = forward of the CFG batch + speculative_verify"))
    print(markdown(rows, name, copy_bw))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
