"""scripts/gpu_check.sh in its dry mode (no CUDA here): the summary is written whatever happens,
CUDA stages are recorded as skipped, the step benchmark's code runs on its toy model, the output
folder stays within what a device call returns (at most 8 files, two folders deep), the re-run
mode runs only the chosen stages and the budget stops stages from starting."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry mode is what runs without CUDA")


def run_check(out, **env):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary, {s["stage"]: s for s in summary["stages"]}


def test_dry_run_writes_the_summary_and_exercises_the_step(tmp_path):
    out = tmp_path / "gpu_check"
    proc, summary, stages = run_check(out, STAGES="env,step,kernels,e2e,demo")  # parity: see the next test
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["mode"] == "dry run (no CUDA)"
    assert stages["install"]["status"].startswith("skipped: no CUDA")
    assert stages["env"]["status"] == "ok" and stages["env"]["result"]["torch"] == torch.__version__
    assert "parity" not in stages
    step = stages["step"]
    assert step["status"] == "ok" and step["result"]["toy"] and step["result"]["rows"]
    assert {r["method"] for r in step["result"]["rows"]} == {"ar", "pjd"}
    assert all(r["eager_ms"] > 0 and r["graph"] == "skipped: no CUDA" for r in step["result"]["rows"])
    for name in ("kernels", "e2e", "demo"):
        assert stages[name]["status"] == "skipped: no CUDA"
    # what comes back from a device call: at most 8 files, at most two folders deep
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["log.txt", "raw.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(out / "raw.tar.gz") as tar:
        names = tar.getnames()
    assert "raw/step.json" in names and "raw/env.json" in names and "raw/step.log" in names
    md = (out / "summary.md").read_text()
    assert "| step | ok |" in md and "not GPU measurements" in md
    assert proc.stdout.rstrip().endswith(md.rstrip())  # summary.md is printed last


def test_rerun_mode_and_budget(tmp_path):
    proc, summary, stages = run_check(tmp_path / "b", STAGES="env,step", BUDGET_S="0")
    assert proc.returncode == 1 and list(stages) == ["install", "env", "step"]  # only the chosen stages
    assert all(stages[s]["status"].startswith("not started: budget") for s in ("env", "step"))
    assert (tmp_path / "b" / "summary.md").exists()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "c"), "STAGES": "nope"})
    assert proc.returncode == 2 and "unknown stages" in proc.stdout + proc.stderr


def test_parity_headline_reads_the_junit_report(tmp_path):
    """The parity stage's summary: counts and failed tests from pytest's junit XML, the compiled
    variants' registers and spills from tests/test_gpu.py's report (the stage itself needs CUDA)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    (tmp_path / "parity.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    (tmp_path / "parity_kernels.gw0.json").write_text(json.dumps([dict(kernel="_k", regs=96, spills=20)]))
    (tmp_path / "parity_kernels.gw1.json").write_text(json.dumps([dict(kernel="_k", regs=64, spills=0)]))
    head = gpu_check._parity_headline(tmp_path)
    assert (head["tests"], head["failures"], head["skipped"]) == (3, 1, 1)
    assert head["failed"] == ["tests.test_gpu::test_b"]
    md = gpu_check.markdown(dict(date="d", device="GPU", mode="GPU", commit="c", budget_s=450, total_s=1.0,
                                 stages=[dict(stage="parity", status="failed (exit 1)", result=head, tail="E boom")]))
    assert "- FAILED tests.test_gpu::test_b" in md and "_k: 2 variants, max 96 registers, 20 spills" in md
    assert "E boom" in md
