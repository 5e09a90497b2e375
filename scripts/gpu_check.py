"""Driver of scripts/gpu_check.sh: install, then stages, each in its own process with a time cap.

    python scripts/gpu_check.py --out OUT [--stages env,parity,...]     (scripts/gpu_check.sh runs this)
    python scripts/gpu_check.py --stage env --raw DIR                   (one stage's own work; internal)

No stage starts once ``--budget-s`` seconds have passed since ``--start`` (the shell script's start),
and each runs under min(its cap, what is left of ``--hard-s``). Whatever happens, OUT gets
summary.json, summary.md, log.txt (the shell script's) and raw.tar.gz (every stage's output): four
files, one folder. Without CUDA (or with DRY=1) the run is a dry run: the CUDA stages are recorded
as "skipped: no CUDA", the parity suite runs (and skips), the step benchmark runs its toy model.
This file imports neither torch nor pjd at the top: the install stage must come first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
# (stage, time cap in seconds), in the order they run: what matters most first.
STAGES = (("env", 60), ("parity", 170), ("step", 150), ("kernels", 120), ("e2e", 100), ("graph", 60), ("demo", 60))
INSTALL_CAP = 240
CUDA_STAGES = {"kernels", "e2e", "graph", "demo"}  # nothing to run without CUDA (parity skips itself, step runs a toy)


def _python() -> str:
    return os.environ.get("PYTHON") or sys.executable


def _run(cmd, log: Path, timeout: float, env=None) -> tuple[int | None, float]:
    """(exit code or None on time-out, seconds); stdout + stderr into ``log``."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the stage and its children
            proc.wait()
            rc = None
    return rc, time.monotonic() - t0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def has_cuda() -> bool:
    if os.environ.get("DRY") == "1":
        return False
    probe = subprocess.run([_python(), "-c", "import torch; print(int(torch.cuda.is_available()))"],
                           capture_output=True, text=True, cwd=ROOT)
    return probe.stdout.strip() == "1"


def install(raw: Path, timeout: float) -> dict:
    """pip install --no-deps --no-build-isolation -e . (no network), then: does pjd._C_cuda load?"""
    log = raw / "install.log"
    cmd = [_python(), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-v", "-e", "."]
    rc, seconds = _run(cmd, log, timeout)
    result = dict(stage="install", seconds=round(seconds, 1), command=" ".join(cmd[1:]))
    if rc != 0:
        result.update(status="timed out" if rc is None else f"failed (exit {rc})", tail=_tail(log))
        return result
    probe = subprocess.run([_python(), "-c", "import pjd, pjd._C, pjd._C_cuda; print(pjd.__file__)"],
                           capture_output=True, text=True, cwd=ROOT)
    text = log.read_text(errors="replace")
    home = next((line.split("CUDA_HOME=", 1)[1].strip() for line in text.splitlines() if "pjd: CUDA_HOME=" in line),
                None)
    result.update(status="ok", cuda_home=home, cuda_extension="built" if probe.returncode == 0 else "NOT BUILT")
    if probe.returncode != 0:
        result["cuda_extension_error"] = (probe.stderr.strip().splitlines() or ["?"])[-1]
        result["tail"] = "\n".join(line for line in text.splitlines() if "pjd" in line and "FAILED" in line
                                   or "cuda_runtime" in line)[-2000:]
        bar = "!" * 78
        print(f"\n{bar}\nGPU CHECK: the CUDA extension pjd._C_cuda did NOT build or load "
              f"({result['cuda_extension_error']}).\ncompact_kv runs its torch fallback; see install.log in "
              f"raw.tar.gz.\n{bar}\n", flush=True)
    return result


def stage_command(name: str, raw: Path, cuda: bool, cap: float) -> list:
    py = _python()
    if name == "env":
        return [py, __file__, "--stage", "env", "--raw", raw]
    if name == "parity":
        workers = ["-n", "4"] if cuda else []  # kernels compile in 4 processes (pytest-xdist) sharing the GPU
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *workers, "tests/test_gpu.py",
                "--junitxml", raw / "parity.xml"]
    if name == "step":
        budget = ["--budget-s", str(max(10, int(cap - 45)))]
        return [py, "benchmarks/gpu_step.py", "--out", raw / "step.json", "--ceilings", raw / "env.json", *budget,
                *([] if cuda else ["--toy", "--iters", "1"])]
    if name == "kernels":
        return [py, __file__, "--stage", "kernels", "--raw", raw]
    if name == "e2e":
        return [py, "benchmarks/e2e.py", "--device", "cuda", "--sections", "speed", "--batch", "1",
                "--speed-methods", "ar,sjd,pjd", "--hf-cfg", "batched", "--repeats", "3", "--out", raw / "e2e"]
    if name == "graph":  # issue 20: the step captured as a CUDA graph against eager (tokens_equal_to_eager)
        return [py, "benchmarks/e2e.py", "--device", "cuda", "--sections", "speed", "--batch", "1",
                "--speed-methods", "ar,pjd,ar-compiled,pjd-compiled", "--hf-cfg", "batched", "--repeats", "2",
                "--out", raw / "graph"]
    if name == "demo":
        return [py, "-m", "pjd.cli", "demo", "--device", "cuda", "--no-progress", "--out", raw / "demo",
                "--json", raw / "demo_rows.json"]
    raise ValueError(name)


# --- stage bodies run in their own process (--stage NAME) -------------------------------------------------

def env_stage(raw: Path) -> None:
    import importlib.metadata as md
    import platform

    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda)
    for pkg in ("triton", "transformers", "numpy", "pytest", "matplotlib"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    info["flash_attn"] = "installed" if _importable("flash_attn") else "not installed"
    from pjd.ops import compact_kv_backend

    info["compact_kv_backend_cuda"] = compact_kv_backend("cuda")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from roofline import measure_ceilings

        info.update(measure_ceilings(torch.device("cuda")))
    else:
        info["gpu"] = "none (no CUDA): dry run"
    (raw / "env.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def kernels_stage(raw: Path) -> None:
    """Verification and attention microbenchmarks (per-call and graph-replayed times)."""
    for script, args in (("verify.py", ["--out", raw / "verify"]),
                         ("roofline.py", ["--no-docs", "--ceilings", raw / "env.json", "--out", raw / "roofline"]),
                         ("attention.py", ["--quick", "--out", raw / "attention"])):  # flex compiles: last
        rc = subprocess.run([_python(), str(ROOT / "benchmarks" / script), *map(str, args)], cwd=ROOT).returncode
        if rc:
            raise SystemExit(f"benchmarks/{script} exited {rc}")


# --- summary ------------------------------------------------------------------------------------------------

def _parity_headline(raw: Path) -> dict:
    xml = raw / "parity.xml"
    if not xml.exists():
        return {}
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    headline = dict(counts, failed=failed[:20])
    reports = sorted(raw.glob("parity_kernels.*.json"))  # one per pytest-xdist worker
    if reports:
        headline["compiled_variants"] = [v for path in reports for v in json.loads(path.read_text())]
    return headline


def _headline(name: str, raw: Path) -> dict:
    try:
        if name == "env" and (raw / "env.json").exists():
            return json.loads((raw / "env.json").read_text())
        if name == "parity":
            return _parity_headline(raw)
        if name == "step" and (raw / "step.json").exists():
            step = json.loads((raw / "step.json").read_text())
            keep = ("model", "method", "rows", "inputs", "fill", "eager_ms", "graph_ms", "eager_vs_ar", "graph_vs_ar",
                    "graph_of_copy_bandwidth", "graph")
            return dict(device=step["device"], toy=step["toy"], note=step["note"],
                        not_run_for_budget=step["not_run_for_budget"], projections=step.get("projections", []),
                        rows=[{k: r.get(k) for k in keep} for r in step["rows"]])
        if name in ("e2e", "graph"):
            found = sorted((raw / name).glob("e2e/*.json"))
            if found:
                report = json.loads(found[0].read_text())
                return dict(device=report["device"], rows=report["sections"].get("speed"))
        if name == "kernels":
            out = {}
            for key, path in (("verify", raw / "verify" / "verify.json"), ("attention", raw / "attention" / "attention.json")):
                if path.exists():
                    out[key] = json.loads(path.read_text())["results"]
            return out
        if name == "demo" and (raw / "demo_rows.json").exists():
            return dict(rows=json.loads((raw / "demo_rows.json").read_text()))
    except (OSError, ValueError, KeyError) as err:
        return dict(headline_error=f"{type(err).__name__}: {err}")
    return {}


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def markdown(summary: dict) -> str:
    lines = [f"# GPU check {summary['date']} — {summary['device']}", "",
             f"Mode: **{summary['mode']}**; commit {summary['commit']}; total {summary['total_s']:.0f} s "
             f"(budget {summary['budget_s']:.0f} s: no stage starts after it). Re-run chosen stages: "
             f"`STAGES=parity,step bash scripts/gpu_check.sh`.", "",
             "| stage | status | seconds |", "|---|---|---:|"]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} |")
    stages = {s["stage"]: s for s in summary["stages"]}
    inst = stages.get("install", {})
    if inst.get("status") == "ok":
        lines += ["", f"Install: CUDA_HOME {inst.get('cuda_home')}, CUDA extension **{inst.get('cuda_extension')}**"
                  + (f" ({inst['cuda_extension_error']})" if inst.get("cuda_extension_error") else "")]
    env = stages.get("env", {}).get("result", {})
    if env:
        ceil = ""
        if env.get("copy_bytes_per_s"):
            ceil = (f"; measured copy bandwidth **{env['copy_bytes_per_s'] / 1e12:.2f} TB/s**, bf16 matmul "
                    f"({env['matmul_n']}^3) **{env['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s**")
        lines += ["", f"Env: {env.get('gpu')} ({env.get('sm_count', '-')} SMs, cc {env.get('capability', '-')}); "
                  f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, transformers "
                  f"{env.get('transformers')}, numpy {env.get('numpy')}, flash-attn {env.get('flash_attn')}; "
                  f"compact_kv on cuda: {env.get('compact_kv_backend_cuda')}{ceil}"]
    parity = stages.get("parity", {}).get("result", {})
    if parity:
        lines += ["", f"Parity (tests/test_gpu.py): {parity.get('tests', 0)} tests, {parity.get('failures', 0)} failed, "
                  f"{parity.get('errors', 0)} errors, {parity.get('skipped', 0)} skipped"]
        lines += [f"- FAILED {f}" for f in parity.get("failed", [])]
        variants = parity.get("compiled_variants", [])
        for kernel in sorted({v["kernel"] for v in variants}):
            mine = [v for v in variants if v["kernel"] == kernel]
            lines.append(f"- compiled here: {kernel}: {len(mine)} variants, max {max(v['regs'] or 0 for v in mine)} "
                         f"registers, {sum(v['spills'] or 0 for v in mine)} spills")
    step = stages.get("step", {}).get("result", {})
    if step.get("rows"):
        lines += ["", f"Step ({step['device']}; {step['note']}):", "",
                  "| model | method | rows x inputs | fill | eager ms | graph ms | t/t(ar) graph | share of copy BW | graph |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in step["rows"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['rows']} x {r['inputs'] // max(1, r['rows'])} | "
                         f"{r['fill']:.0%} | {_fmt(r.get('eager_ms'))} | {_fmt(r.get('graph_ms'))} | "
                         f"{_fmt(r.get('graph_vs_ar'), '.2f')} | {_fmt(r.get('graph_of_copy_bandwidth'), '.1%')} | "
                         f"{r.get('graph')} |")
        for p in step.get("projections", []):
            lines.append(f"\n{p['model']}: **PROJECTION, not a measurement** (the PJD paper's step counts x the "
                         f"graph-replayed ms/step above): ar {p['ar_steps']} x {p['ar_ms_per_step']:.2f} ms = "
                         f"{p['ar_image_ms']:.0f} ms/image, pjd {p['pjd_steps']} x {p['pjd_ms_per_step']:.2f} ms = "
                         f"{p['pjd_image_ms']:.0f} ms/image ({p['speedup']:.2f}x)")
        if step.get("not_run_for_budget"):
            lines.append(f"\nNot run (stage budget): {len(step['not_run_for_budget'])} configurations")
    kernels = stages.get("kernels", {}).get("result", {})
    if kernels.get("verify"):
        lines += ["", "speculative_verify (ms per call: do_bench with L2 flush / graph-replayed kernel-only):", "",
                  "| V | lanes | triton | triton graph | torch | torch graph |", "|---:|---:|---:|---:|---:|---:|"]
        for r in kernels["verify"]:
            lines.append(f"| {r['vocab']} | {r['lanes']} | {_fmt(r.get('triton_ms'))} | {_fmt(r.get('triton_graph_ms'))} "
                         f"| {_fmt(r.get('torch_ms'))} | {_fmt(r.get('torch_graph_ms'))} |")
    if kernels.get("attention"):
        names = ("pjd", "flex", "sdpa", "flash")
        lines += ["", "draft attention (ms per call / graph-replayed):", "",
                  "| case | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for r in kernels["attention"]:
            cells = [f"{_fmt(r.get(f'{n}_ms'))} / {_fmt(r.get(f'{n}_graph_ms'))}" if r.get(f"{n}_ms") == r.get(f"{n}_ms")
                     else r.get(f"{n}_note", "-") for n in names]
            lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    for name, key in (("e2e", "median_s_per_image"), ("demo", "seconds")):
        rows = stages.get(name, {}).get("result", {}).get("rows") or []
        if rows:
            lines += ["", f"{name} (whole decodes of the embedded model on the GPU; real step counts):", "",
                      "| method | steps | seconds |", "|---|---:|---:|"]
            lines += [f"| {r['method']} | {r.get('steps')} | {_fmt(r.get(key))} |" for r in rows]
    for s in summary["stages"]:
        if s.get("tail") and not s["status"].startswith(("ok", "skipped", "not started")):
            lines += ["", f"### {s['stage']}: {s['status']}", "```", s["tail"], "```"]
    lines += ["", "Figures of a dry run (no CUDA) are code-path checks, not GPU measurements. Raw outputs: raw.tar.gz."]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "unknown"


def drive(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "summary.md", "raw.tar.gz"):
        (out / name).unlink(missing_ok=True)
    raw = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    start = args.start or time.time()
    known = [name for name, _ in STAGES]
    wanted = [s for s in (args.stages or ",".join(known)).split(",") if s]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        print(f"gpu_check: unknown stages {unknown}; choose from {known}", file=sys.stderr)
        return 2
    cuda = has_cuda()
    summary = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), mode="GPU" if cuda else "dry run (no CUDA)",
                   commit=_commit(), budget_s=args.budget_s, hard_s=args.hard_s, device="no CUDA", stages=[])

    def elapsed():
        return time.time() - start

    try:
        if not cuda:
            summary["stages"].append(dict(stage="install", status="skipped: no CUDA (dry run uses this environment)"))
        elif os.environ.get("INSTALL", "1") == "0":
            summary["stages"].append(dict(stage="install", status="skipped: INSTALL=0"))
        else:
            summary["stages"].append(install(raw, min(INSTALL_CAP, args.hard_s - elapsed())))
        for name, cap in STAGES:
            if name not in wanted:
                continue
            entry = dict(stage=name)
            summary["stages"].append(entry)
            if name in CUDA_STAGES and not cuda:
                entry["status"] = "skipped: no CUDA"
                continue
            if elapsed() > args.budget_s:
                entry["status"] = f"not started: budget ({elapsed():.0f} s > {args.budget_s:.0f} s)"
                continue
            timeout = min(cap, args.hard_s - elapsed())
            log = raw / f"{name}.log"
            print(f"gpu_check: stage {name} (cap {timeout:.0f} s) at {elapsed():.0f} s", flush=True)
            try:
                rc, seconds = _run(stage_command(name, raw, cuda, timeout), log, timeout,
                                   env={"PJD_GPU_REPORT": str(raw / "parity_kernels.json"), "PYTHONUNBUFFERED": "1"})
                entry["seconds"] = round(seconds, 1)
                entry["status"] = ("ok" if rc == 0 else f"timed out after {timeout:.0f} s" if rc is None
                                   else f"failed (exit {rc})")
            except Exception as err:  # noqa: BLE001 -- a stage's failure is recorded, the next one runs
                entry["status"] = f"failed: {type(err).__name__}: {err}"
            entry["result"] = _headline(name, raw)
            spilling = [v for v in entry["result"].get("compiled_variants", []) if v.get("spills")]
            if spilling and entry["status"] == "ok":  # the per-process test sees one xdist worker's variants
                entry["status"] = f"failed: {len(spilling)} compiled variants spill on this GPU"
            if entry["status"] != "ok":
                entry["tail"] = _tail(log)
            print(f"gpu_check: stage {name}: {entry['status']}", flush=True)
        env = next((s.get("result", {}) for s in summary["stages"] if s["stage"] == "env"), {})
        summary["device"] = env.get("gpu", summary["device"])
    finally:
        summary["total_s"] = elapsed()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "summary.md").write_text(markdown(summary))
        with tarfile.open(out / "raw.tar.gz", "w:gz") as tar:
            tar.add(raw, arcname="raw")
        shutil.rmtree(raw, ignore_errors=True)
    failed = [s["stage"] for s in summary["stages"] if not s["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out/gpu_check"))
    p.add_argument("--stages", default=os.environ.get("STAGES"), help="comma-separated subset (re-run mode)")
    p.add_argument("--start", type=float, default=None, help="epoch seconds the run started (the shell script's)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 450)))
    p.add_argument("--hard-s", type=float, default=float(os.environ.get("HARD_S", 530)))
    p.add_argument("--stage", choices=["env", "kernels"], help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        {"env": env_stage, "kernels": kernels_stage}[args.stage](Path(args.raw))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
