"""KVzip-style scores on the paged cache: the re-reading attention by hand, the cache left as it was,
chunking, clear errors; and the compressor taking given scores."""

import pytest
import torch

from permkv.compress import InferenceKVCacheCompression, kvzip_scores, observing, paged_cache_for
from permkv.compress.kvzip import _max_attention
from permkv.data import heldout_essays


def test_max_attention_matches_hand_reference():
    """Each key's score is the largest causal softmax weight any re-reading query of its group gives it."""
    torch.manual_seed(0)
    keys, queries = torch.randn(1, 2, 10, 8), torch.randn(1, 4, 3, 8)  # 2 KV heads, groups of 2, 3 re-read tokens
    want = torch.zeros(2, 10)
    for qh in range(4):
        for i in range(3):
            visible = 10 - 3 + i + 1
            a = (queries[0, qh, i] @ keys[0, qh // 2, :visible].T * 8**-0.5).softmax(-1)
            want[qh // 2, :visible] = torch.maximum(want[qh // 2, :visible], a)
    assert torch.allclose(_max_attention(keys, queries, 3), want, atol=1e-6)


@pytest.fixture(scope="module")
def prefilled(smol):
    model, tok, _ = smol
    ids = tok(heldout_essays()[:3000], add_special_tokens=False).input_ids[:300]
    cache = paged_cache_for(model, 2 * len(ids) + 64)
    with observing(model), torch.no_grad():
        model(torch.tensor([ids]), past_key_values=cache)
    prompt = tok("\n\nRepeat the previous context exactly.", add_special_tokens=False).input_ids
    return cache, ids, prompt


def test_scores_leave_the_cache_as_it_was(smol, prefilled):
    model, _, spec = smol
    cache, ids, prompt = prefilled
    free, lengths = cache.pool.num_free, cache.stats().lengths
    keys = cache.gather(3)[0].clone()
    scores = kvzip_scores(model, cache, ids, prompt, chunk_tokens=1024)
    assert cache.pool.num_free == free and cache.stats().lengths == lengths and torch.equal(cache.gather(3)[0], keys)
    assert sorted(scores) == list(range(spec.n_layers))
    assert scores[0].shape == (1, spec.n_kv_heads, len(ids))
    assert float(scores[5].min()) >= 0 and float(scores[5].max()) <= 1 and float(scores[5].max()) > 0.05
    chunked = kvzip_scores(model, cache, ids, prompt, chunk_tokens=100)
    assert cache.pool.num_free == free
    # every token scored in both; the chunk-local softmax changes values but keeps the strong tokens
    top = set(scores[5][0, 0].topk(30).indices.tolist()) & set(chunked[5][0, 0].topk(30).indices.tolist())
    assert len(top) >= 10


def test_compressor_takes_given_scores(smol, prefilled):
    """Given scores replace the scorer: the highest-scored unprotected tokens are kept."""
    model, _, spec = smol
    cache, ids, _ = prefilled
    from permkv.compress import fork_sequence

    fork = fork_sequence(cache, model.config)
    given = {i: torch.arange(len(ids), 0, -1, dtype=torch.float).expand(1, spec.n_kv_heads, len(ids)) for i in range(spec.n_layers)}
    InferenceKVCacheCompression(window=0, sinks=0).compressor().compress(fork, 4, scores=given)  # oldest score highest
    keys, _, _, lengths = fork.gather(0)
    assert lengths.tolist() == [[75] * spec.n_kv_heads]
    assert torch.equal(keys[0, :, :75], cache.gather(0)[0][0, :, :75])
    fork.reset()


def test_clear_errors(smol, prefilled):
    model, _, _ = smol
    cache, ids, prompt = prefilled
    with pytest.raises(ValueError, match="len\\(ids\\)"):
        kvzip_scores(model, cache, ids[:-1], prompt)
    with pytest.raises(ValueError, match="chunk_tokens"):
        kvzip_scores(model, cache, ids, prompt, chunk_tokens=0)
