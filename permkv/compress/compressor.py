"""Apply (scorer, allocator, ratio) to a PagedCache and give the evicted blocks back to its pool.

`ratio` means one thing everywhere: tokens the uncompressed cache would hold / tokens kept, where the
uncompressed cache holds every token the sequence has seen (`cache.seen[seq]`). Per sequence, every
full-attention (layer, KV head) is scored, the sink tokens and the last `window` tokens are
protected, the allocator splits the remaining budget among heads, and `PagedCache.evict` compacts
each head into the fewest blocks. The budget is round(seen * heads / ratio) tokens over all those
heads, protected tokens included, so the cache's allocated bytes drop to about 1/ratio of the
uncompressed cache's (each head rounds up to a whole block). Compressing an already compressed cache
(chunked prefill) again targets seen / ratio. Sliding-window layers (Gemma-3) are left whole: they
are bounded by their window and the cache cannot evict from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from permkv.cache import PagedCache
from permkv.checks import check_ratio, positive_int
from permkv.compress.allocators import ALLOCATORS, UniformAllocator
from permkv.compress.estimate import KVZIP_SCORER, MeasuredQuality, QualityEstimate
from permkv.compress.kvzip import repeat_prompt_ids
from permkv.compress.scorers import KVCompressScore, get_scorer, rereads


@dataclass
class CompressionReport:
    """What one compression did, measured on the cache (bytes are allocated blocks x block bytes)."""

    ratio: float  # the ratio asked for: tokens seen / tokens kept
    original_bytes: int  # what the uncompressed cache of the tokens seen takes (sliding layers: their window)
    compressed_bytes: int  # blocks the cache holds now
    kept: list[list[int]]  # [layer][kv_head] tokens kept (sequence 0; whole window for sliding layers)
    per_head_ratios: list[list[float]]  # [layer][kv_head] tokens seen / tokens kept (sequence 0)
    quality: QualityEstimate | None = None  # retention measured by notebook 02 for this setting, or None
    # full-attention layer -> per KV head, the sorted indices (into what it held before) it kept; sequence 0
    kept_indices: dict[int, list[torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def achieved_ratio(self) -> float:
        """original_bytes / compressed_bytes: the ratio in memory (heads round up to whole blocks)."""
        return self.original_bytes / self.compressed_bytes if self.compressed_bytes else math.inf

    @property
    def bytes_freed(self) -> int:
        return self.original_bytes - self.compressed_bytes

    def as_dict(self) -> dict:
        return dict(ratio=self.ratio, original_bytes=self.original_bytes, compressed_bytes=self.compressed_bytes,
                    achieved_ratio=self.achieved_ratio, bytes_freed=self.bytes_freed, kept=self.kept,
                    per_head_ratios=self.per_head_ratios, quality=self.quality)


def protected_indices(n: int, sinks: int, window: int) -> torch.Tensor:
    """Indices of the first `sinks` and last `window` of n cached tokens, sorted, no repeats."""
    return torch.cat([torch.arange(min(sinks, n)), torch.arange(max(n - window, 0), n)]).unique(sorted=True)


def report_of(cache: PagedCache, ratio: float) -> CompressionReport:
    """The report of `cache` as it is now, against the uncompressed cache of the tokens it has seen."""
    stats = cache.stats()
    original = sum(cache.blocks_needed(n) for n in cache.seen) * cache.pool.bytes_per_block
    kept = stats.lengths[0] if stats.lengths else []
    seen = cache.seen[0] if cache.seen else 0
    ratios = [[min(seen, layer.keep_limit() or seen) / max(k, 1) for k in row] for layer, row in zip(cache.layers, kept)]
    return CompressionReport(ratio, original, stats.allocated_bytes, kept, ratios)


@dataclass
class Compressor:
    """Evicts per (layer, KV head) from a PagedCache so that it holds about seen / ratio tokens."""

    scorer: object = field(default_factory=KVCompressScore)
    allocator: object = field(default_factory=UniformAllocator)
    sinks: int = 4  # first tokens never evicted (attention sinks, StreamingLLM)
    window: int = 32  # last tokens never evicted (KV-Compress's protected_window_size)
    observe: int = 64  # attention scorers read the last `observe` recorded queries (measured in notebook 02)

    def compress(self, cache: PagedCache, ratio: float, queries: dict[int, torch.Tensor] | None = None,
                 scores: dict[int, torch.Tensor] | None = None, keep: dict[int, list[int]] | None = None
                 ) -> CompressionReport:
        """Compress every sequence of `cache` to seen / ratio tokens; `queries[layer]`
        `(batch, q_heads, w, head_dim)` are the last queries of each layer (from
        `permkv.compress.observing`, w >= 1; the last `observe` are used), needed by attention scorers.
        `scores[layer]` `(batch, kv_heads, cached)`, if given, replace the scorer (e.g. `kvzip_scores`).
        `keep[layer][head]`: that head's oldest cached tokens always stay, besides the sinks and the window
        (a context compressed before, whose generated tokens are compressed now); the rest of the budget
        goes to the other tokens, and nothing kept is evicted even when that holds more than seen / ratio.

        If the budget is smaller than the protected tokens, each head keeps its sinks and then its
        most recent tokens, up to an equal share of the budget.
        """
        ratio = check_ratio(ratio)
        if scores is None and rereads(self.scorer) and ratio > 1:
            raise ValueError(f"{type(self.scorer).__name__} scores by re-reading the context with the model: pass its "
                             "scores= (permkv.compress.kvzip_scores / last_chunk_scores), or use prefill_and_compress")
        if scores is None and getattr(self.scorer, "needs_queries", False) and not queries:
            raise ValueError(f"{type(self.scorer).__name__} needs queries: prefill inside `permkv.compress.observing(model)`")
        if cache.num_sequences == 0:
            raise ValueError("cache holds no sequence: prefill it before compressing")
        if keep is not None and cache.num_sequences != 1:
            raise ValueError(f"keep is for a one-sequence cache, got {cache.num_sequences} sequences")
        kept = [self._compress_sequence(cache, seq, ratio, queries, scores, keep) for seq in range(cache.num_sequences)]
        report = report_of(cache, ratio)
        report.kept_indices = kept[0]
        return report

    @torch.no_grad()
    def _compress_sequence(self, cache: PagedCache, seq: int, ratio: float, queries, given, keep
                           ) -> dict[int, list[torch.Tensor]]:
        """Evict from sequence `seq`; returns each full-attention layer's kept indices per head."""
        layers = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
        n_heads = cache.n_kv_heads
        sub = torch.tensor([[cache.cached_tokens(seq, i, h) for h in range(n_heads)] for i in layers])  # (n_layers, kv_heads)
        total = round(cache.seen[seq] * sub.numel() / ratio)
        if total < sub.numel():
            raise ValueError(
                f"ratio {ratio} leaves {total} tokens for {sub.numel()} (layer, head) pairs of "
                f"{cache.seen[seq]} tokens seen: at least one token per head is needed"
            )
        if int(sub.sum()) <= total:  # already at or below seen / ratio
            return {i: [torch.arange(int(n)) for n in sub[row]] for row, i in enumerate(layers)}
        quota = total // sub.numel()
        scores = torch.full((len(layers), n_heads, int(sub.max())), float("-inf"))
        protected: list[list[torch.Tensor]] = []
        for row, i in enumerate(layers):
            keys, values, _, _ = cache.gather(i)  # (batch, kv_heads, longest, head_dim), padded
            q = queries[i][seq : seq + 1, :, -self.observe :] if queries else None  # (1, q_heads, w, head_dim)
            group = q.shape[1] // n_heads if q is not None else 0
            prot_row = []
            for h in range(n_heads):  # one head at a time: after an earlier eviction lengths differ
                nh = int(sub[row, h])
                k, v = keys[seq : seq + 1, h : h + 1, :nh], values[seq : seq + 1, h : h + 1, :nh]
                qh = q[:, h * group : (h + 1) * group] if q is not None else None
                s = (given[i][seq, h, :nh] if given is not None else self.scorer.score(k, v, qh)[0, 0]).float().clone()  # (nh,)
                prot = protected_indices(nh, self.sinks, self.window)
                if keep is not None:
                    prot = torch.cat([torch.arange(min(keep[i][h], nh)), prot]).unique(sorted=True)
                elif prot.numel() > quota:  # budget below the protected set: sinks, then most recent
                    prot = protected_indices(nh, min(self.sinks, quota), quota - min(self.sinks, quota))
                s[prot] = float("-inf")
                scores[row, h, :nh] = s
                prot_row.append(prot)
            protected.append(prot_row)
        budget = total - sum(p.numel() for row in protected for p in row)
        counts = self.allocator.allocate(scores, max(budget, 0))  # (n_layers, kv_heads)
        kept = {}
        for row, i in enumerate(layers):
            kept[i] = []
            for h in range(n_heads):
                chosen = scores[row, h].topk(int(counts[row, h])).indices
                keep = torch.cat([protected[row][h], chosen]).unique(sorted=True)
                cache.evict(seq, i, h, keep)
                kept[i].append(keep)
        return kept


BEST_ALLOCATOR = {KVZIP_SCORER: "global"}  # per scorer, the allocator notebook 02 measured best; else uniform


@dataclass
class InferenceKVCacheCompression:
    """The one-call API: `prefill_and_compress(model, ids, 8, tokenizer=tok)` (or `compress_auto` on a
    prefilled cache). The defaults are what notebook 02 measured best on needles in both modes (SmolLM2,
    4K, n = 30: 0.93 retention at 8x query-aware, 0.83 query-agnostic): KVzip-style re-reading
    (`scorer="kvzip"`) with one global top-k over all heads, 4 sinks and a 32-token protected window.
    The cheap attention scorers are one argument away, e.g. `scorer="kvcompress"` or `"snapkv"` (the last
    `observe` queries score the cache; with their best measured allocator, the same budget per head).
    """

    scorer: str = KVZIP_SCORER  # one of permkv.compress.scorers.SCORERS
    allocator: str | None = None  # one of permkv.compress.allocators.ALLOCATORS; None: the scorer's best (BEST_ALLOCATOR)
    min_share: float = 0.2  # adaptive allocators: each head's floor, as a fraction of an equal share
    sinks: int = 4
    window: int = 32
    observe: int = 64  # attention scorers read the last `observe` queries (KV-Compress used 8); unused by "kvzip"
    quality: MeasuredQuality | None = None  # QualityTable.load(path).measured(model, mode): reports carry it

    @property
    def rereads(self) -> bool:
        """Whether the scorer re-reads the context with the model (needs the model and `reread_ids`)
        instead of scoring the cache from observed queries (see the package docstring)."""
        return rereads(get_scorer(self.scorer))

    @property
    def allocator_in_use(self) -> str:
        return self.allocator if self.allocator is not None else BEST_ALLOCATOR.get(self.scorer, "uniform")

    def setting(self) -> tuple[str, str, int]:
        """(scorer, allocator, observe): how notebook 02's quality table keys this compression (observe 0
        for re-reading, which observes no queries)."""
        return self.scorer, self.allocator_in_use, 0 if self.rereads else self.observe

    def reread_ids(self, tokenizer=None, reread: Sequence[int] | None = None) -> list[int] | None:
        """The re-reading prompt of a re-reading scorer: `reread` if given, else KVzip's request built from
        `tokenizer` (`repeat_prompt_ids`); None for attention scorers, which must not be given one."""
        if not self.rereads:
            if reread is not None:
                raise ValueError(f"reread is the re-reading prompt of scorer {KVZIP_SCORER!r}; scorer is {self.scorer!r}")
            return None
        if reread is not None:
            return list(reread)
        if tokenizer is None:
            raise ValueError(f"scorer {self.scorer!r} (the default) re-reads the context: pass tokenizer= (its "
                             "re-reading prompt is built from it) or reread= ids, or choose an attention scorer, "
                             "e.g. InferenceKVCacheCompression(scorer='kvcompress')")
        return repeat_prompt_ids(tokenizer)

    def compressor(self) -> Compressor:
        for name in ("sinks", "window", "observe"):
            positive_int(name, getattr(self, name), 1 if name == "observe" else 0)
        if self.allocator_in_use not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {sorted(ALLOCATORS)}, got {self.allocator!r}")
        return Compressor(get_scorer(self.scorer), ALLOCATORS[self.allocator_in_use](self.min_share), self.sinks,
                          self.window, self.observe)

    def estimate(self, ratio: float) -> QualityEstimate | None:
        """Retention notebook 02 measured for this setting at `ratio` (from `quality`), or None."""
        return None if self.quality is None else self.quality.estimate(check_ratio(ratio), *self.setting())

    def ratio_for(self, quality_floor: float) -> float | None:
        """The largest measured ratio whose retention CI's lower end is >= `quality_floor`, or None."""
        if self.quality is None:
            raise ValueError("ratio_for needs quality= (QualityTable.load(path).measured(model, mode))")
        return self.quality.ratio_for(quality_floor, *self.setting())

    def compress_auto(self, cache: PagedCache, ratio: float | None = None, queries: dict | None = None,
                      quality_floor: float | None = None, scores: dict | None = None) -> CompressionReport:
        """Compress `cache` to about seen / ratio tokens; returns the measured report, whose `quality` is
        the retention measured for this setting (None where nothing was measured or loaded). Attention
        scorers read `queries`; a re-reading scorer needs its `scores` (prefill_and_compress computes them).

        Give `quality_floor` instead of `ratio` to pick the largest measured ratio that kept at least
        that retention (CI lower end); ValueError if none did.
        """
        if (ratio is None) == (quality_floor is None):
            raise ValueError(f"give exactly one of ratio and quality_floor, got ratio={ratio!r}, quality_floor={quality_floor!r}")
        if ratio is None:
            ratio = self.ratio_for(quality_floor)
            if ratio is None:
                raise ValueError(f"no measured ratio keeps retention >= {quality_floor} for {self.quality.model} "
                                 f"{self.quality.mode} {self.setting()} in {self.quality.source}")
        report = self.compressor().compress(cache, ratio, queries, scores)
        report.quality = self.estimate(ratio)
        return report
