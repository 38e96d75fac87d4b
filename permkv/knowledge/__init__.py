"""Continual-learning knowledge cache: a product-key memory in SmolLM2, sparse memory finetuning
(Lin et al. 2025) and the full-finetuning / LoRA baselines, with acquisition and forgetting probes."""

from permkv.knowledge.cache import KnowledgeCache, Retention, domain_retention
from permkv.knowledge.experiment import ExperimentConfig, Start, matched_comparison, prepare, run_method
from permkv.knowledge.facts import Fact, make_facts, training_texts
from permkv.knowledge.memory import (
    MemoryConfig, ProductKeyMemory, find_memory, insert_memory, memory_inserted, remove_memory,
)
from permkv.knowledge.probes import ProbeSet, build_probes, fact_scores, forgetting, probe_scores
from permkv.knowledge.sparse import (
    BackgroundCounts, SparseMemoryTrainer, doc_counts, slot_counts, tfidf_scores, top_t_slots,
)

__all__ = [
    "BackgroundCounts", "ExperimentConfig", "Fact", "KnowledgeCache", "MemoryConfig", "ProbeSet",
    "ProductKeyMemory", "Retention", "SparseMemoryTrainer", "Start", "build_probes", "domain_retention",
    "fact_scores", "find_memory", "forgetting", "insert_memory", "make_facts", "matched_comparison",
    "memory_inserted", "prepare", "probe_scores", "remove_memory", "run_method", "slot_counts",
    "tfidf_scores", "top_t_slots", "training_texts", "doc_counts",
]
