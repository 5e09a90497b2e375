"""VQ decoders (pjd.models.vq) on checkpoints written here in the official on-disk layouts.

LlamaGen's ``vq_ds16_c2i.pt``: ``{"model": state_dict}`` with the names of its
``tokenizer/tokenizer_image/vq_model.py`` (``decoder.conv_blocks.{i}.res.{j}``, ``decoder.mid.{0,1,2}``,
attention on the lowest-resolution level, l2-normalised codebook, a ``codebook_used`` buffer).
Chameleon's ``vqgan.ckpt``: a Lightning checkpoint ``{"state_dict": ...}`` with taming-transformers
names (``decoder.up.{level}.block.{j}``, ``decoder.mid.block_1``, attention where the resolution is in
``attn_resolutions``), raw codebook, plus encoder and loss entries. Each decode is compared with a
plain functional reference that reads the same state dict.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ChameleonVQVAEConfig

from pjd.models import decode_images, load_llamagen
from pjd.models.vq import (LLAMAGEN_VQ, VQConfig, VQDecoder, chameleon_vq_config, load_chameleon_vqgan,
                           load_llamagen_vq)

TINY = dict(ch=32, ch_mult=(1, 2), z=32, nres=1, codebook=24, dim=4)


def _res(p, cin, cout):
    s = {p + ".norm1.weight": (cin,), p + ".norm1.bias": (cin,), p + ".conv1.weight": (cout, cin, 3, 3),
         p + ".conv1.bias": (cout,), p + ".norm2.weight": (cout,), p + ".norm2.bias": (cout,),
         p + ".conv2.weight": (cout, cout, 3, 3), p + ".conv2.bias": (cout,)}
    if cin != cout:
        s.update({p + ".nin_shortcut.weight": (cout, cin, 1, 1), p + ".nin_shortcut.bias": (cout,)})
    return s


def _attn(p, c):
    s = {p + ".norm.weight": (c,), p + ".norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        s.update({f"{p}.{name}.weight": (c, c, 1, 1), f"{p}.{name}.bias": (c,)})
    return s


class Names:
    """Where each decoder part lives, by taming's level numbering (0 = highest resolution)."""

    def __init__(self, layout, levels):
        self.layout, self.levels = layout, levels
        self.mid = (["decoder.mid.0", "decoder.mid.1", "decoder.mid.2"] if layout == "llamagen"
                    else ["decoder.mid.block_1", "decoder.mid.attn_1", "decoder.mid.block_2"])

    def level(self, level):
        return (f"decoder.conv_blocks.{self.levels - 1 - level}" if self.layout == "llamagen"
                else f"decoder.up.{level}")

    def res(self, level, j):
        return f"{self.level(level)}.{'res' if self.layout == 'llamagen' else 'block'}.{j}"

    def attn(self, level, j):
        return f"{self.level(level)}.attn.{j}"


def official_shapes(layout, *, ch, ch_mult, z, nres, codebook, dim, attn_levels):
    """Parameter shapes of the official VQ model (decoder, quantizer, convs, and some encoder/training
    entries a loader must skip). attn_levels: taming level numbers with attention in the up path."""
    L = len(ch_mult)
    names = Names(layout, L)
    s = {"quantize.embedding.weight": (codebook, dim), "post_quant_conv.weight": (z, dim, 1, 1),
         "post_quant_conv.bias": (z,), "quant_conv.weight": (dim, z, 1, 1), "quant_conv.bias": (dim,),
         "encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    if layout == "llamagen":
        s["quantize.codebook_used"] = (65536,)
    else:
        s["loss.discriminator.main.0.weight"] = (64, 3, 4, 4)
    block_in = ch * ch_mult[-1]
    s.update({"decoder.conv_in.weight": (block_in, z, 3, 3), "decoder.conv_in.bias": (block_in,)})
    s.update(_res(names.mid[0], block_in, block_in) | _attn(names.mid[1], block_in)
             | _res(names.mid[2], block_in, block_in))
    for level in reversed(range(L)):
        out = ch * ch_mult[level]
        for j in range(nres + 1):
            s.update(_res(names.res(level, j), block_in, out))
            block_in = out
            if level in attn_levels:
                s.update(_attn(names.attn(level, j), out))
        if level != 0:
            s.update({names.level(level) + ".upsample.conv.weight": (out, out, 3, 3),
                      names.level(level) + ".upsample.conv.bias": (out,)})
    s.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,),
              "decoder.conv_out.weight": (3, block_in, 3, 3), "decoder.conv_out.bias": (3,)})
    return s


def taming_encoder_shapes(*, ch, ch_mult, z, nres, resolution, attn_resolutions):
    """The full encoder of a taming VQGAN (Chameleon's vqgan.ckpt also holds it): down levels from the
    highest resolution, attention where the resolution is in attn_resolutions, middle, conv_out to z."""
    s = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    block_in, res = ch, resolution
    for level, mult in enumerate(ch_mult):
        out = ch * mult
        for j in range(nres):
            s.update(_res(f"encoder.down.{level}.block.{j}", block_in, out))
            block_in = out
            if res in attn_resolutions:
                s.update(_attn(f"encoder.down.{level}.attn.{j}", out))
        if level != len(ch_mult) - 1:
            s.update({f"encoder.down.{level}.downsample.conv.weight": (out, out, 3, 3),
                      f"encoder.down.{level}.downsample.conv.bias": (out,)})
            res //= 2
    s.update(_res("encoder.mid.block_1", block_in, block_in) | _attn("encoder.mid.attn_1", block_in)
             | _res("encoder.mid.block_2", block_in, block_in))
    s.update({"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,),
              "encoder.conv_out.weight": (z, block_in, 3, 3), "encoder.conv_out.bias": (z,)})
    return s


def random_weights(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("codebook_used"):
            sd[key] = torch.zeros(shape)
        elif len(shape) == 1:
            sd[key] = (1.0 if "norm" in key and key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return sd


def reference_decode(sd, ids, names, *, ch_mult, nres, l2):
    """The taming decoder written out functionally over the state dict."""
    table = sd["quantize.embedding.weight"]
    if l2:
        table = table / table.norm(dim=1, keepdim=True)
    z = table[ids].permute(0, 3, 1, 2)

    def conv(x, p, pad):
        return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], padding=pad)

    def gn(x, p):
        return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def swish(x):
        return x * torch.sigmoid(x)

    def res(x, p):
        h = conv(swish(gn(x, p + ".norm1")), p + ".conv1", 1)
        h = conv(swish(gn(h, p + ".norm2")), p + ".conv2", 1)
        return (conv(x, p + ".nin_shortcut", 0) if p + ".nin_shortcut.weight" in sd else x) + h

    def attn(x, p):
        b, c, hh, ww = x.shape
        y = gn(x, p + ".norm")
        q, k, v = (conv(y, p + "." + n, 0).reshape(b, c, hh * ww) for n in "qkv")
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(c), dim=2)  # [b, query, key]
        return x + conv(torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww), p + ".proj_out", 0)

    h = conv(conv(z, "post_quant_conv", 0), "decoder.conv_in", 1)
    h = attn(res(h, names.mid[0]), names.mid[1])
    h = res(h, names.mid[2])
    for level in reversed(range(len(ch_mult))):
        for j in range(nres + 1):
            h = res(h, names.res(level, j))
            if names.attn(level, j) + ".q.weight" in sd:
                h = attn(h, names.attn(level, j))
        if level != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), names.level(level) + ".upsample.conv", 1)
    return conv(swish(gn(h, "decoder.norm_out")), "decoder.conv_out", 1)


def tiny_llamagen_vq(seed=0, codebook=TINY["codebook"]):
    t = TINY
    return random_weights(official_shapes("llamagen", ch=t["ch"], ch_mult=t["ch_mult"], z=t["z"], nres=t["nres"],
                                          codebook=codebook, dim=t["dim"], attn_levels={1}), seed)


TINY_VQ_MODEL = dict(ch=TINY["ch"], ch_mult=TINY["ch_mult"], z_channels=TINY["z"], num_res_blocks=TINY["nres"])


def tiny_chameleon_vqgan(seed=1, attn_resolutions=(8,)):
    """A taming-layout VQGAN for a ChameleonVQVAEConfig with resolution 8, ch_mult (1, 2): attention at
    resolution 8 is taming level 0 (the highest resolution)."""
    t = TINY
    config = ChameleonVQVAEConfig(embed_dim=t["dim"], num_embeddings=t["codebook"], latent_channels=t["z"],
                                  resolution=8, base_channels=t["ch"], channel_multiplier=list(t["ch_mult"]),
                                  num_res_blocks=t["nres"], attn_resolutions=list(attn_resolutions))
    levels = {i for i in range(2) if 8 // 2 ** i in attn_resolutions}
    shapes = official_shapes("taming", ch=t["ch"], ch_mult=t["ch_mult"], z=t["z"], nres=t["nres"],
                             codebook=t["codebook"], dim=t["dim"], attn_levels=levels)
    shapes |= taming_encoder_shapes(ch=t["ch"], ch_mult=t["ch_mult"], z=t["z"], nres=t["nres"], resolution=8,
                                    attn_resolutions=attn_resolutions)
    return config, random_weights(shapes, seed)


def test_llamagen_vq_equals_reference(tmp_path):
    sd = tiny_llamagen_vq()
    torch.save({"model": sd}, tmp_path / "vq.pt")
    decoder = load_llamagen_vq(tmp_path / "vq.pt", downsample=2, vq_model=TINY_VQ_MODEL)
    ids = torch.randint(0, TINY["codebook"], (2, 3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = decoder.decode(ids)
    ref = reference_decode(sd, ids, Names("llamagen", 2), ch_mult=TINY["ch_mult"], nres=TINY["nres"], l2=True)
    assert ours.shape == (2, 3, 6, 10)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert ref.std() > 0.1


def test_llamagen_decode_images_through_loader(tmp_path):
    """load_llamagen(vq_checkpoint=...) attaches the decoder; decode_images gives PIL images of f * grid."""
    from test_llamagen import ARCH, GRID, release_state_dict

    torch.save({"model": release_state_dict(codebook=TINY["codebook"])}, tmp_path / "gpt.pt")
    torch.save({"model": tiny_llamagen_vq()}, tmp_path / "vq.pt")
    model = load_llamagen(tmp_path / "gpt.pt", gpt_model=ARCH, image_size=GRID * 2, downsample=2,
                          vq_checkpoint=tmp_path / "vq.pt", vq_model=TINY_VQ_MODEL)
    tokens = torch.randint(0, TINY["codebook"], (2, GRID, GRID), generator=torch.Generator().manual_seed(1))
    images = decode_images(model, tokens)
    assert len(images) == 2 and images[0].size == (GRID * 2, GRID * 2) and images[0].mode == "RGB"
    with torch.no_grad():
        pixels = model.image_decoder.decode(tokens)
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[1].permute(1, 2, 0)
    assert torch.equal(torch.tensor(np.array(images[1])), expected)
    torch.save({"model": tiny_llamagen_vq(codebook=30)}, tmp_path / "vq30.pt")
    with pytest.raises(ValueError, match="codes but the GPT"):
        load_llamagen(tmp_path / "gpt.pt", gpt_model=ARCH, image_size=GRID * 2, downsample=2,
                      vq_checkpoint=tmp_path / "vq30.pt", vq_model=TINY_VQ_MODEL)


@pytest.mark.parametrize("attn_resolutions", [(8,), ()])
def test_chameleon_vqgan_equals_reference(tmp_path, attn_resolutions):
    config, sd = tiny_chameleon_vqgan(attn_resolutions=attn_resolutions)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000}, tmp_path / "vqgan.ckpt")
    decoder = load_chameleon_vqgan(tmp_path / "vqgan.ckpt", config)
    assert decoder.config.attn_levels == ((1,) if attn_resolutions else ())
    ids = torch.randint(0, TINY["codebook"], (1, 4, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = decoder.decode(ids)
    ref = reference_decode(sd, ids, Names("taming", 2), ch_mult=TINY["ch_mult"], nres=TINY["nres"], l2=False)
    assert ours.shape == (1, 3, 8, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_release_architectures_match_official_layouts():
    """VQ-16, VQ-8 and Chameleon's released VQGAN config give exactly the official decoder's parameters."""
    for downsample, mult in ((16, (1, 1, 2, 2, 4)), (8, (1, 2, 2, 4))):
        cfg = LLAMAGEN_VQ[downsample]
        with torch.device("meta"):
            ours = {k: tuple(v.shape) for k, v in VQDecoder(cfg).state_dict().items()}
        official = official_shapes("llamagen", ch=128, ch_mult=mult, z=256, nres=2, codebook=16384, dim=8,
                                   attn_levels={len(mult) - 1})
        assert ours == {k: v for k, v in official.items() if k.startswith(("decoder.", "post_quant", "quantize.emb"))}
    cfg = chameleon_vq_config(ChameleonVQVAEConfig())  # transformers' defaults = Chameleon's vqgan.yaml
    assert (cfg.codebook_size, cfg.codebook_dim, cfg.z_channels, cfg.ch, cfg.attn_levels) == (8192, 256, 256, 128, ())
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VQDecoder(cfg).state_dict().items()}
    from pjd.models.vq import taming_to_llamagen_keys
    official = official_shapes("taming", ch=128, ch_mult=(1, 1, 2, 2, 4), z=256, nres=2, codebook=8192, dim=256,
                               attn_levels=set())
    converted = taming_to_llamagen_keys(official, 5)
    assert ours == {k: v for k, v in converted.items() if k.startswith(("decoder.", "post_quant", "quantize.emb"))}


def test_bad_vq_inputs(tmp_path):
    torch.save({"model": tiny_llamagen_vq()}, tmp_path / "vq.pt")
    with pytest.raises(ValueError, match="does not match the VQ architecture"):
        load_llamagen_vq(tmp_path / "vq.pt", downsample=16)
    with pytest.raises(ValueError, match="unknown fields"):
        load_llamagen_vq(tmp_path / "vq.pt", downsample=2, vq_model=dict(channels=3))
    with pytest.raises(ValueError, match="downsample"):
        load_llamagen_vq(tmp_path / "vq.pt", downsample=4)
    decoder = load_llamagen_vq(tmp_path / "vq.pt", downsample=2, vq_model=TINY_VQ_MODEL)
    with pytest.raises(ValueError, match="codebook ids"):
        decoder.decode(torch.full((1, 2, 2), TINY["codebook"]))
    assert isinstance(decoder.config, VQConfig)
