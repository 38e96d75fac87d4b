"""Greedy decoding under a KV budget: a reasoning trace compressed while it is written (R-KV style).

The input is held in full (it is the sinks of the compressor); the trace may use `budget` more
tokens per (layer, KV head). With ratio 1 the trace stops when the budget is full (truncated).
With ratio r > 1 it may run to r * budget tokens: whenever a head holds input + budget tokens, every
head is scored and evicted down to input + budget - buffer (so compression runs once every
`buffer` generated tokens, as R-KV's 128-token buffer), keeping the last `window` tokens. The pool
is sized for input + budget tokens per head, so the budget is a hard limit: a bug would raise
`CacheFull`, not use more memory. Positions stay explicit: the cache holds fewer tokens than seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from permkv.cache import BlockPool, PagedCache
from permkv.checks import check_ratio, positive_int
from permkv.compress import Compressor, UniformAllocator, observing
from permkv.eval import greedy_decode, prefill
from permkv.models import kv_layout
from permkv.rvs.scorers import RKVScore


@dataclass
class TraceStats:
    """What one budgeted generation did, counted on the cache."""

    input_tokens: int
    budget: int  # trace tokens a head may hold
    generated: int = 0  # tokens generated (the trace)
    max_held: int = 0  # most tokens any (layer, KV head) held at once, input included
    compressions: int = 0  # times the cache was scored and evicted
    evicted: int = 0  # tokens evicted per head, summed over compressions
    truncated: bool = False  # stopped by the token limit, not by a stop token
    seconds: float = 0.0


def held_tokens(cache: PagedCache, seq: int = 0) -> int:
    """Most tokens any full-attention (layer, KV head) of `seq` holds now."""
    return max(cache.cached_tokens(seq, i, h) for i, layer in enumerate(cache.layers) if not layer.is_sliding
               for h in range(cache.n_kv_heads))


@dataclass
class BudgetedDecoder:
    """`generate(ids, stop)`: greedy trace of up to ratio * budget tokens in input + budget tokens of KV."""

    model: object
    budget: int  # trace tokens each (layer, KV head) may hold
    ratio: float = 1.0  # tokens reasoned / tokens held: 1 truncates at the budget
    buffer: int = 128  # generated tokens between two compressions (R-KV: 128)
    window: int = 8  # most recent tokens never evicted (R-KV keeps its 8 observation tokens)
    observe: int = 8  # queries that score the cache (R-KV: 8)
    scorer: object = field(default_factory=RKVScore)  # any permkv.compress scorer
    block_size: int = 16

    def __post_init__(self):
        for name in ("budget", "buffer", "window", "observe", "block_size"):
            positive_int(name, getattr(self, name))
        check_ratio(self.ratio)
        if self.ratio > 1 and self.window + self.buffer > self.budget:
            raise ValueError(f"window + buffer must be <= budget, got {self.window} + {self.buffer} > {self.budget}")

    @property
    def max_new_tokens(self) -> int:
        """Trace tokens allowed: ratio x budget (the last token is never written to the cache)."""
        return int(self.ratio * self.budget)

    def new_cache(self, n_input: int) -> PagedCache:
        """A cache whose pool holds exactly n_input + budget tokens per (layer, KV head)."""
        layout = kv_layout(self.model.config)
        per_head = -(-(n_input + self.budget) // self.block_size)
        pool = BlockPool(layout.n_layers * layout.n_kv_heads * per_head, self.block_size, layout.head_dim,
                         self.model.dtype, self.model.device)
        return PagedCache(pool, self.model.config)

    def generate(self, ids: Sequence[int], stop: set[int],
                 on_step: Callable[[PagedCache, int], None] | None = None) -> tuple[list[int], TraceStats]:
        """Greedy trace after the prompt `ids`; returns (new token ids, stats).

        `on_step(cache, position)` runs after each token is written and any compression done (tests
        check the budget there).
        """
        if not ids:
            raise ValueError("ids must hold at least one token")
        t0 = time.perf_counter()
        n = len(ids)
        cap = n + self.budget
        stats = TraceStats(n, self.budget)
        cache = self.new_cache(n)
        compressor = Compressor(self.scorer, UniformAllocator(), sinks=n, window=self.window)
        with observing(self.model, window=self.observe) as recorder:

            def after_step(cache: PagedCache, position: int) -> None:
                held = held_tokens(cache)
                stats.max_held = max(stats.max_held, held)
                if held >= cap and self.ratio > 1:
                    target = cap - self.buffer
                    # ratio = tokens seen / tokens kept (what the compressor measures against)
                    compressor.compress(cache, cache.seen[0] / target, recorder.queries)
                    stats.compressions += 1
                    stats.evicted += held - held_tokens(cache)
                if on_step is not None:
                    on_step(cache, position)

            cache, logits = prefill(self.model, list(ids), cache)
            stats.max_held = held_tokens(cache)
            out = greedy_decode(self.model, cache, logits, start=n, max_new_tokens=self.max_new_tokens,
                                stop=stop, after_step=after_step)
        stats.generated = len(out)
        stats.truncated = len(out) == self.max_new_tokens
        stats.seconds = time.perf_counter() - t0
        cache.reset()
        return out, stats
