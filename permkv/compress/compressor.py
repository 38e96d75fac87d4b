"""Apply (scorer, allocator, ratio) to a PagedCache and give the evicted blocks back to its pool.

Per sequence: every full-attention (layer, KV head) is scored, the sink tokens and the last
`window` tokens are protected, the allocator splits the remaining budget among heads, and
`PagedCache.evict` compacts each head into the fewest blocks. The budget is round(cached / ratio)
tokens over all those heads, protected tokens included, so the cache's allocated bytes drop to
about 1/ratio (each head rounds up to a whole block). Sliding-window layers (Gemma-3) are left
whole: they are bounded by their window and the cache cannot evict from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from permkv.cache import PagedCache
from permkv.compress.allocators import ALLOCATORS, GlobalAdaptiveAllocator
from permkv.compress.scorers import KVCompressScore, get_scorer


@dataclass
class CompressionReport:
    """What one compression did, measured on the cache (bytes are allocated blocks x block bytes)."""

    target_ratio: float
    original_bytes: int
    compressed_bytes: int
    kept: list[list[int]]  # [layer][kv_head] tokens kept (sequence 0; whole layer for sliding ones)
    per_head_rates: list[list[float]]  # [layer][kv_head] tokens before / tokens after (sequence 0)

    @property
    def achieved_ratio(self) -> float:
        return self.original_bytes / self.compressed_bytes if self.compressed_bytes else math.inf

    @property
    def bytes_freed(self) -> int:
        return self.original_bytes - self.compressed_bytes

    def as_dict(self) -> dict:
        return dict(target_ratio=self.target_ratio, original_bytes=self.original_bytes,
                    compressed_bytes=self.compressed_bytes, achieved_ratio=self.achieved_ratio,
                    bytes_freed=self.bytes_freed, kept=self.kept, per_head_rates=self.per_head_rates)


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"ratio must be a finite number >= 1 (8 = 8x smaller), got {ratio!r}")
    return float(ratio)


def protected_indices(n: int, sinks: int, window: int) -> torch.Tensor:
    """Indices of the first `sinks` and last `window` of n cached tokens, sorted, no repeats."""
    return torch.cat([torch.arange(min(sinks, n)), torch.arange(max(n - window, 0), n)]).unique(sorted=True)


@dataclass
class Compressor:
    """Evicts per (layer, KV head) from a PagedCache so that it holds about 1/ratio of its tokens."""

    scorer: object = field(default_factory=KVCompressScore)
    allocator: object = field(default_factory=GlobalAdaptiveAllocator)
    sinks: int = 4  # first tokens never evicted (attention sinks, StreamingLLM)
    window: int = 32  # last tokens never evicted (KV-Compress's protected_window_size)

    def compress(self, cache: PagedCache, ratio: float, queries: dict[int, torch.Tensor] | None = None) -> CompressionReport:
        """Compress every sequence of `cache`; `queries[layer]` `(batch, q_heads, w, head_dim)` are the
        last queries of each layer (from `permkv.compress.observing`), needed by attention scorers.

        If the budget is smaller than the protected tokens, each head keeps its sinks and then its
        most recent tokens, up to an equal share of the budget.
        """
        ratio = check_ratio(ratio)
        if getattr(self.scorer, "needs_queries", False) and not queries:
            raise ValueError(f"{type(self.scorer).__name__} needs queries: prefill inside `permkv.compress.observing(model)`")
        if cache.num_sequences == 0:
            raise ValueError("cache holds no sequence: prefill it before compressing")
        before_bytes = cache.stats().allocated_bytes
        before = [self._compress_sequence(cache, seq, ratio, queries) for seq in range(cache.num_sequences)]
        after = cache.stats().lengths[0]
        rates = [[b / max(a, 1) for b, a in zip(rb, ra)] for rb, ra in zip(before[0], after)]
        return CompressionReport(ratio, before_bytes, cache.stats().allocated_bytes, after, rates)

    @torch.no_grad()
    def _compress_sequence(self, cache: PagedCache, seq: int, ratio: float, queries) -> list[list[int]]:
        """Compress one sequence; returns its token counts `[layer][kv_head]` before."""
        layers = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
        n_heads = cache.n_kv_heads
        lengths = torch.tensor([[cache.cached_tokens(seq, i, h) for h in range(n_heads)] for i in range(len(cache.layers))])
        sub = lengths[layers]  # (n_layers, kv_heads)
        total = round(int(sub.sum()) / ratio)
        if total < sub.numel():
            raise ValueError(
                f"ratio {ratio} leaves {total} tokens for {sub.numel()} (layer, head) pairs of "
                f"{int(sub.min())}-{int(sub.max())} tokens: at least one token per head is needed"
            )
        quota = total // sub.numel()
        L = int(sub.max())
        scores = torch.full((len(layers), n_heads, L), float("-inf"))
        protected: list[list[torch.Tensor]] = []
        for row, i in enumerate(layers):
            keys, values, _, _ = cache.gather(i)  # (batch, kv_heads, longest, head_dim), padded
            q = queries[i][seq : seq + 1] if queries else None  # (1, q_heads, w, head_dim)
            group = q.shape[1] // n_heads if q is not None else 0
            prot_row = []
            for h in range(n_heads):  # one head at a time: after an earlier eviction lengths differ
                nh = int(sub[row, h])
                k, v = keys[seq : seq + 1, h : h + 1, :nh], values[seq : seq + 1, h : h + 1, :nh]
                qh = q[:, h * group : (h + 1) * group] if q is not None else None
                s = self.scorer.score(k, v, qh)[0, 0].float()  # (nh,)
                prot = protected_indices(nh, self.sinks, self.window)
                if prot.numel() > quota:  # budget below the protected set: sinks, then most recent
                    prot = protected_indices(nh, min(self.sinks, quota), quota - min(self.sinks, quota))
                s[prot] = float("-inf")
                scores[row, h, :nh] = s
                prot_row.append(prot)
            protected.append(prot_row)
        budget = total - sum(p.numel() for row in protected for p in row)
        counts = self.allocator.allocate(scores, max(budget, 0))  # (n_layers, kv_heads)
        for row, i in enumerate(layers):
            for h in range(n_heads):
                chosen = scores[row, h].topk(int(counts[row, h])).indices
                cache.evict(seq, i, h, torch.cat([protected[row][h], chosen]))
        return lengths.tolist()


@dataclass
class InferenceKVCacheCompression:
    """The one-call API: `InferenceKVCacheCompression().compress_auto(cache, 8, queries)`.

    Defaults are KV-Compress's: L2-sum attention score, one global top-k over layers and heads,
    4 sinks and a 32-token protected window. Quality is not estimated here: only an evaluation
    (`permkv.compress.answer`) measures it.
    """

    scorer: str = "kvcompress"  # one of permkv.compress.scorers.SCORERS
    allocator: str = "global"  # "uniform", "layer" or "global"
    min_share: float = 0.2  # adaptive allocators: each head's floor, as a fraction of an equal share
    sinks: int = 4
    window: int = 32
    observe: int = 8  # queries that score the cache: the last `observe` positions (KV-Compress: 8)

    def compressor(self) -> Compressor:
        for name in ("sinks", "window", "observe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "observe" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'observe' else 0}, got {value!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {sorted(ALLOCATORS)}, got {self.allocator!r}")
        return Compressor(get_scorer(self.scorer), ALLOCATORS[self.allocator](self.min_share), self.sinks, self.window)

    def compress_auto(self, cache: PagedCache, target_ratio: float, queries: dict | None = None) -> CompressionReport:
        """Compress `cache` to about 1/target_ratio of its bytes; returns the measured report."""
        return self.compressor().compress(cache, target_ratio, queries)
