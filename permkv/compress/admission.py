"""How many requests a fixed KV memory serves when every prompt's cache is really compressed.

The compressed rows of the paged notebook's capacity table (KV-Compress's argument, ANCHORS.md s1:
freed blocks admit more sequences). Each request gets its own `PagedCache` on one shared
`BlockPool`; its prompt is really prefilled (in chunks, so the pool only needs room for the
compressed cache plus one chunk) and compressed to 1/ratio, then the blocks for its output tokens
are taken uncompressed, as a server must before it decodes them. Requests are admitted in order,
cycling through the mix, until the pool cannot take the next one.
"""

from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from permkv.cache import BlockPool, CacheFull, PagedCache
from permkv.cache.capacity import Admission, Request
from permkv.compress.compressor import InferenceKVCacheCompression
from permkv.compress.prefill import chunked_prefill_and_compress


@torch.no_grad()
def admit_compressed(model, pool: BlockPool, requests: list[Request], ratio: float,
                     compression: InferenceKVCacheCompression | None = None, chunk_tokens: int = 256,
                     limit: int = 10_000, progress: bool = True) -> tuple[Admission, list[PagedCache]]:
    """Admit requests (with `prompt_ids`) into `pool` compressed to 1/ratio until one does not fit.

    Returns the admission (bytes as the pool holds them) and the admitted caches, which still hold
    their blocks (release them to reuse the pool). `limit` stops a runaway cycle.
    """
    if not requests or not all(r.prompt_ids for r in requests):
        raise ValueError("requests must be non-empty and carry prompt_ids (request_mix of token ids)")
    compression = compression or InferenceKVCacheCompression()
    caches: list[PagedCache] = []
    used_tokens = 0
    bar = tqdm(desc=f"admit {ratio:g}x", disable=not progress)
    for r in itertools.islice(itertools.cycle(requests), limit):
        cache = PagedCache(pool, model.config)
        try:
            chunked_prefill_and_compress(model, list(r.prompt_ids), ratio, compression, chunk_tokens, cache=cache)
            for i, layer in enumerate(cache.layers):  # the output tokens' slots, uncompressed
                zeros = torch.zeros(1, cache.n_kv_heads, r.output_tokens, pool.head_dim, dtype=pool.keys.dtype, device=pool.keys.device)
                cache.append(i, zeros, zeros)
                if layer.is_sliding:
                    cache.trim(i)
        except CacheFull:
            cache.reset()
            break
        caches.append(cache)
        used_tokens += cache.stats().used_tokens
        bar.update()
    bar.close()
    return Admission(len(caches), pool.stats().allocated_bytes, used_tokens * pool.bytes_per_block // pool.block_size), caches
