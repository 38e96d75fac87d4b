"""Attention that reads each KV head's own tokens from a `PagedCache`, registered with transformers.

`with paged_attention(model):` switches the model to the "permkv_paged" attention implementation
(and back afterwards). Under it, a model called with `past_key_values=PagedCache(...)`:
- on the first call (prefill) attends over the given K/V directly (causal, padding and sliding
  window masks) and stores only the real tokens in blocks;
- on later calls stores the new tokens, gathers every head's blocks into a padded compute view and
  masks each head to its own length (and window). Padding exists only in that view, never in the pool.
Grouped-query heads are folded into the query axis, so K/V are never repeated.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from permkv.cache.paged import TAG, PagedCache

NAME = "permkv_paged"


def _padding_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The model's mask for this implementation: just the `(batch, columns)` bool padding mask."""
    return attention_mask


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    window: int | None,
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention over the given tokens only.

    query `(batch, q_heads, T, head_dim)`, key/value `(batch, kv_heads, T, head_dim)`, valid
    `(batch, T)` bool (False = padding) or None. Returns `(batch, q_heads, T, head_dim)`.
    A padding query attends to itself only, so no row is empty (empty rows give NaN).
    """
    T = query.shape[2]
    if (valid is None or bool(valid.all())) and (window is None or T <= window):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    i = torch.arange(T, device=query.device)
    mask = (i[None, :] <= i[:, None])[None]  # (1, T, T): query row, key column
    if window is not None:
        mask = mask & (i[None, :] > i[:, None] - window)[None]
    if valid is not None:
        mask = (mask & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=query.device)[None]
    return masked_attention(query, key, value, mask[:, None], scaling)


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """sdpa over grouped-query heads with a bool mask (True = attend), K/V never repeated.

    query `(batch, q_heads, T, head_dim)`, key/value `(batch, kv_heads, L, head_dim)`, mask
    `(batch or 1, 1 or kv_heads, T or 1, L)`. Returns `(batch, q_heads, T, head_dim)`.
    A mask shared by all heads goes to sdpa's grouped-query mode (on a CPU 2x faster than a mask per
    head); a mask per KV head, or one KV head, folds the group into the query axis (head h*G + g
    reads KV head h). One KV head keeps the folded path: it is its model's reference numerics.
    """
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    if mask.shape[1] == 1 and Hkv > 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    if mask.shape[2] > 1:  # one mask row per query: repeat it for each query head of the group
        n, h, _, L = mask.shape
        mask = mask[:, :, None].expand(n, h, G, T, L).reshape(n, h, G * T, L)
    q = query.reshape(B, Hkv, G * T, D)
    return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling).view(B, Hq, T, D)


def paged_attend(
    cache: PagedCache,
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Store the new K/V of one layer in `cache` and attend over each head's cached tokens.

    query `(batch, q_heads, T, head_dim)`, key/value `(batch, kv_heads, T, head_dim)`, valid
    `(batch, T)` bool or None. Returns `(batch, q_heads, T, head_dim)`.
    """
    B, T = query.shape[0], query.shape[2]
    cache.ensure_batch(B)
    counts = [T] * B if valid is None else valid.sum(1).tolist()
    if layer_idx == 0:
        cache.check_room(counts)  # all layers or none: CacheFull before the first write
    layer = cache.layers[layer_idx]
    window = layer.sliding_window
    if layer.columns == 0 and all(t.length == 0 for row in layer.tables for t in row):
        out = dense_attention(query, key, value, valid, window, scaling)
        cache.append(layer_idx, key, value, valid)
    else:
        if valid is not None and not bool(valid.all()):
            raise ValueError("padding is only supported in the first call (prefill) of a PagedCache")
        cache.append(layer_idx, key, value)
        keys, values, starts, lengths = cache.gather(layer_idx)
        L = keys.shape[2]
        # Every head holds the same tokens (an uncompressed sequence, e.g. a prefill chunk or KVzip's
        # re-reading): one (B, 1, T, L) mask serves all heads (`masked_attention`'s fast path).
        if T > 1 and bool((starts == starts[:, :1]).all()) and bool((lengths == lengths[:, :1]).all()):
            starts, lengths = starts[:, :1], lengths[:, :1]
        u = torch.arange(L, device=query.device) - starts[:, :, None, None]  # (B, Hkv or 1, 1, L) token index
        if T == 1 and window is None:  # decode: the one query sees all of its head's tokens
            mask = (u >= 0) & (u < lengths[:, :, None, None])  # (B, Hkv, 1, L)
        else:
            last = (lengths - T)[:, :, None, None] + torch.arange(T, device=query.device)[:, None]  # (B, Hkv or 1, T, 1)
            mask = (u >= 0) & (u <= last)  # (B, Hkv or 1, T, L)
            if window is not None:
                mask = mask & (u > last - window)
        out = masked_attention(query, keys, values, mask, scaling)
    cache.advance(layer_idx, T, counts)
    return out


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: returns `(batch, T, q_heads, head_dim)` and no weights."""
    T = query.shape[2]
    valid = None if attention_mask is None else attention_mask[:, -T:].bool()
    tag = getattr(key, TAG, None)
    if tag is None:  # no cache (use_cache=False): plain causal attention
        window = sliding_window or getattr(module, "sliding_window", None)
        out = dense_attention(query, key, value, valid, window, scaling)
    else:
        cache, layer_idx = tag
        cache.consume(layer_idx)
        out = paged_attend(cache, layer_idx, query, key, value, valid, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, paged_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _padding_mask)


@contextmanager
def paged_attention(model):
    """Run `model` with the paged attention inside the block, restoring its implementation after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
