"""Admission accounting: reservation vs paged, on exact small numbers."""

import pytest
from transformers import LlamaConfig

from permkv.cache import BlockPool, PagedCache
from permkv.experiments.paged_attention import Admission, Request, ReservationPool, admit_paged, admit_reserved, request_mix


def tiny_config():
    """A real config of a tiny Llama with 2 layers and 2 KV heads of size 4."""
    return LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=8, head_dim=4)


def test_reservation_admits_until_the_next_reservation_does_not_fit():
    pool = ReservationPool(capacity_bytes=1000, bytes_per_token=10, reserve_tokens=30)  # 3 slots of 300 bytes
    got = admit_reserved(pool, [Request(5, 5), Request(20, 10)])  # cycles: 10, 30, 10 tokens
    assert got == Admission(admitted=3, allocated_bytes=900, used_bytes=500)
    assert got.waste_pct == pytest.approx(100 * 400 / 900)
    with pytest.raises(ValueError, match="exceeds reserve_tokens=30"):
        pool.admit(Request(30, 1))
    with pytest.raises(ValueError, match="requests must not be empty"):
        admit_reserved(pool, [])


def test_paged_admission_takes_real_blocks():
    # 2 layers x 2 KV heads = 4 tables per request; block_size 4, so 5 tokens take 2 blocks per table
    cache = PagedCache(BlockPool(20, block_size=4, head_dim=4), tiny_config())
    got = admit_paged(cache, [Request(3, 2), Request(4, 0), Request(8, 1)])
    # blocks: 8, then 4 (12), then 12 would make 24 > 20: admission stops at the third request
    assert got.admitted == 2 and cache.pool.num_free == 8
    per_block = cache.pool.bytes_per_block
    assert got.allocated_bytes == 12 * per_block
    assert got.used_bytes == 4 * 9 * per_block // 4
    assert cache.stats().lengths == [[[5, 5]] * 2, [[4, 4]] * 2]


def test_request_mix_is_seeded_and_checked():
    a = request_mix([10, 20, 30], (1, 5), seed=3)
    assert a == request_mix([10, 20, 30], (1, 5), seed=3)
    assert sorted(r.prompt_tokens for r in a) == [10, 20, 30]
    assert all(1 <= r.output_tokens <= 5 for r in a)
    with pytest.raises(ValueError, match="output_range"):
        request_mix([10], (0, 5))


@pytest.mark.slow
def test_compressed_admission_really_compresses_and_admits_more(smol):
    """Real prefill + 4x compression of SQuAD prompts in a shared pool: more requests fit than
    uncompressed, and each admitted cache holds about prompt / 4 + output tokens per head."""
    from permkv.cache import BlockPool
    from permkv.experiments.paged_attention import natural_prompts
    from permkv.experiments.paged_attention import admit_compressed

    model, tok, spec = smol
    requests = request_mix(natural_prompts(tok, spec, "squad", 3), (8, 16), seed=0)
    assert all(len(r.prompt_ids) == r.prompt_tokens for r in requests)
    heads = spec.n_layers * spec.n_kv_heads
    admitted = {}
    for ratio in (1, 4):
        pool = BlockPool(heads * 60, 16, spec.head_dim)  # about 960 tokens per head
        got, caches = admit_compressed(model, pool, requests, ratio, chunk_tokens=128, progress=False)
        admitted[ratio] = got.admitted
        assert got.allocated_bytes == pool.stats().allocated_bytes <= pool.num_blocks * pool.bytes_per_block
        for cache, r in zip(caches, requests * 10):
            held = sum(map(sum, cache.stats().lengths[0]))
            assert abs(held - heads * (r.prompt_tokens / ratio + r.output_tokens)) <= heads, (ratio, held)
    assert admitted[4] > admitted[1] >= 1, admitted
    with pytest.raises(ValueError, match="prompt_ids"):
        admit_compressed(model, BlockPool(10, 16, spec.head_dim), [Request(10, 5)], 4)
