"""The model side: chunked prefill (compressed by `permkv.compress`), one batched decode forward,
compression of one sequence. The caller holds `paged_attention(model)` around every call.

Positions are explicit everywhere: a compressed cache holds fewer tokens than it has seen.
"""

from __future__ import annotations

import torch

from permkv.cache import PagedCache
from permkv.compress import InferenceKVCacheCompression, chunked_prefill_and_compress, observing


class ModelRunner:
    """Runs `model` on `PagedCache`s of one pool."""

    def __init__(self, model, compression: InferenceKVCacheCompression, chunk_tokens: int):
        self.model = model
        self.device = model.device
        self.compression = compression
        self.compressor = compression.compressor()
        self.chunk_tokens = chunk_tokens
        self.n_layers = model.config.get_text_config(decoder=True).num_hidden_layers

    @torch.no_grad()
    def prefill(self, cache: PagedCache, prompt: list[int], ratio: float) -> torch.Tensor:
        """Read `prompt` into the empty one-sequence `cache`, `chunk_tokens` at a time; with ratio > 1
        the cache is compressed to seen / ratio after every chunk (`chunked_prefill_and_compress`).
        Returns the last position's logits `(vocab,)`. Raises CacheFull."""
        if ratio > 1:
            return chunked_prefill_and_compress(self.model, prompt, ratio, self.compression, self.chunk_tokens, cache=cache)[1]
        for start in range(0, len(prompt), self.chunk_tokens):
            chunk = prompt[start : start + self.chunk_tokens]
            ids = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start, start + len(chunk), device=self.device)[None]
            logits = self.model(ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[0, -1]
        return logits

    @torch.no_grad()
    def decode(self, cache: PagedCache, tokens: list[int], positions: list[int], observe: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass over every sequence of `cache`: row b feeds `tokens[b]` at `positions[b]`;
        each (sequence, layer, KV head) attends over its own cached tokens. Returns logits
        `(batch, vocab)` and, with `observe`, the step's queries `(batch, q_heads, layers, head_dim)`."""
        ids = torch.tensor(tokens, device=self.device)[:, None]  # (batch, 1)
        pos = torch.tensor(positions, device=self.device)[:, None]
        if not observe:
            return self.model(ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[:, -1], None
        with observing(self.model, window=1) as recorder:
            logits = self.model(ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[:, -1]
        return logits, torch.cat([recorder.queries[i] for i in range(self.n_layers)], dim=2)

    def compress(self, cache: PagedCache, ratio: float, queries: torch.Tensor) -> bool:
        """Compress the one sequence of `cache` to seen / ratio tokens per full-attention head.
        `queries` `(q_heads, layers, w, head_dim)`: its last w decode queries. Returns whether it evicted."""
        before = cache.stats().used_tokens
        by_layer = {i: queries[:, i][None] for i in range(self.n_layers)}  # layer -> (1, q_heads, w, head_dim)
        self.compressor.compress(cache, ratio, by_layer)
        return cache.stats().used_tokens < before
