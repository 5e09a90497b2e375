"""KV-cache compaction after rejections: the native op (C++ on CPU, CUDA on GPU) against the
pure-torch fallback (a gather + scatter per tensor), at real model shapes.

Default shapes: a 32-layer model (K and V: 64 tensors) with 32 KV heads of dim 128, a cache of
2,400 tokens, CFG batch 2, tails of 50 and 100 entries of which about half are kept, ragged
destinations a few entries below the tail. Prints a table and writes <out>/compaction.json.
Each backend is timed after one untimed warm-up call on the same tensors (pjd.timing.time_ms; on
CUDA triton.testing.do_bench), so first-call costs are never timed.

    python benchmarks/compaction.py --out bench_out/compaction            # CPU, 1 thread
    python benchmarks/compaction.py --devices cpu,cuda --out bench_out/compaction
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from pjd.ops import compact_kv, compact_kv_backend
from pjd.timing import time_ms

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def make_case(args, dtype, tail, device, seed):
    g = torch.Generator().manual_seed(seed)
    tail_start, S = args.cache, args.cache + max(args.tails)
    dst_start = (tail_start - torch.randint(0, 4, (args.batch,), generator=g)).to(torch.int32)
    keep = torch.rand(args.batch, tail, generator=g) < 0.5
    shape = (args.batch, args.heads, S, args.head_dim)
    # Only rows from the lowest destination on are read or written: fill those, leave the rest empty.
    lo = int(dst_start.min())
    # Cache contents are drawn on the device itself (a CPU draw of GPU-sized caches takes seconds per case).
    gd = torch.Generator(device=device).manual_seed(seed)
    caches = []
    for _ in range(2 * args.layers):
        x = torch.empty(shape, dtype=dtype, device=device)
        x[:, :, lo:].normal_(generator=gd)
        caches.append(x)
    positions = torch.arange(S, dtype=torch.int32).repeat(args.batch, 1)
    meta = [positions.to(device), torch.full_like(positions, -1).to(device)]
    return caches, keep.to(device), tail_start, dst_start.to(device), meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for compaction.json")
    parser.add_argument("--devices", default="cpu", help="comma list: cpu,cuda")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--cache", type=int, default=2400, help="tokens before the tail (tail_start)")
    parser.add_argument("--tails", default="50,100", help="comma list of tail lengths T")
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with CFG")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machine: 1)")
    args = parser.parse_args(argv)
    args.tails = [int(t) for t in args.tails.split(",")]
    torch.set_num_threads(args.threads)

    rows = []
    header = (f"{'device':<6} {'dtype':<5} {'T':>4} {'kept':>9} {'native':>6} {'native ms':>10} "
              f"{'torch ms':>9} {'speed-up':>8} {'native GB/s':>11}")
    print(f"{2 * args.layers} tensors [B={args.batch}, H={args.heads}, S={args.cache}+tail, D={args.head_dim}], "
          f"median of {args.repeats} calls (CUDA: triton do_bench) after a warm-up call, torch threads {args.threads}")
    print(header)
    for dev in args.devices.split(","):
        device = torch.device(dev)
        impl = compact_kv_backend(device)
        for dname in args.dtypes.split(","):
            for tail in args.tails:
                caches, keep, tail_start, dst_start, meta = make_case(args, DTYPES[dname], tail, device, seed=tail)
                timing = {}
                for backend in ("native", "torch"):
                    if backend == "native" and impl == "torch":
                        continue  # no extension for this device: nothing to compare

                    def run(backend=backend):
                        compact_kv(caches, keep, tail_start, dst_start, meta=meta, backend=backend)

                    timing[backend] = time_ms(run, device, args.repeats)
                kept = keep.sum(1).tolist()
                moved = sum(kept) * args.heads * args.head_dim * caches[0].element_size() * len(caches)
                native_ms = timing.get("native", (float("nan"),))[0]
                row = {
                    "device": dev, "device_name": device_name(device), "dtype": dname, "tail": tail,
                    "kept": kept, "native_impl": impl, "native_ms": native_ms,
                    "native_min_ms": timing.get("native", (None, None))[1],
                    "torch_ms": timing["torch"][0], "torch_min_ms": timing["torch"][1],
                    "speedup": timing["torch"][0] / native_ms, "bytes_moved": moved,
                    # read + write of every moved row
                    "native_gbps": 2 * moved / native_ms / 1e6,
                }
                rows.append(row)
                print(f"{dev:<6} {dname:<5} {tail:>4} {str(kept):>9} {impl:>6} {native_ms:>10.3f} "
                      f"{row['torch_ms']:>9.3f} {row['speedup']:>7.1f}x {row['native_gbps']:>11.1f}")
                del caches
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args), "torch": torch.__version__, "rows": rows}
    (out / "compaction.json").write_text(json.dumps(result, indent=2))
    print(f"device: {', '.join(sorted({r['device_name'] for r in rows}))}; wrote {out / 'compaction.json'}")


if __name__ == "__main__":
    main()
