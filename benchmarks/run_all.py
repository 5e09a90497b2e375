"""Run every benchmark script into one folder and print a summary (what `make bench` calls).

Runs roofline.py and attention.py, plus compaction.py and verify.py when those files exist, each in
its own process (a failure in one does not hide the others), all writing under --out.

Usage: python benchmarks/run_all.py [--out bench_out] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("roofline.py", "attention.py", "compaction.py", "verify.py")
QUICK_FLAG = {"attention.py"}  # scripts known to take --quick


def device_line() -> str:
    sys.path.insert(0, str(HERE))
    import torch
    from attention import device_name

    return device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--quick", action="store_true", help="smaller attention sweep")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in SCRIPTS:
        script = HERE / name
        if not script.exists():
            results.append({"script": name, "status": "absent"})
            continue
        cmd = [sys.executable, str(script), "--out", str(out)]
        cmd += ["--quick"] if args.quick and name in QUICK_FLAG else []
        print(f"== {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd)
        results.append({"script": name, "status": "ok" if rc == 0 else f"failed (exit {rc})",
                        "seconds": round(time.perf_counter() - t, 1)})
    device = device_line()
    summary = {"device": device, "out": str(out), "scripts": results,
               "files": sorted(str(f.relative_to(out)) for f in out.iterdir() if f.is_file())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n== summary (device: {device})")
    for r in results:
        print(f"  {r['script']:<15} {r['status']}" + (f"  {r['seconds']} s" if "seconds" in r else ""))
    print(f"  files in {out}/: {', '.join(summary['files'])}")
    print("  roofline figures are model-derived floors, not measurements")
    return 0 if all(r["status"] in ("ok", "absent") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
