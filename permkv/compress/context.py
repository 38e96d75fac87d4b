"""Compress once, ask many: a context read and compressed query-agnostically once, that any number of
later requests fork copy-on-write (a question, a pipeline module, another user), never re-reading it.

    ctx = ContextCache.build(model, context_ids, ratio=8, reread=repeat_prompt_ids(tok, spec))
    fork = ctx.fork()                                   # a one-sequence PagedCache sharing every block
    with paged_attention(model):
        logits = forward(model, fork, torch.tensor([question_ids]))[0, -1]   # positions continue at ctx.seen
        answer = greedy_decode(model, fork, logits, start=ctx.seen + len(question_ids), ...)
    fork.reset(); ctx.release()                         # the pool counts references: blocks go back last

KVzip's argument for query-agnostic scores is exactly this reuse. The context is scored by KVzip-style
re-reading with one global top-k (the best query-agnostic method notebook 02 measured), in one pass, or
chunk by chunk (`chunk_tokens`) for a context larger than the pool can hold uncompressed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from permkv.cache import PagedCache, forward, paged_attention
from permkv.compress.compressor import InferenceKVCacheCompression, check_ratio
from permkv.compress.forks import fork_sequence, paged_cache_for
from permkv.compress.prefill import chunked_prefill_and_compress, prefill_and_compress


@dataclass(frozen=True)
class ContextReport:
    """What a compressed context holds: tokens read and kept (per full-attention KV head, mean), bytes."""

    tokens: int
    kept: float
    bytes: int  # blocks it holds
    original_bytes: int  # what the uncompressed cache of the tokens would take

    @property
    def achieved_ratio(self) -> float:
        """Tokens read / tokens kept per head."""
        return self.tokens / self.kept if self.kept else math.inf

    def as_dict(self) -> dict:
        return dict(tokens=self.tokens, kept_tokens=self.kept, bytes=self.bytes, original_bytes=self.original_bytes,
                    achieved_ratio=self.achieved_ratio)


def context_report(cache: PagedCache, seq: int = 0) -> ContextReport:
    """The report of sequence `seq` of `cache` as it is now."""
    full = [t.length for layer in cache.layers if not layer.is_sliding for t in layer.tables[seq]]
    blocks = {b for layer in cache.layers for t in layer.tables[seq] for b in t.blocks}
    return ContextReport(cache.seen[seq], sum(full) / len(full) if full else float(cache.seen[seq]),
                         len(blocks) * cache.pool.bytes_per_block, cache.blocks_needed(cache.seen[seq]) * cache.pool.bytes_per_block)


class ContextCache:
    """A compressed context on a `BlockPool` that requests fork (see the module docstring).

    `logits` `(vocab,)`: the next-token logits after the context (what a request with no tokens of its
    own would start from). Forks and the context each hold references to the shared blocks.
    """

    def __init__(self, cache: PagedCache, ids: Sequence[int], logits: torch.Tensor, ratio: float):
        if cache.num_sequences != 1:
            raise ValueError(f"a context is one sequence, got {cache.num_sequences}")
        self.cache = cache
        self.ids = list(ids)
        self.logits = logits
        self.ratio = ratio
        self.report = context_report(cache)

    @classmethod
    @torch.no_grad()
    def build(cls, model, ids: Sequence[int], ratio: float, reread: Sequence[int], cache: PagedCache | None = None,
              compression: InferenceKVCacheCompression | None = None, chunk_tokens: int | None = None,
              extra_tokens: int = 1024) -> "ContextCache":
        """Read `ids` once and compress them to 1/ratio by KVzip-style re-reading (`reread`: the repeat
        prompt, `permkv.compress.repeat_prompt_ids`) with one global top-k. `cache`: an empty cache on the
        pool the forks will share (default: a new pool with `extra_tokens` per head of room for them).
        `chunk_tokens`: read and compress that many tokens at a time (a context the pool cannot hold
        uncompressed; each chunk then keeps its share). Raises CacheFull when the pool is short."""
        ratio = check_ratio(ratio)
        if not ids:
            raise ValueError("a context must hold at least one token")
        compression = compression or InferenceKVCacheCompression(allocator="global")
        if cache is None:
            cache = paged_cache_for(model, len(ids) + len(reread) + min(len(ids), 1024) + 16 + extra_tokens)
        if ratio == 1:  # kept whole: a prefix cache
            cache.ensure_batch(1)
            with paged_attention(model):
                logits = forward(model, cache, torch.tensor([list(ids)], device=model.device))[0, -1]
        elif chunk_tokens is not None and chunk_tokens < len(ids):
            cache, logits, _ = chunked_prefill_and_compress(model, list(ids), ratio, compression, chunk_tokens,
                                                            cache=cache, reread=reread)
        else:
            cache, logits, _ = prefill_and_compress(model, list(ids), ratio, compression, cache=cache, reread=reread)
        return cls(cache, ids, logits, ratio)

    @property
    def seen(self) -> int:
        """Positions the context takes: a fork's own tokens start here."""
        return self.cache.seen[0]

    def fork(self) -> PagedCache:
        """A new one-sequence PagedCache on the same pool sharing all of the context's blocks; appending
        to it or evicting from it never changes the context; `fork.reset()` gives its references back."""
        if self.cache.num_sequences == 0:
            raise ValueError("this context was released")
        return fork_sequence(self.cache, self.cache.config)

    @property
    def released(self) -> bool:
        return self.cache.num_sequences == 0

    def release(self) -> None:
        """Give the context's own references back (blocks still shared by forks stay until those go)."""
        self.cache.reset()
