"""LlamaGen's own sampler as a baseline (pjd.baseline.OfficialLlamaGen) and its rows in benchmarks/e2e.py.

The official repository (github.com/FoundationVision/LlamaGen) is an external dependency that nothing in
pjd ships or downloads: the tests that run its code skip unless $PJD_LLAMAGEN_REPO names a checkout.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

import pjd
from pjd.baseline import LLAMAGEN_REPO_ENV, OfficialLlamaGen, llamagen_repo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import e2e  # noqa: E402

REPO = os.environ.get(LLAMAGEN_REPO_ENV)
needs_checkout = pytest.mark.skipif(
    not REPO, reason=f"external dependency: set ${LLAMAGEN_REPO_ENV} to a checkout of github.com/FoundationVision/LlamaGen")


def test_a_missing_checkout_is_named_with_how_to_give_it(monkeypatch, tmp_path):
    monkeypatch.delenv(LLAMAGEN_REPO_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=LLAMAGEN_REPO_ENV) as e:
        llamagen_repo()
    assert "--llamagen-repo" in str(e.value) and "git clone" in str(e.value)
    with pytest.raises(FileNotFoundError, match="not a checkout .*autoregressive/models/gpt.py"):
        OfficialLlamaGen.default(repo=tmp_path)


def test_e2e_refuses_bad_speed_methods_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(LLAMAGEN_REPO_ENV, raising=False)
    monkeypatch.setattr(e2e, "Bench", lambda *a, **k: pytest.fail("the bench was built"))
    for methods, message in (("ar,llamagen", LLAMAGEN_REPO_ENV), ("ar,greedy", "--speed-methods: unknown")):
        with pytest.raises(SystemExit):
            e2e.main(["--sections", "speed", "--speed-methods", methods, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def official():
    return OfficialLlamaGen.default(repo=REPO)


@needs_checkout
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_official_greedy_decode_equals_pjd_ar(official, cfg_scale):
    """Their Transformer + generate() on the embedded checkpoint == pjd's LlamaForCausalLM port (greedy, CFG)."""
    dm, labels = pjd.models.default(), torch.tensor([0, 7])
    tokens, seconds = official.generate(labels, cfg_scale=cfg_scale, top_k=1)
    with torch.no_grad():
        ar = pjd.generate(dm.model, dm.prompt(labels), height=16, width=16, method="ar", top_k=1,
                          image_token_range=dm.image_token_range, cfg_scale=cfg_scale,
                          uncond_input_ids=dm.null_prompt(2) if cfg_scale != 1 else None)
    assert tokens.shape == (2, 16, 16) and seconds > 0
    assert torch.equal(tokens, ar.tokens)


@needs_checkout
def test_official_sampling_follows_the_seed_and_checks_its_arguments(official):
    a, b, c = (official.generate([3], cfg_scale=3.0, top_k=50, seed=s)[0] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 256
    with pytest.raises(ValueError, match="cfg_scale"):
        official.generate([3], cfg_scale=0.5)
    with pytest.raises(ValueError, match="labels"):
        official.generate([10])


@needs_checkout
def test_e2e_speed_rows_of_the_llamagen_baselines(monkeypatch):
    """Both baselines interleaved, warmed up (the compiled one timed apart), same tokens for a seed."""
    from pjd import baseline

    # dynamo without inductor: the same plumbing in seconds instead of a CPU compile's minute
    monkeypatch.setattr(baseline, "LLAMAGEN_COMPILE", dict(backend="eager", fullgraph=True))
    bench = e2e.Bench("default", batch=1, seed=0, cfg_scale=3.0, llamagen_repo=REPO)
    rows = {r["method"]: r for r in e2e.speed_section(bench, ["llamagen", "llamagen-compiled"], repeats=1,
                                                       hf_modes=[])}
    eager, compiled = rows["llamagen"], rows["llamagen-compiled"]
    assert list(rows) == ["llamagen", "llamagen-compiled"] and eager["steps"] == compiled["steps"] == 256
    assert eager["speedup_vs_llamagen"] == 1.0 and compiled["speedup_vs_llamagen_compiled"] == 1.0
    assert compiled["tokens_equal_to_eager"] == 1.0 and "compile_s" in compiled and "compile_s" not in eager
    assert 5 < eager["ops_per_step"] < 60 and compiled["ops_per_step"] is None
    assert [w.get("compiled") for w in bench.warm.log] == [False, True]
