"""Prefill a prompt into a PagedCache and compress it: in one pass, or chunk by chunk.

`prefill_and_compress` reads the whole prompt at once and compresses to seen / ratio.
`chunked_prefill_and_compress` wraps it: the prompt is read `chunk_tokens` at a time and the cache is
compressed again after every chunk, so the pool only ever holds about len(prompt) / ratio +
chunk_tokens tokens per head (a context larger than memory can be read). `fork_sequence` gives a
copy-on-write copy of a prefilled sequence in its own PagedCache on the same pool, so that one
prefill can be compressed many ways (notebook 02) and each copy released after use.
"""

from __future__ import annotations

import math

import torch

from permkv.cache import BlockPool, HeadTable, PagedCache
from permkv.compress.compressor import CompressionReport, InferenceKVCacheCompression, check_ratio, report_of
from permkv.compress.observe import observing


def paged_cache_for(model, n_tokens: int, block_size: int = 16) -> PagedCache:
    """An empty PagedCache whose pool holds one sequence of `n_tokens` tokens uncompressed."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    blocks = text.num_hidden_layers * text.num_key_value_heads * (-(-n_tokens // block_size) + 1)
    pool = BlockPool(blocks, block_size=block_size, head_dim=head_dim, dtype=model.dtype, device=model.device)
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
        dst.columns = cache.seen[seq]
        dst.changed()
    copy.seen = [cache.seen[seq]]
    return copy


@torch.no_grad()
def prefill_and_compress(model, prefix: list[int], ratio: float, compression: InferenceKVCacheCompression,
                         extra_tokens: int = 64, cache: PagedCache | None = None,
                         ) -> tuple[PagedCache, torch.Tensor, CompressionReport]:
    """Prefill `prefix` into a PagedCache (recording queries) and compress it to seen / ratio.

    `cache`: an empty PagedCache to fill (e.g. one of many on a shared pool; CacheFull propagates
    when its pool runs out) instead of a new one sized for the prefix plus `extra_tokens`.
    Returns the cache, the last position's logits `(vocab,)` and the report.
    """
    ratio = check_ratio(ratio)
    if cache is not None and cache.num_sequences:
        raise ValueError("cache must be empty")
    cache = paged_cache_for(model, len(prefix) + extra_tokens) if cache is None else cache
    with observing(model, window=compression.observe) as recorder:
        logits = model(torch.tensor([prefix], device=model.device), past_key_values=cache, logits_to_keep=1).logits[0, -1]
    return cache, logits, compression.compress_auto(cache, ratio, recorder.queries)


@torch.no_grad()
def chunked_prefill_and_compress(model, prefix: list[int], ratio: float, compression: InferenceKVCacheCompression,
                                 chunk_tokens: int, extra_tokens: int = 64, cache: PagedCache | None = None,
                                 ) -> tuple[PagedCache, torch.Tensor, CompressionReport]:
    """`prefill_and_compress` reading `chunk_tokens` at a time, compressing to seen / ratio after
    every chunk. Each chunk's last queries score everything cached so far, so a chunk must hold at
    least the observation window and the protected tokens. Same returns; the report's original
    bytes are what the whole prefix takes uncompressed.
    """
    ratio = check_ratio(ratio)
    need = max(compression.observe, compression.window + compression.sinks)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < need:
        raise ValueError(f"chunk_tokens must be an int >= the protected tokens and the observation window ({need}), "
                         f"got {chunk_tokens!r}")
    if chunk_tokens >= len(prefix):
        return prefill_and_compress(model, prefix, ratio, compression, extra_tokens, cache)
    if cache is not None and cache.num_sequences:
        raise ValueError("cache must be empty")
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None) or 0
    cache = paged_cache_for(model, max(math.ceil(len(prefix) / ratio), window) + chunk_tokens + extra_tokens) \
        if cache is None else cache
    compressor = compression.compressor()
    for start in range(0, len(prefix), chunk_tokens):
        chunk = prefix[start : start + chunk_tokens]
        pos = torch.arange(start, start + len(chunk), device=model.device)[None]
        with observing(model, window=compression.observe) as recorder:
            logits = model(torch.tensor([chunk], device=model.device), past_key_values=cache, position_ids=pos,
                           logits_to_keep=1).logits[0, -1]
        compressor.compress(cache, ratio, recorder.queries)
    report = report_of(cache, ratio)
    report.quality = compression.estimate(ratio)
    return cache, logits, report
