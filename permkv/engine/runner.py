"""The model side: chunked prefill with compression, one batched decode forward, compression of a sequence.

Positions are explicit everywhere: a compressed cache holds fewer tokens than it has seen.
"""

from __future__ import annotations

import math

import torch

from permkv.cache import PagedCache
from permkv.compress import InferenceKVCacheCompression, observing


class ModelRunner:
    """Runs `model` on `PagedCache`s of one pool. The caller holds the attention context
    (`paged_attention(model)` or `observing(model, 1)`) around every call."""

    def __init__(self, model, compression: InferenceKVCacheCompression, chunk_tokens: int):
        self.model = model
        self.device = model.device
        self.compression = compression
        self.compressor = compression.compressor()
        self.chunk_tokens = chunk_tokens

    @torch.no_grad()
    def prefill(self, cache: PagedCache, prompt: list[int], ratio: float) -> torch.Tensor:
        """Read `prompt` into the empty one-sequence `cache`, `chunk_tokens` at a time; with ratio > 1
        each chunk's last queries score everything cached so far and the cache is compressed back to
        1/ratio of the tokens read. Returns the last position's logits `(vocab,)`. Raises CacheFull."""
        for start in range(0, len(prompt), self.chunk_tokens):
            chunk = prompt[start : start + self.chunk_tokens]
            ids = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start, start + len(chunk), device=self.device)[None]
            if ratio == 1:
                logits = self.model(ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[0, -1]
                continue
            with observing(self.model, window=self.compression.observe) as recorder:
                logits = self.model(ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[0, -1]
            self.compress(cache, start + len(chunk), ratio, recorder.queries)
        return logits

    @torch.no_grad()
    def decode(self, cache: PagedCache, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One forward pass over every sequence of `cache`: row b feeds `tokens[b]` at `positions[b]`.
        Each (sequence, layer, KV head) attends over its own cached tokens. Returns logits `(batch, vocab)`."""
        ids = torch.tensor(tokens, device=self.device)[:, None]  # (batch, 1)
        pos = torch.tensor(positions, device=self.device)[:, None]
        return self.model(ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[:, -1]

    def compress(self, cache: PagedCache, seen: int, ratio: float, queries: dict[int, torch.Tensor]) -> bool:
        """Compress the one sequence of `cache` back to `seen / ratio` tokens per full-attention head
        (at least one). `queries[layer]`: `(1, q_heads, w, head_dim)`, its last w queries.
        Returns whether anything was evicted."""
        full = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
        heads = len(full) * cache.n_kv_heads
        cached = sum(cache.cached_tokens(0, i, h) for i in full for h in range(cache.n_kv_heads))
        target = max(seen * heads / ratio, heads)
        if not full or cached <= math.ceil(target):
            return False
        self.compressor.compress(cache, cache.seen[0] * heads / target, queries)  # tokens seen / tokens kept
        return True
