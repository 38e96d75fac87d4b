"""Per-(layer, KV head) KV-cache compression that gives blocks back to the pool (KV-Compress style).

    from permkv.compress import prefill_and_compress
    cache, logits, report = prefill_and_compress(model, prompt_ids, 8, tokenizer=tok)  # the default
    prefill_and_compress(model, prompt_ids, 8, InferenceKVCacheCompression(scorer="snapkv"))  # a cheap scorer

The default, `InferenceKVCacheCompression()`, is what notebook 02 measured best in both modes (SmolLM2,
needles at 4K, n = 30): KVzip-style re-reading with one global top-k over all heads.

To compare compressions on one prompt without reading it again, `prefill_shared(model, prefix, suffix, ...)`
reads it once (`Prefilled`) and `Prefilled.answer(model, tok, n, compress)` answers on a copy-on-write fork.

The scorer contract (what every caller, the engine included, branches on):
- `compression.rereads` False, an attention or key scorer (`kvcompress`, `snapkv`, `streaming`, ...):
  `Compressor.compress(cache, ratio, queries)` scores each head's cached tokens from the last
  `compression.observe` queries each layer computed (record them with `observing(model)` around the
  forward passes that read the tokens; `needs_queries` False scorers ignore them).
- `compression.rereads` True (`scorer="kvzip"`, `KVzipScore`): the model re-reads the context on a
  copy-on-write fork of a one-sequence cache after `compression.reread_ids(tokenizer)` (KVzip's request
  to repeat it). Scores come from `kvzip_scores(model, cache, ids, reread)` (the whole uncompressed
  prompt) or, chunk by chunk, `last_chunk_scores(model, cache, chunk, reread, compression.sinks)` right
  after each chunk is read, the older tokens keeping their own chunk's scores (`RereadScores`); they go
  to `Compressor.compress(cache, ratio, scores=...)`, which refuses to run such a scorer without them.
  The pool needs room for one fork's `len(reread) + chunk + 16` extra tokens per head; the re-read costs
  about one more prefill of the chunk. No queries are observed.
`ratio` is tokens seen / tokens kept everywhere; at ratio 1 nothing is scored.
"""

from permkv.compress.allocators import ALLOCATORS, GlobalAdaptiveAllocator, LayerAdaptiveAllocator, UniformAllocator
from permkv.compress.compressor import (
    BEST_ALLOCATOR,
    CompressionReport,
    Compressor,
    InferenceKVCacheCompression,
    check_ratio,
    report_of,
)
from permkv.compress.context import ContextCache, ContextReport
from permkv.compress.estimate import KVZIP_SCORER, MeasuredQuality, QualityEstimate, QualityTable
from permkv.compress.forks import fork_sequence, paged_cache_for
from permkv.compress.kvzip import REPEAT_PROMPT, RereadScores, kvzip_scores, last_chunk_scores, repeat_prompt_ids
from permkv.compress.observe import LayerInputs, QueryRecorder, capture_inputs, observing
from permkv.compress.prefill import chunked_prefill_and_compress, prefill_and_compress
from permkv.compress.scorers import (
    SCORERS,
    KeyNormScore,
    KVCompressScore,
    KVzipScore,
    Pooled,
    RandomScore,
    RecencyMix,
    RecentScore,
    SnapKVScore,
    get_scorer,
    rereads,
)
from permkv.compress.shared_prefix import Prefilled, prefill_shared

__all__ = [
    "ALLOCATORS", "BEST_ALLOCATOR", "REPEAT_PROMPT", "SCORERS", "CompressionReport", "Compressor", "ContextCache",
    "ContextReport", "GlobalAdaptiveAllocator", "InferenceKVCacheCompression", "KVCompressScore", "KVZIP_SCORER",
    "KVzipScore", "KeyNormScore", "LayerAdaptiveAllocator", "LayerInputs", "MeasuredQuality", "Pooled", "Prefilled",
    "QualityEstimate", "QualityTable", "QueryRecorder", "RandomScore", "RecencyMix", "RecentScore", "RereadScores",
    "SnapKVScore", "UniformAllocator", "capture_inputs", "check_ratio", "chunked_prefill_and_compress",
    "fork_sequence", "get_scorer", "kvzip_scores", "last_chunk_scores", "observing", "paged_cache_for",
    "prefill_and_compress", "prefill_shared", "repeat_prompt_ids", "report_of", "rereads",
]
