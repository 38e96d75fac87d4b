"""Continual-learning knowledge cache: a product-key memory in SmolLM2, sparse memory finetuning
(Lin et al. 2025) and the full-finetuning / LoRA baselines, with a recall check (the forgetting experiment is `permkv.experiments.continual_learning`)."""

from permkv.knowledge.cache import KnowledgeCache, Retention, domain_retention
from permkv.knowledge.memory import (
    MemoryConfig, ProductKeyMemory, find_memory, insert_memory, memory_inserted, remove_memory,
)
from permkv.knowledge.recall import FEW_SHOT, FactLike, fact_scores, greedy_match, qa_format_tokens
from permkv.knowledge.sparse import (
    BackgroundCounts, SparseMemoryTrainer, doc_counts, slot_counts, tfidf_scores, top_t_slots,
)

__all__ = [
    "FEW_SHOT", "BackgroundCounts", "FactLike", "KnowledgeCache", "MemoryConfig", "ProductKeyMemory", "Retention",
    "SparseMemoryTrainer", "doc_counts", "domain_retention", "fact_scores", "find_memory", "greedy_match",
    "insert_memory", "memory_inserted", "qa_format_tokens", "remove_memory", "slot_counts", "tfidf_scores", "top_t_slots",
]
