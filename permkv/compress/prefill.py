"""Prefill a prompt into a PagedCache and compress it: in one pass, or chunk by chunk.

`prefill_and_compress` reads the whole prompt at once and compresses to seen / ratio.
`chunked_prefill_and_compress` wraps it: the prompt is read `chunk_tokens` at a time and the cache is
compressed again after every chunk, so the pool only ever holds about len(prompt) / ratio +
chunk_tokens tokens per head (a context larger than memory can be read).

Tokens are scored by the compression's scorer from the last observed queries, or, given `reread`
(KVzip's request to repeat the context, `repeat_prompt_ids`), by KVzip-style re-reading: each chunk
is re-read on a fork right after it is read, and every token keeps the score its own chunk gave it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from permkv.cache import PagedCache, forward
from permkv.compress.compressor import CompressionReport, InferenceKVCacheCompression, check_ratio
from permkv.compress.forks import paged_cache_for
from permkv.compress.kvzip import kvzip_scores, last_chunk_scores
from permkv.compress.observe import observing

KVZIP_CHUNK = 1024  # context tokens one KVzip re-reading pass takes in one-pass prefill (as kvzip_scores)


def _reread_room(reread: Sequence[int] | None, chunk: int) -> int:
    """Extra tokens per head a fork needs to re-read `chunk` tokens after `reread` (0 without KVzip): the
    re-read itself plus one 16-token block for the copy-on-write of each head's shared last block."""
    return 0 if reread is None else len(reread) + chunk + 16


@torch.no_grad()
def prefill_and_compress(model, prefix: list[int], ratio: float, compression: InferenceKVCacheCompression,
                         extra_tokens: int = 64, cache: PagedCache | None = None, reread: Sequence[int] | None = None,
                         ) -> tuple[PagedCache, torch.Tensor, CompressionReport]:
    """Prefill `prefix` into a PagedCache (recording queries) and compress it to seen / ratio.

    `cache`: an empty PagedCache to fill (e.g. one of many on a shared pool; CacheFull propagates
    when its pool runs out) instead of a new one sized for the prefix plus `extra_tokens`.
    `reread`: score by KVzip-style re-reading instead of the compression's scorer (the report's quality
    is then what notebook 02 measured for re-reading with this allocator: its `permkv_kvzip*` rows).
    Returns the cache, the last position's logits `(vocab,)` and the report.
    """
    ratio = check_ratio(ratio)
    if cache is not None and cache.num_sequences:
        raise ValueError("cache must be empty")
    room = _reread_room(reread, min(len(prefix), KVZIP_CHUNK))
    cache = paged_cache_for(model, len(prefix) + extra_tokens + room) if cache is None else cache
    with observing(model, window=compression.observe) as recorder:
        logits = forward(model, cache, torch.tensor([prefix], device=model.device))[0, -1]
    if reread is None:
        return cache, logits, compression.compress_auto(cache, ratio, recorder.queries)
    scores = kvzip_scores(model, cache, prefix, list(reread), KVZIP_CHUNK, compression.sinks)
    report = compression.compressor().compress(cache, ratio, scores=scores)
    report.quality = compression.estimate(ratio, reread=True)  # 02's rows for this re-reading (scorer "kvzip")
    return cache, logits, report


@torch.no_grad()
def chunked_prefill_and_compress(model, prefix: list[int], ratio: float, compression: InferenceKVCacheCompression,
                                 chunk_tokens: int, extra_tokens: int = 64, cache: PagedCache | None = None,
                                 reread: Sequence[int] | None = None,
                                 ) -> tuple[PagedCache, torch.Tensor, CompressionReport]:
    """`prefill_and_compress` reading `chunk_tokens` at a time, compressing to seen / ratio after
    every chunk. Each chunk's last queries score everything cached so far (or, with `reread`, each
    chunk is scored by re-reading it), so a chunk must hold at least the observation window and the
    protected tokens. Same returns; the report's original bytes are what the whole prefix takes
    uncompressed.
    """
    ratio = check_ratio(ratio)
    need = max(compression.observe, compression.window + compression.sinks)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < need:
        raise ValueError(f"chunk_tokens must be an int >= the protected tokens and the observation window ({need}), "
                         f"got {chunk_tokens!r}")
    if chunk_tokens >= len(prefix):
        return prefill_and_compress(model, prefix, ratio, compression, extra_tokens, cache, reread)
    if cache is not None and cache.num_sequences:
        raise ValueError("cache must be empty")
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None) or 0
    held = max(math.ceil(len(prefix) / ratio), window) + chunk_tokens + extra_tokens
    cache = paged_cache_for(model, held + _reread_room(reread, chunk_tokens)) if cache is None else cache
    compressor = compression.compressor()
    kept: dict[int, list[torch.Tensor]] = {}  # reread: per full-attention layer and head, the scores of what it holds
    for start in range(0, len(prefix), chunk_tokens):
        chunk = prefix[start : start + chunk_tokens]
        pos = torch.arange(start, start + len(chunk), device=model.device)[None]
        with observing(model, window=compression.observe) as recorder:
            logits = forward(model, cache, torch.tensor([chunk], device=model.device), pos)[0, -1]
        if reread is None:
            report = compressor.compress(cache, ratio, recorder.queries)
        else:  # the new chunk scored by re-reading it; older tokens keep the scores their chunks gave them
            new = last_chunk_scores(model, cache, chunk, list(reread), compression.sinks)
            held = {i: [torch.cat([kept[i][h], s[0, h]]) if kept else s[0, h] for h in range(s.shape[1])]
                    for i, s in new.items()}
            report = compressor.compress(cache, ratio, scores={i: pad_sequence(r, batch_first=True)[None]
                                                               for i, r in held.items()})
            kept = {i: [r[h][idx] for h, idx in enumerate(report.kept_indices[i])] for i, r in held.items()}
    report.quality = None if reread is not None else compression.estimate(ratio)  # 02 measured re-reading in one pass only
    return cache, logits, report
