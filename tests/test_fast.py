"""pjd.fast: the "pjd" attention implementation is SDPA outside decoding, loads, and patches exactly."""
import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel

import pjd.fast
from pjd.cache import ActiveStep
from pjd.models import tiny_janus, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(40, hidden_size=32, heads=4, kv_heads=2, seed=3)  # GQA: 2 query heads per kv head


def twin(model):
    """The same weights loaded with attn_implementation="pjd" (from_config path)."""
    other = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="pjd")  # it edits the config
    assert model.config._attn_implementation == "sdpa"
    other.load_state_dict(model.state_dict())
    return other.eval()


def padded_batch():
    ids = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


def test_from_config_prefill_and_padding_match_sdpa(llama):
    fast = twin(llama)
    assert fast.config._attn_implementation == "pjd"
    ids, mask = padded_batch()
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask)):
            torch.testing.assert_close(fast(**kwargs).logits, llama(**kwargs).logits, rtol=0, atol=0)
        # transformers must hand "pjd" the 2-D padding mask (it drops it for unknown mask backends).
        assert not torch.allclose(fast(input_ids=ids, attention_mask=mask).logits[2], fast(input_ids=ids).logits[2])


def test_dynamic_cache_decoding_matches_sdpa(llama):
    fast = twin(llama)
    ids, mask = padded_batch()
    with torch.no_grad():
        a = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = fast.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b)
        # Manual past_key_values: prefill then one token at a time, logits at every step.
        caches = [DynamicCache(config=m.config) for m in (llama, fast)]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        step_ids, step_mask = ids, mask
        for _ in range(4):
            outs = [m(input_ids=step_ids, attention_mask=step_mask, position_ids=pos, past_key_values=c).logits
                    for m, c in zip((llama, fast), caches)]
            torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
            step_ids = outs[0][:, -1:].argmax(-1)
            step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], 1)
            pos = pos[:, -1:] + 1


def test_from_pretrained_with_pjd(llama, tmp_path):
    llama.save_pretrained(tmp_path)
    fast = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="pjd").eval()
    assert fast.config._attn_implementation == "pjd"
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits,
                                   llama(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def implementations(model):
    config = model.config
    return {key: getattr(config, key)._attn_implementation_internal for key in config.sub_configs} | {
        "": config._attn_implementation_internal}


@pytest.mark.parametrize("start", ["sdpa", "eager"])
def test_patch_switches_text_config_and_round_trips(start):
    model = tiny_janus()
    model.set_attn_implementation(start)
    before = implementations(model)
    assert pjd.fast.patch(model) is True
    after = implementations(model)
    assert after["text_config"] == "pjd" and after[""] == "pjd"
    assert after["vision_config"] == before["vision_config"]  # pjd never decodes through the vision tower
    assert model.model.language_model.layers[0].self_attn.config._attn_implementation == "pjd"
    assert pjd.fast.is_patched(model) and pjd.fast.patch(model) is True  # idempotent
    pjd.fast.unpatch(model)
    assert implementations(model) == before and not pjd.fast.is_patched(model)
    with pjd.fast.patched(model):
        assert pjd.fast.is_patched(model)
    assert implementations(model) == before


def test_patched_keeps_a_model_loaded_with_pjd(llama):
    fast = twin(llama)
    with pjd.fast.patched(fast):
        pass
    assert fast.config._attn_implementation == "pjd"


class ToyAttention(nn.Module):  # attention computed by hand, not through transformers' interface
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)


class ToyModel(PreTrainedModel):
    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = ToyAttention(config, 0)
        self.post_init()


class NoAttentionModel(PreTrainedModel):
    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()


TOY = dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1)


@pytest.mark.parametrize("make,reason", [
    (lambda: ToyModel(LlamaConfig(**TOY)), "AttentionInterface"),
    (lambda: nn.Linear(2, 2), "not a transformers PreTrainedModel"),
    (lambda: NoAttentionModel(LlamaConfig(**TOY)), "no attention layer"),
])
def test_unpatchable_models_warn_and_stay_unchanged(make, reason):
    model = make()
    before = getattr(getattr(model, "config", None), "_attn_implementation_internal", None)
    with pytest.warns(UserWarning, match=reason):
        assert pjd.fast.patch(model) is False
    assert getattr(getattr(model, "config", None), "_attn_implementation_internal", None) == before
    with warnings.catch_warnings(), pytest.raises(ValueError, match="cannot use pjd attention"):
        warnings.simplefilter("ignore")
        with pjd.fast.patched(model):
            pass


def test_mask_function_builds_no_mask_during_a_pjd_step():
    kw = dict(batch_size=1, q_length=4, kv_length=4, attention_mask=torch.tensor([[0, 1, 1, 1]], dtype=torch.bool),
              allow_is_causal_skip=True)
    assert pjd.fast.pjd_mask(**kw).shape == (1, 1, 4, 4)
    with ActiveStep(cache=None, step=None, backend="torch"):
        assert pjd.fast.pjd_mask(**kw) is None


def load_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sjd_dynamic_cache.py"
    spec = importlib.util.spec_from_file_location("sjd_dynamic_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("window", [1, 5])
def test_backend_example_sjd_over_dynamic_cache_equals_greedy_ar(window):
    """docs/backend.md's loop: HF DynamicCache + pjd hook + speculative_verify + compact_kv."""
    example = load_example()
    model = tiny_llama(48, hidden_size=32, logit_scale=6.0, seed=4)
    prompt = torch.tensor([[3, 30, 11]])
    n = 20
    sjd, steps = example.sjd_generate(model, prompt, n, window=window, top_k=1)
    with torch.no_grad():  # a manual greedy loop (the model's generation config may stop at EOS)
        ids = prompt
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(sjd, ids[:, 3:])
    assert 1 <= steps <= n
