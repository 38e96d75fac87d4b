"""Capture the post-RoPE queries of the last `window` positions while a model prefills a PagedCache.

Attention-based scorers need the queries that will look at the cache. transformers passes them,
already rotated, to the attention function only, so `observing(model)` switches the model to a
registered attention function that records them and then runs permkv's paged attention unchanged.
The recorder is attached to the model's attention modules for the duration of the block (no module
state): nested or concurrent models each have their own.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from permkv.cache.attention import NAME as PAGED
from permkv.cache.attention import paged_attention_forward
from permkv.checks import positive_int
from permkv.models import attention_modules

NAME = "permkv_paged_observed"
ATTR = "_permkv_recorder"  # attribute an attention module carries while it is observed


@dataclass
class QueryRecorder:
    """The last `window` queries each layer computed: `queries[layer]` is `(batch, q_heads, w, head_dim)`
    with w <= window, post-RoPE and unscaled. Queries of later calls push older ones out."""

    window: int = 64  # kvpress SnapKV's window; measured on needles in notebook 02 (8 missed the answer)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)  # layer -> the attention scale the model used

    def __post_init__(self):
        positive_int("window", self.window)

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        """query: `(batch, q_heads, T, head_dim)` of one forward call."""
        old = self.queries.get(layer_idx)
        new = query.detach() if old is None else torch.cat([old, query.detach()], dim=2)
        self.queries[layer_idx] = new[:, :, -self.window :].clone()


def _observed_forward(module, query, key, value, attention_mask, *args, **kwargs):
    """Record `query` `(batch, q_heads, T, head_dim)` for the module's recorder, then paged attention."""
    recorder = getattr(module, ATTR, None)
    if recorder is not None:
        recorder.record(module.layer_idx, query)
        if kwargs.get("scaling") is not None:
            recorder.scaling[module.layer_idx] = float(kwargs["scaling"])
    return paged_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(NAME, _observed_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS[PAGED])


@contextmanager
def observing(model, window: int = 64) -> Iterator[QueryRecorder]:
    """Run `model` with paged attention inside the block and record its last `window` queries.

    Blocks nest: an inner block records alone until it ends, then the outer recorder is back (the
    engine observes decode steps while a chunked prefill observes its own chunks)."""
    recorder = QueryRecorder(window)
    modules = attention_modules(model)
    outer = [getattr(m, ATTR, None) for m in modules]
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    for m in modules:
        setattr(m, ATTR, recorder)
    try:
        yield recorder
    finally:
        for m, r in zip(modules, outer):
            setattr(m, ATTR, r)
        model.set_attn_implementation(previous)
