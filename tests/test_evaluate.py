"""`pjd eval`: measures over a sample directory or npz, chunked in index order."""
import json

import numpy as np
import pytest
import torch

from pjd import cli
from pjd.evaluate import EvalError, Measures, load_samples, run_eval


def _toy_measures() -> Measures:
    """Features: per-channel means and stds; class: the brightest channel. FID: squared mean distance."""
    def features(x):
        x = x.double()
        return torch.cat([x.mean((1, 2)), x.std((1, 2))], 1)

    return Measures(name="toy", features=features, classify=lambda x: x.double().mean((1, 2)).argmax(1),
                    reference=lambda: (torch.full((6,), 100.0), None),
                    fid=lambda f, ref: float(((f.mean(0) - ref[0]) ** 2).sum()))


def _write_run(folder, n=11, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, n)
    folder.mkdir()
    np.savez(folder / "samples.npz", arr_0=images)
    records = [dict(index=i, class_id=int(c), file=f"images/{i:06d}.png") for i, c in enumerate(labels)]
    (folder / "manifest.json").write_text(json.dumps(dict(settings={}, images=records)))
    return images, labels


@pytest.mark.parametrize("batch_size", [1, 4, 500])
def test_measures_over_chunks_equal_one_pass(tmp_path, batch_size):
    images, labels = _write_run(tmp_path / "run")
    m = _toy_measures()
    report = run_eval(tmp_path / "run", batch_size=batch_size, measures=m)
    x = torch.from_numpy(images)
    assert report["fid"] == pytest.approx(m.fid(m.features(x), m.reference()), rel=1e-12)
    correct = m.classify(x).numpy() == labels
    assert report["class_accuracy"] == correct.mean()
    assert report["per_class_accuracy"] == {c: correct[labels == c].mean() for c in range(3) if (labels == c).any()}
    lo, hi = report["class_accuracy_ci95"]
    assert lo <= report["class_accuracy"] <= hi and lo < hi
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["fid"] == report["fid"]


def test_npz_without_manifest_gives_fid_only(tmp_path, capsys):
    images, _ = _write_run(tmp_path / "run")
    (tmp_path / "run" / "manifest.json").unlink()
    report = run_eval(tmp_path / "run" / "samples.npz", measures=_toy_measures(), write=False)
    assert "class_accuracy" not in report and report["images"] == images.shape[0]
    printed = capsys.readouterr().out
    assert "no class accuracy (no manifest.json" in printed and "class accuracy -" not in printed
    assert "FID is biased upward at small N" in printed and "N = 11" in printed


def test_pngs_are_read_when_there_is_no_npz(tmp_path):
    from pjd.sample import SampleSettings, run_sample

    out = tmp_path / "s"
    run_sample(SampleSettings(num_images=5, model="tiny", method="sjd", seed=1), out, batch_size=2, npz=False,
               progress=False)
    images, labels, _ = load_samples(out)
    assert images.shape == (5, 8, 8, 3) and labels.tolist() == [0, 1, 2, 3, 0]


def test_bootstrap_off_and_bad(tmp_path):
    _write_run(tmp_path / "run")
    report = run_eval(tmp_path / "run", bootstrap=0, measures=_toy_measures(), write=False)
    assert "class_accuracy_ci95" not in report
    with pytest.raises(EvalError, match="bootstrap"):
        run_eval(tmp_path / "run", bootstrap=1, measures=_toy_measures())


@pytest.mark.parametrize("setup,match", [
    (lambda d: None, "samples"),
    (lambda d: d.mkdir(), "neither"),
    (lambda d: (d.mkdir(), np.savez(d / "samples.npz", arr_0=np.zeros((3, 4, 4), np.uint8))), "got shape"),
    (lambda d: (d.mkdir(), np.savez(d / "samples.npz", arr_0=np.zeros((3, 4, 4, 3), np.float32))), "uint8"),
    (lambda d: (d.mkdir(), np.savez(d / "samples.npz", x=np.zeros((3, 4, 4, 3), np.uint8))), "arr_0"),
])
def test_bad_inputs(tmp_path, capsys, setup, match):
    setup(tmp_path / "d")
    with pytest.raises(EvalError, match=match):
        run_eval(tmp_path / "d", measures=_toy_measures())
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path / "d")])
    assert match in capsys.readouterr().err


def _grey_run(folder, n=12):
    """n grey 28x28 images (blurred noise, as RGB) and their requested classes, as `pjd sample` writes them."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 32, 32, generator=g), 5, 1)[:, 0] * 255
    grey = x.to(torch.uint8)
    labels = torch.arange(n) % 10
    folder.mkdir()
    np.savez(folder / "samples.npz", arr_0=grey[..., None].expand(n, 28, 28, 3).numpy())
    records = [dict(index=i, class_id=int(c), file=f"images/{i:06d}.png") for i, c in enumerate(labels)]
    (folder / "manifest.json").write_text(json.dumps(dict(settings={}, images=records)))
    return grey, labels


def test_default_measures_are_the_quality_api(tmp_path):
    """Exactly, for any batch size: the classifier sees one image at a time (pjd.quality._run)."""
    from pjd import quality

    grey, labels = _grey_run(tmp_path / "run")
    fid, accuracy = quality.fid(quality.classifier_features(grey)), quality.class_accuracy(grey, labels)
    for batch_size in (1, 5):
        report = run_eval(tmp_path / "run", batch_size=batch_size, bootstrap=0, write=False)
        assert (report["fid"], report["class_accuracy"]) == (fid, accuracy), batch_size
    from pjd.fashion.idx import CLASS_NAMES

    assert list(report["per_class_accuracy"]) == list(CLASS_NAMES)  # by name: the 12 images cover all 10 classes


@pytest.mark.slow
def test_eval_under_torchrun_matches_one_process(tmp_path):
    import os
    import subprocess
    import sys

    from test_sample import _free_port

    _grey_run(tmp_path / "run")
    one = run_eval(tmp_path / "run", batch_size=5, write=False)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "pjd.cli", "eval",
                           str(tmp_path / "run"), "--batch-size", "5"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert two["world_size"] == 2
    for key in ("fid", "class_accuracy", "per_class_accuracy", "images", "class_accuracy_ci95"):
        assert two[key] == json.loads(json.dumps(one))[key], key
    assert "FID" in proc.stdout
