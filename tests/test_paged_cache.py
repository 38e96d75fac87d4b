"""PagedCache on the real models: same tokens and logits as DynamicCache (one sequence, and several of
different lengths packed into one forward with decodes), eviction, explicit errors."""

import pytest
import torch
from transformers import DynamicCache

from permkv.cache import BlockPool, CacheFull, PagedBatch, PagedCache, Segment, forward, paged_attention, run
from permkv.cache.attention import masked_attention

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Here is a short list of three prime numbers:",
]


def paged_cache(model, spec, blocks=3000):
    return PagedCache(BlockPool(blocks, block_size=16, head_dim=spec.head_dim, device=model.device), model.config)


@torch.no_grad()
def dynamic_reference(model, ids: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of one prompt on a DynamicCache and the logits that chose each."""
    cache = DynamicCache(config=model.config)
    logits = model(torch.tensor([ids]), past_key_values=cache).logits[0, -1]
    tokens, steps = [], []
    for _ in range(new_tokens):
        steps.append(logits)
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache).logits[0, -1]
    return tokens, steps


@torch.no_grad()
def assert_packed_same_as_dynamic(model, tok, spec, texts, new_tokens):
    """Prompts of different lengths prefilled in ONE packed forward, then decoded together one token
    per forward: tokens identical and logits within 1e-4 of each prompt alone on a DynamicCache."""
    prompts = [tok(t).input_ids for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length"
    want = [dynamic_reference(model, p, new_tokens) for p in prompts]
    pool = BlockPool(4000, 16, spec.head_dim)
    caches = [PagedCache(pool, model.config) for _ in prompts]
    for c in caches:
        c.ensure_batch(1)
    got = [[] for _ in prompts]
    with paged_attention(model):
        batch = PagedBatch([Segment(c, 0, len(p)) for c, p in zip(caches, prompts)])
        ids = torch.tensor([t for p in prompts for t in p])
        positions = torch.cat([torch.arange(len(p)) for p in prompts])
        logits = run(model, batch, ids, positions)  # (prompts, vocab): each prompt's last position
        for step in range(new_tokens):
            for b, (tokens, steps) in enumerate(want):
                assert (logits[b] - steps[step]).abs().max() < 1e-4, f"prompt {b} step {step}"
                got[b].append(int(logits[b].argmax()))
            batch = PagedBatch([Segment(c, 0, 1) for c in caches])
            positions = torch.tensor([c.seen[0] for c in caches])
            logits = run(model, batch, torch.tensor([g[-1] for g in got]), positions)
    assert got == [tokens for tokens, _ in want]
    return caches, prompts


def test_smollm2_packed_prompts_match_dynamic_cache(smol):
    model, tok, spec = smol
    caches, prompts = assert_packed_same_as_dynamic(model, tok, spec, PROMPTS, new_tokens=10)
    for cache, p in zip(caches, prompts):  # each head holds exactly its sequence's tokens
        assert cache.stats().lengths[0] == [[len(p) + 10] * spec.n_kv_heads] * spec.n_layers
        assert cache.seen == [len(p) + 10] and cache.stats().waste_pct < 50


def test_one_sequence_forward_matches_dynamic_cache_at_every_position(smol):
    model, tok, spec = smol
    ids = torch.tensor([tok(PROMPTS[1]).input_ids])
    with torch.no_grad():
        a = model(ids, past_key_values=DynamicCache(config=model.config)).logits[0]
        with paged_attention(model):
            b = forward(model, paged_cache(model, spec), ids, logits_to_keep=ids.shape[1])[0]
    assert (a - b).abs().max() < 1e-4


def test_gemma3_past_sliding_window_matches_dynamic_cache(gemma):
    model, tok, spec = gemma
    long = "The river runs past the old mill and the stone bridge. " * 50  # ~600 tokens > 512 window
    texts = [long + "The mill stands by the", "The capital of France is"]
    caches, prompts = assert_packed_same_as_dynamic(model, tok, spec, texts, new_tokens=4)
    n_long = len(prompts[0])
    assert n_long > spec.sliding_window + 16
    for layer, kind in enumerate(model.config.layer_types):
        held = caches[0].cached_tokens(0, layer, 0)
        assert held == (spec.sliding_window - 1 if kind == "sliding_attention" else n_long + 4)
        if kind == "sliding_attention":  # old blocks went back to the pool as the window slid
            assert len(caches[0].layers[layer].tables[0][0].blocks) <= spec.sliding_window // 16 + 1


def attend(cache, layer, q, k, v, scale):
    """One layer's paged attention for T = q.shape[2] new tokens of sequence 0, as the model runs it."""
    return PagedBatch([Segment(cache, 0, q.shape[2])]).attend(layer, q, k, v, scale)


@torch.no_grad()
def test_evict_half_of_one_head(smol):
    model, tok, spec = smol
    ids = torch.tensor([tok(PROMPTS[1]).input_ids])
    cache = paged_cache(model, spec)
    with paged_attention(model):
        forward(model, cache, ids)
    n, layer, head = ids.shape[1], 5, 1
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
    assert cache.seen == [n]

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, spec.n_heads, 1, spec.head_dim, generator=gen)
    k = torch.randn(1, spec.n_kv_heads, 1, spec.head_dim, generator=gen)
    v = torch.randn(1, spec.n_kv_heads, 1, spec.head_dim, generator=gen)
    scale = spec.head_dim**-0.5
    out = attend(cache, layer, q, k, v, scale)
    group = spec.n_heads // spec.n_kv_heads
    for qh in range(spec.n_heads):
        h = qh // group
        rows = list(range(n)) if h != head else keep
        K = torch.cat([before_keys[0, h, rows], k[0, h]])
        V = torch.cat([before_values[0, h, rows], v[0, h]])
        ref = torch.softmax(q[0, qh] @ K.T * scale, -1) @ V
        torch.testing.assert_close(out[0, qh], ref, atol=1e-5, rtol=1e-5)

    with paged_attention(model):  # the model keeps decoding after eviction
        nxt = forward(model, cache, torch.tensor([[42]]))
    assert torch.isfinite(nxt).all() and cache.seen == [n + 1]


def test_several_new_tokens_attend_to_each_heads_own_tokens(smol):
    """T > 1 new tokens (a prefill chunk, a suffix, KVzip's re-reading) against a hand reference, both when
    every head holds the same tokens (one mask for all heads) and after one head evicted half of its own."""
    model, tok, spec = smol
    ids = torch.tensor([tok(PROMPTS[1]).input_ids])
    cache = paged_cache(model, spec)
    with paged_attention(model), torch.no_grad():
        forward(model, cache, ids)
    n, T, group, scale = ids.shape[1], 3, spec.n_heads // spec.n_kv_heads, spec.head_dim**-0.5
    keep = list(range(0, n, 2))
    cache.evict(0, 7, 1, keep)
    gen = torch.Generator().manual_seed(0)
    for layer, head in [(5, None), (7, 1)]:  # layer 5: all heads alike; layer 7: head 1 evicted
        before_keys, before_values, starts, lengths = cache.gather(layer)
        assert lengths[0].tolist() == [len(keep) if h == head else n for h in range(spec.n_kv_heads)]
        q = torch.randn(1, spec.n_heads, T, spec.head_dim, generator=gen)
        k = torch.randn(1, spec.n_kv_heads, T, spec.head_dim, generator=gen)
        v = torch.randn(1, spec.n_kv_heads, T, spec.head_dim, generator=gen)
        out = attend(cache, layer, q, k, v, scale)
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


@torch.no_grad()
def test_nothing_falls_back_silently(smol):
    """A PagedCache as past_key_values, or a paged forward without the paged attention: clear errors."""
    model, tok, spec = smol
    ids = torch.tensor([tok(PROMPTS[0]).input_ids])
    cache = paged_cache(model, spec)
    with pytest.raises(TypeError, match="not a transformers past_key_values"):
        model(ids, past_key_values=cache)
    with pytest.raises(RuntimeError, match="paged_attention"):
        forward(model, cache, ids)
    cache.ensure_batch(1)
    batch = PagedBatch([Segment(cache, 0, ids.shape[1])])
    with pytest.raises(RuntimeError, match="attended through the paged cache in layers"):
        model(ids, use_cache=False, paged=batch)  # sdpa ignores `paged`: caught when the forward ends
        batch.finish(spec.n_layers)
    assert model.config._attn_implementation == "sdpa"


def test_batch_layout_errors(smol):
    model, _, spec = smol
    cache = paged_cache(model, spec)
    cache.ensure_batch(2)
    with pytest.raises(ValueError, match="same sequence"):
        PagedBatch([Segment(cache, 0, 2), Segment(cache, 0, 1)])
    with pytest.raises(ValueError, match="one BlockPool"):
        PagedBatch([Segment(cache, 0, 2), Segment(paged_cache(model, spec, 10), 0, 1)])
    with pytest.raises(ValueError, match="at least one token"):
        PagedBatch([Segment(cache, 0, 0)])
    with pytest.raises(ValueError, match=r"seq must be an int in \[0, 2\)"):
        PagedBatch([Segment(cache, 5, 1)])
    with paged_attention(model), pytest.raises(ValueError, match=r"input_ids and position_ids must be \(3,\)"):
        run(model, PagedBatch([Segment(cache, 0, 3)]), torch.tensor([1, 2]), torch.tensor([0, 1]))


@torch.no_grad()
def test_full_pool_raises_before_any_layer_writes(smol):
    model, tok, spec = smol
    ids = torch.arange(1000, 1032)[None]  # 32 tokens: exactly 2 blocks per table, the next token needs a third
    probe = paged_cache(model, spec, blocks=1)
    cache = paged_cache(model, spec, blocks=probe.blocks_needed(32) + 5)
    with paged_attention(model):
        forward(model, cache, ids)
        before = cache.stats()
        with pytest.raises(CacheFull, match=f"needed {spec.n_layers * spec.n_kv_heads} blocks, 5 free"):
            forward(model, cache, torch.tensor([[7]]))
    assert cache.stats() == before and cache.seen == [32]
    assert cache.can_admit(0) and not cache.can_admit(1)


def test_crop_rejects_bad_lengths(smol):
    model, _, spec = smol
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        paged_cache(model, spec, blocks=10).crop(-1)


@torch.no_grad()
def test_greedy_decode_switches_the_paged_attention_on_for_its_loop(smol):
    """What README's example does: decode a PagedCache outside any `paged_attention` block."""
    from permkv.eval import greedy_decode, prefill

    model, tok, spec = smol
    ids = tok(PROMPTS[0]).input_ids
    expected, _ = dynamic_reference(model, ids, 6)
    cache, logits = prefill(model, ids, paged_cache(model, spec))
    before = model.config._attn_implementation
    assert greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=6, stop=set()) == expected
    assert model.config._attn_implementation == before


@torch.no_grad()
def test_a_transformers_cache_decodes_the_same_inside_the_paged_attention(smol):
    """A server's engine holds the model in the paged attention; another caller's DynamicCache still decodes
    exactly (the past is attended with the causal offset, not as if the new tokens were all)."""
    model, tok, spec = smol
    ids = tok(PROMPTS[1]).input_ids
    expected, _ = dynamic_reference(model, ids, 6)
    with paged_attention(model):
        assert dynamic_reference(model, ids, 6)[0] == expected
