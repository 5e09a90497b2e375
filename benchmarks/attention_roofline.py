"""Roofline model of draft_attention per decode step (a calculation, nothing is timed).

    python benchmarks/attention_roofline.py

Per step and per sequence, attention reads every visible K/V byte of every layer once and does
4 * D flops per (query head, query, key): 2 D for Q K^T and 2 D for P V. CFG runs two sequences.
Floor = max(bytes / HBM bandwidth, flops / tensor peak) on an H100 SXM (3.35 TB/s, ~990 TFLOP/s
dense bf16). Model shapes are assumptions stated in docs/kernels.md.
"""
from __future__ import annotations

HBM_BYTES_PER_S = 3.35e12
PEAK_FLOPS = 990e12
ELEM = 2  # bf16 / fp16 K, V

# name: (layers, query heads, kv heads, head dim, prompt tokens, image slots, parameters)
MODELS = {
    "Lumina-mGPT 7B, 768 px": (32, 32, 32, 128, 100, 48 * 49, 7.0e9),
    "LlamaGen-XL, 512 px": (36, 20, 20, 64, 1, 32 * 32, 0.775e9),
    "Janus-Pro 7B, 384 px": (30, 32, 32, 128, 30, 24 * 24, 6.9e9),
}
QUERIES = (8, 32, 64)  # 1, 4, 8 active rows x 8 inputs
CFG_BATCH = 2


def rows():
    for name, (layers, hq, hkv, d, prompt, image, params) in MODELS.items():
        weights_ms = params * ELEM / HBM_BYTES_PER_S * 1e3
        for frac in (0.1, 0.5, 1.0):
            cache = prompt + round(frac * image)
            kv_bytes = CFG_BATCH * layers * cache * 2 * hkv * d * ELEM
            flops = [CFG_BATCH * layers * hq * nq * cache * 4 * d for nq in QUERIES]
            floor_ms = max(kv_bytes / HBM_BYTES_PER_S, max(flops) / PEAK_FLOPS) * 1e3
            yield name, cache, kv_bytes, flops, floor_ms, weights_ms


def main():
    nq = " / ".join(map(str, QUERIES))
    print(f"| model | cache keys | K/V read MB | GFLOP at {nq} queries | flop/byte | attention floor ms "
          "| weight-read floor ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, cache, kv_bytes, flops, floor_ms, weights_ms in rows():
        gflop = " / ".join(f"{f / 1e9:.1f}" for f in flops)
        intensity = " / ".join(f"{f / kv_bytes:.0f}" for f in flops)
        print(f"| {name} | {cache} | {kv_bytes / 1e6:.0f} | {gflop} | {intensity} | {floor_ms:.3f} | {weights_ms:.2f} |")


if __name__ == "__main__":
    main()
