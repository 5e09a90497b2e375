"""`pjd sample`: results independent of ranks and batch size, resumable, bad inputs refused."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pjd import cli
from pjd.sample import IMAGE_DIR, SampleError, SampleSettings, chunks, run_sample

N = 10
COMMON = ["--model", "tiny", "--method", "pjd", "--context", "2", "--top-k", "8", "--cfg-scale", "2.0",
          "--seed", "7", "--classes", "0,2,class3", "--no-progress"]


def _settings(**kw):
    base = dict(num_images=N, classes=["0", "2", "class3"], model="tiny", method="pjd", context=2, top_k=8,
                cfg_scale=2.0, seed=7)
    return SampleSettings(**{**base, **kw})


def _files(out: Path) -> dict:
    """Every result file's bytes (PNGs, manifest, npz), by relative path; summary.json holds timings."""
    names = [f"{IMAGE_DIR}/{p.name}" for p in sorted((out / IMAGE_DIR).iterdir())] + ["manifest.json", "samples.npz"]
    return {name: (out / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    summary = run_sample(_settings(), out, batch_size=4, progress=False)
    return out, summary


def test_single_process_output(reference):
    out, summary = reference
    files = _files(out)
    assert sorted(files) == [f"{IMAGE_DIR}/{i:06d}.png" for i in range(N)] + ["manifest.json", "samples.npz"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["class_id"] for r in manifest["images"]] == [[0, 2, 3][i % 3] for i in range(N)]
    assert manifest["settings"]["seed"] == 7 and manifest["settings"]["method"] == "pjd"
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 8, 8, 3)
    assert len({a.tobytes() for a in arr}) == N  # every image its own
    steps = [r["steps"] for r in manifest["images"]]
    assert summary["mean_steps_per_image"] == sum(steps) / N and summary["step_compression"] > 1
    assert summary["generated"] == N and summary["per_rank"][0]["batches"] == 3
    assert not list((out / IMAGE_DIR).glob(".*"))  # no temp file left behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(reference, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "pjd.cli", "sample", "-n", str(N), "--batch-size", "4", "--out", str(out), *COMMON]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(out) == _files(reference[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert [r["images"] for r in summary["per_rank"]] == [6, 4]  # chunks 0 and 2 on rank 0, chunk 1 on rank 1
    assert [r["rank"] for r in summary["per_rank"]] == [0, 1]


def test_chunks_split_by_index():
    assert [list(c) for c in chunks(10, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batch_size_does_not_change_the_images(reference, tmp_path):
    for bs in (1, 8):
        out = tmp_path / f"bs{bs}"
        run_sample(_settings(), out, batch_size=bs, progress=False)
        assert _files(out) == _files(reference[0]), bs


def test_resume_after_lost_images_rewrites_only_those(reference, tmp_path):
    out = tmp_path / "resume"
    run_sample(_settings(), out, batch_size=4, progress=False)
    for i in (1, 8):
        (out / IMAGE_DIR / f"{i:06d}.png").unlink()
    (out / "samples.npz").unlink()
    (out / IMAGE_DIR / ".000005.png.tmp-123").write_bytes(b"half a png")  # a killed writer's leftover
    summary = run_sample(_settings(), out, batch_size=4, progress=False)
    assert summary["generated"] == 2 and summary["per_rank"][0]["batches"] == 2  # chunks 0 and 2 only
    assert summary["mismatched_on_resume"] == 0
    assert _files(out) == _files(reference[0])
    # A file on disk that this run decodes differently is kept, and counted.
    from pjd.sample import _read_png, _write_png

    pixels, record = _read_png(out / IMAGE_DIR / "000000.png")
    _write_png(out / IMAGE_DIR / "000000.png", 255 - pixels, record)
    (out / IMAGE_DIR / "000003.png").unlink()
    assert run_sample(_settings(), out, batch_size=4, progress=False)["mismatched_on_resume"] == 1


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    n, args = 40, ["-n", "40", "--batch-size", "2", *COMMON]
    full = tmp_path / "full"
    assert cli.main(["sample", "--out", str(full), *args]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pjd.cli", "sample", "--out", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list((out / IMAGE_DIR).glob("*.png"))) < 3:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    written = list((out / IMAGE_DIR).glob("*.png"))
    assert 3 <= len(written) < n, "the run was not interrupted midway"
    assert not (out / "manifest.json").exists()
    for p in written:  # every visible file is complete
        assert p.read_bytes() == (full / IMAGE_DIR / p.name).read_bytes()
    assert cli.main(["sample", "--out", str(out), *args]) == 0
    assert _files(out) == _files(full)


@pytest.mark.parametrize("argv,match", [
    (["--classes", "0,9"], "unknown class id 9"),
    (["--classes", "dog"], "unknown class 'dog'"),
    (["--classes", ","], "classes"),
    (["-n", "0"], "--num-images"),
    (["-n", "-3"], "--num-images"),
    (["--batch-size", "0"], "--batch-size"),
    (["--top-k", "99"], "top_k"),
    (["--prompts", "/nonexistent/prompts.txt"], "prompts"),
    (["--model", "huge"], "--model"),
    (["--backend", "triton"], "TRITON_INTERPRET"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:99"], "--device"),  # no such device, with or without CUDA
    # pjd.generate's own checks (pjd._checks), run before run.json is written:
    (["--method", "sjd", "--no-row-causal"], "row_causal"),
    (["--method", "sjd", "--reuse-threshold", "0.3"], "reuse_threshold"),
    (["--temperature", "0"], "temperature"),
    (["--method", "sjd", "--row0-first", "on"], "row0_first"),
    (["--method", "ar", "--row-lead", "above"], "row_lead"),
    (["--seed", "-1"], "seed"),
])
def test_bad_arguments_are_refused(tmp_path, capsys, argv, match):
    base = ["sample", "--out", str(tmp_path / "o"), "--model", "tiny", "-n", "2", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        cli.main(base + argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o" / "run.json").exists()  # refused before the directory is bound


def test_directory_of_another_run_is_refused(reference, tmp_path):
    out = tmp_path / "other"
    run_sample(_settings(num_images=2), out, batch_size=2, progress=False)
    with pytest.raises(SampleError, match=r"another run \(seed: 7 there, 8 now\)"):
        run_sample(_settings(num_images=2, seed=8), out, batch_size=2, progress=False)
    with pytest.raises(SampleError, match="num_images: 2 there, 3 now"):
        run_sample(_settings(num_images=3), out, batch_size=2, progress=False)
    # The issue-21 rule is part of a run's identity: a directory of another rule is refused.
    with pytest.raises(SampleError, match="row_lead: 'row_end' there, 'above' now"):
        run_sample(_settings(num_images=2, row_lead="above", row0_first=False), out, batch_size=2, progress=False)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(SampleError, match="not empty"):
        run_sample(_settings(num_images=2), stray, batch_size=2, progress=False)


def test_prompts_file_sets_classes_and_count(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("class1\n\n3\nCLASS0\n")
    out = tmp_path / "p"
    assert cli.main(["sample", "--out", str(out), "--model", "tiny", "--prompts", str(prompts), "--method", "sjd",
                     "--no-progress", "--no-npz"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["class_id"] for r in manifest["images"]] == [1, 3, 0]
    assert not (out / "samples.npz").exists()
