"""Light checks of the benchmark scripts: roofline arithmetic by hand, attention correctness gate,
steps_per_image statistics, warm-up before every timed figure."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _report  # noqa: E402
import attention  # noqa: E402
import roofline  # noqa: E402

TINY = roofline.ModelConfig("tiny", layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16,
                            head_params=80, embed_params=80, height=2, width=4, eol=False, prefix=1)


def test_roofline_bytes_and_flops_match_hand_calculation():
    # per layer: q 8*8 + o 8*8 + k 8*4 + v 8*4 = 192 attention, 3*8*16 = 384 MLP
    assert TINY.layer_params == 576
    assert TINY.streamed_params == 2 * 576 + 80
    assert TINY.kv_bytes_per_token == 2 * 2 * 1 * 4 * 2  # K+V, layers, kv heads, D, bf16
    # first AR step: 1 input per sequence, CFG = 2 sequences, 1 cached key (the prefix token)
    step = roofline.ar_steps(TINY, 1)[0]
    assert (step.tokens, step.keys, step.visible_keys) == (1, 1, 1)
    nbytes, flops = roofline.step_cost(TINY, step)
    weights, kv_read, kv_write, embed = 1232 * 2, 2 * 1 * 32, 2 * 32, 2 * 8 * 2
    assert nbytes == weights + kv_read + kv_write + embed == 2624
    # matmuls 2 * params * tokens; attention 4 * layers * heads * D * visible keys, per sequence
    assert flops == 2 * 1232 * 2 + 2 * 4 * 2 * 2 * 4 * 1 == 5056
    dev = roofline.Device("toy", bandwidth=1000.0, peak_flops=1000.0)
    assert roofline.floor_seconds(TINY, [step], dev) == (pytest.approx(5.056), 1)  # compute-bound


def test_roofline_pjd_schedule_hits_the_step_count():
    steps, rate = roofline.pjd_steps(TINY, 3, context=1, window=3)
    assert len(steps) == 3 and 0 < rate <= 4
    assert all(s.tokens % 4 == 0 and s.tokens > 0 for s in steps)  # active rows x (window + 1)
    assert max(s.tokens for s in steps) == 8  # both rows active at some step
    row = roofline.analyse(TINY, compression=2.0, window=3, context=None)
    assert row["pjd_steps"] == 4 and row["compression"] == pytest.approx(2.0)
    for d in row["devices"].values():
        assert d["pjd_floor_ms"] < d["ar_floor_ms"]


def test_roofline_docs_block_is_replaced_not_appended(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("intro\n")
    _report.update_docs("roofline", "first\n", doc)
    _report.update_docs("roofline", "second\n", doc)
    text = doc.read_text()
    assert text.count("<!-- roofline:begin -->") == 1 and "second" in text and "first" not in text
    assert text.startswith("intro\n")


TINY_ATTN = attention.AttnModel("tiny", heads=4, kv_heads=2, head_dim=16, height=6, width=8, eol=True, prefix=5)


@pytest.mark.parametrize("rows", [1, 3])
def test_attention_baselines_agree_with_pjd(rows):
    case = attention.Case(TINY_ATTN, 0.5, rows)
    x = attention.make_inputs(case, torch.device("cpu"), torch.float32)
    run, skip = attention.variants(case, x, torch.device("cpu"))
    assert {"pjd", "sdpa", "flex"} <= set(run) and "flash" in skip
    errs = attention.check(case, x, run)
    assert max(errs.values()) < 2e-4


def test_attention_check_rejects_a_wrong_mask():
    case = attention.Case(TINY_ATTN, 0.5, 3)
    x = attention.make_inputs(case, torch.device("cpu"), torch.float32)
    run, _ = attention.variants(case, x, torch.device("cpu"))
    # plain causal attention lets a row see the other rows' drafts: the gate must catch it
    run["causal"] = lambda x: torch.nn.functional.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], attn_mask=(x["k_pos"][:, None, :] <= x["q_pos"][:, :, None])[:, None],
        enable_gqa=True)
    with pytest.raises(RuntimeError, match="causal disagrees"):
        attention.check(case, x, run)


def test_single_row_step_is_left_padded_causal_as_flash_attention_sees_it():
    """The flash variant (GPU only) relies on this: one row's step = bottom-right causal + left padding."""
    case = attention.Case(attention.MODELS[0], 0.5, 1)
    q_pos, q_group, k_pos, k_group = attention.build_metadata(case)
    x = dict(k_group=k_group)
    lead = attention.flash_leftpad(x)
    assert lead.tolist() == [0, case.model.prefix // 2]
    nq, nk = q_pos.shape[1], k_pos.shape[1]
    j = torch.arange(nk)[None, None, :]
    i = torch.arange(nq)[None, :, None]
    flash_mask = (j <= nk - nq + i) & (j >= lead[:, None, None])
    assert torch.equal(flash_mask, attention.visibility_mask(q_pos, q_group, k_pos, k_group))


# ---------------------------------------------------------------- e2e speed section: hf baseline, op counts
import e2e  # noqa: E402

import pjd  # noqa: E402
from pjd.baseline import hf_generate  # noqa: E402
from pjd.models import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(40, hidden_size=32, layers=2, heads=2, kv_heads=1, logit_scale=4.0, seed=3)


@pytest.mark.parametrize("eol", [None, 38])
@pytest.mark.parametrize("cfg_mode", ["batched", "guidance"])
def test_hf_baseline_greedy_equals_pjd_ar(lm, cfg_mode, eol):
    """Same target distribution as pjd (CFG, image tokens, forced EOL): greedy tokens agree."""
    ids, null = torch.tensor([[32, 33], [34, 35]]), torch.full((2, 2), 39)
    kw = dict(height=3, width=4, image_token_range=(0, 32), cfg_scale=3.0, uncond_input_ids=null, top_k=1,
              eol_token_id=eol)
    with torch.no_grad():
        ar = pjd.generate(lm, ids, method="ar", **kw)
    tokens, seconds, forwards = hf_generate(lm, ids, cfg_mode=cfg_mode, **kw)
    assert torch.equal(tokens, ar.tokens) and seconds > 0
    assert forwards == 3 * (4 + (eol is not None)) * (2 if cfg_mode == "guidance" else 1)


def test_hf_baseline_samples_image_tokens_and_restores_attention(lm):
    before = lm.config._attn_implementation
    ids = torch.tensor([[32], [33], [34]])
    a, _, _ = hf_generate(lm, ids, height=4, width=4, image_token_range=(8, 24), cfg_scale=2.0,
                          uncond_input_ids=torch.full_like(ids, 39), top_k=6, seed=1)
    b, _, _ = hf_generate(lm, ids, height=4, width=4, image_token_range=(8, 24), cfg_scale=2.0,
                          uncond_input_ids=torch.full_like(ids, 39), top_k=6, seed=2)
    assert a.shape == (3, 4, 4) and a.min() >= 8 and a.max() < 24
    assert not torch.equal(a, b)  # sampled: the seed matters
    assert lm.config._attn_implementation == before


def test_ops_outside_forward_ar_is_lean_and_pjd_does_not_grow_with_rows(lm):
    ids, null = torch.tensor([[32]]), torch.full((1, 1), 39)
    kw = dict(height=8, width=8, image_token_range=(0, 32), cfg_scale=3.0, uncond_input_ids=null, seed=0)

    def per_step(method, **extra):
        out = {}

        def go():
            with torch.no_grad():
                out["r"] = pjd.generate(lm, ids, method=method, **kw, **extra)
        return e2e.ops_outside_forward(lm, go) / out["r"].steps, out["r"]

    ar, _ = per_step("ar")
    assert ar <= 40
    one_row, r1 = per_step("pjd", context=8)   # one active row at a time
    many_rows, r2 = per_step("pjd", context=1)  # up to 8 rows at once
    assert r2.steps < r1.steps
    assert abs(one_row - many_rows) <= 0.05 * one_row
    reference, _ = per_step("ar", backend="torch")  # the counter sees the reference's extra work
    assert reference > 2 * ar


def test_steps_per_image_chunks_and_statistics(tmp_path):
    import steps_per_image

    out = tmp_path / "s.json"
    row = steps_per_image.main(["--n", "2", "--out", str(out)])  # two chunks of one image
    steps = torch.tensor(row["steps_per_image"], dtype=torch.float64)
    assert len(steps) == 2 and len(row["nll_per_image"]) == 2
    h, w = map(int, row["grid"].split("x"))
    assert ((steps >= 1) & (steps < h * w)).all()  # pjd needs fewer steps than AR's one per token
    assert row["steps_mean"] == pytest.approx(float(steps.mean()))
    assert row["steps_sem"] == pytest.approx(float(steps.std() / 2 ** 0.5))
    assert row["per_image_compression"] == pytest.approx(h * w / float(steps.mean()))
    assert row["nll_mean"] > 0 and out.exists()
    assert not [k for k in row if "second" in k]  # steps and NLL only: it times nothing (see its docstring)


def test_batch_invariance_report_on_the_tiny_model(capsys):
    import batch_invariance

    out = batch_invariance.main(["--model", "tiny", "--batch", "3", "--method", "sjd"])
    assert len(out["logit_max_abs_diff"]) == 3 and len(out["images"]) == 3
    assert all(r["tokens_differing"] == 0 and r["steps_in_batch"] == r["steps_alone"] for r in out["images"])
    assert "images with any token differing: 0/3" in capsys.readouterr().out


# ---------------------------------------------------------------- warm-up before anything is timed
FIRST_CALL_S = 1.0  # a simulated compilation: what the first call of a callable costs below (well above
# what any tiny case costs on a loaded 2-core machine: eager FlexAttention took 0.2 s there)


def first_call_sleeps(fn, key=lambda *args, **kwargs: None):
    """fn, whose first call per ``key(*args, **kwargs)`` sleeps FIRST_CALL_S first (like a Triton compile)."""
    seen = set()

    def wrapped(*args, **kwargs):
        k = key(*args, **kwargs)
        if k not in seen:
            seen.add(k)
            time.sleep(FIRST_CALL_S)
        return fn(*args, **kwargs)
    return wrapped


def test_time_ms_never_times_the_first_call():
    from pjd.timing import time_ms

    calls = []
    median, low = time_ms(first_call_sleeps(lambda: calls.append(1)), torch.device("cpu"), repeats=1)
    assert len(calls) == 2 and median == low < 1e3 * FIRST_CALL_S / 2


def test_warm_up_runs_each_configuration_once_and_refuses_a_generator(lm):
    from pjd.timing import WarmUp

    warm, kw = WarmUp(), dict(height=2, width=2, image_token_range=(0, 32), method="sjd")
    ids = torch.tensor([[32], [33]])
    with torch.no_grad():
        a = warm.generate(lm, ids, seed=1, **kw)
        b = warm.generate(lm, ids + 1, seed=2, **kw)  # another seed and other classes: the same configuration
        warm.generate(lm, ids[:1], seed=1, **kw)  # another batch size: a new one
        assert torch.equal(a.tokens, pjd.generate(lm, ids, seed=1, **kw).tokens)  # the warm-up left it unchanged
    assert not torch.equal(a.tokens, b.tokens)
    assert [w["args"][1]["shape"] for w in warm.log] == [[2, 1], [1, 1]] and warm.log[0]["method"] == "sjd"
    with pytest.raises(ValueError, match="seed"):
        warm.generate(lm, ids, generator=torch.Generator(), **kw)


def test_warm_up_where_nothing_compiles_decodes_one_row(lm, monkeypatch):
    """CPU / sdpa: nothing is compiled, so the warm-up is one row of the same decode, not the whole."""
    from pjd import timing

    heights, real = [], pjd.generate
    monkeypatch.setattr(pjd, "generate", lambda *a, **k: heights.append(k["height"]) or real(*a, **k))
    kw = dict(height=3, width=2, image_token_range=(0, 32), method="pjd", seed=0)
    with torch.no_grad():
        warm = timing.WarmUp()
        warm.generate(lm, torch.tensor([[32]]), **kw)
    assert heights == [1, 3] and warm.reruns == []


def test_warm_up_of_a_compiled_step_is_the_identical_call(lm, monkeypatch):
    """generate(compile=True) compiles the step for the call's shapes: the warm-up is the identical call
    (one row would compile another graph), its compile time logged apart; e2e names the variants."""
    from types import SimpleNamespace

    from pjd import timing

    calls = []

    def fake(model, ids, **kw):
        calls.append(kw["height"])
        return SimpleNamespace(compile_seconds=5.0 if len(calls) == 1 else 0.0)

    monkeypatch.setattr(pjd, "generate", fake)
    warm = timing.WarmUp()
    out = warm.generate(lm, torch.tensor([[32]]), height=3, width=2, method="pjd", compile=True, seed=0)
    assert calls == [3, 3] and out.compile_seconds == 0.0 and warm.log[0]["compile_seconds"] == 5.0
    assert e2e.variant("pjd-compiled") == ("pjd", {"compile": True})
    assert e2e.variant("sjd++-fixed") == ("sjd++", {"fixed_shapes": True})
    assert e2e.variant("llamagen-compiled") == ("llamagen-compiled", {})


def test_warm_up_reruns_a_timed_call_that_compiled(lm, compile_on_first_call, monkeypatch):
    """GPU: the one-row warm-up compiles what one row reaches; a timed call that still compiled a
    variant (e.g. split-KV attention, reached only by longer caches) is run again, never reported."""
    from pjd import timing

    heights, counted = [], pjd.generate
    monkeypatch.setattr(pjd, "generate", lambda *a, **k: heights.append(k["height"]) or counted(*a, **k))
    kw = dict(height=3, width=2, image_token_range=(0, 32), method="pjd", seed=0)
    warm = timing.WarmUp()
    with torch.no_grad():
        first = warm.generate(lm, torch.tensor([[32]]), **kw)
        second = warm.generate(lm, torch.tensor([[33]]), **{**kw, "seed": 1})  # warmed: neither warmed nor rerun
    assert heights == [1, 3, 3, 3] and warm.reruns == ["pjd.generate pjd"]
    assert first.wall_seconds < compile_on_first_call and second.wall_seconds < compile_on_first_call


def test_e2e_times_only_warmed_configurations(compile_on_first_call):
    bench = e2e.Bench("tiny", batch=1, seed=0, cfg_scale=3.0)
    bench.height = bench.width = 4  # a small grid: only the order of calls matters here
    rows = e2e.speed_section(bench, ["ar", "pjd"], repeats=1, hf_modes=["batched"])
    assert [r["method"] for r in rows] == ["ar", "hf-batched", "pjd"]
    assert all(r["median_s_per_image"] < compile_on_first_call for r in rows)
    assert bench.run("pjd", context=2)["seconds"] < compile_on_first_call
    assert [(w["call"], w.get("method"), w.get("context")) for w in bench.warm.log] == [
        ("pjd.generate", "ar", None), ("hf_generate", None, None), ("pjd.generate", "pjd", None),
        ("pjd.generate", "pjd", 2)]


def test_microbenchmarks_time_only_after_a_warm_up(monkeypatch, tmp_path):
    import compaction
    import verify

    limit_ms = 0.9e3 * FIRST_CALL_S  # a timed first call would cost at least FIRST_CALL_S
    real_variants = attention.variants

    def variants(case, x, device):
        run, skip = real_variants(case, x, device)
        return {name: first_call_sleeps(fn) for name, fn in run.items()}, skip

    monkeypatch.setattr(attention, "variants", variants)
    monkeypatch.setattr(attention, "flex_block_mask", first_call_sleeps(attention.flex_block_mask))
    row = attention.run_case(attention.Case(TINY_ATTN, 0.5, 3), torch.device("cpu"), torch.float32, repeats=1)
    assert all(row[f"{n}_ms"] < limit_ms for n in ("pjd", "flex", "sdpa")) and row["flex_mask_ms"] < limit_ms

    monkeypatch.setattr(verify, "run_op", first_call_sleeps(verify.run_op, key=lambda x, backend: backend))
    assert verify.run_case(64, 1, torch.device("cpu"), torch.float32, repeats=1)["torch_ms"] < limit_ms

    monkeypatch.setattr(compaction, "compact_kv", first_call_sleeps(compaction.compact_kv,
                                                                     key=lambda *a, backend, **k: backend))
    compaction.main(["--out", str(tmp_path), "--layers", "1", "--heads", "1", "--head-dim", "4", "--cache", "8",
                     "--tails", "4", "--dtypes", "fp32", "--repeats", "1"])
    rows = json.loads((tmp_path / "compaction.json").read_text())["rows"]
    assert rows and all(r["native_ms"] < limit_ms and r["torch_ms"] < limit_ms for r in rows)


def test_charts_are_drawn_by_matplotlib(tmp_path):
    from PIL import Image

    _report.bar_chart([("a", 1.0), ("b", float("nan")), ("c", 2.5)], tmp_path / "bar.png", title="t", unit="ms",
                      colors=[0, 1, 0])
    _report.line_chart({"pjd": [(1, 2.0), (2, 3.0), (4, float("nan"))], "zipar": [(1, 1.0)]}, tmp_path / "line.png",
                       title="t", xlabel="c", ylabel="y", log_x=True)
    for name in ("bar.png", "line.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and min(img.size) > 100


def test_table1_rows_select_by_method_or_context_and_merge_a_previous_run():
    """--table1-methods picks rows by method or method:context; --table1-merge keeps the previous
    run's rows this run did not decode (marked reused) in Table 1's order, and the new rows win."""
    import _table1

    rows = _table1.table1_rows(16)
    assert [_table1.row_key(m, kw) for m, kw in rows if _table1.selected(m, kw, ["ar", "pjd:2"])] == ["ar", "pjd:2"]
    assert sum(_table1.selected(m, kw, ["pjd"]) for m, kw in rows) == 4
    old = [dict(method="ar", fid=1.0), dict(method="sjd", fid=2.0), dict(method="pjd", context=4, fid=3.0),
           dict(method="pjd", context=16, fid=4.0)]
    new = [dict(method="pjd", context=4, fid=5.0), dict(method="pjd", context=2, fid=6.0), dict(method="ar", fid=7.0)]
    merged = _table1.merge_rows(old, new, "from run X", 16)
    assert [(_table1.row_key(r["method"], r), r["fid"], r.get("reused")) for r in merged] == [
        ("ar", 7.0, None), ("sjd", 2.0, "from run X"), ("pjd:2", 6.0, None), ("pjd:4", 5.0, None),
        ("pjd:16", 4.0, "from run X")]
    for r in merged:
        r.update(samples=10, steps_per_image=1.0, step_compression=1.0, seconds=1.0, fid_ci=(0, 1),
                 class_accuracy=0.5, class_accuracy_ci=(0, 1), nll_per_token=1.0, nll_sem=0.1)
    text = _table1.markdown(merged, "CPU")
    assert "| sjd † |" in text and "| ar |" in text and text.count("† from run X") == 1


def test_host_reads_counts_what_reads_a_value_back_and_nothing_else():
    """benchmarks/host_reads.py's counter (tests/test_fixed_step.py's too): .item(), int(), bool() and
    tolist count; device-side work does not."""
    import collections

    import host_reads

    x, tolist_before = torch.arange(6.0), torch.Tensor.tolist
    with host_reads.HostReads() as reads, host_reads.counting_tolist(collections.Counter()) as tolist:
        y = (x * 2).cumsum(0)  # no read
        x.sum().item(), int(x[1]), bool(x[2] > 0)
        y.tolist()
    assert reads.ops == {"_local_scalar_dense": 3}
    assert tolist["tolist"] == 1
    assert torch.Tensor.tolist is tolist_before  # restored
