"""AOT compile report of every shipped Triton kernel config for sm_80 and sm_90 (no GPU needed).

    python benchmarks/kernel_report.py          # table
    python benchmarks/kernel_report.py --json   # JSON list of {kernel, config, arch, regs, spill_bytes, smem_bytes}

Registers and spills come from the ptxas bundled with triton (-v on the PTX), shared memory from the
compiled metadata. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import sys

from pjd.kernels.aot import ARCHS, SMEM_LIMIT, compile_report, shipped_configs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    rows = [compile_report(cfg, arch) for cfg in shipped_configs() for arch in ARCHS]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = f"| {'kernel':<24} | {'config':<34} | arch  | regs | spill B | smem B | smem limit B |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        limit = SMEM_LIMIT[int(r["arch"][3:])]
        print(f"| {r['kernel']:<24} | {r['config']:<34} | {r['arch']} | {r['regs']:>4} | {r['spill_bytes']:>7} "
              f"| {r['smem_bytes']:>6} | {limit:>12} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
