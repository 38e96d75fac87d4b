"""permkv.compress on the real SmolLM2: bytes really freed, protected tokens kept, adaptive budgets,
ratio = tokens seen / kept everywhere, copy-on-write forks, chunked prefill, clear errors."""

import pytest
import torch

from permkv.cache import forward, paged_attention
from permkv.compress import (
    SCORERS,
    GlobalAdaptiveAllocator,
    InferenceKVCacheCompression,
    KVCompressScore,
    LayerAdaptiveAllocator,
    UniformAllocator,
    chunked_prefill_and_compress,
    fork_sequence,
    get_scorer,
    observing,
    paged_cache_for,
    prefill_and_compress,
    repeat_prompt_ids,
)
from permkv.compress.scorers import rereads
from permkv.data import heldout_essays


@pytest.fixture(scope="module")
def prefix(smol):
    _, tok, _ = smol
    return tok(heldout_essays()[:4000], add_special_tokens=False).input_ids[:600]


def test_scorers_shapes_and_registry():
    keys, values = torch.randn(1, 3, 50, 64), torch.randn(1, 3, 50, 64)
    queries = torch.randn(1, 9, 8, 64)
    for name in SCORERS:
        scorer = get_scorer(name)
        if rereads(scorer):  # scored by running the model (test_kvzip.py), not from the cache
            assert not hasattr(scorer, "score") and not scorer.needs_queries, name
            continue
        assert scorer.score(keys, values, queries).shape == (1, 3, 50), name
    assert [n for n in SCORERS if rereads(get_scorer(n))] == ["kvzip"]


def test_kvcompress_score_matches_hand_reference():
    """Sum over window queries and the GQA group of squared causal softmax attention."""
    torch.manual_seed(0)
    keys, queries = torch.randn(1, 2, 12, 8), torch.randn(1, 4, 3, 8)  # 2 KV heads, groups of 2, w = 3
    want = torch.zeros(2, 12)
    for qh in range(4):
        for i in range(3):
            visible = 12 - 3 + i + 1
            a = (queries[0, qh, i] @ keys[0, qh // 2, :visible].T * 8**-0.5).softmax(-1)
            want[qh // 2, :visible] += a**2
    got = KVCompressScore().score(keys, None, queries)[0]
    assert torch.allclose(got, want, atol=1e-6)


def test_adaptive_gives_more_to_spread_head():
    """Head 0's window queries spread attention evenly, head 1's fall on one key: head 0 needs more."""
    L, D = 64, 16
    keys = torch.zeros(1, 2, L, D)
    keys[0, 1, 10, 0] = 50.0  # one key the head-1 queries align with
    queries = torch.zeros(1, 2, 4, D)
    queries[0, 1, :, 0] = 1.0
    scores = KVCompressScore().score(keys, None, queries)  # (1, 2, L)
    for allocator in (LayerAdaptiveAllocator(0.2), GlobalAdaptiveAllocator(0.2)):
        counts = allocator.allocate(scores, 16)  # scores as (layers=1, heads=2, L)
        assert counts.sum() == 16
        assert counts[0, 0] > counts[0, 1], (type(allocator).__name__, counts)
        assert counts[0, 1] >= int(0.2 * 16 / 2)  # the floor
    assert UniformAllocator().allocate(scores, 16).tolist() == [[8, 8]]


@pytest.mark.parametrize("allocator", ["global", "uniform"])
@pytest.mark.parametrize("ratio", [4, 8])
def test_bytes_drop_to_one_over_ratio(smol, prefix, allocator, ratio):
    model, _, spec = smol
    cache, _, report = prefill_and_compress(model, prefix, ratio, InferenceKVCacheCompression("kvcompress", allocator))
    stats = cache.stats()
    heads = spec.n_layers * spec.n_kv_heads
    assert report.original_bytes == heads * -(-len(prefix) // 16) * stats.bytes_per_block
    assert report.compressed_bytes == stats.allocated_bytes == cache.pool.stats().allocated_bytes
    assert abs(report.compressed_bytes - report.original_bytes / ratio) <= heads * stats.bytes_per_block
    assert report.bytes_freed == report.original_bytes - report.compressed_bytes
    assert abs(sum(map(sum, report.kept)) - round(heads * len(prefix) / ratio)) <= heads
    assert len(report.per_head_ratios) == spec.n_layers and len(report.per_head_ratios[0]) == spec.n_kv_heads
    assert report.ratio == ratio
    assert report.quality is None  # no measured table given: no estimate, never a formula


def test_protected_and_sink_tokens_survive(smol, prefix):
    model, _, spec = smol
    cache = paged_cache_for(model, len(prefix))
    with observing(model) as recorder, torch.no_grad():
        forward(model, cache, torch.tensor([prefix]))
    assert recorder.queries[0].shape == (1, spec.n_heads, 64, spec.head_dim)
    before = [cache.gather(i)[0][0, :, : len(prefix)].clone() for i in range(spec.n_layers)]
    InferenceKVCacheCompression("kvcompress", "layer").compress_auto(cache, 8, recorder.queries)
    for i in range(spec.n_layers):
        keys, _, _, lengths = cache.gather(i)
        for h in range(spec.n_kv_heads):
            n = int(lengths[0, h])
            assert n < len(prefix)
            assert torch.equal(keys[0, h, :4], before[i][h, :4])  # sinks
            assert torch.equal(keys[0, h, n - 32 : n], before[i][h, -32:])  # protected window


def test_compressing_a_fork_leaves_the_original_whole(smol, prefix):
    """A copy-on-write fork compressed to 8x frees its own blocks only; the original sequence keeps
    every token and block, and releasing the fork gives the pool back exactly."""
    model, _, spec = smol
    cache = paged_cache_for(model, 2 * len(prefix))
    with observing(model) as recorder, torch.no_grad():
        forward(model, cache, torch.tensor([prefix]))
    free, before = cache.pool.num_free, [cache.gather(i)[0][0, :, : len(prefix)].clone() for i in range(spec.n_layers)]
    fork = fork_sequence(cache, model.config)
    assert cache.pool.num_free == free  # shares everything
    report = InferenceKVCacheCompression("kvcompress").compress_auto(fork, 8, recorder.queries)
    assert report.achieved_ratio == pytest.approx(8, rel=0.1)
    assert all(n == len(prefix) for row in cache.stats().lengths[0] for n in row)
    for i in range(spec.n_layers):
        assert torch.equal(cache.gather(i)[0][0, :, : len(prefix)], before[i])
    fork.reset()
    assert cache.pool.num_free == free


def test_ratio_means_tokens_seen_over_kept(smol, prefix):
    """Compressing to 4x and then again to 4x keeps the same count (the target is seen / 4, not a
    further 4x); to 8x after 4x lands at seen / 8."""
    model, _, spec = smol
    cache = paged_cache_for(model, len(prefix))
    with observing(model) as recorder, torch.no_grad():
        forward(model, cache, torch.tensor([prefix]))
    compression = InferenceKVCacheCompression("kvcompress")
    heads = spec.n_layers * spec.n_kv_heads
    first = sum(map(sum, compression.compress_auto(cache, 4, recorder.queries).kept))
    assert first == round(heads * len(prefix) / 4)
    assert sum(map(sum, compression.compress_auto(cache, 4, recorder.queries).kept)) == first
    assert sum(map(sum, compression.compress_auto(cache, 8, recorder.queries).kept)) == round(heads * len(prefix) / 8)


def test_observer_nests_and_leaves_no_state(smol, prefix):
    model, _, _ = smol
    cache = paged_cache_for(model, 64)
    with observing(model, window=4) as recorder, torch.no_grad():
        with observing(model, window=2) as inner:  # the inner block records alone
            forward(model, cache, torch.tensor([prefix[:16]]))
        assert inner.queries[0].shape[2] == 2 and not recorder.queries
        forward(model, cache, torch.tensor([prefix[16:32]]), torch.arange(16, 32)[None])
    assert recorder.queries[0].shape[2] == 4
    assert getattr(model, "_permkv_recorder", None) is None
    assert model.config._attn_implementation not in ("permkv_paged_observed",)


def test_chunked_prefill_holds_about_one_over_ratio(smol, prefix):
    """Reading 600 tokens in chunks of 128 at 4x: the pool never had room for the whole prefix, and
    the final cache is 1/4 of it within one block per head; heads end at different lengths."""
    model, _, spec = smol
    cache, logits, report = chunked_prefill_and_compress(model, prefix, 4, InferenceKVCacheCompression("kvcompress", "global"), 128)
    heads = spec.n_layers * spec.n_kv_heads
    full_blocks = heads * -(-len(prefix) // 16)
    assert cache.pool.num_blocks < 0.65 * full_blocks  # 600 / 4 + 128 + 64 spare tokens per head
    assert report.original_bytes == full_blocks * cache.pool.bytes_per_block
    assert abs(report.compressed_bytes - report.original_bytes / 4) <= heads * cache.pool.bytes_per_block
    assert abs(sum(map(sum, report.kept)) - round(heads * len(prefix) / 4)) <= heads
    assert len({n for row in report.kept for n in row}) > 1  # adaptive: heads differ
    assert cache.seen == [len(prefix)] and logits.shape == (model.config.vocab_size,)


def test_chunked_prefill_at_ratio_one_matches_one_pass(smol, prefix):
    model, tok, _ = smol
    _, want, _ = prefill_and_compress(model, prefix, 1, tokenizer=tok)
    cache, got, report = chunked_prefill_and_compress(model, prefix, 1, chunk_tokens=100, tokenizer=tok)
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    assert report.achieved_ratio == 1.0


def test_clear_errors(smol, prefix):
    model, tok, _ = smol
    with pytest.raises(ValueError, match="ratio must be"):
        prefill_and_compress(model, prefix, 0.5, InferenceKVCacheCompression())
    with pytest.raises(ValueError, match="scorer must be"):
        InferenceKVCacheCompression(scorer="h2o").compressor()
    with pytest.raises(ValueError, match="window must be"):
        InferenceKVCacheCompression(window=-1).compressor()
    with pytest.raises(ValueError, match="chunk_tokens must be"):
        chunked_prefill_and_compress(model, prefix, 8, InferenceKVCacheCompression(), 16)
    with pytest.raises(ValueError, match="observe must be"):
        InferenceKVCacheCompression(observe=0).compressor()
    with pytest.raises(ValueError, match="at least one token per head"):
        prefill_and_compress(model, prefix[:100], 1000, InferenceKVCacheCompression("kvcompress"))
    cache = paged_cache_for(model, 100)
    with torch.no_grad(), paged_attention(model):
        forward(model, cache, torch.tensor([prefix[:100]]))
    with pytest.raises(ValueError, match="needs queries"):
        InferenceKVCacheCompression("kvcompress").compress_auto(cache, 2)
    with pytest.raises(ValueError, match="scores by re-reading the context"):
        InferenceKVCacheCompression().compress_auto(cache, 2)
    with pytest.raises(ValueError, match="pass tokenizer="):
        prefill_and_compress(model, prefix, 4)
    with pytest.raises(ValueError, match="reread is the re-reading prompt"):
        prefill_and_compress(model, prefix, 4, InferenceKVCacheCompression("snapkv"), reread=[1, 2])


def test_gemma_compresses_global_layers_only(gemma):
    """Gemma-3: sliding-window layers stay whole (bounded by their window), global layers shrink to
    about 1/ratio, also when read in chunks (scored by attention or by KVzip-style re-reading); kvpress is refused with a clear error."""
    model, tok, spec = gemma
    prefix = tok(heldout_essays()[:6000], add_special_tokens=False).input_ids[:700]
    reread = repeat_prompt_ids(tok, spec)
    for chunk, kvzip in ((None, False), (256, False), (256, True)):  # KVzip-style scores: global layers only
        compression = InferenceKVCacheCompression("kvzip" if kvzip else "kvcompress", "global")
        cache, _, report = (prefill_and_compress(model, prefix, 4, compression) if chunk is None else
                            chunked_prefill_and_compress(model, prefix, 4, compression, chunk,
                                                         reread=reread if kvzip else None))
        full_layers = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
        for layer, row in zip(cache.layers, report.kept):
            if layer.is_sliding:
                assert all(n == spec.sliding_window - 1 for n in row), (chunk, layer.index, row)
        kept = sum(sum(report.kept[i]) for i in full_layers)  # spread adaptively over the global layers
        assert abs(kept - len(full_layers) * len(prefix) / 4) <= len(full_layers), (chunk, kept)
        assert 1 < report.achieved_ratio < 2  # 15 of 18 layers are sliding
    from permkv.baselines.kvpress import kvpress_answer

    with pytest.raises(ValueError, match="sliding-window"):
        kvpress_answer(model, tok, "snapkv", 8)


def test_pooling_and_recency_wrappers():
    """Pooled spreads a lone peak to its neighbours; RecencyMix at weight 1 is recency, at 0 the base
    scaled to [0, 1]; both need queries exactly when their base does."""
    from permkv.compress import KeyNormScore, Pooled, RecencyMix

    keys, queries = torch.zeros(1, 1, 9, 4), torch.zeros(1, 1, 2, 4)

    class Peak:
        needs_queries = True

        def score(self, keys, values, queries):
            s = torch.zeros(keys.shape[:3])
            s[..., 4] = 5.0
            return s

    pooled = Pooled(Peak(), 5).score(keys, None, queries)[0, 0]
    assert pooled.tolist() == pytest.approx([0, 0, 1, 1, 1, 1, 1, 0, 0])
    assert RecencyMix(Peak(), 1.0).score(keys, None, queries)[0, 0].tolist() == pytest.approx([i / 8 for i in range(9)])
    assert RecencyMix(Peak(), 0.0).score(keys, None, queries)[0, 0].tolist() == pytest.approx([0, 0, 0, 0, 1, 0, 0, 0, 0])
    assert Pooled(Peak()).needs_queries and not RecencyMix(KeyNormScore()).needs_queries
