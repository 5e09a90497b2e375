"""SJD over a Hugging Face DynamicCache, built on pjd's backend ops (docs/backend.md).

Another decoding library's loop, not pjd's engine: the model keeps its own append-ordered
``DynamicCache``; pjd supplies the attention of each draft step (through the "pjd" attention hook
-> ``pjd.ops.draft_attention``), the verification (``pjd.ops.speculative_verify``), and the removal
of rejected drafts' keys/values from every layer in one call (``pjd.ops.compact_kv``).

Run: ``python examples/sjd_dynamic_cache.py`` (tiny random Llama, CPU, a few seconds). It checks
that greedy SJD gives exactly ``model.generate``'s greedy tokens, then samples with top-k.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

import pjd.fast
from pjd.cache import ActiveStep
from pjd.models import tiny_llama
from pjd.ops import TOP, compact_kv, speculative_verify

COMMITTED, DRAFT = -1, 0  # key states of draft_attention: -1 committed, g >= 0 draft of lane g


class DynamicCacheBackend:
    """What the "pjd" attention hook calls: ``update(layer, k, v) -> (keys, values, k_pos, k_group)``.

    Keys/values live in the HF DynamicCache (appended by ``DynamicCache.update``); this object keeps
    the per-key metadata draft_attention needs: raster position and state, int32 ``[B, S]``.
    """

    def __init__(self, cache: DynamicCache, batch: int):
        self.cache = cache
        self.k_pos = torch.zeros(batch, 0, dtype=torch.int32)
        self.k_group = torch.zeros(batch, 0, dtype=torch.int32)

    def begin(self, key_pos: torch.Tensor, key_group: torch.Tensor) -> None:
        """Metadata of this step's inputs, appended before the layers run."""
        self.k_pos = torch.cat([self.k_pos, key_pos], 1)
        self.k_group = torch.cat([self.k_group, key_group], 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.cache.update(k, v, layer)
        return keys, values, self.k_pos, self.k_group

    def end(self, keep: torch.Tensor) -> None:
        """keep [B, N]: which of this step's entries survive; compact every layer in one call, crop."""
        tail = self.k_pos.shape[1] - keep.shape[1]
        self.k_group[:, tail:] = COMMITTED  # what survives is committed from now on
        tensors = [t for layer in self.cache.layers for t in (layer.keys, layer.values)]
        lengths = compact_kv(tensors, keep, tail, torch.full((keep.shape[0],), tail, dtype=torch.int32),
                             meta=[self.k_pos, self.k_group])
        new_len = int(lengths.max())  # batch of one here; ragged batches need per-sample lengths
        self.cache.crop(new_len - self.k_pos.shape[1])  # transformers 5: crop(-tokens_to_remove)
        self.k_pos, self.k_group = self.k_pos[:, :new_len], self.k_group[:, :new_len]


class Step:
    """The queries' metadata the hook reads: q_pos, q_group int32 [B, N]."""

    def __init__(self, q_pos, q_group):
        self.q_pos, self.q_group = q_pos, q_group


@torch.no_grad()
def sjd_generate(model, prompt: torch.Tensor, num_tokens: int, *, window: int = 6, top_k: int = 0,
                 seed: int = 0) -> tuple[torch.Tensor, int]:
    """SJD for one sequence: ``prompt`` int64 [1, P] -> (new tokens [1, num_tokens], forward steps)."""
    gen = torch.Generator().manual_seed(seed)
    V = model.get_output_embeddings().weight.shape[0]
    P, W = prompt.shape[1], window
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt[:, :-1], past_key_values=cache)  # prefill: plain SDPA, HF fills the cache
    backend = DynamicCacheBackend(cache, 1)
    backend.begin(torch.arange(P - 1, dtype=torch.int32)[None], torch.full((1, P - 1), COMMITTED, dtype=torch.int32))

    out = prompt.clone()
    drafts = torch.randint(0, V, (1, 1, W), generator=gen)
    draft_q = torch.nn.functional.one_hot(drafts, V).float()
    steps = 0
    with pjd.fast.patched(model):
        while out.shape[1] < P + num_tokens:
            n = out.shape[1] - P                     # tokens committed so far
            m = min(W, num_tokens - n - 1)           # drafts fed this step (never past the end)
            tokens = torch.cat([out[:, -1:], drafts[0, :, :m]], 1)       # last committed + drafts
            pos = torch.arange(P - 1 + n, P + n + m, dtype=torch.int32)[None]
            # The re-fed token's key is new and committed; the drafts' keys are drafts of lane 0.
            backend.begin(pos, torch.tensor([[COMMITTED] + [DRAFT] * m], dtype=torch.int32))
            with ActiveStep(backend, Step(pos, torch.zeros_like(pos)), backend="auto"):
                logits = model(input_ids=tokens, position_ids=pos.long(), use_cache=False).logits
            lane = lambda x: torch.tensor([[x]], dtype=torch.int32)  # noqa: E731  [B=1, L=1]
            verdict = speculative_verify(
                logits, lane(0), lane(m), lane(TOP), lane(n), lane(num_tokens - n), drafts, draft_q,
                torch.rand(1, 1, W, generator=gen), torch.rand(1, 1, W + 1, generator=gen),
                torch.randint(0, V, (1, 1, W), generator=gen), image_token_range=(0, V), top_k=top_k)
            a, c = int(verdict.num_accepted), int(verdict.num_commit)
            backend.end(torch.arange(m + 1)[None] <= a)  # keep the re-fed token and accepted drafts
            out = torch.cat([out, verdict.commit_tokens[0, :, :c]], 1)
            drafts, draft_q = verdict.next_tokens, verdict.next_q
            steps += 1
    return out[:, P:], steps


def main() -> None:
    model = tiny_llama(64, hidden_size=48, logit_scale=6.0, seed=1)
    model.generation_config.eos_token_id = None  # compare full lengths: no early stop
    prompt = torch.tensor([[5, 17, 42]])
    n = 40
    sjd, steps = sjd_generate(model, prompt, n, top_k=1)
    with torch.no_grad():
        ar = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
    assert torch.equal(sjd, ar), (sjd, ar)
    print(f"greedy: SJD == model.generate for {n} tokens; {steps} SJD steps vs {n} AR steps")
    sampled, steps = sjd_generate(model, prompt, n, top_k=8, seed=3)
    print(f"top-k 8 sampling: {steps} steps for {n} tokens: {sampled[0].tolist()}")


if __name__ == "__main__":
    main()
