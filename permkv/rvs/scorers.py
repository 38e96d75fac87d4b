"""R-KV's token score for compressing a reasoning trace while it is written (Cai 2025, arXiv 2505.24133).

Same interface as `permkv.compress` scorers, so it can move there: `score(keys, values, queries)`
with keys, values `(batch, kv_heads, seq, head_dim)` and queries `(batch, q_heads, w, head_dim)`
(the last w positions), returning `(batch, kv_heads, seq)`, higher = keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from permkv.compress import SnapKVScore


def redundancy(keys: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """R-KV's redundancy of each cached token: its mean cosine similarity to the other keys of its
    head, softmaxed over the sequence; for every key its newest look-alike (cosine > threshold) is
    not counted, so the latest copy of a repeated token scores as less redundant than older ones.

    keys `(batch, kv_heads, seq, head_dim)` -> `(batch, kv_heads, seq)`.
    """
    B, H, L, D = keys.shape
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)  # (B, H, L, L)
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    idx = torch.arange(L, device=keys.device).expand(B, H, L, L)
    newest = torch.where(sim > threshold, idx, torch.zeros_like(idx)).max(dim=-1).values  # (B, H, L)
    sim.scatter_(-1, newest.unsqueeze(-1), 0.0)
    return sim.mean(dim=-2).softmax(dim=-1)


@dataclass
class RKVScore:
    """score = mix * importance - (1 - mix) * redundancy (R-KV: mix 0.1, 8 observation queries).

    Importance is SnapKV's pooled attention of the observation queries (R-KV pools it with a max
    over 7 neighbours where SnapKV averages; both spread a key's attention to its neighbours)."""

    mix: float = 0.1  # weight of importance; R-KV's paper uses 0.1
    threshold: float = 0.5  # cosine above which two keys count as copies
    importance: SnapKVScore = field(default_factory=lambda: SnapKVScore(kernel=7))
    needs_queries = True

    def __post_init__(self):
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {self.mix!r}")

    def score(self, keys, values, queries):
        return self.mix * self.importance.score(keys, values, queries) - (1 - self.mix) * redundancy(keys.float())
