"""LlamaGen release checkpoints through pjd.models.load_llamagen.

A tiny random-weight GPT is written here in LlamaGen's on-disk format (key names and shapes of its
``autoregressive/models/gpt.py``, a torch pickle, ``{"model": sd}`` or the bare FSDP state dict) and
checked against an independent from-scratch forward of LlamaGen's math: fused wqkv, 2-D RoPE on
interleaved pairs built straight from its definition (zero class row), RMSNorm, SwiGLU.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import pjd
from pjd.models import GPT_MODELS, LlamaGenForCausalLM, decode_images, llamagen_prompt, load_llamagen
from pjd.models.llamagen import _to_hf, llamagen_config, llamagen_state_dict

DIM, HEADS, LAYERS, FFN, K, CLASSES, GRID = 32, 2, 2, 96, 24, 5, 3
BASE = 10000.0


def release_state_dict(seed=0, dim=DIM, heads=HEADS, layers=LAYERS, ffn=FFN, codebook=K, classes=CLASSES):
    """Random weights under LlamaGen's GPT key names; large enough to give peaked logits."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale / math.sqrt(shape[-1])

    sd = {"tok_embeddings.weight": torch.randn(codebook, dim, generator=g),
          "cls_embedding.embedding_table.weight": torch.randn(classes + 1, dim, generator=g),
          "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g), "output.weight": w(codebook, dim, scale=6.0)}
    for i in range(layers):
        p = f"layers.{i}."
        sd.update({p + "attention.wqkv.weight": w(3 * dim, dim, scale=2.0), p + "attention.wo.weight": w(dim, dim),
                   p + "feed_forward.w1.weight": w(ffn, dim), p + "feed_forward.w3.weight": w(ffn, dim),
                   p + "feed_forward.w2.weight": w(dim, ffn),
                   p + "attention_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
                   p + "ffn_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g)})
    return sd


ARCH = dict(n_layer=LAYERS, n_head=HEADS, dim=DIM, multiple_of=32)  # LlamaGen's rule: 2/3 * 128 -> 85 -> 96


# ----------------------------------------------------------------- independent reference of LlamaGen's forward
def reference_freqs(grid, head_dim, base=BASE):
    """[1 + grid^2, head_dim/2, 2] (cos, sin) per interleaved pair: row 0 (class token) zero; image token
    (r, c): pair i < head_dim/4 turns by r * base^(-4i/head_dim), pair head_dim/4 + i by c * the same."""
    quarter = head_dim // 4
    table = torch.zeros(1 + grid * grid, head_dim // 2, 2)
    for r in range(grid):
        for c in range(grid):
            for i in range(quarter):
                theta = base ** (-4 * i / head_dim)
                for pair, coord in ((i, r), (quarter + i, c)):
                    table[1 + r * grid + c, pair] = torch.tensor([math.cos(coord * theta), math.sin(coord * theta)])
    return table


def reference_logits(sd, label, image_tokens, grid=GRID, heads=HEADS):
    """LlamaGen's forward for [class token, image tokens...] (one sequence): logits [T, K]."""
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][label][None],
                   sd["tok_embeddings.weight"][torch.as_tensor(image_tokens, dtype=torch.long)]])
    T, dim = x.shape
    hd = dim // heads
    freqs = reference_freqs(grid, hd)[:T]

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    def rotate(v):  # v [T, heads, hd], interleaved pairs
        pairs = v.reshape(T, heads, hd // 2, 2)
        cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]
        return torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                            pairs[..., 1] * cos + pairs[..., 0] * sin], -1).reshape(T, heads, hd)

    layer = 0
    while f"layers.{layer}.attention.wqkv.weight" in sd:
        p = f"layers.{layer}."
        q, k, v = (rms(x, sd[p + "attention_norm.weight"]) @ sd[p + "attention.wqkv.weight"].T).split(dim, -1)
        q, k, v = rotate(q.view(T, heads, hd)), rotate(k.view(T, heads, hd)), v.view(T, heads, hd)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, dim)
        x = x + attn @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
        layer += 1
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def reference_greedy(sd, label, cfg_scale, grid=GRID):
    """LlamaGen's generate() with top_k=1: CFG with the null class, full recompute per token."""
    tokens = []
    for _ in range(grid * grid):
        cond = reference_logits(sd, label, tokens, grid)[-1]
        uncond = reference_logits(sd, CLASSES, tokens, grid)[-1]
        tokens.append(int((uncond + cfg_scale * (cond - uncond)).argmax()))
    return torch.tensor(tokens).view(grid, grid)


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    sd = release_state_dict()
    path = tmp_path_factory.mktemp("llamagen") / "c2i_tiny_48.pt"
    # As LlamaGen's DDP trainer saves (train_c2i.py), args Namespace included: read without trust_checkpoint.
    torch.save({"model": sd, "optimizer": {"state": {}}, "steps": 10, "args": argparse.Namespace(gpt_model="custom")},
               path)
    return sd, path


@pytest.fixture(scope="module")
def model(release):
    return load_llamagen(release[1], gpt_model=ARCH, image_size=GRID * 16)


def test_logits_equal_reference(release, model):
    sd, _ = release
    image = torch.randint(0, K, (GRID * GRID - 1,), generator=torch.Generator().manual_seed(5))
    for label in (2, CLASSES):  # a class and the null class
        ids = torch.cat([torch.tensor([K + label]), image])[None]
        with torch.no_grad():
            ours = model(input_ids=ids).logits[0]                   # HF's default positions 0..T-1
            with pjd.fast.patched(model):
                ours_pjd = model(input_ids=ids).logits[0]
        ref = reference_logits(sd, label, image)
        assert ours.shape == (GRID * GRID, K)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours_pjd, ours, rtol=0, atol=0)
        assert ref.std() > 1.0  # the weights are not degenerate


def test_two_d_rope_matters(release, model):
    """A 1-D RoPE (the recipe the old docs gave) does not reproduce LlamaGen: the test can tell."""
    sd, _ = release
    image = torch.randint(0, K, (GRID * GRID - 1,), generator=torch.Generator().manual_seed(6))
    ids = torch.cat([torch.tensor([K + 1]), image])[None]
    table = model.model.rotary_emb
    cos, sin = table.cos.clone(), table.sin.clone()
    try:
        pos = torch.arange(cos.shape[0], dtype=torch.float64)[:, None]
        inv = BASE ** (-torch.arange(0, DIM // HEADS, 2, dtype=torch.float64) / (DIM // HEADS))
        table.cos.copy_(torch.cat([pos * inv] * 2, 1).cos()), table.sin.copy_(torch.cat([pos * inv] * 2, 1).sin())
        with torch.no_grad():
            one_d = model(input_ids=ids).logits[0]
    finally:
        table.cos.copy_(cos), table.sin.copy_(sin)
    assert (one_d - reference_logits(sd, 1, image)).abs().max() > 1e-2


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_greedy_methods_equal_reference(release, model, cfg_scale):
    sd, _ = release
    labels = [1, 3]
    prompt = llamagen_prompt(labels, model=model, cfg_scale=cfg_scale)
    assert prompt["height"] == prompt["width"] == GRID and prompt["image_token_range"] == (0, K)
    with torch.no_grad():
        runs = {m: pjd.generate(model, **prompt, method=m, top_k=1, **extra)
                for m, extra in [("ar", {}), ("sjd", {}), ("pjd", dict(context=GRID))]}
    for b, label in enumerate(labels):
        ref = reference_greedy(sd, label, cfg_scale)
        for method, out in runs.items():
            assert torch.equal(out.tokens[b], ref), (method, label)
    assert runs["sjd"].steps_per_image.sum() < runs["ar"].steps_per_image.sum()


def test_fsdp_layout_and_dtype(tmp_path, release):
    """XXL/3B releases are bare state dicts (FSDP); bf16 loads too."""
    sd, _ = release
    path = tmp_path / "c2i_bare.pt"
    torch.save(sd, path)
    bare = load_llamagen(path, gpt_model=ARCH, image_size=GRID * 16, dtype=torch.bfloat16)
    assert bare.dtype == torch.bfloat16 and bare.config.codebook_size == K and bare.config.num_classes == CLASSES
    ids = torch.tensor([[K + 2, 3, 4]])
    with torch.no_grad():
        got = bare(input_ids=ids).logits[0].float()
    torch.testing.assert_close(got, reference_logits(sd, 2, [3, 4]), rtol=0, atol=0.25)


def test_export_round_trip(release, model):
    sd, _ = release
    exported = llamagen_state_dict(model)
    assert exported.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(exported[key], value), key


def test_custom_model_from_scratch(tmp_path):
    """A model built from llamagen_config (how a custom-size model is trained) saves and loads back."""
    config = llamagen_config(ARCH, codebook_size=K, num_classes=CLASSES, grid_size=GRID)
    torch.manual_seed(0)
    fresh = LlamaGenForCausalLM(config).eval()
    torch.save({"model": llamagen_state_dict(fresh)}, tmp_path / "c.pt")
    loaded = load_llamagen(tmp_path / "c.pt", gpt_model=ARCH, image_size=GRID * 8, downsample=8)
    ids = torch.tensor([[K + 4, 1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, fresh(input_ids=ids).logits)
    # Training loss (LlamaGen's: the class token predicts the first image token, and so on).
    labels = ids.clone()
    labels[0, 0] = -100
    out = fresh(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[0, :-1], ids[0, 1:]))


def test_release_configs():
    """Parameter counts of LlamaGen's README (111M, 343M, 775M, 1.4B, 3.1B) with 16384 codes, 1000 classes."""
    readme = {"GPT-B": 111e6, "GPT-L": 343e6, "GPT-XL": 775e6, "GPT-XXL": 1.4e9, "GPT-3B": 3.1e9}
    for name, count in readme.items():
        a = GPT_MODELS[name]
        per_layer = 4 * a.dim * a.dim + 3 * a.dim * a.ffn_dim + 2 * a.dim
        total = a.n_layer * per_layer + (2 * 16384 + 1001 + 1) * a.dim
        assert abs(total - count) / count < 0.05, (name, total)
    assert GPT_MODELS["GPT-3B"].head_dim == 100 and GPT_MODELS["GPT-3B"].ffn_dim == 8704


@pytest.mark.parametrize("name,layers,heads,dim", [("GPT-B", 12, 12, 768), ("GPT-L", 24, 16, 1024),
                                                   ("GPT-XL", 36, 20, 1280), ("GPT-XXL", 48, 24, 1536),
                                                   ("GPT-3B", 24, 32, 3200)])
def test_release_shapes_convert(name, layers, heads, dim):
    """Full-size release state dicts (shapes only, on the meta device) convert into the model strictly."""
    ffn = -(-int(2 * 4 * dim / 3) // 256) * 256  # LlamaGen's FeedForward width
    with torch.device("meta"):
        sd = release_state_dict(dim=dim, heads=heads, layers=layers, ffn=ffn, codebook=16384, classes=1000)
        config = llamagen_config(name, codebook_size=16384, num_classes=1000, grid_size=24)
        model = LlamaGenForCausalLM(config)
    model.load_state_dict(_to_hf(sd, config), strict=True, assign=True)
    assert model.model.rotary_emb.cos.shape == (1 + 24 * 24, dim // heads)


def test_bad_inputs(tmp_path, release):
    sd, path = release
    with pytest.raises(ValueError, match="gpt_model"):
        load_llamagen(path, gpt_model="GPT-Q", image_size=48)
    with pytest.raises(ValueError, match="does not match gpt_model"):
        load_llamagen(path, gpt_model="GPT-B", image_size=48)
    with pytest.raises(ValueError, match="multiple of downsample"):
        load_llamagen(path, gpt_model=ARCH, image_size=50)
    with pytest.raises(FileNotFoundError, match="gpt_checkpoint"):
        load_llamagen(tmp_path / "nope.pt", gpt_model=ARCH, image_size=48)
    torch.save({"weights": sd}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not a LlamaGen GPT checkpoint"):
        load_llamagen(tmp_path / "odd.pt", gpt_model=ARCH, image_size=48)


def test_prompt_checks(model):
    with pytest.raises(ValueError, match="width"):
        llamagen_prompt([0], model=model, width=GRID + 1)
    with pytest.raises(ValueError, match="labels"):
        llamagen_prompt([CLASSES], model=model)
    p = llamagen_prompt(torch.tensor([0, 4]), model=model, cfg_scale=2.0, height=2)
    assert p["input_ids"].tolist() == [[K], [K + 4]] and p["uncond_input_ids"].tolist() == [[K + CLASSES]] * 2
    with pytest.raises(TypeError, match="vq_checkpoint"):
        decode_images(model, torch.zeros(1, GRID, GRID, dtype=torch.long))
