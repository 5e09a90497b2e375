"""Lumina-mGPT's published weights through pjd.models.load_lumina_mgpt.

A tiny release directory is written here as Lumina-mGPT's trainer leaves it (``save_pretrained`` of its
``ChameleonXLLMXForConditionalGeneration``): ``config.json`` with ``model_type "chameleon"``,
``model_parallel_size``, ``z_loss_weight``, the vocabulary map and ``vq_config``; weights in sharded
safetensors with an index; q/k-norm affine stored per model-parallel shard ``[mp, head_dim]``; no
``model.vqmodel.*``. It is checked against a from-scratch forward of Lumina's Chameleon math.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_vq import TINY, tiny_chameleon_vqgan
from transformers import ChameleonForConditionalGeneration

import pjd
from pjd.models import decode_images, load_lumina_mgpt, lumina_prompt, lumina_text_ids
from pjd.models.chameleon import codebook_ids
from pjd.models.vq import chameleon_vqgan_decoder

DIM, HEADS, MP, LAYERS, FFN, THETA = 32, 4, 2, 2, 64, 5000.0
HD = DIM // HEADS
CODEBOOK = TINY["codebook"]
GRID = (2, 4)
CFG = 3.0


def vocabulary():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    for code in torch.randperm(CODEBOOK, generator=torch.Generator().manual_seed(3)).tolist():
        vocab["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"] = len(vocab)
    for name in ["<racm3:break>", "<eoss>", "<reserved08799>", *(f"<reserved{8800 + n:05d}>" for n in range(1, 9)),
                 *(f"t{i}" for i in range(12))]:
        vocab[name] = len(vocab)
    return vocab


def release_weights(vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale / math.sqrt(shape[-1])

    sd = {"model.embed_tokens.weight": torch.randn(vocab_size, DIM, generator=g),
          "model.norm.weight": 1 + 0.1 * torch.randn(DIM, generator=g), "lm_head.weight": w(vocab_size, DIM, scale=6.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            sd[p + f"self_attn.{proj}_proj.weight"] = w(DIM, DIM, scale=2.0 if proj in "qk" else 1.0)
        for norm in ("q_norm", "k_norm"):  # one row per model-parallel shard
            sd[p + f"self_attn.{norm}.weight"] = 1 + 0.5 * torch.randn(MP, HD, generator=g)
            sd[p + f"self_attn.{norm}.bias"] = 0.5 * torch.randn(MP, HD, generator=g)
        sd.update({p + "mlp.gate_proj.weight": w(FFN, DIM), p + "mlp.up_proj.weight": w(FFN, DIM),
                   p + "mlp.down_proj.weight": w(DIM, FFN),
                   p + "input_layernorm.weight": 1 + 0.1 * torch.randn(DIM, generator=g),
                   p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(DIM, generator=g)})
    return sd


def write_release(directory, vq_config):
    vocab = vocabulary()
    config = {"architectures": ["ChameleonXLLMXForConditionalGeneration"], "model_type": "chameleon",
              "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0, "dropout": 0.05, "hidden_act": "silu", "hidden_size": DIM,
              "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": 256,
              "mlp_bias": False, "model_parallel_size": MP, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
              "num_key_value_heads": HEADS, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": THETA,
              "swin_norm": False, "tie_word_embeddings": False, "torch_dtype": "float32", "mask_image_logits": False,
              "transformers_version": "4.44.0", "use_cache": True, "vocab_size": len(vocab), "z_loss_weight": 1e-05,
              "vocabulary_map": vocab, "vq_config": vq_config}
    (directory / "config.json").write_text(json.dumps(config))
    sd = release_weights(len(vocab))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard in shards.items():
        save_file({k: sd[k] for k in shard}, directory / name, metadata={"format": "pt"})
    weight_map = {k: name for name, shard in shards.items() for k in shard}
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}))
    return sd, vocab


# ----------------------------------------------------------------- independent reference of Lumina's Chameleon
def reference_logits(sd, ids):
    """Lumina's vendored Chameleon forward (swin_norm False) for one unpadded sequence: logits [T, V]."""
    x = sd["model.embed_tokens.weight"][ids]
    T = len(ids)
    inv = 1.0 / THETA ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rms(v, weight):
        return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5))

    def head_norm(v, p):  # LayerNorm over head_dim; shard s's gamma/beta serve heads s*H/mp .. (s+1)*H/mp - 1
        shard = torch.arange(HEADS) // (HEADS // MP)
        return F.layer_norm(v, (HD,), eps=1e-5) * sd[p + ".weight"][shard] + sd[p + ".bias"][shard]

    def rope(v):
        half = torch.cat([-v[..., HD // 2:], v[..., :HD // 2]], -1)
        return v * cos + half * sin

    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        q = rope(head_norm(q.view(T, HEADS, HD), p + "self_attn.q_norm"))
        k = rope(head_norm(k.view(T, HEADS, HD), p + "self_attn.k_norm"))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        x = x + torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.view(T, HEADS, HD)).reshape(T, DIM) \
            @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def reference_greedy(sd, cond, uncond, lo, hi, eol):
    """Lumina's greedy image generation with CFG: the unconditional sequence starts at <racm3:break>;
    image tokens only (its MultiModalLogitsProcessor), EOL after each row."""
    out = []
    for _ in range(GRID[0]):
        for _ in range(GRID[1]):
            lc, lu = reference_logits(sd, cond)[-1, lo:hi], reference_logits(sd, uncond)[-1, lo:hi]
            tok = int((lu + CFG * (lc - lu)).argmax()) + lo
            out.append(tok)
            cond, uncond = cond + [tok], uncond + [tok]
        cond, uncond = cond + [eol], uncond + [eol]
    return torch.tensor(out).view(*GRID)


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    directory = tmp_path_factory.mktemp("Lumina-mGPT-7B-768")
    vq_config, vqgan = tiny_chameleon_vqgan()
    sd, vocab = write_release(directory, vq_config.to_dict())
    torch.save({"state_dict": vqgan, "epoch": 5, "global_step": 1}, directory.parent / "vqgan.ckpt")
    return directory, sd, vocab, vqgan


@pytest.fixture(scope="module")
def model(release):
    directory = release[0]
    return load_lumina_mgpt(directory, vqgan_checkpoint=directory.parent / "vqgan.ckpt", dtype=torch.float32)


def test_logits_equal_reference(release, model):
    _, sd, vocab, _ = release
    ids = [1, vocab["t3"], vocab["t7"], vocab["<racm3:break>"], vocab["<reserved08801>"], vocab["<reserved08802>"],
           vocab["IMGIMGBZ"], vocab["IMGIMGCZ"]]
    with torch.no_grad():
        ours = pjd.models.adapter_for(model).forward(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    ref = reference_logits(sd, ids)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert ref.std() > 1.0
    # Why the loader exists: transformers' from_pretrained refuses the per-shard q/k norms, and with
    # ignore_mismatched_sizes re-initialises them.
    with pytest.raises(RuntimeError, match="mismatched"):
        ChameleonForConditionalGeneration.from_pretrained(release[0])
    plain = ChameleonForConditionalGeneration.from_pretrained(release[0], dtype=torch.float32,
                                                              ignore_mismatched_sizes=True)
    with torch.no_grad():
        wrong = pjd.models.adapter_for(plain).forward(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    assert (wrong - ref).abs().max() > 0.1


def test_greedy_methods_equal_reference(release, model):
    _, sd, vocab, _ = release
    text = [[1, vocab["t1"], vocab["t4"], vocab["t9"]], [1, vocab["t2"]]]
    prompt = lumina_prompt(model, text, height=GRID[0], width=GRID[1], cfg_scale=CFG)
    lo, hi = prompt["image_token_range"]
    with torch.no_grad():
        runs = {m: pjd.generate(model, **prompt, method=m, top_k=1, **extra)
                for m, extra in [("ar", {}), ("sjd", {}), ("pjd", dict(context=GRID[1]))]}
    block = [vocab["<racm3:break>"], vocab["<reserved08801>"], vocab["<reserved08802>"]]
    for b, t in enumerate(text):
        ref = reference_greedy(sd, t + block, block, lo, hi, vocab["<reserved08799>"])
        for method, out in runs.items():
            assert torch.equal(out.tokens[b], ref), (method, b)


def test_vq_weights_and_images(release, model):
    directory, _, _, vqgan = release
    # The trainer dropped the VQ; the encoder comes from vqgan.ckpt (transformers' VQ uses taming's names).
    for key, value in model.model.vqmodel.state_dict().items():
        assert torch.equal(value, vqgan[key]), key
    lo, hi = pjd.models.chameleon.image_token_range(model)
    tokens = torch.randint(lo, hi, (2, *GRID), generator=torch.Generator().manual_seed(4))
    images = decode_images(model, tokens)
    assert len(images) == 2 and images[0].size == (GRID[1] * 2, GRID[0] * 2) and images[0].mode == "RGB"
    with torch.no_grad():
        pixels = chameleon_vqgan_decoder(vqgan, model.config.vq_config).decode(codebook_ids(model, tokens))
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0)
    assert torch.equal(torch.tensor(np.array(images[0])), expected)

    bare = load_lumina_mgpt(directory, dtype=torch.bfloat16)  # no vqgan: VQ absent, no decoder
    assert bare.model.vqmodel is None and bare.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="vqgan_checkpoint"):
        decode_images(bare, tokens)


def test_bad_inputs(tmp_path, release):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_lumina_mgpt(tmp_path)
    (tmp_path / "config.json").write_text((release[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_lumina_mgpt(tmp_path)


def test_text_ids():
    """Lumina's request text: "{W}x{H}" in pixels, then the turn separator; BOS first, no other specials."""
    class Tokenizer:
        bos_token_id = 1

        def encode(self, text, add_special_tokens):
            assert not add_special_tokens
            return [ord(c) for c in text]

    ids = lumina_text_ids(Tokenizer(), "a cat", height=48, width=32)
    assert ids[0] == 1 and "".join(map(chr, ids[1:])) == \
        "Generate an image of 512x768 according to the following prompt:\na cat<reserved08706>"
