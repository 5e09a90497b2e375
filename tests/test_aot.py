"""AOT gate: every shipped Triton kernel config compiles for sm_80 and sm_90 with no register spills and
shared memory within the per-block limit. No GPU needed: triton.compile for a GPUTarget + ptxas -v.

Runs benchmarks/kernel_report.py --json in a subprocess WITHOUT TRITON_INTERPRET (the interpreter
replaces the compiler) and with an empty Triton cache, so every config is really compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pjd.kernels.aot import ARCHS, SMEM_LIMIT, shipped_configs

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.py"


def test_every_shipped_config_compiles_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(REPORT), "--json"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)

    expected = {(c.kernel, c.config, f"sm_{arch}") for c in shipped_configs() for arch in ARCHS}
    assert {(r["kernel"], r["config"], r["arch"]) for r in rows} == expected
    assert {r["kernel"] for r in rows} >= {"draft_attention_fwd", "draft_attention_combine", "verify_target_probs",
                                          "verify_accept", "verify_next_drafts"}
    problems = [r for r in rows
                if r["spill_bytes"] != 0 or not 0 < r["regs"] <= 255
                or not 0 <= r["smem_bytes"] <= SMEM_LIMIT[int(r["arch"][3:])]]
    assert not problems, json.dumps(problems, indent=1)
