"""Per-image counter-based randomness (pjd.rng) and the batch invariance it gives pjd.generate."""
import warnings

import pytest
import torch

import pjd
from pjd.models import tiny_llama
from pjd.rng import GAMMA, MASK64, DrawStream, draws, image_keys, mix64, mix64_int, to_tokens, to_uniform

IMAGE = (0, 24)
PROMPT = (24, 30)
EOL = 30


def _u64(t: torch.Tensor) -> list[int]:
    return [v & MASK64 for v in t.tolist()]


def test_mix64_matches_python_splitmix64():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**63), 2**63 - 1, (4096,), generator=g, dtype=torch.int64)
    x = torch.cat([x, torch.tensor([0, 1, -1, -(2**63), 2**63 - 1])])
    assert _u64(mix64(x)) == [mix64_int(v) for v in _u64(x)]
    # SplitMix64 seeded with 0: its first output is the published 0xE220A8397B1DCDAF.
    assert mix64_int(GAMMA) == 0xE220A8397B1DCDAF


def test_keys_and_draws_follow_the_documented_derivation():
    seed, index = 12345, torch.tensor([0, 7, 1 << 40])
    keys = image_keys(seed, index)
    expect = [mix64_int(seed + (i + 1) * GAMMA) for i in index.tolist()]
    assert _u64(keys) == expect
    c = torch.tensor([0, 3, 10**9])
    assert _u64(draws(keys[1], c)) == [mix64_int(expect[1] + (n + 1) * GAMMA) for n in c.tolist()]


def test_uniforms_and_tokens_are_exact_and_in_range():
    z = draws(image_keys(3, torch.arange(4)), torch.arange(50_000)[:, None]).flatten()
    u = to_uniform(z)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).round())  # 24-bit grid: exact float32
    assert abs(float(u.double().mean()) - 0.5) < 0.005
    tok = to_tokens(z, 5, 12)
    assert tok.min() == 5 and tok.max() == 11
    freq = torch.bincount(tok - 5).double() / tok.numel()
    assert (freq - 1 / 7).abs().max() < 0.005


def test_coupled_noise_follows_the_documented_derivation_and_is_keyed_by_slot():
    """Coupled draws (issue 22): E = -log(1 - u) of the draw with counter -1 - (slot * Vi + v), the
    same for a slot whatever lane, offset or step asks for it."""
    seed, index = 77, torch.tensor([3, 9])
    stream = DrawStream(seed, index, lanes=2, window=3, token_range=(5, 9))  # Vi = 4
    slots = torch.tensor([[0, 10], [2, 10]])
    noise = stream.coupled(slots, 4)  # [B=2, A=2, 4 slots, Vi=4]
    assert noise.shape == (2, 2, 4, 4) and noise.dtype == torch.float32
    key = mix64_int(seed + (9 + 1) * GAMMA)  # image 9
    s, v = 10 + 2, 3  # lane 1 of image 9, offset 2, token 3
    z = mix64_int(key + (-1 - (s * 4 + v) + 1) * GAMMA)
    u = (z >> 40) * 2.0**-24
    assert float(noise[1, 1, 2, 3]) == float(-torch.log1p(-torch.tensor(u, dtype=torch.float32)))
    # Slot 3 of image 3 seen from slot base 0 (offset 3) and from slot base 2 (offset 1): same noise.
    assert torch.equal(noise[0, 0, 3], stream.coupled(torch.tensor([[2], [0]]), 2)[0, 0, 1])
    assert not torch.equal(noise[0, 0, 0], noise[0, 0, 1]) and (noise >= 0).all()


def test_an_images_draws_do_not_depend_on_its_batch():
    big = DrawStream(9, torch.tensor([5, 2, 9, 0]), lanes=3, window=4, token_range=(0, 100))
    alone = DrawStream(9, torch.tensor([9]), lanes=3, window=4, token_range=(0, 100))
    other_seed = DrawStream(10, torch.tensor([9]), lanes=3, window=4, token_range=(0, 100))
    for t in (0, 1, 57):
        for x, y, z in zip(big.step(t), alone.step(t), other_seed.step(t)):
            assert torch.equal(x[2], y[0])
            assert not torch.equal(y, z)
    a, b = big.step(1), big.step(2)
    assert not torch.equal(a[0], b[0])  # steps draw fresh numbers
    assert not torch.equal(a[0][0], a[0][1])  # images draw different numbers


# ---------------------------------------------------------------- through pjd.generate
@pytest.fixture(scope="module")
def model():
    return tiny_llama(32, hidden_size=48, layers=2, heads=4, kv_heads=2, logit_scale=2.0, seed=1)


def _prompts(batch, length, seed):
    return torch.randint(*PROMPT, (batch, length), generator=torch.Generator().manual_seed(seed))


def _run(model, ids, **kw):
    with torch.no_grad():
        return pjd.generate(model, ids, image_token_range=IMAGE, **kw)


@pytest.mark.parametrize("eol", [None, EOL])
@pytest.mark.parametrize("method,extra", [("pjd", dict(context=2)), ("sjd++", {}), ("zipar", {}),
                                          ("pjd", dict(context=3, draft_init="repeat_left", cache="append")),
                                          ("pjd", dict(context=2, coupled_draws=True, continuation=True)),
                                          ("sjd", dict(coupled_draws=True))])
def test_sampled_images_are_batch_invariant(model, method, extra, eol):
    """Non-exact settings, sampling, CFG, ragged prompts (left padding) and ragged acceptance: each
    image decoded inside a batch equals the same image decoded alone, at another batch position."""
    ids = _prompts(4, 4, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[3, :1] = 0
    uncond = torch.full((4, 1), PROMPT[1] - 1)
    kw = dict(height=4, width=6, method=method, top_k=10, temperature=1.1, seed=21, eol_token_id=eol,
              cfg_scale=2.5, uncond_input_ids=uncond, **extra)
    index = torch.tensor([40, 3, 17, 8])
    batch = _run(model, ids.masked_fill(mask == 0, 0), attention_mask=mask, image_index=index, **kw)
    if method != "zipar":  # zipar's step count is fixed by the grid
        assert len(set(batch.steps_per_image.tolist())) > 1  # the images finish at different steps
    for b in range(4):
        ids_b = ids[b:b + 1, mask[b].bool()]
        alone = _run(model, ids_b, image_index=index[b:b + 1], **{**kw, "uncond_input_ids": uncond[:1]})
        assert torch.equal(batch.tokens[b], alone.tokens[0]), b
        assert int(batch.steps_per_image[b]) == alone.steps
    # Reversed batch order, same indices: the same images in reverse.
    rev = _run(model, ids.flip(0).masked_fill(mask.flip(0) == 0, 0), attention_mask=mask.flip(0),
               image_index=index.flip(0), **kw)
    assert torch.equal(rev.tokens, batch.tokens.flip(0))


def test_image_index_selects_the_stream(model):
    ids = _prompts(1, 2, seed=0).expand(3, 2)
    kw = dict(height=4, width=5, method="pjd", context=2, top_k=12, seed=4)
    default = _run(model, ids, **kw)
    explicit = _run(model, ids, image_index=[0, 1, 2], **kw)
    assert torch.equal(default.tokens, explicit.tokens)
    # Same prompt, different index: different images; same index twice: the same image.
    assert not torch.equal(default.tokens[0], default.tokens[1])
    same = _run(model, ids, image_index=torch.tensor([1, 1, 1]), **kw)
    assert torch.equal(same.tokens[0], default.tokens[1]) and torch.equal(same.tokens[2], default.tokens[1])


def test_generator_is_deprecated_but_reproducible(model):
    ids = _prompts(2, 2, seed=0)
    kw = dict(height=3, width=4, method="sjd", top_k=12)
    with pytest.warns(DeprecationWarning, match="seed"):
        a = _run(model, ids, generator=torch.Generator().manual_seed(6), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        b = _run(model, ids, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(image_index=[0]), ValueError, "image_index: expected 2"),
    (dict(image_index=[[0, 1]]), ValueError, "image_index"),
    (dict(image_index=[0.0, 1.0]), ValueError, "image_index"),
    (dict(image_index=[0, -1]), ValueError, "non-negative"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),  # a wrong kind: TypeError, as every pjd._checks argument
    (dict(seed=torch.tensor(1.0)), TypeError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "generator"),
])
def test_bad_seed_and_index_are_rejected(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        _run(model, _prompts(2, 2, seed=0), height=2, width=3, **kwargs)


def test_sample_uniform_alone_equals_the_step_draw():
    stream = DrawStream(5, torch.tensor([3, 0, 12]), lanes=2, window=3, token_range=(0, 9))
    steps = [1, 40, 1 << 40]  # the last one's offset t * per_step * GAMMA wraps modulo 2**64
    for t in steps:
        assert torch.equal(stream.sample_uniform(t), stream.step(t)[1][..., 0])
    # Many steps at once (the ar loop's upfront draws) hold the same numbers.
    assert torch.equal(stream.sample_uniform(torch.tensor(steps)),
                       torch.stack([stream.step(t)[1][..., 0] for t in steps]))
