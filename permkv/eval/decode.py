"""The one greedy decode loop every path uses (full cache, compressed caches, kvpress, RLM, RVS),
and perplexity.

Positions are explicit: a compressed cache holds fewer tokens than the sequence has seen, so the
next token's position is `start + i`, never the cache's length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from permkv.cache import PagedCache, forward, paged_attention


def stop_ids(model, tokenizer=None) -> set[int]:
    """Token ids that end a generation: the model's EOS ids and the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    ids = set() if eos is None else set(eos) if isinstance(eos, list) else {eos}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy_decode(
    model,
    cache,
    logits: torch.Tensor,
    *,
    start: int,
    max_new_tokens: int,
    stop: set[int],
    suffix: Sequence[int] = (),
    after_step: Callable[[object, int], None] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Feed `suffix` at positions `start..`, then decode greedily; returns the new token ids.

    `logits` `(vocab,)`: the last prefix position's logits (used when `suffix` is empty). Stops at a
    stop id (not returned) or after `max_new_tokens`; the last token is never fed back (no wasted pass).
    `after_step(cache, position)` runs after each token is written to the cache (decode-time
    compression hooks in here); `position` is the next free position. `on_token(token)` sees each
    new token as soon as it is chosen (streaming; an exception it raises stops the loop).
    A PagedCache is decoded with the paged attention switched on for the loop (a no-op inside one).
    """
    with paged_attention(model) if isinstance(cache, PagedCache) else nullcontext():
        return _greedy_decode(model, cache, logits, start, max_new_tokens, stop, suffix, after_step, on_token)


def _greedy_decode(model, cache, logits, start, max_new_tokens, stop, suffix, after_step, on_token) -> list[int]:
    device = model.device
    pos = start
    if suffix:
        ids = torch.tensor([list(suffix)], device=device)
        positions = torch.arange(start, start + len(suffix), device=device)[None]
        logits = forward(model, cache, ids, positions)[0, -1]
        pos += len(suffix)
        if after_step is not None:
            after_step(cache, pos)
    out: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        if step == max_new_tokens - 1:
            break
        logits = forward(model, cache, torch.tensor([[token]], device=device), torch.tensor([[pos]], device=device))[0, -1]
        pos += 1
        if after_step is not None:
            after_step(cache, pos)
    return out


@torch.no_grad()
def prefill(model, ids: Sequence[int], cache=None):
    """Run `ids` through the model into `cache` (a new DynamicCache by default; a PagedCache too).
    Returns (cache, last position's logits `(vocab,)`)."""
    if not ids:
        raise ValueError("ids must hold at least one token")
    cache = DynamicCache(config=model.config) if cache is None else cache
    with paged_attention(model) if isinstance(cache, PagedCache) else nullcontext():
        logits = forward(model, cache, torch.tensor([list(ids)], device=model.device))[0, -1]
    return cache, logits


def generate(model, tokenizer, ids: Sequence[int], max_new_tokens: int = 32, suffix: Sequence[int] = ()) -> str:
    """Full-cache greedy answer: prefill `ids`, feed `suffix`, decode; text without special tokens.

    This is the reference every compressed answer is compared with (same loop, same stops)."""
    cache, logits = prefill(model, ids)
    out = greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=max_new_tokens,
                        stop=stop_ids(model, tokenizer), suffix=suffix)
    return tokenizer.decode(out, skip_special_tokens=True)


@torch.no_grad()
def perplexity(model, ids: Sequence[int], window: int | None = None) -> float:
    """Perplexity of `ids` (the first token of each window is not scored).

    `window`: score consecutive non-overlapping windows of this many tokens (texts longer than the
    model's context, or bounded memory); None scores everything in one pass."""
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    if window is not None and window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    window = window or len(ids)
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        chunk = torch.tensor([list(ids[i : i + window])], device=model.device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    return math.exp(nll / n)
