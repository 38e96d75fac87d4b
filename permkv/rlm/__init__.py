"""Recursive Language Models over compressed KV caches.

    from permkv.rlm import RecursiveLanguageModel
    rlm = RecursiveLanguageModel(load_model("smollm2-135m"), max_depth=3, context_chunk_size=640,
                                 kv_cache_compression_ratio=8)
    result = rlm.completion("What is the special magic number for amber-delta?", document)
    result.answer, result.stats()  # calls, read_calls, depth_reached, tokens_read, peak_kv_bytes, ...
"""

from permkv.rlm.backend import (
    GREEDY,
    Backend,
    ContextTooLong,
    EngineBackend,
    Generation,
    Sampling,
    SequentialBackend,
    TokenStream,
    check_request,
)
from permkv.rlm.lm import LM, ClientLM, LocalLM, Reply, as_lm
from permkv.rlm.model import (
    AGGREGATE,
    POLICIES,
    READ,
    Call,
    RecursiveLanguageModel,
    RLMBudgetExceeded,
    RLMResult,
    evidence,
    is_none,
)
from permkv.rlm.pieces import sentences, split_pieces

__all__ = [
    "AGGREGATE", "GREEDY", "Backend", "ContextTooLong", "EngineBackend", "Generation", "Sampling", "SequentialBackend",
    "TokenStream", "check_request", "LM", "POLICIES", "READ", "Call", "ClientLM", "LocalLM", "RLMBudgetExceeded", "RLMResult",
    "RecursiveLanguageModel", "Reply", "as_lm", "evidence", "is_none", "sentences", "split_pieces",
]
