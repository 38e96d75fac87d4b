"""Sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103): only the top-t slots get gradient.

Per batch: count how often each memory slot is read (term frequency), weight by how rare the slot is
in background text (inverse document frequency), keep the `t` best slots, and update only their
value rows with plain SGD. Everything else in the model stays bit-identical.

TF-IDF, with `c` the batch's access counts and `df` the number of background documents reading a slot:
    tf(i)  = c(i) / sum_j c(j)
    idf(i) = log((N + 1) / (df(i) + 1))       N = number of background documents
    score(i) = tf(i) * idf(i), and only slots read in the batch (c(i) > 0) are eligible.

A background document is one sequence (a window of background text) here, not one batch as in the
paper: a batch of a few hundred tokens reads (heads * top_k) slots per token, a large share of a
memory this small (measured: all 16,384 slots with top_k 32), so batch-level document frequencies
saturate and every idf is ~0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from permkv.knowledge.memory import ProductKeyMemory


def slot_counts(indices: torch.Tensor, n_slots: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Access counts per slot (n_slots,) from recorded indices (batch, seq, heads, top_k).

    `mask` (batch, seq), 1 for real tokens, drops padding positions from the count.
    """
    if mask is not None:
        indices = indices[mask.bool()]
    return torch.bincount(indices.reshape(-1), minlength=n_slots)


def doc_counts(indices: torch.Tensor, n_slots: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per slot, how many sequences (documents) of the batch read it at least once (n_slots,).

    indices (batch, seq, heads, top_k); `mask` (batch, seq), 1 for real tokens.
    """
    out = torch.zeros(n_slots, dtype=torch.long)
    for b in range(indices.shape[0]):
        rows = indices[b] if mask is None else indices[b][mask[b].bool()]  # (tokens, heads, top_k)
        out[torch.unique(rows)] += 1
    return out


@dataclass
class BackgroundCounts:
    """Slot statistics over background text: per slot, the number of documents (sequences) that read it."""

    doc_freq: torch.Tensor  # (n_slots,) background documents that read each slot at least once
    n_docs: int  # background documents counted

    @classmethod
    def empty(cls, n_slots: int) -> "BackgroundCounts":
        return cls(torch.zeros(n_slots, dtype=torch.long), 0)

    def add(self, counts: torch.Tensor, n_docs: int) -> None:
        """Add `n_docs` documents; `counts` (n_slots,): how many of them read each slot (`doc_counts`)."""
        if n_docs < 1 or int(counts.max()) > n_docs:
            raise ValueError(f"n_docs must be >= 1 and >= every slot's count, got {n_docs}")
        self.doc_freq += counts.long()
        self.n_docs += n_docs

    @property
    def used_fraction(self) -> float:
        """Share of slots read at least once in the background set."""
        return float((self.doc_freq > 0).float().mean())


def tfidf_scores(counts: torch.Tensor, background: BackgroundCounts) -> torch.Tensor:
    """TF-IDF score per slot (n_slots,) for one batch's access counts (n_slots,); 0 where unread."""
    if counts.shape != background.doc_freq.shape:
        raise ValueError(
            f"counts must have one entry per slot ({background.doc_freq.numel()}), got {tuple(counts.shape)}"
        )
    total = counts.sum()
    if total == 0:
        return torch.zeros(counts.shape, dtype=torch.float64)
    tf = counts.double() / total.double()
    idf = torch.log((background.n_docs + 1) / (background.doc_freq.double() + 1))
    return tf * idf


def top_t_slots(counts: torch.Tensor, background: BackgroundCounts, t: int) -> torch.Tensor:
    """Ids of the (at most) `t` accessed slots with the highest TF-IDF, best first.

    Ties (e.g. slots never seen in the background) are broken by raw count, then by slot id.
    """
    n_slots = counts.numel()
    if not 1 <= t <= n_slots:
        raise ValueError(f"t must be in [1, {n_slots}] (the memory's slot count), got {t}")
    scores = tfidf_scores(counts, background)
    accessed = torch.nonzero(counts > 0).flatten()
    # sort accessed slots by (score desc, count desc, id asc): stable sorts from the last key back
    order = accessed[torch.argsort(counts[accessed], descending=True, stable=True)]
    order = order[torch.argsort(scores[order], descending=True, stable=True)]
    return order[:t]


@dataclass
class SparseStep:
    """What one sparse update did: the loss before it and the slots it wrote."""

    loss: float
    slots: torch.Tensor  # (<= t,) slot ids whose value rows changed


class SparseMemoryTrainer:
    """Trains only the top-t TF-IDF slots' value rows of `memory` inside `model`, with SGD.

    All model parameters (and the memory's keys and queries) are frozen on construction; the value
    table alone requires grad, and each step writes `values[slots] -= lr * grad[slots]` for the
    chosen slots only, so every other number in the model keeps its exact bits.

    `skip_tokens`: token ids whose reads do not count towards the batch's access counts (the QA
    scaffolding "Q", ":", "?", newline: every question reads the slots those tokens read, so writing a
    fact there reaches every question). `reads_by_token` (vocab,) counts, per token id, the reads of
    the slots each step chose: which tokens the written slots serve.
    """

    def __init__(
        self, model: torch.nn.Module, memory: ProductKeyMemory, background: BackgroundCounts, t: int, lr: float,
        skip_tokens: list[int] | None = None,
    ) -> None:
        if not 1 <= t <= memory.config.n_slots:
            raise ValueError(f"t must be in [1, {memory.config.n_slots}] (the memory's slot count), got {t}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if background.doc_freq.numel() != memory.config.n_slots:
            raise ValueError("background counts were taken on a memory with a different slot count")
        self.model, self.memory, self.background, self.t, self.lr = model, memory, background, t, lr
        for p in model.parameters():
            p.requires_grad_(False)
        memory.values.requires_grad_(True)
        memory.record = True
        self.importance = torch.zeros(memory.config.n_slots, dtype=torch.float64)  # summed TF-IDF when chosen
        self.updates = torch.zeros(memory.config.n_slots, dtype=torch.long)  # steps that wrote each slot
        self.skip_tokens = torch.tensor(sorted(set(skip_tokens or [])), dtype=torch.long)
        self.reads_by_token = torch.zeros(model.config.vocab_size, dtype=torch.long)

    def step(self, batch: dict[str, torch.Tensor]) -> SparseStep:
        """One update on a batch with input_ids, attention_mask and labels (-100 = ignored)."""
        self.model.train()
        self.memory.values.grad = None
        loss = self.model(**{k: v.to(self.memory.values.device) for k, v in batch.items()}).loss
        loss.backward()
        indices, ids, mask = self.memory.last_indices.cpu(), batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        counted = mask & ~torch.isin(ids, self.skip_tokens)
        counts = slot_counts(indices, self.memory.config.n_slots, counted)
        slots = top_t_slots(counts, self.background, self.t)
        chosen = torch.isin(indices, slots).sum(dim=(2, 3))  # (batch, seq) reads of the chosen slots per position
        self.reads_by_token += torch.bincount(ids[mask], weights=chosen[mask].double(),
                                              minlength=self.reads_by_token.numel()).long()
        self.importance[slots] += tfidf_scores(counts, self.background)[slots]
        self.updates[slots] += 1
        with torch.no_grad():
            grad = self.memory.values.grad
            rows = slots.to(grad.device)
            self.memory.values[rows] -= self.lr * grad[rows]
        self.memory.values.grad = None
        self.model.eval()
        return SparseStep(loss.item(), slots)
