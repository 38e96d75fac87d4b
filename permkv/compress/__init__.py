"""Per-(layer, KV head) KV-cache compression that gives blocks back to the pool (KV-Compress style).

    from permkv.compress import InferenceKVCacheCompression, prefill_and_compress
    cache, logits, report = prefill_and_compress(model, prompt_ids, 8, InferenceKVCacheCompression())
"""

from permkv.compress.allocators import ALLOCATORS, GlobalAdaptiveAllocator, LayerAdaptiveAllocator, UniformAllocator
from permkv.compress.context import ContextCache, ContextReport
from permkv.compress.compressor import CompressionReport, Compressor, InferenceKVCacheCompression, check_ratio, report_of
from permkv.compress.estimate import KVZIP_SCORER, QualityEstimate, QualityTable
from permkv.compress.observe import QueryRecorder, observing
from permkv.compress.forks import fork_sequence, paged_cache_for
from permkv.compress.kvzip import REPEAT_PROMPT, kvzip_scores, last_chunk_scores, repeat_prompt_ids
from permkv.compress.prefill import chunked_prefill_and_compress, prefill_and_compress
from permkv.compress.scorers import (
    SCORERS,
    KeyNormScore,
    KVCompressScore,
    Pooled,
    RandomScore,
    RecencyMix,
    RecentScore,
    SnapKVScore,
    get_scorer,
)

__all__ = [
    "ALLOCATORS", "REPEAT_PROMPT", "SCORERS", "CompressionReport", "Compressor", "ContextCache", "ContextReport", "GlobalAdaptiveAllocator", "InferenceKVCacheCompression",
    "KVCompressScore", "KVZIP_SCORER", "KeyNormScore", "LayerAdaptiveAllocator", "Pooled", "QualityEstimate", "QualityTable", "QueryRecorder",
    "RandomScore", "RecencyMix", "RecentScore",
    "SnapKVScore", "UniformAllocator", "check_ratio", "chunked_prefill_and_compress", "fork_sequence", "get_scorer", "kvzip_scores",
    "last_chunk_scores", "observing", "paged_cache_for", "prefill_and_compress", "repeat_prompt_ids", "report_of",
]
