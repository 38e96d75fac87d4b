"""One prefix read once, compressed many ways: copy-on-write forks of one uncompressed paged sequence.

    pre = prefill_shared(model, prefix, suffix, max_new_tokens=32)
    text, report = pre.answer(model, tok, 32, lambda fork: compression.compress(fork, 8, pre.queries))
    longer = pre.extend(model, question_ids, suffix)  # read more on top of it: a second prefill chunk
    longer.release()

`Prefilled.answer` compresses a fork of the sequence (any `compress(fork) -> report`), feeds the suffix,
decodes greedily on it and gives the fork's blocks back, so every method and ratio starts from the same
uncompressed keys and values without a second prefill. `extend` reads a longer prefix on the same cache
(the query-aware prefix after the query-agnostic one: the context is read once for both).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from permkv.cache import PagedCache, forward, paged_attention
from permkv.checks import positive_int
from permkv.compress.compressor import CompressionReport
from permkv.compress.forks import fork_sequence, paged_cache_for
from permkv.compress.kvzip import kvzip_scores
from permkv.compress.observe import LayerInputs, QueryRecorder, capture_inputs, observing
from permkv.eval import greedy_decode, stop_ids


@dataclass
class Prefilled:
    """One prefix read once. `cache` holds it uncompressed in sequence 0 (methods compress forks; only
    `extend` reads more into it), `queries[layer]` `(1, q_heads, w, head_dim)` are the last w <= `observe`
    queries, `inputs` the attention layers' inputs (empty unless `prefill_shared(keep_inputs=True)`)."""

    prefix: list[int]
    suffix: list[int]
    cache: PagedCache
    logits: torch.Tensor  # (vocab,) at the last prefix position
    queries: dict[int, torch.Tensor]
    inputs: dict[int, LayerInputs]
    observe: int = 64
    repeat_prompt: list[int] = field(default_factory=list)  # KVzip's request to repeat the context
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key: str, make: Callable[[], object]):
        """`make()` computed once per prefix and kept until `extend` or `release` (scores, gathered keys)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def kvzip(self, model, prompt: list[int], chunk_tokens: int) -> dict[int, torch.Tensor]:
        """KVzip-style scores of the prefix (computed once, on forks of the cache)."""
        return self.memo("kvzip", lambda: kvzip_scores(model, self.cache, self.prefix, prompt, chunk_tokens))

    def keys_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's uncompressed keys, values `(1, kv_heads, len(prefix), head_dim)` (gathered once)."""
        n = len(self.prefix)
        return self.memo("keys_values", lambda: [(k[:, :, :n], v[:, :, :n]) for k, v, _, _ in
                                                 (self.cache.gather(i) for i in range(len(self.cache.layers)))])

    def answer(self, model, tokenizer, max_new_tokens: int,
               compress: Callable[[PagedCache], CompressionReport | None]) -> tuple[str, CompressionReport | None]:
        """Compress a copy-on-write fork of the prefilled sequence with `compress(fork) -> report`, feed
        the suffix and decode greedily on it (the one loop), then release the fork."""
        fork = fork_sequence(self.cache, model.config)
        try:
            report = compress(fork)
            with paged_attention(model):
                out = greedy_decode(model, fork, self.logits, start=len(self.prefix), max_new_tokens=max_new_tokens,
                                    stop=stop_ids(model, tokenizer), suffix=self.suffix)
        finally:
            fork.reset()
        return tokenizer.decode(out, skip_special_tokens=True), report

    @torch.no_grad()
    def extend(self, model, ids: list[int], suffix: list[int]) -> "Prefilled":
        """The prefix read further by `ids` on the same cache (a second prefill chunk): the query-aware
        prefix after the query-agnostic one, without reading the context twice. Queries and inputs
        continue this prefix's (the same as one prefill of the longer prefix, up to rounding). This
        object's memos are dropped; its cache now belongs to the returned one."""
        positive_int("len(ids)", len(ids))
        self._memo.clear()
        n = len(self.prefix)
        positions = torch.arange(n, n + len(ids), device=model.device)[None]
        with observing(model, window=self.observe) as recorder, _inputs(model, bool(self.inputs)) as inputs:
            logits = forward(model, self.cache, torch.tensor([ids], device=model.device), positions)[0, -1]
        continued = QueryRecorder(self.observe, dict(self.queries))  # this prefix's last queries, then the new ones
        for i, query in recorder.queries.items():
            continued.record(i, query)
        joined = {i: old.followed_by(inputs[i]) for i, old in self.inputs.items()}
        return Prefilled(self.prefix + list(ids), suffix, self.cache, logits, continued.queries, joined,
                         self.observe, self.repeat_prompt)

    def release(self) -> None:
        """Give the cache's blocks back and drop the memos."""
        self.cache.reset()
        self._memo.clear()


@torch.no_grad()
def prefill_shared(model, prefix: list[int], suffix: list[int], max_new_tokens: int, observe: int = 64,
                   keep_inputs: bool = False) -> Prefilled:
    """Prefill `prefix` into a PagedCache whose pool also has room for one compressed fork and its
    decode (of any longer prefix of `prefix + suffix`: `extend`), recording the last `observe` queries
    and, if `keep_inputs`, every attention layer's inputs (for post hoc compressors such as kvpress's)."""
    cache = paged_cache_for(model, 2 * (len(prefix) + len(suffix)) + max_new_tokens + 64)
    with observing(model, window=observe) as recorder, _inputs(model, keep_inputs) as inputs:
        logits = forward(model, cache, torch.tensor([prefix], device=model.device))[0, -1]
    return Prefilled(prefix, suffix, cache, logits, recorder.queries, inputs, observe)


def _inputs(model, keep: bool):
    """`capture_inputs(model)` if `keep`, else a block that captures nothing."""
    return capture_inputs(model) if keep else nullcontext({})
