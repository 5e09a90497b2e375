"""The embedded default model: tokenizer, data split, shipped weights, quality measures."""
import socket

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pjd.models import data
from pjd.models.palette import Palette
from pjd.quality import frechet_distance, image_features, nll_per_token, unigram_nll_per_token


@pytest.fixture(scope="module")
def heldout():
    images, labels = data.heldout_crops(32, seed=1)
    return images, labels


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


# --- palette -------------------------------------------------------------------------------
def test_palette_fit_recovers_few_colours_exactly():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    pixels = colours[rng.integers(0, 12, 5000)]
    pal = Palette.fit(pixels, 12, seed=3, iters=10)
    assert sorted(map(tuple, pal.colors.tolist())) == sorted(map(tuple, colours.tolist()))
    images = torch.from_numpy(pixels.reshape(5, 10, 100, 3))
    assert torch.equal(pal.decode(pal.encode(images)), images)
    assert pal.counts.sum() == 5000


def test_palette_encode_is_nearest_colour(shipped):
    pal = shipped.palette
    pixels = torch.randint(0, 256, (777, 3), dtype=torch.uint8)
    d2 = ((pixels[:, None, :].float() - pal.colors[None].float()) ** 2).sum(-1)
    ids = pal.encode(pixels)
    assert torch.equal(d2.gather(1, ids[:, None]).squeeze(1), d2.min(1).values)


def test_shipped_palette_round_trip_error_bound(shipped, heldout):
    pal = shipped.palette
    images = torch.from_numpy(heldout[0])
    tokens = pal.encode(images)
    assert tokens.shape == images.shape[:3] and tokens.dtype == torch.long
    err = (pal.decode(tokens).float() - images.float()).abs()
    # Measured on held-out crops: mean abs error a few levels of 255, worst pixel well bounded.
    assert err.mean() < 4.0, err.mean()
    assert err.max() < 64, err.max()
    # Distinct colours, so decode -> encode is the identity on token ids.
    assert torch.equal(pal.encode(pal.decode(tokens)), tokens)


def test_palette_rejects_bad_input(shipped):
    with pytest.raises(ValueError, match="images"):
        shipped.palette.encode(torch.zeros(2, 4, 4, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="tokens"):
        shipped.palette.decode(torch.tensor([shipped.palette.size]))


# --- data split ------------------------------------------------------------------------------
def test_train_and_eval_regions_never_overlap(monkeypatch):
    # Photos whose pixels say which side of the cut they come from: 0 = train columns, 255 = eval.
    def marked_photo(index):
        h, w = 300 + 37 * index, 451 + 53 * index
        photo = np.zeros((h, w, 3), dtype=np.uint8)
        photo[:, data.split_columns(w):] = 255
        return photo

    monkeypatch.setattr(data, "load_photo", marked_photo)
    rng = np.random.default_rng(0)
    train, _ = data.CropSampler("train").sample(400, rng)
    evals, _ = data.CropSampler("eval").sample(400, rng)
    assert (train == 0).all(), "a training crop contains held-out pixels"
    assert (evals == 255).all(), "an eval crop contains training pixels"


def test_real_photo_levels_fit_a_crop():
    for split in ("train", "eval"):
        sampler = data.CropSampler(split)
        assert len(sampler.levels) == len(data.CLASS_NAMES)
        for pyramid in sampler.levels:
            assert all(level.shape[0] >= data.HEIGHT and level.shape[1] >= data.WIDTH for level in pyramid)
    a, la = data.heldout_crops(6, seed=5)
    b, lb = data.heldout_crops(6, seed=5)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)


# --- the shipped model ---------------------------------------------------------------------------
def test_default_loads_and_describes_itself(shipped):
    k = shipped.palette.size
    assert shipped.image_token_range == (0, k)
    assert shipped.null_class_id == k + len(shipped.class_names)
    assert shipped.model.config.vocab_size == shipped.null_class_id + 1
    assert not shipped.model.training
    assert next(shipped.model.parameters()).dtype == torch.float32
    assert torch.equal(shipped.prompt(torch.tensor([0, 3])), torch.tensor([[k], [k + 3]]))
    assert torch.equal(shipped.null_prompt(2), torch.full((2, 1), shipped.null_class_id))
    tokens = torch.randint(0, k, (2, 32, 32))
    assert shipped.decode(tokens).shape == (2, 32, 32, 3)
    pics = shipped.to_pil(tokens, scale=4)
    assert len(pics) == 2 and pics[0].size == (128, 128)
    with pytest.raises(ValueError, match="class_ids"):
        shipped.prompt(torch.tensor([len(shipped.class_names)]))


def test_default_heldout_nll_well_below_unigram(shipped, heldout):
    images, labels = heldout
    tokens = shipped.palette.encode(images[:8])
    nll = nll_per_token(shipped.model, tokens, shipped.prompt(torch.from_numpy(labels[:8])),
                        image_token_range=shipped.image_token_range)
    base = unigram_nll_per_token(tokens, shipped.palette.counts)
    # An untrained model scores about log(K) > unigram; training must beat unigram by a wide margin.
    assert nll.mean() < 0.7 * base.mean(), (nll.mean(), base.mean())


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


# --- Fréchet distance ------------------------------------------------------------------------------
def test_frechet_distance_zero_for_identical_and_large_for_shuffled_pixels():
    a = torch.from_numpy(data.heldout_crops(128, seed=1)[0])
    b = torch.from_numpy(data.heldout_crops(128, seed=2)[0])
    assert abs(frechet_distance(a, a)) < 1e-6
    # Shuffling pixels keeps every colour histogram and destroys all spatial structure.
    gen = torch.Generator().manual_seed(0)
    flat = b.reshape(b.shape[0], -1, 3)
    shuffled = torch.stack([f[torch.randperm(f.shape[0], generator=gen)] for f in flat]).reshape(b.shape)
    real_vs_real = frechet_distance(a, b)
    real_vs_shuffled = frechet_distance(a, shuffled)
    assert real_vs_shuffled > 3 * real_vs_real, (real_vs_shuffled, real_vs_real)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # histogram features sum to 1: rank-deficient
def test_frechet_distance_matches_scipy_formula():
    import scipy.linalg  # installed with scikit-image (the data pipeline's dependency)

    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (40, 8, 8, 3), generator=gen, dtype=torch.uint8)
    b = (a.int() // 2 + 60).to(torch.uint8)
    fa, fb = image_features(a).numpy(), image_features(b).numpy()
    ca, cb = np.cov(fa.T), np.cov(fb.T)
    want = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert image_features(a).shape == (40, 123)
