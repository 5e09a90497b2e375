"""The embedded default model (class-conditional Fashion-MNIST, LlamaGen format): the shipped files
load through load_llamagen, decode, generate, and score; plus nll_per_token's indexing."""
import socket

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pjd
from pjd.fashion.assets import ASSETS, GPT_FILE
from pjd.models import decode_images, llamagen_prompt
from pjd.models.llamagen import LlamaGenForCausalLM, _expected_shapes, _arch
from pjd.quality import class_accuracy, classifier_features, fid, nll_per_token


@pytest.fixture(scope="module")
def shipped():
    from pjd.models import default

    # Offline means offline: any attempt to open a connection fails the load.
    def refuse(*args, **kwargs):
        raise AssertionError("default() tried to use the network")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    try:
        yield default()
    finally:
        mp.undo()


def test_shipped_checkpoint_is_llamagen_release_layout(shipped):
    ckpt = torch.load(ASSETS / GPT_FILE, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model"}
    sd = ckpt["model"]
    arch = _arch(shipped.meta["gpt"]["arch"])
    expected = _expected_shapes(arch, shipped.image_token_range[1], len(shipped.class_names))
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float16 for v in sd.values())


def test_default_loads_through_load_llamagen_and_describes_itself(shipped):
    k = shipped.image_token_range[1]
    assert isinstance(shipped.model, LlamaGenForCausalLM)
    assert (shipped.height, shipped.width) == (16, 16) and shipped.model.config.grid_size == 16
    assert shipped.null_class_id == k + 10 and len(shipped.class_names) == 10
    assert not shipped.model.training and next(shipped.model.parameters()).dtype == torch.float32
    assert torch.equal(shipped.prompt(torch.tensor([0, 3])), torch.tensor([[k], [k + 3]]))
    assert torch.equal(shipped.null_prompt(2), torch.full((2, 1), shipped.null_class_id))
    tokens = torch.randint(0, k, (2, 16, 16))
    assert shipped.decode(tokens).shape == (2, 28, 28) and shipped.decode(tokens).dtype == torch.uint8
    pics = shipped.to_pil(tokens, scale=4)
    assert len(pics) == 2 and pics[0].size == (112, 112)
    via_family = decode_images(shipped.model, tokens)  # the LlamaGen family's decode path
    assert via_family[0].size == (28, 28)
    with pytest.raises(ValueError, match="class_ids"):
        shipped.prompt(torch.tensor([10]))


def test_default_generates_recognisable_classes(shipped):
    """ar samples through llamagen_prompt + pjd.generate: the shipped classifier must recognise most
    of them as their requested class (chance is 10%), and the model's NLL of its own samples must
    be far below uniform over the codebook."""
    labels = torch.arange(10)
    prompt = llamagen_prompt(labels, model=shipped.model, cfg_scale=2.0)
    with torch.no_grad():
        out = pjd.generate(shipped.model, **prompt, method="ar", seed=0, progress=False)
    images = shipped.decode(out.tokens)
    assert class_accuracy(images, labels) >= 0.6
    nll = nll_per_token(shipped.model, out.tokens, shipped.prompt(labels), image_token_range=shipped.image_token_range)
    assert float(nll.mean()) < 0.6 * torch.log(torch.tensor(float(shipped.image_token_range[1])))
    feats = classifier_features(images)
    assert feats.shape == (10, 128) and torch.isfinite(torch.tensor(fid(feats)))


def _first_column_log_prob(dm, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean teacher-forced log-probability (nats, over the image tokens) of the tokens (r, 0), r >= 1."""
    lo, hi = dm.image_token_range
    ids = torch.cat([dm.prompt(labels), tokens.reshape(len(labels), -1)], 1)
    with torch.no_grad():
        logp = dm.model(input_ids=ids).logits[:, :-1, lo:hi].float().log_softmax(-1)
    logp = logp.gather(-1, (ids[:, 1:] - lo)[..., None]).view(len(labels), dm.height, dm.width)
    return float(logp[:, 1:, 0].mean())


def test_pjd_defaults_keep_the_first_column_and_the_classes_of_ar(shipped):
    """docs/decisions.md (issue 21): without EOL a fresh row leads with the last token of the lowest
    complete row, after row 0 is decoded first. The model's log-probability of the first column of
    pjd's images then stays near ar's (the old lead, the row above's mid-row token, loses ~7 nats
    there and turns the left border bright), and the classes stay recognisable (within 0.05 of ar)."""
    labels = torch.arange(10)
    kw = dict(height=16, width=16, image_token_range=shipped.image_token_range, cfg_scale=3.0,
              uncond_input_ids=shipped.null_prompt(10), seed=0)
    with torch.no_grad():
        ar = pjd.generate(shipped.model, shipped.prompt(labels), method="ar", **kw)
        fast = pjd.generate(shipped.model, shipped.prompt(labels), method="pjd", **kw)
        old = pjd.generate(shipped.model, shipped.prompt(labels), method="pjd", row_lead="above", row0_first=False,
                           **kw)
    assert 256 / float(fast.steps_per_image.float().mean()) >= 2.5  # it still decodes in parallel
    ar_col = _first_column_log_prob(shipped, ar.tokens, labels)
    assert _first_column_log_prob(shipped, fast.tokens, labels) >= ar_col - 1.0
    assert _first_column_log_prob(shipped, old.tokens, labels) < ar_col - 3.0  # the check can fail
    ar_acc = class_accuracy(shipped.decode(ar.tokens), labels)
    assert class_accuracy(shipped.decode(fast.tokens), labels) >= ar_acc - 0.05


# --- nll_per_token indexing ------------------------------------------------------------------------
def test_nll_per_token_matches_position_by_position_loop():
    torch.manual_seed(0)
    lo, hi, vocab = 3, 19, 23
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(lo, hi, (2, 2, 3))
    prompt = torch.randint(hi, vocab, (2, 2))
    got = nll_per_token(model, tokens, prompt, image_token_range=(lo, hi))
    flat = tokens.reshape(2, -1)
    want = torch.zeros(2)
    for b in range(2):
        for t in range(flat.shape[1]):
            prefix = torch.cat([prompt[b], flat[b, :t]])[None]
            with torch.no_grad():
                logits = model(input_ids=prefix).logits[0, -1, lo:hi]
            want[b] -= torch.log_softmax(logits, -1)[flat[b, t] - lo] / flat.shape[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nll_per_token_rejects_bad_input():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32))
    with pytest.raises(ValueError, match="tokens"):
        nll_per_token(model, torch.full((1, 2, 2), 7), torch.zeros(1, 1, dtype=torch.long), image_token_range=(0, 6))
    with pytest.raises(ValueError, match="prompt_ids"):
        nll_per_token(model, torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                      image_token_range=(0, 6))


def test_demo_writes_grid_and_scores(shipped, tmp_path, compile_on_first_call):
    import json

    from pjd.demo import run_demo

    rows = run_demo(methods=("ar", "pjd"), batch=2, out=tmp_path, progress=False, model=shipped)
    assert [r["method"] for r in rows] == ["ar", "pjd", "hf"]  # hf: transformers' generate baseline
    assert all(0 <= r["class_accuracy"] <= 1 and r["steps"] >= 1 for r in rows)
    assert rows[0]["steps"] == 256  # ar: one token per step on the 16 x 16 grid
    assert (tmp_path / "demo.png").exists() and (tmp_path / "demo.json").exists()
    # No wall time includes a first call (kernel compilation on a GPU): every row was warmed up.
    assert all(0 < r["seconds"] < compile_on_first_call for r in rows), [r["seconds"] for r in rows]
    warmed = json.loads((tmp_path / "demo.json").read_text())["warm_up"]
    assert [(w["call"], w.get("method")) for w in warmed] == [("pjd.generate", "ar"), ("pjd.generate", "pjd"),
                                                               ("hf_generate", None)]


INTERPRETER_ROWS = 3  # the top rows of an image: row 0 first (row0_first="auto"), then rows 1 and 2 together


@pytest.mark.slow
def test_default_model_decodes_through_the_triton_kernels_under_the_interpreter(shipped):
    """The embedded model on the Triton kernels (the interpreter, in a subprocess) gives the torch
    reference's tokens and steps: pjd with CFG at the model's width, vocabulary, head dim and window,
    on the top INTERPRETER_ROWS rows: row 0 alone, then two rows in flight at once, a row starting
    while the one above runs (the full 16 rows repeat such steps five times over, at five times the
    interpreter's minutes). benchmarks/kernel_report.py's "demo" group compiles the full-size
    `pjd demo` configuration for sm_80 / sm_90; `pjd demo` itself is tested on the torch backend above."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch, pjd\n"
            "dm = pjd.models.default()\n"
            f"out = pjd.generate(dm.model, dm.prompt(torch.tensor([3])), height={INTERPRETER_ROWS}, width=16, "
            "image_token_range=dm.image_token_range, method='pjd', cfg_scale=3.0, uncond_input_ids=dm.null_prompt(1), "
            "seed=0, backend='triton')\n"
            "print(json.dumps(dict(tokens=out.tokens.tolist(), steps=out.steps)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    triton = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = pjd.generate(shipped.model, shipped.prompt(torch.tensor([3])), height=INTERPRETER_ROWS, width=16,
                       image_token_range=shipped.image_token_range, method="pjd", cfg_scale=3.0,
                       uncond_input_ids=shipped.null_prompt(1), seed=0, backend="torch")
    assert triton == dict(tokens=ref.tokens.tolist(), steps=ref.steps)
    assert ref.steps < INTERPRETER_ROWS * 16 * 2 / 3  # drafts accepted, rows in parallel: what the kernels must get right
