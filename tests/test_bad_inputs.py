"""No silent wrong answers (issue 14): bad input is a TypeError/ValueError naming the argument,
raised before any decoding work; threads share a model safely; non-finite logits are reported;
the CLI exits 2 naming the flag; a soak of varied calls never leaves the model patched.

Tables: (call arguments, expected exception type, a word the message must contain: the argument).
"""
import random
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForSequenceClassification, LlamaModel

import pjd
import pjd.fast
from pjd.cli import main as cli_main
from pjd.models import decode_images, emu3_prompt, janus_prompt, llamagen_prompt, tiny_llama
from pjd.ops import compact_kv, draft_attention, speculative_verify
from test_speculative_verify import make_case, public_kwargs

VOCAB, IMAGE = 32, (0, 24)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, hidden_size=32, layers=1, heads=2, kv_heads=1, max_positions=64, logit_scale=3.0)


IDS = torch.tensor([[30, 31]])
GOOD = dict(height=2, width=3, image_token_range=IMAGE)


class CountingForward:
    """A forward hook counting model calls: bad arguments must fail before the first one."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


GENERATE_CASES = [
    # settings
    (dict(window=0, method="pjd"), ValueError, "window"),
    (dict(window=-2, method="sjd"), ValueError, "window"),
    (dict(window=2.5, method="sjd"), TypeError, "window"),
    (dict(window=3, method="ar"), ValueError, "window"),
    (dict(context=0, method="pjd"), ValueError, "context"),
    (dict(context=2.5, method="pjd"), TypeError, "context"),
    (dict(context=2, method="sjd"), ValueError, "context"),
    (dict(top_k=25), ValueError, "top_k"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=None), TypeError, "top_p"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature="1.0"), TypeError, "temperature"),
    (dict(temperature=1e-40), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(method="beam"), ValueError, "method"),
    (dict(cache="paged"), ValueError, "cache"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(draft_init="zeros"), ValueError, "draft_init"),
    (dict(draft_init="repeat_left", method="ar"), ValueError, "draft_init"),
    (dict(height=0), ValueError, "height"),
    (dict(width=3.0), TypeError, "width"),
    (dict(height=20, width=4), ValueError, "max_position_embeddings"),
    (dict(height=10**8, method="pjd"), ValueError, "max_position_embeddings"),
    (dict(image_token_range=(10, 40)), ValueError, "image_token_range"),
    (dict(image_token_range=(5, 5)), ValueError, "image_token_range"),
    (dict(image_token_range=(0.0, 24.0)), TypeError, "image_token_range"),
    (dict(image_token_range=(0, 12, 24)), TypeError, "image_token_range"),
    (dict(image_token_range="ab"), TypeError, "image_token_range"),
    (dict(eol_token_id=3), ValueError, "eol_token_id"),
    (dict(eol_token_id=99), ValueError, "eol_token_id"),
    (dict(eol_token_id=25.0), TypeError, "eol_token_id"),
    (dict(eol_token_id=True), TypeError, "eol_token_id"),
    (dict(cfg_scale=2.0), ValueError, "uncond_input_ids"),
    (dict(cfg_scale="2"), TypeError, "cfg_scale"),
    (dict(uncond_input_ids=IDS), ValueError, "cfg_scale"),
    (dict(uncond_attention_mask=torch.ones(1, 2)), ValueError, "uncond_attention_mask"),
    (dict(cfg_scale=2.0, uncond_input_ids=torch.tensor([[30], [31]])), ValueError, "uncond_input_ids"),
    (dict(cfg_scale=2.0, uncond_input_ids=torch.tensor([[40]])), ValueError, "uncond_input_ids"),
    (dict(cfg_scale=float("nan"), uncond_input_ids=IDS), ValueError, "cfg_scale"),
    (dict(attention_mask=torch.ones(1, 3)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 0]])), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[2, 1]])), ValueError, "attention_mask"),
    (dict(attention_mask=[[1, 1]]), TypeError, "attention_mask"),
    (dict(reuse_threshold=-1.0, method="pjd"), ValueError, "reuse_threshold"),
    (dict(reuse_threshold=0.3, method="sjd"), ValueError, "reuse_threshold"),
    (dict(reuse_threshold=float("nan"), method="sjd"), ValueError, "reuse_threshold"),
    (dict(reuse_threshold="high", method="pjd"), TypeError, "reuse_threshold"),
    (dict(coupled_draws="yes"), TypeError, "coupled_draws"),
    (dict(continuation=1), TypeError, "continuation"),
    (dict(coupled_draws=True, method="sjd++"), ValueError, "sjd\\+\\+'s draft reuse is not exact"),
    (dict(continuation=True, method="ar"), ValueError, "continuation"),
    (dict(continuation=True, method="pjd", reuse_threshold=0.5), ValueError, "replaces pjd's draft reuse"),
    (dict(row_causal="no"), TypeError, "row_causal"),
    (dict(row_causal=False, method="sjd"), ValueError, "row_causal"),
    (dict(row0_first="yes", method="pjd"), TypeError, "row0_first"),
    (dict(row0_first=True, method="sjd"), ValueError, "row0_first"),
    (dict(row_lead="left", method="pjd"), ValueError, "row_lead"),
    (dict(row_lead="above", method="ar"), ValueError, "row_lead"),
    (dict(progress="yes"), TypeError, "progress"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "generator"),
    (dict(generator=42), TypeError, "generator"),
    (dict(seed=1.7), TypeError, "seed"),
    (dict(seed="abc"), TypeError, "seed"),
    (dict(seed=2**70), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(backend="triton"), ValueError, "TRITON_INTERPRET"),
]


@pytest.mark.parametrize("kwargs,error,match", GENERATE_CASES)
def test_generate_rejects_bad_arguments(model, kwargs, error, match):
    counter = CountingForward(model)
    try:
        with pytest.raises(error, match=match):
            pjd.generate(model, IDS, **{**GOOD, **kwargs})
    finally:
        counter.handle.remove()
    assert counter.calls == 0, "the error came after decoding work"
    assert not pjd.fast.is_patched(model)


PROMPT_CASES = [
    (torch.tensor([30, 31]), ValueError, "input_ids"),
    (torch.tensor([[30.0, 31.0]]), TypeError, "input_ids"),
    (torch.tensor([[True, False]]), TypeError, "input_ids"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "input_ids"),
    (torch.zeros(0, 2, dtype=torch.long), ValueError, "batch size 0"),
    (torch.tensor([[30, VOCAB]]), ValueError, "input_ids"),
    (torch.tensor([[-1, 30]]), ValueError, "input_ids"),
    ([[30, 31]], TypeError, "input_ids"),
]


@pytest.mark.parametrize("ids,error,match", PROMPT_CASES)
def test_generate_rejects_bad_prompts(model, ids, error, match):
    counter = CountingForward(model)
    try:
        with pytest.raises(error, match=match):
            pjd.generate(model, ids, **GOOD)
    finally:
        counter.handle.remove()
    assert counter.calls == 0, "the error came after decoding work"


@pytest.mark.parametrize("make", [
    lambda: object(),
    lambda: LlamaModel(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2)),
    lambda: LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2)),
    lambda: BertModel(BertConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)),
], ids=["object", "LlamaModel", "sequence-classifier", "BertModel"])
def test_generate_rejects_models_that_are_not_causal_lms(make):
    with pytest.raises(TypeError, match="model"):
        pjd.generate(make(), IDS, **GOOD)


def test_window_past_the_lane_is_clamped_cheaply(model):
    """window=10**6 on a 2x3 grid: clamped to the lane length (no huge buffer), same tokens."""
    big = pjd.generate(model, IDS, method="sjd", window=10**6, seed=3, **GOOD)
    exact = pjd.generate(model, IDS, method="sjd", window=6, seed=3, **GOOD)
    assert torch.equal(big.tokens, exact.tokens) and big.steps == exact.steps


def test_generate_builds_no_autograd_graph(model):
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    try:
        out = pjd.generate(model, IDS, **GOOD)  # no torch.no_grad() here, as in the README examples
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert not out.tokens.requires_grad


@pytest.fixture(scope="module")
def family_models():
    from pjd.models import tiny_emu3, tiny_janus

    return dict(janus=tiny_janus(), emu3=tiny_emu3())


ADAPTER_CASES = [
    (lambda m: decode_images(m["janus"], torch.full((1, 2, 2), 32)), ValueError, "tokens"),
    (lambda m: decode_images(m["janus"], torch.full((1, 2, 2), -1)), ValueError, "tokens"),
    (lambda m: decode_images(m["emu3"], torch.zeros(1, 2, 2, dtype=torch.long)), ValueError, "tokens"),
    (lambda m: decode_images(m["janus"], torch.zeros(2, 2)), TypeError, "tokens"),
    (lambda m: janus_prompt(m["janus"], [[1.5, 2]]), TypeError, "text_ids"),
    (lambda m: janus_prompt(m["janus"], [[1, 2]], cfg_scale="x"), TypeError, "cfg_scale"),
    (lambda m: janus_prompt(m["janus"], [[1, 2]], height=0), ValueError, "height"),
    (lambda m: emu3_prompt(m["emu3"], [[-1]], height=2, width=2), ValueError, "text_ids"),
    (lambda m: emu3_prompt(m["emu3"], [None], height=2, width=2), TypeError, "text_ids"),
    (lambda m: llamagen_prompt([0], codebook_size=16, num_classes=5, height=2, width=2, cls_token_num=1.5),
     TypeError, "cls_token_num"),
    (lambda m: llamagen_prompt([True], codebook_size=16, num_classes=5, height=2, width=2), TypeError, "labels"),
    (lambda m: llamagen_prompt([0], codebook_size=16, num_classes=5, height=2, width=2, cfg_scale=float("nan")),
     ValueError, "cfg_scale"),
    # A prompt id past Janus' text vocabulary (codebook + text ids): caught before the embedding lookup.
    (lambda m: pjd.generate(m["janus"], torch.tensor([[10**6]]), height=1, width=2), ValueError, "input_ids"),
    (lambda m: pjd.generate(m["emu3"], **{**emu3_prompt(m["emu3"], [[20]], height=2, width=2), "window": 2},
                            method="zipar"), ValueError, "window"),
]


def test_llamagen_decode_rejects_out_of_codebook_tokens():
    from pjd.models.llamagen import LlamaGenForCausalLM, llamagen_config

    model = LlamaGenForCausalLM(llamagen_config(dict(n_layer=1, n_head=2, dim=16), codebook_size=16, num_classes=3,
                                                grid_size=2))
    model.image_decoder = torch.nn.Linear(1, 1)  # never reached: the ids are checked first
    with pytest.raises(ValueError, match=r"tokens must be codebook ids in \[0, 16\)"):
        decode_images(model, torch.full((1, 2, 2), 16))


@pytest.mark.parametrize("call,error,match", ADAPTER_CASES)
def test_adapters_reject_bad_inputs(family_models, call, error, match):
    with pytest.raises(error, match=match):
        call(family_models)


# ---------------------------------------------------------------- non-finite logits
def _poison(model, where):
    """A forward hook on the LM head that writes non-finite values into every forward's logits."""
    def hook(module, inputs, out):
        out = out.clone()
        where(out)
        return out
    return model.lm_head.register_forward_hook(hook)


def _plus_inf(x):
    x[0, :, 5] = float("inf")


def _all_minus_inf(x):
    x[-1, :, IMAGE[0]:IMAGE[1]] = float("-inf")


def _nan(x):
    x[0, :, 7] = float("nan")


@pytest.mark.parametrize("poison,image", [(_plus_inf, 0), (_all_minus_inf, 1), (_nan, 0)])
@pytest.mark.parametrize("method", ["ar", "pjd"])
@pytest.mark.parametrize("backend", ["torch", "sdpa"])  # sdpa + ar: the loop without per-step syncs
def test_non_finite_logits_raise_naming_step_and_image(model, poison, image, method, backend):
    ids = torch.tensor([[30, 31], [31, 30]])
    handle = _poison(model, poison)
    try:
        with pytest.raises(ValueError, match=rf"image {image} at decoding step 1\b"):
            pjd.generate(model, ids, method=method, backend=backend, **GOOD)
    finally:
        handle.remove()
    assert not pjd.fast.is_patched(model)


def test_minus_inf_on_some_image_tokens_is_probability_zero(model):
    """-inf is a legal logit: those tokens are never sampled, nothing is raised."""
    handle = _poison(model, lambda x: x[..., 0:20].fill_(float("-inf")))
    try:
        out = pjd.generate(model, IDS, method="pjd", seed=1, **GOOD)
    finally:
        handle.remove()
    assert out.tokens.min() >= 20 and out.tokens.max() < IMAGE[1]


def _verify_with(args, logits, backend):
    args = list(args)
    args[0] = logits
    return speculative_verify(*args[:11], **public_kwargs(args), backend=backend)


def _inf_cases():
    """One make_case step and three poisoned copies: (name, logits, the lane that must be invalid)."""
    args = make_case(21, B=2, L=3, W=3, V=40, cfg=True)
    lane_start = args[1]
    b, lane = 1, int((lane_start[1] >= 0).nonzero()[0])
    row = int(lane_start[b, lane])
    plus, minus, nan = (args[0].clone() for _ in range(3))
    plus[b, row + int(args[2][b, lane]), 3] = float("inf")      # cond row, the lane's last fed input
    minus[[b, b + 2], row, :] = float("-inf")                    # cond and uncond rows: nothing above -inf
    nan[b + 2, row, 11] = float("nan")                           # uncond row
    return args, [("+inf", plus), ("-inf", minus), ("nan", nan)], (b, lane)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_speculative_verify_flags_non_finite_lanes_torch(which):
    args, cases, (b, lane) = _inf_cases()
    clean = _verify_with(args, args[0], "torch")
    out = _verify_with(args, cases[which][1], "torch")
    expected = torch.zeros_like(out.invalid)
    expected[b, lane] = True
    assert torch.equal(out.invalid, expected) and not clean.invalid.any()
    # The invalid lane commits nothing and keeps its drafts; the other lanes are unchanged.
    assert out.num_commit[b, lane] == 0 and torch.equal(out.next_tokens[b, lane], args[6][b, lane])
    others = ~expected
    assert torch.equal(out.num_commit[others], clean.num_commit[others])
    assert torch.equal(out.next_tokens[others], clean.next_tokens[others])


TRITON_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "tests")
    import pjd
    from test_bad_inputs import _inf_cases, _verify_with, _poison, _plus_inf, GOOD
    from pjd.models import decode_images, emu3_prompt, janus_prompt, llamagen_prompt, tiny_llama
    args, cases, lane = _inf_cases()
    report = {}
    for name, logits in cases:
        ref, out = _verify_with(args, logits, "torch"), _verify_with(args, logits, "triton")
        report[name] = [torch.equal(ref.invalid, out.invalid), bool(out.invalid[lane]), int(out.invalid.sum()),
                        torch.equal(ref.num_commit, out.num_commit), torch.equal(ref.next_tokens, out.next_tokens)]
    model = tiny_llama(32, hidden_size=128, layers=1, heads=2, kv_heads=1, max_positions=64, logit_scale=3.0)
    _poison(model, _plus_inf)
    try:
        pjd.generate(model, torch.tensor([[30, 31]]), method="pjd", backend="triton", **GOOD)
        report["generate"] = "no error"
    except ValueError as err:
        report["generate"] = str(err)
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_non_finite_logits_triton_interpreter():
    """The Triton kernels flag the same lanes as the reference; generate(backend="triton") raises."""
    import json
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("+inf", "-inf", "nan"):
        assert report[name] == [True, True, 1, True, True], (name, report[name])
    assert "image 0 at decoding step 1" in report["generate"], report["generate"]


# ---------------------------------------------------------------- ops
def _verify_case():
    return list(make_case(5, B=2, L=2, W=3, V=30, eol=True))


def _set(index, value):
    def change(args, kwargs):
        args[index] = value(args) if callable(value) else value
    return change


def _kw(name, value):
    def change(args, kwargs):
        kwargs[name] = value
    return change


VERIFY_CASES = [
    (_set(0, lambda a: a[0][0]), ValueError, "logits"),                               # 2-D logits
    (_set(0, lambda a: torch.cat([a[0]] * 3)), ValueError, "logits"),                 # 3B rows
    (_set(0, lambda a: a[0].long()), TypeError, "logits"),
    (_set(1, lambda a: a[1].long()), TypeError, "lane_start"),
    (_set(1, lambda a: a[1].masked_fill(a[1] >= 0, a[0].shape[1])), ValueError, "lane_start"),
    (_set(1, lambda a: a[1].masked_fill(a[1] < 0, -3)), ValueError, "lane_start"),
    (_set(2, lambda a: a[2] + 4), ValueError, "lane_drafts"),
    (_set(3, lambda a: a[3] + 5), ValueError, "lane_rule"),
    (_set(4, lambda a: a[4] - 100), ValueError, "lane_slot"),
    (_set(5, lambda a: a[5] - 100), ValueError, "lane_room"),
    (_set(6, lambda a: a[6].masked_fill(a[6] == a[6].max(), 100)), ValueError, "draft_tokens"),
    (_set(6, lambda a: a[6].int()), TypeError, "draft_tokens"),
    (_set(7, lambda a: a[7][..., :-1]), ValueError, "draft_q"),
    (_set(7, lambda a: a[7].masked_fill(a[7] == a[7].max(), float("nan"))), ValueError, "draft_q"),
    (_set(8, lambda a: a[8][..., :-1]), ValueError, "u_accept"),
    (_set(8, lambda a: a[8].double()), TypeError, "u_accept"),
    (_set(9, lambda a: torch.ones_like(a[9])), ValueError, "u_sample"),
    (_set(10, lambda a: a[10] + 100), ValueError, "init_tokens"),
    (_kw("image_token_range", (0, 31)), ValueError, "image_token_range"),           # beyond the vocabulary
    (_kw("image_token_range", (0.0, 20.0)), TypeError, "image_token_range"),
    (_kw("temperature", 0.0), ValueError, "temperature"),
    (_kw("temperature", 1e-40), ValueError, "temperature"),
    (_kw("temperature", "1"), TypeError, "temperature"),
    (_kw("top_k", -1), ValueError, "top_k"),
    (_kw("top_p", float("nan")), ValueError, "top_p"),
    (_kw("cfg_scale", 2.0), ValueError, "cfg_scale"),                                  # B rows: no CFG
    (_kw("reuse_threshold", float("nan")), ValueError, "reuse_threshold"),
    (_kw("draft_init", "copy"), ValueError, "draft_init"),
    (_kw("eol_token_id", 3), ValueError, "eol_token_id"),                              # an image token
    (_kw("row_slots", 3), ValueError, "row_slots"),
    (_kw("width", 0), ValueError, "width"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change,error,match", VERIFY_CASES)
def test_speculative_verify_rejects_bad_inputs(change, error, match, backend):
    """Checked in the backend-independent wrapper, so both backends reject exactly the same inputs
    (here without TRITON_INTERPRET: a valid call with backend="triton" would fail on the device)."""
    args = _verify_case()
    kwargs = public_kwargs(args)
    change(args, kwargs)
    with pytest.raises(error, match=match):
        speculative_verify(*args[:11], **kwargs, backend=backend)


def test_speculative_verify_validate_false_skips_value_checks_only():
    args = _verify_case()
    bad = list(args)
    bad[8] = torch.ones_like(args[8])  # u_accept = 1: a value error
    speculative_verify(*bad[:11], **public_kwargs(bad), backend="torch", validate=False)
    bad[8] = args[8].double()          # a dtype error: always checked
    with pytest.raises(TypeError, match="u_accept"):
        speculative_verify(*bad[:11], **public_kwargs(bad), backend="torch", validate=False)


def _attention_args():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (3, 5, 5))
    pos = torch.arange(5, dtype=torch.int32)[None]
    return dict(q=q, k=k, v=v, q_pos=pos[:, :3], q_group=torch.full((1, 3), -1, dtype=torch.int32),
                k_pos=pos, k_group=torch.full((1, 5), -1, dtype=torch.int32))


ATTENTION_CASES = [
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale="0.3"), TypeError, "scale"),
    (dict(q=torch.randn(2, 3, 8)), ValueError, "q"),
    (dict(q=torch.randn(1, 2, 3, 0), k=torch.randn(1, 2, 5, 0), v=torch.randn(1, 2, 5, 0)), ValueError, "q"),
    (dict(k=torch.randn(1, 2, 5, 8).double()), TypeError, "k"),
    (dict(k_pos=torch.arange(5)[None]), TypeError, "k_pos"),
    (dict(q_group=torch.zeros(1, 4, dtype=torch.int32)), ValueError, "q_group"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change,error,match", ATTENTION_CASES)
def test_draft_attention_rejects_bad_inputs(change, error, match, backend):
    kwargs = {**_attention_args(), **change}
    with pytest.raises(error, match=match):
        draft_attention(**kwargs, backend=backend)


def test_compact_kv_rejects_aliased_tensors():
    buf = torch.zeros(2, 2, 2, 6, 4)
    keep = torch.tensor([[True, False], [False, True]])
    dst = torch.zeros(2, dtype=torch.int32)
    compact_kv([buf[0], buf[1]], keep, 4, dst)  # two disjoint halves of one buffer: fine
    cache = torch.zeros(2, 2, 6, 4)
    with pytest.raises(ValueError, match=r"caches\[0\] and caches\[1\] share memory"):
        compact_kv([cache, cache], keep, 4, dst)
    big = torch.zeros(cache.numel() + 8)
    with pytest.raises(ValueError, match="share memory"):  # partly overlapping views
        compact_kv([big[:cache.numel()].view(2, 2, 6, 4), big[8:].view(2, 2, 6, 4)], keep, 4, dst)
    flat = torch.zeros(2 * 6 * 2)
    meta = flat[:12].view(2, 6)
    with pytest.raises(ValueError, match=r"dst_start shares memory with meta\[0\]"):
        compact_kv([cache], keep, 4, flat[:2].view(torch.int32)[:2], meta=[meta])


# ---------------------------------------------------------------- threads
def test_concurrent_generate_equals_serial():
    """Four threads decoding one unpatched model get exactly the serial tokens; the model ends unpatched.
    (Before the shared switch, the first thread to finish unpatched the model under the others.)"""
    model = tiny_llama(VOCAB, hidden_size=32, layers=2, heads=2, kv_heads=1, max_positions=128, logit_scale=3.0)
    settings = [dict(method=m, seed=s, height=6, width=8, image_token_range=IMAGE)
                for s, m in enumerate(["pjd", "sjd", "ar", "pjd"])]
    serial = [pjd.generate(model, IDS, **kw).tokens for kw in settings]
    results, errors = [None] * 4, []
    start = threading.Barrier(4)

    def work(i):
        try:
            start.wait()
            for _ in range(3):
                out = pjd.generate(model, IDS, **settings[i]).tokens
                results[i] = out if results[i] is None or torch.equal(results[i], out) else "differs"
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        assert isinstance(results[i], torch.Tensor) and torch.equal(results[i], serial[i]), i
    assert not pjd.fast.is_patched(model) and not hasattr(model, "_pjd_decoders")


def test_active_step_is_per_thread():
    """The step the attention hook reads is a ContextVar: a decode in one thread is invisible to others."""
    from pjd.cache import ActiveStep, active_step

    seen = []
    with ActiveStep(cache=None, step=None, backend="torch") as mine:
        worker = threading.Thread(target=lambda: seen.append(active_step()))
        worker.start()
        worker.join()
        assert active_step() is mine
    assert seen == [None]


# ---------------------------------------------------------------- soak
def test_soak_varied_calls(model):
    """300 cheap calls in one process, every tenth a bad one: every bad call raises, the model is
    never left patched, greedy exact methods equal ar, sampled calls are reproducible per seed."""
    rng = random.Random(0)
    ar_cache = {}
    bad_cases = GENERATE_CASES + [(dict(input_ids=ids), e, m) for ids, e, m in PROMPT_CASES]
    for i in range(300):
        if i % 10 == 9:
            kwargs, error, match = bad_cases[rng.randrange(len(bad_cases))]
            call = {"input_ids": IDS, **GOOD, **kwargs}
            with pytest.raises(error, match=match):
                pjd.generate(model, **call)
        else:
            h, w = rng.randint(1, 3), rng.randint(1, 4)
            ids = torch.tensor([[rng.randrange(24, 32) for _ in range(rng.randint(1, 3))]])
            eol = rng.choice([None, 30])
            method = rng.choice(["sjd", "sjd++", "pjd", "zipar"])
            kw = dict(height=h, width=w, image_token_range=IMAGE, eol_token_id=eol,
                      cache=rng.choice(["slot", "append"]))
            if method in ("pjd", "zipar"):
                kw["context"] = w  # one active row: greedy pjd / zipar are exact
            if method != "zipar":
                kw["window"] = rng.randint(1, 5)
            key = (tuple(ids.tolist()[0]), h, w, eol)
            if key not in ar_cache:
                ar_cache[key] = pjd.generate(model, ids, method="ar", top_k=1, **{**kw, "window": None,
                                                                                   "context": None}).tokens
            out = pjd.generate(model, ids, method=method, top_k=1, seed=i, **kw)
            assert torch.equal(out.tokens, ar_cache[key]), (method, kw)
        assert not pjd.fast.is_patched(model) and not hasattr(model, "_pjd_decoders")


# ---------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv,flag", [
    (["generate", "--batch", "0"], "--batch"),
    (["generate", "--batch", "-1"], "--batch"),
    (["generate", "--height", "x"], "--height"),
    (["generate", "--width", "0"], "--width"),
    (["generate", "--seed", "-2"], "--seed"),
    (["generate", "--method", "beam"], "--method"),
    (["generate", "--height", "100", "--width", "100"], "--height"),
    (["demo", "--batch", "0"], "--batch"),
    (["demo", "--cfg-scale", "nan"], "--cfg-scale"),
    (["demo", "--top-k", "-1"], "--top-k"),
    (["demo", "--methods", "ar,beam"], "--methods"),
    (["demo", "--device", "gpu0"], "--device"),
    (["demo", "--device", "cuda:99"], "--device"),       # no such device, with or without CUDA
    (["demo", "--backend", "triton"], "--backend"),      # no CUDA tensors, no interpreter
    (["demo", "--top-k", "100000", "--no-hf", "--methods", "ar"], "top_k"),  # beyond the 512 image tokens
    (["generate", "--threads", "0"], "--threads"),
])
def test_cli_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert flag in lines[-1] and "Traceback" not in "".join(lines)


def test_cli_checks_outputs_before_generating(tmp_path, capsys, monkeypatch):
    import pjd.demo

    monkeypatch.setattr(pjd.demo, "run_demo", lambda **kw: pytest.fail("generated before checking outputs"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, flag in ((["--out", str(a_file)], "--out"),
                       (["--out", str(a_file / "sub")], "--out"),
                       (["--out", str(tmp_path / "o"), "--json", str(tmp_path)], "--json"),
                       (["--out", str(tmp_path / "o"), "--json", str(a_file / "x.json")], "--json")):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["demo", *argv])
        assert exit_.value.code == 2
        assert flag in capsys.readouterr().err.strip().splitlines()[-1]
    # Missing folders are created up front.
    target = tmp_path / "new" / "deep"
    monkeypatch.setattr(pjd.demo, "run_demo", lambda **kw: [])
    assert cli_main(["demo", "--out", str(target), "--json", str(tmp_path / "j" / "r.json")]) == 0
    assert target.is_dir() and (tmp_path / "j").is_dir()


def test_cli_sample_refuses_outputs_it_cannot_write(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["sample", "--out", str(out), "--model", "tiny", "-n", "2", "--no-progress"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--out" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_cli_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import pjd.sample

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pjd.sample, "run_sample", interrupted)
    assert cli_main(["sample", "--out", str(tmp_path / "o"), "--model", "tiny", "-n", "2"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "re-run the same command to resume" in err and "Traceback" not in err


def test_cli_eval_of_wrong_size_images_names_the_size(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "big.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["eval", str(tmp_path / "big.npz")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "28x28" in err and "64x64" in err and "Traceback" not in err


def test_cli_threads_option_sets_torch_threads(monkeypatch):
    from pjd import cli

    monkeypatch.setitem(cli.RUN, "generate", lambda parser, args: 0)
    try:
        assert cli_main(["generate", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert cli_main(["generate"]) == 0
        assert torch.get_num_threads() == cli.DEFAULT_THREADS == 1
    finally:
        torch.set_num_threads(1)


def test_cli_help_imports_no_torch_and_documents_every_option():
    """`pjd --help` answers without importing torch; every option of every command has a help text,
    and one that has a default shows it."""
    code = ("import sys\nfrom pjd import cli\nfor argv in (['--help'], ['sample', '--help'], ['--version']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO TORCH")
    from pjd import __version__, cli

    assert f"pjd {__version__}" in proc.stdout
    parser = cli.build_parser()
    for name, command in parser.commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, f"pjd {name} {action.option_strings}: no help"
            shown = formatter._get_help_string(action)
            if action.default is not None and action.default is not False and action.option_strings:
                assert "default" in shown, f"pjd {name} {action.option_strings}: default not shown"


def test_model_grid_is_checked_and_device_must_exist():
    """A LlamaGen model decodes its own grid's width (2-D RoPE by rows), at most its rows; a device
    that does not exist is refused before the weights load."""
    dm = pjd.models.default()
    prompt = dm.prompt(torch.tensor([0]))
    with pytest.raises(ValueError, match="8x8 grid on a model built for 16x16 .*width must be 16"):
        pjd.generate(dm.model, prompt, height=8, width=8, image_token_range=dm.image_token_range)
    with pytest.raises(ValueError, match="height at most 16"):
        pjd.generate(dm.model, prompt, height=17, width=16, image_token_range=dm.image_token_range)
    top = pjd.generate(dm.model, prompt, height=1, width=16, image_token_range=dm.image_token_range, method="ar")
    assert top.tokens.shape == (1, 1, 16)  # the top row of an image
    with pytest.raises(ValueError, match="device='cuda:99'"):
        pjd.models.default(device="cuda:99")
    assert len(repr(top)) < 200 and "steps=16" in repr(top)  # a summary, not the tensors

