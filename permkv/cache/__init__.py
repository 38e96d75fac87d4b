"""Paged KV cache with per-(sequence, layer, KV head) block tables.

    from permkv.cache import BlockPool, PagedCache, forward, paged_attention
    pool = BlockPool.from_bytes(2**30, block_size=16, head_dim=spec.head_dim)  # 1 GiB of K and V
    cache = PagedCache(pool, model.config)
    with paged_attention(model):
        logits = forward(model, cache, ids)          # (batch, 1, vocab); the cache holds the tokens
    cache.stats().waste_pct; cache.evict(seq=0, layer_idx=3, head=1, keep=[0, 5, 9])
"""

from permkv.cache.attention import NAME, PagedBatch, Segment, forward, paged_attention, run
from permkv.cache.paged import PagedCache
from permkv.cache.pool import BlockPool, CacheFull, PoolStats
from permkv.cache.tables import CacheStats, HeadTable, PagedLayer

__all__ = [
    "NAME",
    "BlockPool",
    "CacheFull",
    "CacheStats",
    "HeadTable",
    "PagedBatch",
    "PagedCache",
    "PagedLayer",
    "PoolStats",
    "Segment",
    "forward",
    "paged_attention",
    "run",
]
