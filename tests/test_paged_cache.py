"""PagedCache on the real models: same tokens and logits as DynamicCache, eviction, errors."""

import pytest
import torch
from transformers import DynamicCache

from permkv.cache import BlockPool, CacheFull, PagedCache, paged_attention
from permkv.cache.attention import masked_attention, paged_attend

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Here is a short list of three prime numbers:",
]


def batch(tok, texts):
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def paged_cache(model, spec, blocks=3000):
    return PagedCache(BlockPool(blocks, block_size=16, head_dim=spec.head_dim, device=model.device), model.config)


def generate(model, tok, enc, cache, n):
    """Greedy generation returning the tokens and the logits of every step."""
    return model.generate(
        **enc,
        max_new_tokens=n,
        do_sample=False,
        past_key_values=cache,
        pad_token_id=tok.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )


@torch.no_grad()
def assert_same_as_dynamic(model, tok, spec, texts, new_tokens):
    """Greedy tokens identical and every step's logits within 1e-4 of DynamicCache's."""
    enc = batch(tok, texts)
    assert len(set(enc.attention_mask.sum(1).tolist())) == len(texts), "prompts must differ in length"
    want = generate(model, tok, enc, DynamicCache(config=model.config), new_tokens)
    cache = paged_cache(model, spec)
    with paged_attention(model):
        got = generate(model, tok, enc, cache, new_tokens)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(want.logits, got.logits)):
        assert (a - b).abs().max() < 1e-4, f"step {step}"
    return cache


def test_smollm2_batch_matches_dynamic_cache(smol):
    model, tok, spec = smol
    cache = assert_same_as_dynamic(model, tok, spec, PROMPTS, new_tokens=10)
    enc = batch(tok, PROMPTS)
    lengths = enc.attention_mask.sum(1).tolist()
    stats = cache.stats()
    for s, n in enumerate(lengths):  # padding took no slot: each head holds only real tokens
        assert stats.lengths[s] == [[n + 9] * spec.n_kv_heads] * spec.n_layers
    assert cache.seen == [n + 9 for n in lengths]
    assert cache.get_seq_length() == enc.input_ids.shape[1] + 9
    assert stats.waste_pct < 50

    with torch.no_grad():  # prefill logits at every real position, not only the last
        a = model(**enc, past_key_values=DynamicCache(config=model.config)).logits
        with paged_attention(model):
            b = model(**enc, past_key_values=paged_cache(model, spec)).logits
    assert (a - b)[enc.attention_mask.bool()].abs().max() < 1e-4


def test_gemma3_past_sliding_window_matches_dynamic_cache(gemma):
    model, tok, spec = gemma
    long = "The river runs past the old mill and the stone bridge. " * 50  # ~600 tokens > 512 window
    texts = [long + "The mill stands by the", "The capital of France is"]
    cache = assert_same_as_dynamic(model, tok, spec, texts, new_tokens=4)
    n_long = len(tok(texts[0]).input_ids)
    assert n_long > spec.sliding_window + 16
    types = model.config.layer_types
    for layer, kind in enumerate(types):
        held = cache.cached_tokens(0, layer, 0)
        assert held == (spec.sliding_window - 1 if kind == "sliding_attention" else n_long + 3)
        if kind == "sliding_attention":  # old blocks went back to the pool as the window slid
            assert len(cache.layers[layer].tables[0][0].blocks) <= spec.sliding_window // 16 + 1


@torch.no_grad()
def test_evict_half_of_one_head(smol):
    model, tok, spec = smol
    enc = batch(tok, [PROMPTS[1]])
    cache = paged_cache(model, spec)
    with paged_attention(model):
        model(**enc, past_key_values=cache)
    n, layer, head = enc.input_ids.shape[1], 5, 1
    before_keys, before_values, _, _ = cache.gather(layer)
    free_before = cache.pool.num_free
    keep = list(range(0, n, 2))
    freed = cache.evict(0, layer, head, keep)
    assert freed == -(-n // 16) - -(-len(keep) // 16)
    assert cache.pool.num_free == free_before + freed
    keys, values, starts, lengths = cache.gather(layer)
    assert lengths[0].tolist() == [n if h != head else len(keep) for h in range(spec.n_kv_heads)]
    for h in range(spec.n_kv_heads):  # other heads untouched, the evicted head holds the kept rows
        rows = list(range(n)) if h != head else keep
        assert torch.equal(keys[0, h, : len(rows)], before_keys[0, h, rows])
        assert torch.equal(values[0, h, : len(rows)], before_values[0, h, rows])
    assert cache.seen == [n] and cache.get_seq_length() == n

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, spec.n_heads, 1, spec.head_dim, generator=gen)
    k = torch.randn(1, spec.n_kv_heads, 1, spec.head_dim, generator=gen)
    v = torch.randn(1, spec.n_kv_heads, 1, spec.head_dim, generator=gen)
    scale = spec.head_dim**-0.5
    out = paged_attend(cache, layer, q, k, v, None, scale)
    group = spec.n_heads // spec.n_kv_heads
    for qh in range(spec.n_heads):
        h = qh // group
        rows = list(range(n)) if h != head else keep
        K = torch.cat([before_keys[0, h, rows], k[0, h]])
        V = torch.cat([before_values[0, h, rows], v[0, h]])
        ref = torch.softmax(q[0, qh] @ K.T * scale, -1) @ V
        torch.testing.assert_close(out[0, qh], ref, atol=1e-5, rtol=1e-5)

    with paged_attention(model):  # the model keeps decoding after eviction
        nxt = model(torch.tensor([[42]]), attention_mask=torch.ones(1, n + 2, dtype=torch.long), past_key_values=cache)
    assert torch.isfinite(nxt.logits).all() and cache.seen == [n + 1]


def test_several_new_tokens_attend_to_each_heads_own_tokens(smol):
    """T > 1 new tokens (a prefill chunk, a suffix, KVzip's re-reading) against a hand reference, both when
    every head holds the same tokens (one mask for all heads) and after one head evicted half of its own."""
    model, tok, spec = smol
    enc = batch(tok, [PROMPTS[1]])
    cache = paged_cache(model, spec)
    with paged_attention(model):
        model(**enc, past_key_values=cache)
    n, T, group, scale = enc.input_ids.shape[1], 3, spec.n_heads // spec.n_kv_heads, spec.head_dim**-0.5
    keep = list(range(0, n, 2))
    cache.evict(0, 7, 1, keep)
    gen = torch.Generator().manual_seed(0)
    for layer, head in [(5, None), (7, 1)]:  # layer 5: all heads alike; layer 7: head 1 evicted
        before_keys, before_values, starts, lengths = cache.gather(layer)
        assert lengths[0].tolist() == [len(keep) if h == head else n for h in range(spec.n_kv_heads)]
        q = torch.randn(1, spec.n_heads, T, spec.head_dim, generator=gen)
        k = torch.randn(1, spec.n_kv_heads, T, spec.head_dim, generator=gen)
        v = torch.randn(1, spec.n_kv_heads, T, spec.head_dim, generator=gen)
        out = paged_attend(cache, layer, q, k, v, None, scale)
        for qh in range(spec.n_heads):
            h = qh // group
            rows = slice(starts[0, h], starts[0, h] + lengths[0, h])  # the head's own tokens in the view
            for t in range(T):  # causal among the new tokens
                K = torch.cat([before_keys[0, h, rows], k[0, h, : t + 1]])
                V = torch.cat([before_values[0, h, rows], v[0, h, : t + 1]])
                ref = torch.softmax(q[0, qh, t] @ K.T * scale, -1) @ V
                torch.testing.assert_close(out[0, qh, t], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_masked_attention_shared_and_per_head_masks_agree_with_a_hand_reference(kv_heads):
    """A mask for all heads (sdpa's grouped mode when several KV heads) and the same mask per KV head
    (folded into the query axis) both equal attention written out, each query head on its group's KV head."""
    gen = torch.Generator().manual_seed(1)
    B, G, T, L, D = 2, 3, 4, 9, 8
    q = torch.randn(B, kv_heads * G, T, D, generator=gen)
    k, v = torch.randn(2, B, kv_heads, L, D, generator=gen)
    mask = torch.rand(B, 1, T, L, generator=gen) < 0.6
    mask[..., 0] = True  # no empty row
    for m in (mask, mask.expand(B, kv_heads, T, L)):
        out = masked_attention(q, k, v, m, D**-0.5)
        for b in range(B):
            for qh in range(kv_heads * G):
                h = qh // G
                w = (q[b, qh] @ k[b, h].T * D**-0.5).masked_fill(~m[b, min(h, m.shape[1] - 1)], float("-inf"))
                torch.testing.assert_close(out[b, qh], torch.softmax(w, -1) @ v[b, h], atol=1e-5, rtol=1e-5)


def test_without_paged_attention_is_a_clear_error(smol):
    model, tok, spec = smol
    enc = batch(tok, [PROMPTS[0]])
    with pytest.raises(RuntimeError, match="permkv_paged"):
        model(**enc, past_key_values=paged_cache(model, spec))
    assert model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_full_pool_raises_before_any_layer_writes(smol):
    model, tok, spec = smol
    ids = torch.arange(1000, 1032)[None]  # 32 tokens: exactly 2 blocks per table, the next token needs a third
    probe = paged_cache(model, spec, blocks=1)
    cache = paged_cache(model, spec, blocks=probe.blocks_needed(32) + 5)
    with paged_attention(model):
        model(ids, past_key_values=cache)
        before = cache.stats()
        with pytest.raises(CacheFull, match=f"needed {spec.n_layers * spec.n_kv_heads} blocks, 5 free"):
            model(torch.tensor([[7]]), past_key_values=cache)
    assert cache.stats() == before and cache.seen == [32] and cache.get_seq_length() == 32
    assert cache.can_admit(0) and not cache.can_admit(1)


def test_crop_rejects_bad_lengths(smol):
    model, _, spec = smol
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        paged_cache(model, spec, blocks=10).crop(-1)
