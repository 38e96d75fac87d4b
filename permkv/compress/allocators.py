"""Budget allocators: how many scored (unprotected) tokens each (layer, KV head) keeps.

All take `scores` `(layers, kv_heads, seq)` with -inf where a head has no candidate token
(protected or absent) and a total `budget` of candidates to keep, and return `(layers, kv_heads)`
counts summing to `budget` (or to all candidates when there are fewer). `min_share` guarantees
each head at least that fraction of an equal share, so no head is emptied by a greedy top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check(scores: torch.Tensor, budget: int) -> tuple[torch.Tensor, int]:
    available = torch.isfinite(scores).sum(-1)  # (layers, kv_heads)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return available, min(budget, int(available.sum()))


def _equal_split(budget: int, n: int) -> torch.Tensor:
    """`budget` split over n parts as evenly as integers allow, first parts one more."""
    return torch.full((n,), budget // n, dtype=torch.long) + (torch.arange(n) < budget % n).long()


def top_k_with_floor(scores: torch.Tensor, budget: int, min_share: float) -> torch.Tensor:
    """Counts per head of one top-k over the heads' candidates, each head first given its floor.

    scores `(heads, seq)` with -inf for non-candidates; returns `(heads,)` counts summing to
    min(budget, candidates).
    """
    n, L = scores.shape
    available = torch.isfinite(scores).sum(-1)
    budget = min(budget, int(available.sum()))
    floor = torch.minimum(available, torch.tensor(int(min_share * budget / n)))
    ranked = scores.sort(dim=-1, descending=True).values  # finite first
    ranked = ranked.masked_fill(torch.arange(L)[None, :] < floor[:, None], float("inf"))  # floors win
    chosen = ranked.flatten().topk(budget).indices // L
    return torch.bincount(chosen, minlength=n)


@dataclass
class UniformAllocator:
    """The same count for every head (kvpress's default); heads short of candidates keep them all."""

    min_share: float = 1.0  # unused: uniform is all floor

    def allocate(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        available, budget = _check(scores, budget)
        n_layers, n_heads = available.shape
        return torch.minimum(_equal_split(budget, n_layers * n_heads).view(n_layers, n_heads), available)


@dataclass
class LayerAdaptiveAllocator:
    """Equal budget per layer, split among that layer's heads by one top-k over their scores (AdaKV)."""

    min_share: float = 0.2  # each head keeps at least this fraction of an equal share of its layer

    def allocate(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        _, budget = _check(scores, budget)
        per_layer = _equal_split(budget, scores.shape[0]).tolist()
        return torch.stack([top_k_with_floor(s, b, self.min_share) for s, b in zip(scores, per_layer)])


@dataclass
class GlobalAdaptiveAllocator:
    """One top-k over all layers and heads together (KV-Compress evicts across the whole cache)."""

    min_share: float = 0.2  # each head keeps at least this fraction of an equal share of the budget

    def allocate(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        _, budget = _check(scores, budget)
        n_layers, n_heads, L = scores.shape
        return top_k_with_floor(scores.reshape(n_layers * n_heads, L), budget, self.min_share).view(n_layers, n_heads)


ALLOCATORS = {"uniform": UniformAllocator, "layer": LayerAdaptiveAllocator, "global": GlobalAdaptiveAllocator}
