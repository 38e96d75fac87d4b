"""Paged KV cache with per-(sequence, layer, KV head) block tables."""

from permkv.cache.attention import NAME, paged_attention
from permkv.cache.paged import CacheStats, HeadTable, PagedCache
from permkv.cache.pool import BlockPool, CacheFull, PoolStats

__all__ = [
    "NAME",
    "BlockPool",
    "CacheFull",
    "CacheStats",
    "HeadTable",
    "PagedCache",
    "PoolStats",
    "paged_attention",
]
