"""Paged KV cache with per-(sequence, layer, KV head) block tables.

    from permkv.cache import BlockPool, PagedCache, paged_attention
    pool = BlockPool.from_bytes(2**30, block_size=16, head_dim=spec.head_dim)  # 1 GiB of K and V
    cache = PagedCache(pool, model.config)
    with paged_attention(model):
        model.generate(**batch, past_key_values=cache, max_new_tokens=32)
    cache.stats().waste_pct; cache.evict(seq=0, layer_idx=3, head=1, keep=[0, 5, 9])
"""

from permkv.cache.attention import NAME, paged_attention
from permkv.cache.paged import PagedCache
from permkv.cache.pool import BlockPool, CacheFull, PoolStats
from permkv.cache.tables import CacheStats, HeadTable, PagedLayer

__all__ = [
    "NAME",
    "BlockPool",
    "CacheFull",
    "CacheStats",
    "HeadTable",
    "PagedLayer",
    "PagedCache",
    "PoolStats",
    "paged_attention",
]
