"""A knowledge cache that learns one domain after another by sparse memory finetuning.

`KnowledgeCache.learn("A", facts_a, steps)` writes domain A's facts into the top-t TF-IDF slots of
each batch; `recall(facts)` measures them; `importance("A")` is the summed TF-IDF each slot earned
while learning A, so which slots hold which domain can be inspected (`slot_overlap`).
`domain_retention` runs the seed's scenario: learn A, learn B, report how much of A survived.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from permkv.knowledge.memory import ProductKeyMemory
from permkv.knowledge.recall import FactLike, fact_scores
from permkv.knowledge.sparse import BackgroundCounts, SparseMemoryTrainer
from permkv.knowledge.train import text_batches


class KnowledgeCache:
    """Sparse-memory knowledge store on top of a model that already holds a (pretrained) memory.
    `skip_tokens`: token ids whose reads do not count when choosing slots (see `SparseMemoryTrainer`)."""

    def __init__(self, model, tokenizer, memory: ProductKeyMemory, background: BackgroundCounts,
                 t: int, lr: float, batch_size: int = 8, max_tokens: int = 64, seed: int = 0,
                 skip_tokens: list[int] | None = None) -> None:
        self.model, self.tokenizer, self.memory = model, tokenizer, memory
        self.trainer = SparseMemoryTrainer(model, memory, background, t, lr, skip_tokens=skip_tokens)
        self.batch_size, self.max_tokens, self.seed = batch_size, max_tokens, seed
        self.domains: dict[str, torch.Tensor] = {}  # domain -> (n_slots,) summed TF-IDF while learning it
        self.writes: dict[str, torch.Tensor] = {}  # domain -> (n_slots,) steps that wrote each slot

    def learn(self, domain: str, facts: list[FactLike], steps: int) -> list[float]:
        """Train on `facts` for `steps` sparse steps; returns the loss per step."""
        if domain in self.domains:
            raise ValueError(f"domain {domain!r} was already learned; use a new name")
        if not facts:
            raise ValueError("the fact set is empty; pass at least one fact")
        texts = [text for fact in facts for text in fact.train_texts]
        start, start_writes = self.trainer.importance.clone(), self.trainer.updates.clone()
        losses = [self.trainer.step(b).loss for b in text_batches(
            self.tokenizer, texts, self.batch_size, steps, self.max_tokens, seed=self.seed + len(self.domains))]
        self.domains[domain] = self.trainer.importance - start
        self.writes[domain] = self.trainer.updates - start_writes
        return losses

    def recall(self, facts: list[FactLike]) -> float:
        """Exact match on the facts' held-out questions."""
        return fact_scores(self.model, self.tokenizer, facts)["em"]

    def importance(self, domain: str) -> torch.Tensor:
        """(n_slots,) summed TF-IDF of each slot while learning `domain` (0 = never written)."""
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; learned: {sorted(self.domains)}")
        return self.domains[domain]

    def slots(self, domain: str) -> torch.Tensor:
        """Ids of the slots written while learning `domain`."""
        self.importance(domain)  # raises for an unknown domain
        return torch.nonzero(self.writes[domain] > 0).flatten()

    def slot_overlap(self, a: str, b: str) -> float:
        """Share of domain `a`'s written slots that domain `b` also wrote (Jaccard would hide direction)."""
        sa, sb = set(self.slots(a).tolist()), set(self.slots(b).tolist())
        return len(sa & sb) / len(sa) if sa else 0.0


@dataclass
class Retention:
    """Domain A -> B scores: A after learning A, A after B, B after B; retention = A after B / A after A."""

    a_after_a: float
    a_after_b: float
    b_after_b: float
    slot_overlap: float  # share of A's slots that B also wrote

    @property
    def retention(self) -> float:
        return self.a_after_b / self.a_after_a if self.a_after_a > 0 else float("nan")


def domain_retention(cache: KnowledgeCache, facts_a: list[FactLike], facts_b: list[FactLike], steps: int) -> Retention:
    """Learn A, then B (same number of steps), and report how much of A is retained."""
    cache.learn("A", facts_a, steps)
    a_after_a = cache.recall(facts_a)
    cache.learn("B", facts_b, steps)
    return Retention(a_after_a, cache.recall(facts_a), cache.recall(facts_b), cache.slot_overlap("A", "B"))
