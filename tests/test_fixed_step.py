"""The fixed-shape step (issue 20): same tokens as the dynamic one, no host read inside the loop but
the few flags read every CHECK_EVERY steps, and one shape per tensor for the whole decode."""
import collections
import sys
from pathlib import Path

import pytest
import torch

import pjd
from pjd import engine
from pjd.models import tiny_llama

IMAGE, PROMPT, EOL, VOCAB = (0, 24), (24, 30), 30, 32
PLAN = dict(method="pjd", height=5, width=7, window=None, context=None, top_k=0, top_p=1.0, temperature=1.0,
            cfg_scale=3.0, image_token_range=IMAGE, eol_token_id=None, draft_init="random", reuse_threshold="auto",
            cache="slot", vocab_size=VOCAB, row_causal=True)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from host_reads import HostReads  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, hidden_size=48, layers=2, heads=4, kv_heads=2, logit_scale=2.0, seed=1)


def settings(batch=2, **kw):
    ids = torch.randint(*PROMPT, (batch, 3), generator=torch.Generator().manual_seed(0))
    out = dict(image_token_range=IMAGE, seed=3, cfg_scale=3.0, uncond_input_ids=torch.full_like(ids[:, :1], 29))
    out.update(kw)
    return ids, out


@pytest.mark.parametrize("cache", ["slot", "append"])
@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_fixed_shapes_give_the_dynamic_tokens(model, cache, backend):
    """Sampled, CFG, batch 2, every method, EOL on and off: tokens, step counts and per-step commits agree."""
    for method in ("ar", "sjd", "sjd++", "pjd", "zipar"):
        for eol in (None, EOL):
            extra = dict(context=2) if method in ("pjd", "zipar") else {}
            ids, kw = settings(height=4, width=6, method=method, eol_token_id=eol, cache=cache, backend=backend,
                               **extra)
            dynamic = pjd.generate(model, ids, fixed_shapes=False, **kw)
            fixed = pjd.generate(model, ids, fixed_shapes=True, **kw)
            assert torch.equal(fixed.tokens, dynamic.tokens), (method, eol)
            assert fixed.steps == dynamic.steps and torch.equal(fixed.steps_per_image, dynamic.steps_per_image)
            assert torch.equal(torch.stack(fixed.accepted), torch.stack(dynamic.accepted)), (method, eol)


@pytest.mark.parametrize("eol", [None, EOL])
def test_the_bucket_bounds_every_step_and_is_reached(model, monkeypatch, eol):
    """DecodePlan.max_fed_inputs (N of the fixed-shape step) bounds the inputs of every dynamic step, over
    widths, contexts, windows and row orders, and is reached: the derivation is neither wrong nor loose."""
    fed = collections.defaultdict(int)
    forward = engine._Decoder.forward

    def spy(self, step, logits=True):
        if logits:
            key = (self.plan.width, self.N)
            fed[key] = max(fed[key], step.tokens.shape[1])
        return forward(self, step, logits)

    monkeypatch.setattr(engine._Decoder, "forward", spy)
    for width, context, window, row0_first in ((5, 1, 7, False), (7, 2, 3, True), (9, 1, 2, False), (9, 3, 7, True)):
        ids, kw = settings(height=6, width=width, method="pjd", context=context, window=window, row0_first=row0_first,
                           eol_token_id=eol, top_k=2, seed=width)
        pjd.generate(model, ids, fixed_shapes=False, **kw)
    assert all(most <= bound for (_, bound), most in fed.items()), fed
    assert any(most == bound == width + 2 for (width, bound), most in fed.items()), fed


@pytest.mark.parametrize("cache", ["slot", "append"])
@pytest.mark.parametrize("eol", [None, EOL])
@pytest.mark.parametrize("method", ["ar", "pjd"])
def test_no_host_read_in_the_loop_but_the_flags_every_ten_steps(model, monkeypatch, method, eol, cache):
    """In the loop (first step to completion) nothing reads a value back but ``_Watch``; it reads at most
    once per CHECK_EVERY steps while completion is further away than that (steady state), and only
    as often as a lower bound on the steps left allows after (no step is run past completion)."""
    seen = {}
    run_fixed, tolist = engine._Decoder.run_fixed, torch.Tensor.tolist

    def counting_tolist(self):
        seen["tolist"] = seen.get("tolist", 0) + 1
        return tolist(self)

    def counted(self, step, bar):
        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
        try:
            with HostReads() as reads:
                run_fixed(self, step, bar)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        seen.update(ops=reads.ops, log=self.watch.log)

    monkeypatch.setattr(engine._Decoder, "run_fixed", counted)
    grid = dict(height=10, width=10) if method == "ar" else dict(height=24, width=8)  # both long enough
    ids, kw = settings(method=method, eol_token_id=eol, cache=cache, **grid)
    out = pjd.generate(model, ids, fixed_shapes=True, **kw)
    log, steps = seen["log"], out.steps
    assert sum(seen["ops"].values()) == 0, seen["ops"]
    assert seen["tolist"] == len(log)  # every read is the watch's
    assert log[-1][0] == steps and log[-1][1][0] == 1  # completion read at the very step it happened
    assert all(flags[0] == 0 for _, flags in log[:-1])
    reads = [(at, flags[-1]) for at, flags in log]  # (step, lower bound of the steps left)
    steady = [(at, bound) for at, bound in reads if bound >= engine.CHECK_EVERY]
    assert len(steady) >= 2, reads  # the decode is long enough to have a steady state
    # Steady state: reads CHECK_EVERY steps apart, i.e. one per ten steps; the first at step 10 at latest.
    assert reads[0][0] <= engine.CHECK_EVERY
    for (at, bound), (next_at, _) in zip(reads, reads[1:]):
        if bound >= engine.CHECK_EVERY:
            assert next_at - at == engine.CHECK_EVERY, reads
    # Every read's bound is a true lower bound of the steps left.
    assert all(bound <= steps - at for at, bound in reads), (steps, reads)


@pytest.mark.parametrize("cache", ["slot", "append"])
@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_every_tensor_fed_to_the_model_and_the_verification_keeps_its_shape(model, monkeypatch, cache, backend):
    shapes = collections.defaultdict(set)
    forward, update, verify = engine._Decoder.forward, None, engine.speculative_verify

    def record(where, values):
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                shapes[(where, i)].add(tuple(v.shape))

    def spy_forward(self, step, logits=True):
        if logits:  # decoding steps (the prefill runs once, before them)
            record("model", [step.tokens, step.rope, *vars(step.inputs).values()])
            self.cache.update = spy_update.__get__(self.cache)
        return forward(self, step, logits)

    def spy_update(cache, layer, k, v):
        out = type(cache).update(cache, layer, k, v)
        record("attention", [k, v, *out])
        return out

    def spy_verify(*args, **kwargs):
        record("verify", [*args, *kwargs.values()])
        return verify(*args, **kwargs)

    monkeypatch.setattr(engine._Decoder, "forward", spy_forward)
    monkeypatch.setattr(engine, "speculative_verify", spy_verify)
    ids, kw = settings(height=6, width=8, method="pjd", context=2, cache=cache, backend=backend)
    out = pjd.generate(model, ids, fixed_shapes=True, **kw)
    assert out.steps > 5
    assert {where for where, _ in shapes} == {"model", "attention", "verify"}
    assert all(len(s) == 1 for s in shapes.values()), {k: s for k, s in shapes.items() if len(s) > 1}
    # The dynamic path, spied the same way, does change shapes (the spy can see a change).
    shapes.clear()
    pjd.generate(model, ids, fixed_shapes=False, **kw)
    assert any(len(s) > 1 for s in shapes.values())


def test_compiled_step_is_one_graph_with_the_eager_tokens(model, monkeypatch):
    """compile=True on a CPU: the whole step traced by dynamo as ONE graph (fullgraph: a host read or
    a graph break would raise), tokens equal to the eager fixed-shape step's. Dynamo's "eager" backend
    stands in for inductor here (the same trace; inductor's code generation takes minutes on this
    machine: docs/performance.md)."""
    from torch._dynamo.utils import counters

    from pjd import compiler

    monkeypatch.setattr(compiler, "BACKEND", "eager")
    graphs = counters["stats"]["unique_graphs"]
    ids, kw = settings(height=4, width=6, method="pjd", context=2, seed=1)
    out = pjd.generate(model, ids, compile=True, **kw)
    eager = pjd.generate(model, ids, fixed_shapes=True, **kw)
    assert out.compiled == "inductor" and out.compile_seconds > 0
    assert torch.equal(out.tokens, eager.tokens) and out.steps == eager.steps
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_the_compiled_cpu_step_switches_buckets_with_the_eager_tokens(model, monkeypatch):
    """The compiled CPU step of a row-parallel method has two input buckets (one lane's worth and
    DecodePlan.max_fed_inputs), one graph each, picked per step: a decode that goes back and forth
    between them gives eager's tokens; a bucket too small for a step would raise (the overflow check)."""
    from torch._dynamo.utils import counters

    from pjd import compiler

    monkeypatch.setattr(compiler, "BACKEND", "eager")
    picked = []
    pick = engine._Decoder._pick_bucket

    def spy(self):
        pick(self)
        picked.append(self.bucket)

    monkeypatch.setattr(engine._Decoder, "_pick_bucket", spy)
    graphs = counters["stats"]["unique_graphs"]
    ids, kw = settings(height=5, width=7, method="pjd", context=1, window=2, seed=4)
    out = pjd.generate(model, ids, compile=True, **kw)
    eager = pjd.generate(model, ids, fixed_shapes=True, **kw)
    assert torch.equal(out.tokens, eager.tokens) and out.steps == eager.steps
    assert torch.equal(torch.stack(out.accepted), torch.stack(eager.accepted))
    assert compiler.buckets(engine.make_plan(**{**PLAN, "width": 7, "context": 1, "window": 2}), "inductor") == (3, 9)
    switches = sum(a != b for a, b in zip(picked, picked[1:]))
    assert set(picked) == {3, 9} and switches >= 3, picked
    assert counters["stats"]["unique_graphs"] == graphs + 2


def test_a_second_compiled_call_reuses_the_step_and_its_buffers(monkeypatch):
    """Compiled once per model and settings: a second call (other prompts, other seed) builds no decoder,
    compiles nothing and gives eager's tokens; the kept decoder's buffers are reset in place (what a CUDA
    graph needs, since it replays on the addresses it recorded); other settings or replaced weights get
    their own; the kept steps do not keep the model alive."""
    import gc
    import weakref

    from pjd import compiler

    monkeypatch.setattr(compiler, "BACKEND", "eager")
    net = tiny_llama(VOCAB, hidden_size=32, layers=1, heads=2, kv_heads=1, logit_scale=2.0, seed=2)
    built = []
    init = engine._Decoder.__init__

    def counted(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(engine._Decoder, "__init__", counted)
    grid = dict(height=4, width=6, method="pjd", context=2, cache="append")
    for seed in (1, 2, 3):
        ids, kw = settings(seed=seed, **grid)
        ids = ids[:, :1] + seed % 3  # other prompts each call; one token: no prefill (the cache's tail)
        out = pjd.generate(net, ids, compile=True, **kw)
        eager = pjd.generate(net, ids, fixed_shapes=True, **kw)
        assert torch.equal(out.tokens, eager.tokens) and out.steps == eager.steps, seed
        assert torch.equal(torch.stack(out.accepted), torch.stack(eager.accepted))
        assert (out.compile_seconds > 0) == (seed == 1)
    assert len(built) == 1 + 3  # one compiled decoder, kept; one per eager call
    first = built[0]
    assert first.adapter is None  # kept without the model
    ids, kw = settings(seed=1, **{**grid, "width": 5})
    pjd.generate(net, ids, compile=True, **kw)  # other settings: a decoder of their own
    assert len(built) == 5
    with torch.no_grad():
        net.lm_head.weight = torch.nn.Parameter(net.lm_head.weight.clone())  # replaced weights
    pjd.generate(net, ids, compile=True, **kw)
    assert len(built) == 6
    ref = weakref.ref(net)
    del net, out, eager
    built.clear()
    gc.collect()
    assert ref() is None


def test_every_settings_of_a_process_compiles(model, monkeypatch):
    """Dynamo keeps at most 8 graphs per function and, with fullgraph, raises at the 9th settings of a
    process; the compiled step lifts that limit where it may compile (one graph per settings and
    bucket is the design). The limit is set to 1 here: without the lift the second settings raise."""
    import torch._dynamo.config

    from pjd import compiler

    monkeypatch.setattr(compiler, "BACKEND", "eager")
    for width in (9, 10, 11):
        ids, kw = settings(height=2, width=width, method="ar", seed=width)
        with torch._dynamo.config.patch(recompile_limit=1):
            out = pjd.generate(model, ids, compile=True, **kw)
        assert out.compile_seconds > 0, width
        assert torch.equal(out.tokens, pjd.generate(model, ids, fixed_shapes=True, **kw).tokens)


def test_compile_argument(model, monkeypatch):
    from pjd import compiler

    compiler._warned.clear()
    ids, kw = settings(height=2, width=3, method="pjd")
    monkeypatch.setattr(compiler.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="compile='auto' runs the step eagerly: inductor needs a C.. compiler"):
        assert pjd.generate(model, ids, compile="auto", **kw).compiled == ""
    with pytest.raises(ValueError, match="compile=True cannot run here: inductor needs a C.. compiler"):
        pjd.generate(model, ids, compile=True, **kw)
    monkeypatch.undo()
    ids, kw = settings(height=2, width=3, method="ar")
    with pytest.raises(ValueError, match="compile must be False, True or 'auto'"):
        pjd.generate(model, ids, compile="yes", **kw)
    with pytest.raises(ValueError, match="compile needs fixed shapes"):
        pjd.generate(model, ids, compile=True, fixed_shapes=False, **kw)
    with pytest.raises(TypeError, match="fixed_shapes must be True, False or None"):
        pjd.generate(model, ids, fixed_shapes="yes", **kw)


def test_coupled_draws_and_continuation_in_the_fixed_and_compiled_step(model, monkeypatch):
    """Issue 22's options: the fixed-shape step and the compiled one (one graph, dynamo's "eager"
    backend as above) give the dynamic step's tokens."""
    from pjd import compiler

    monkeypatch.setattr(compiler, "BACKEND", "eager")
    for method, extra in (("sjd", dict(coupled_draws=True, continuation=True)),
                          ("pjd", dict(context=2, coupled_draws=True)), ("pjd", dict(context=2, continuation=True))):
        ids, kw = settings(height=4, width=6, method=method, eol_token_id=EOL, **extra)
        dynamic = pjd.generate(model, ids, fixed_shapes=False, **kw)
        fixed = pjd.generate(model, ids, fixed_shapes=True, **kw)
        assert torch.equal(fixed.tokens, dynamic.tokens) and fixed.steps == dynamic.steps, (method, extra)
    compiled = pjd.generate(model, ids, compile=True, **kw)
    assert torch.equal(compiled.tokens, dynamic.tokens) and compiled.steps == dynamic.steps
