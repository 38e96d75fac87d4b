"""Per-(layer, KV head) KV-cache compression that gives blocks back to the pool (KV-Compress style)."""

from permkv.compress.allocators import ALLOCATORS, GlobalAdaptiveAllocator, LayerAdaptiveAllocator, UniformAllocator
from permkv.compress.compressor import CompressionReport, Compressor, InferenceKVCacheCompression
from permkv.compress.observe import QueryRecorder, observing
from permkv.compress.answer import paged_cache_for, prefill_and_compress
from permkv.compress.scorers import SCORERS, KeyNormScore, KVCompressScore, RandomScore, RecentScore, SnapKVScore, get_scorer

__all__ = [
    "ALLOCATORS", "SCORERS", "CompressionReport", "Compressor", "GlobalAdaptiveAllocator", "InferenceKVCacheCompression",
    "KVCompressScore", "KeyNormScore", "LayerAdaptiveAllocator", "QueryRecorder", "RandomScore", "RecentScore",
    "SnapKVScore", "UniformAllocator", "get_scorer", "observing",
]
