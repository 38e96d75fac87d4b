"""Sizing and forking PagedCaches for compression.

`paged_cache_for` gives an empty cache whose pool holds one sequence of n tokens. `fork_sequence`
gives a copy-on-write copy of a prefilled sequence in its own PagedCache on the same pool, so that
one prefill can be compressed many ways (notebook 02) or re-read (KVzip) and each copy released
after use.
"""

from __future__ import annotations

from permkv.cache import BlockPool, HeadTable, PagedCache
from permkv.models import kv_layout


def paged_cache_for(model, n_tokens: int, block_size: int = 16) -> PagedCache:
    """An empty PagedCache whose pool holds one sequence of `n_tokens` tokens uncompressed."""
    layout = kv_layout(model.config)
    blocks = layout.n_layers * layout.n_kv_heads * (-(-n_tokens // block_size) + 1)
    pool = BlockPool(blocks, block_size=block_size, head_dim=layout.head_dim, dtype=model.dtype, device=model.device)
    return PagedCache(pool, model.config)


def fork_sequence(cache: PagedCache, config, seq: int = 0) -> PagedCache:
    """A new one-sequence PagedCache on `cache.pool` sharing all of `seq`'s blocks (copy-on-write);
    `config` is the model's config (the one `cache` was made with).

    Evicting from or appending to the copy never changes `seq`; `copy.reset()` gives its blocks back.
    """
    if not 0 <= seq < cache.num_sequences:
        raise ValueError(f"seq must be in [0, {cache.num_sequences}), got {seq!r}")
    copy = PagedCache(cache.pool, config)
    for src, dst in zip(cache.layers, copy.layers):
        dst.tables = [[HeadTable(cache.pool.fork(t.blocks), t.start, t.length) for t in src.tables[seq]]]
        dst.changed()
    copy.seen = [cache.seen[seq]]
    return copy
