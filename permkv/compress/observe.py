"""Capture the post-RoPE queries of the last `window` positions while a model reads a PagedCache.

Attention-based scorers need the queries that will look at the cache. transformers passes them,
already rotated, to the attention function only: `observing(model)` runs the model with permkv's
paged attention and gives every forward's segments an observation window (`Segment.observe`), and
the recorder keeps the last `window` queries of each layer. The recorder is attached to the model
for the duration of the block; blocks nest (an inner block records alone until it ends).

`capture_inputs(model)` saves every attention layer's inputs (hidden states, RoPE) of the forward passes
inside its block: what a post hoc compressor (a kvpress press) reads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from permkv.cache.attention import RECORDER, PagedBatch, paged_attention
from permkv.checks import positive_int
from permkv.models import attention_modules


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

    def record_batch(self, batch: PagedBatch) -> None:
        """The queries a forward's segments kept, stacked `(segments, q_heads, w, head_dim)` per layer
        (segments of equal length: a rectangular `(batch, T)` input), and each layer's attention scale."""
        if len({s.count for s in batch.segments}) != 1:
            raise ValueError("observing records inputs whose rows have one length; give a mixed batch's "
                             "segments their own `observe` instead")
        for layer_idx in batch.segments[0].queries:
            self.record(layer_idx, torch.cat([s.queries[layer_idx] for s in batch.segments], dim=0))
        self.scaling.update(batch.scaling)


@contextmanager
def observing(model, window: int = 64) -> Iterator[QueryRecorder]:
    """Run `model` with paged attention inside the block and record its last `window` queries."""
    recorder = QueryRecorder(window)
    outer = getattr(model, RECORDER, None)
    with paged_attention(model):
        setattr(model, RECORDER, recorder)
        try:
            yield recorder
        finally:
            setattr(model, RECORDER, outer)


@dataclass
class LayerInputs:
    """What a press reads at one attention layer: its input hidden states `(1, seq, hidden)` and the
    forward's keyword arguments (`position_embeddings` = RoPE cos, sin `(1, seq, head_dim)`)."""

    hidden_states: torch.Tensor
    kwargs: dict

    def followed_by(self, later: "LayerInputs") -> "LayerInputs":
        """These inputs and a later forward pass's of the same layer, joined along the sequence (a prefix
        read in two chunks)."""
        cos_sin = zip(self.kwargs["position_embeddings"], later.kwargs["position_embeddings"])
        return LayerInputs(torch.cat([self.hidden_states, later.hidden_states], dim=1),
                           dict(position_embeddings=tuple(torch.cat(pair, dim=1) for pair in cos_sin)))


@contextmanager
def capture_inputs(model) -> Iterator[dict[int, LayerInputs]]:
    """Save every attention layer's inputs of the forward passes inside the block (the last pass wins)."""
    saved: dict[int, LayerInputs] = {}

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"].detach()
        saved[module.layer_idx] = LayerInputs(hidden, dict(position_embeddings=kwargs["position_embeddings"]))

    hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield saved
    finally:
        for h in hooks:
            h.remove()
