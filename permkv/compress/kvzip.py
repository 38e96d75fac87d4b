"""KVzip-style query-agnostic scores on a paged cache (Kim 2025, arXiv 2505.23416).

A cached token matters if the model needs it to reproduce the context: after a "repeat the previous
context" prompt, the model re-reads the context chunk by chunk on a copy-on-write fork of the cache,
and each cached token scores the most attention any re-reading query (any head of its group) gives
it. The fork is released after each chunk, so the cache itself never changes. As in kvpress's
KVzipPress, each chunk's queries attend over the sinks, the chunk's own cached tokens and the
re-read tokens (a chunk-local softmax), which bounds memory to O(chunk^2) per layer.
"""

from __future__ import annotations

import torch

from permkv.cache import PagedCache
from permkv.checks import positive_int
from permkv.compress.observe import observing
from permkv.compress.prefill import fork_sequence


@torch.no_grad()
def kvzip_scores(model, cache: PagedCache, ids: list[int], prompt_ids: list[int], chunk_tokens: int = 1024,
                 sinks: int = 4) -> dict[int, torch.Tensor]:
    """Scores `(1, kv_heads, len(ids))` per full-attention layer for the uncompressed sequence 0 of
    `cache`, which holds `ids`; `prompt_ids` ask the model to repeat the context (e.g. the encoded
    "\\n\\nRepeat the previous context exactly."). Higher = keep. The pool must have room for one
    fork's `len(prompt_ids) + chunk_tokens` extra tokens per head.
    """
    if cache.num_sequences != 1 or cache.seen[0] != len(ids):
        raise ValueError(f"cache must hold one sequence of len(ids)={len(ids)} tokens, got seen={cache.seen}")
    if any(cache.cached_tokens(0, i, 0) != len(ids) for i, layer in enumerate(cache.layers) if not layer.is_sliding):
        raise ValueError("cache must be uncompressed: KVzip scores every token the sequence has seen")
    positive_int("chunk_tokens", chunk_tokens)
    n = len(ids)
    layers = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
    scores = {i: torch.zeros(1, cache.n_kv_heads, n) for i in layers}
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        reread = list(prompt_ids) + list(ids[start:end])
        q_len = len(reread)
        fork = fork_sequence(cache, model.config)
        try:
            pos = torch.arange(n, n + q_len, device=model.device)[None]
            with observing(model, window=q_len) as recorder:
                model(torch.tensor([reread], device=model.device), past_key_values=fork, position_ids=pos, logits_to_keep=1)
            for i in layers:
                keys = fork.gather(i)[0][:1]  # (1, kv_heads, >= n + q_len, head_dim)
                sink = min(sinks, start)
                picked = torch.cat([keys[:, :, :sink], keys[:, :, start:end], keys[:, :, n : n + q_len]], dim=2)
                scores[i][0, :, start:end] = _max_attention(picked, recorder.queries[i], q_len)[:, sink : sink + end - start].float().cpu()
        finally:
            fork.reset()
    return scores


def _max_attention(keys: torch.Tensor, queries: torch.Tensor, q_len: int) -> torch.Tensor:
    """keys `(1, H, K, D)` whose last q_len are the queries' own; queries `(1, Hq, q_len, D)`.
    Returns `(H, K)`: the most causal softmax attention any query of the group gave each key."""
    _, H, K, D = keys.shape
    G = queries.shape[1] // H
    q = queries[0].reshape(H, G * q_len, D)  # query head h*G + g -> KV head h
    logits = q @ keys[0].transpose(1, 2) * D**-0.5  # (H, G*q_len, K)
    i = torch.arange(G * q_len, device=keys.device) % q_len  # index of each row within the re-read
    future = torch.arange(K, device=keys.device)[None, :] > (K - q_len + i)[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(-1).amax(dim=1)
