"""Token scorers: how much each cached token of each KV head is worth keeping (higher = keep).

Two kinds, told apart by `rereads` (see the package docstring for the contract):
- cache scorers (`rereads = False`): a small dataclass with `score(keys, values, queries) ->
  (batch, kv_heads, seq)`. keys, values: `(batch, kv_heads, seq, head_dim)` post-RoPE, oldest first;
  queries: `(batch, q_heads, w, head_dim)`, the last w positions, which are the last w cached tokens
  (their keys were written in the same forward); `needs_queries` says whether they are read.
  Grouped-query heads are folded onto their KV head (query head h*G + g reads KV head h), so K/V are
  never repeated.
- `KVzipScore` (`rereads = True`): the model itself re-reads the context (`permkv.compress.kvzip`);
  it has no `score`, its scores come from `kvzip_scores` / `last_chunk_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def window_attention(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the window queries over all cached keys, causal within the window.

    Returns `(batch, kv_heads, G * w, seq)`: row g * w + i is query i of group member g.
    """
    B, H, L, D = keys.shape
    Hq, w = queries.shape[1], queries.shape[2]
    G = Hq // H
    q = queries.reshape(B, H, G * w, D)  # query head h*G + g -> KV head h
    logits = q @ keys.transpose(2, 3) * D**-0.5  # (B, H, G*w, L)
    i = torch.arange(G * w, device=keys.device) % w  # window index of each row
    future = torch.arange(L, device=keys.device)[None, :] > (L - w + i)[:, None]  # (G*w, L)
    logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1)


@dataclass
class KVCompressScore:
    """KV-Compress's L2-sum: sum over the window queries and the query group of squared attention
    each key received (Rehg 2024, arXiv 2410.00161)."""

    needs_queries = True

    def score(self, keys, values, queries):
        return window_attention(keys, queries).square().sum(dim=2)


@dataclass
class SnapKVScore:
    """SnapKV: mean attention from the window queries, smoothed by 1-D average pooling over
    neighbouring tokens (Li 2024, arXiv 2404.14469)."""

    kernel: int = 7  # pooling width, odd
    needs_queries = True

    def score(self, keys, values, queries):
        attn = window_attention(keys, queries).mean(dim=2)  # (B, H, L)
        B, H, L = attn.shape
        pooled = F.avg_pool1d(attn.view(B * H, 1, L), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view(B, H, L)


@dataclass
class KeyNormScore:
    """Keys with a small L2 norm draw more attention, so keep them (Devoto 2024, arXiv 2406.11430)."""

    needs_queries = False

    def score(self, keys, values, queries):
        return -keys.norm(dim=-1)


@dataclass
class RecentScore:
    """StreamingLLM: keep the most recent tokens; the compressor already keeps the sink tokens
    (Xiao 2023, arXiv 2309.17453)."""

    needs_queries = False

    def score(self, keys, values, queries):
        B, H, L, _ = keys.shape
        return torch.arange(L, dtype=keys.dtype, device=keys.device).expand(B, H, L)


@dataclass
class RandomScore:
    """Uniform random scores: the control every method must beat."""

    seed: int = 0
    needs_queries = False

    def score(self, keys, values, queries):
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(keys.shape[:3], generator=g).to(keys.device)


@dataclass
class Pooled:
    """Any scorer's scores averaged over `kernel` neighbouring tokens (SnapKV's pooling): a kept token
    keeps its neighbours, so a multi-token fact (a 7-digit number) survives whole."""

    base: object = field(default_factory=KVCompressScore)
    kernel: int = 5  # odd; kvpress SnapKV's

    @property
    def needs_queries(self) -> bool:
        return getattr(self.base, "needs_queries", False)

    def score(self, keys, values, queries):
        s = self.base.score(keys, values, queries).float()  # (B, H, L)
        B, H, L = s.shape
        return F.avg_pool1d(s.view(B * H, 1, L), self.kernel, stride=1, padding=self.kernel // 2).view(B, H, L)


@dataclass
class RecencyMix:
    """(1 - weight) x the base score scaled to [0, 1] per head + weight x recency (0 oldest .. 1 newest):
    attention scores from a window that has not seen the question, leaning on what StreamingLLM keeps."""

    base: object = field(default_factory=KVCompressScore)
    weight: float = 0.5

    @property
    def needs_queries(self) -> bool:
        return getattr(self.base, "needs_queries", False)

    def score(self, keys, values, queries):
        s = self.base.score(keys, values, queries).float()  # (B, H, L)
        low, high = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
        scaled = (s - low) / (high - low).clamp_min(1e-12)
        L = s.shape[-1]
        recency = torch.arange(L, dtype=s.dtype, device=s.device) / max(L - 1, 1)
        return (1 - self.weight) * scaled + self.weight * recency


@dataclass
class KVzipScore:
    """KVzip-style re-reading (Kim 2025, arXiv 2505.23416): after a request to repeat the context
    (`repeat_prompt_ids`), the model re-reads it on a fork of the cache and each cached token scores the
    most attention any re-reading query gives it. Query-agnostic; about one more prefill of compute.
    Its scores are attention maxima, comparable across heads, hence one global top-k (notebook 02)."""

    chunk_tokens: int = 1024  # context tokens one re-reading pass takes (one-pass prefill)
    rereads = True  # scored by running the model (kvzip_scores / last_chunk_scores), not by `score`
    needs_queries = False


def rereads(scorer) -> bool:
    """Whether `scorer` is scored by re-reading with the model (KVzipScore) rather than from the cache."""
    return bool(getattr(scorer, "rereads", False))


SCORERS = {
    "kvzip": KVzipScore,  # the default of InferenceKVCacheCompression (KVZIP_SCORER)
    "kvcompress": KVCompressScore,
    "snapkv": SnapKVScore,
    "knorm": KeyNormScore,
    "streaming": RecentScore,
    "random": RandomScore,
    "kvcompress_pooled": lambda: Pooled(KVCompressScore(), 5),
    "kvcompress_recency": lambda: RecencyMix(KVCompressScore(), 0.5),
}


def get_scorer(name: str):
    """A scorer by name (one of SCORERS)."""
    if name not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {name!r}")
    return SCORERS[name]()
