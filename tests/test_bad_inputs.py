"""Bad input gets a clear ValueError/TypeError naming the argument, never a deep crash."""
import pytest
import torch

import pjd
from pjd.models import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(32, hidden_size=32, layers=1, heads=2, kv_heads=1, max_positions=64)


IDS = torch.tensor([[30, 31]])
GOOD = dict(height=2, width=3, image_token_range=(0, 24))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window=0, method="pjd"), ValueError, "window"),
    (dict(window=-2, method="sjd"), ValueError, "window"),
    (dict(window=2.5, method="sjd"), TypeError, "window"),
    (dict(window=3, method="ar"), ValueError, "window"),
    (dict(context=0, method="pjd"), ValueError, "context"),
    (dict(context=2, method="sjd"), ValueError, "context"),
    (dict(top_k=25), ValueError, "top_k"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(method="beam"), ValueError, "method"),
    (dict(cache="paged"), ValueError, "cache"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(draft_init="zeros"), ValueError, "draft_init"),
    (dict(height=0), ValueError, "height"),
    (dict(width=3.0), TypeError, "width"),
    (dict(height=20, width=4), ValueError, "max_position_embeddings"),
    (dict(image_token_range=(10, 40)), ValueError, "image_token_range"),
    (dict(image_token_range=(5, 5)), ValueError, "image_token_range"),
    (dict(eol_token_id=3), ValueError, "eol_token_id"),
    (dict(eol_token_id=99), ValueError, "eol_token_id"),
    (dict(cfg_scale=2.0), ValueError, "uncond_input_ids"),
    (dict(uncond_input_ids=IDS), ValueError, "cfg_scale"),
    (dict(cfg_scale=2.0, uncond_input_ids=torch.tensor([[30], [31]])), ValueError, "uncond_input_ids"),
    (dict(cfg_scale=float("nan"), uncond_input_ids=IDS), ValueError, "cfg_scale"),
    (dict(attention_mask=torch.ones(1, 3)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 0]])), ValueError, "attention_mask"),
    (dict(reuse_threshold=-1.0, method="pjd"), ValueError, "reuse_threshold"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "generator"),
    (dict(backend="triton"), ValueError, "TRITON_INTERPRET"),
])
def test_generate_rejects_bad_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        pjd.generate(model, IDS, **{**GOOD, **kwargs})


@pytest.mark.parametrize("ids,error,match", [
    (torch.tensor([30, 31]), ValueError, "input_ids"),
    (torch.tensor([[30.0, 31.0]]), TypeError, "input_ids"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "input_ids"),
    ([[30, 31]], TypeError, "input_ids"),
])
def test_generate_rejects_bad_prompts(model, ids, error, match):
    with pytest.raises(error, match=match):
        pjd.generate(model, ids, **GOOD)


def test_generate_rejects_non_models():
    with pytest.raises(TypeError, match="model"):
        pjd.generate(object(), IDS, **GOOD)


def test_nan_logits_are_reported(model):
    broken = tiny_llama(32, hidden_size=32, layers=1, heads=2, kv_heads=1, max_positions=64)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN logits"):
        pjd.generate(broken, IDS, **GOOD)
