"""kvpress presses as baselines: in prefill (kvpress's own way) or post hoc on one saved prefill.

A press's hook runs after each attention layer's forward in prefill and replaces that layer's cached
keys / values by `press.compress(module, hidden_states, keys, values, attentions, kwargs)`. The layer's
output was already computed with the full cache, so the next layer's input does not depend on the
compression: calling `compress` per layer afterwards on the saved hidden states, keys and values keeps
exactly the same tokens (ANCHORS.md s2; pinned by tests/test_kvpress_baseline.py). `capture_inputs`
saves those inputs during any prefill, and `compress_post_hoc` applies a press to them, so one prefill
serves every press and ratio. KVzip re-reads the context after its prefill (extra passes over the
cache), so it runs its own prefill; its scores do not depend on the ratio, so that one prefill and
re-reading serve every ratio too (`kvzip_scored`, then `mask_kvzip` per ratio: the same
masks as running the press at that ratio, pinned by a test).
Our `ratio` is "x times smaller"; kvpress's `compression_ratio` is the fraction removed, 1 - 1/ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from permkv.compress import CompressionReport, LayerInputs, capture_inputs, check_ratio
from permkv.eval import greedy_decode, prefill, stop_ids
from permkv.models import attention_modules, kv_layout


def _presses() -> dict[str, Callable[[float], object]]:
    import kvpress

    return {
        "snapkv": lambda f: kvpress.SnapKVPress(compression_ratio=f),  # window 64, kernel 5
        "streaming": lambda f: kvpress.StreamingLLMPress(compression_ratio=f),  # 4 sinks + most recent
        "knorm": lambda f: kvpress.KnormPress(compression_ratio=f),
        "expected_attention": lambda f: kvpress.ExpectedAttentionPress(compression_ratio=f),
        "tova": lambda f: kvpress.TOVAPress(compression_ratio=f),
        "adakv_snapkv": lambda f: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=f)),  # masks, keeps bytes
        "pyramidkv": lambda f: kvpress.PyramidKVPress(compression_ratio=f),
        "kvzip": lambda f: kvpress.KVzipPress(compression_ratio=f),  # query-agnostic; masks, keeps bytes
    }


PRESSES = ("snapkv", "streaming", "knorm", "expected_attention", "tova", "adakv_snapkv", "pyramidkv", "kvzip")


def make_press(name: str, ratio: float):
    """The kvpress press `name` (one of PRESSES) at our `ratio` (compression_ratio = 1 - 1/ratio)."""
    if name not in PRESSES:
        raise ValueError(f"press must be one of {list(PRESSES)}, got {name!r}")
    return _presses()[name](1 - 1 / check_ratio(ratio))


def check_model(model) -> None:
    """kvpress 0.5.5 compresses Gemma-3's sliding-window layers too: refuse such models clearly."""
    if kv_layout(model.config).sliding_window is not None:
        raise ValueError(f"kvpress 0.5.5 cannot run on {type(model).__name__}: it compresses the sliding-window "
                         "layers too and their attention mask no longer fits (tested on Gemma-3-270m)")


@torch.no_grad()
def compress_post_hoc(model, press, inputs: dict[int, LayerInputs], keys_values: list[tuple[torch.Tensor, torch.Tensor]]
                      ) -> DynamicCache:
    """A DynamicCache holding what `press` keeps of each layer's `keys_values[i]` `(1, kv_heads, seq, head_dim)`.

    Presses that mask keys (AdaKV) set `module.masked_key_indices`; `clear_masks(model)` after decoding.
    """
    if hasattr(press, "post_init_from_model"):
        press.post_init_from_model(model)
    cache = DynamicCache(config=model.config)
    for module in attention_modules(model):
        i = module.layer_idx
        keys, values = press.compress(module, inputs[i].hidden_states, *keys_values[i], None, inputs[i].kwargs)
        cache.update(keys, values, i)
    return cache


def clear_masks(model) -> None:
    """Forget the keys a masking press (AdaKV, KVzip) hid, so that the next answer starts clean."""
    for module in attention_modules(model):
        module.masked_key_indices = None


@torch.no_grad()
def prefill_with_press(model, prefix: list[int], press) -> tuple[DynamicCache, torch.Tensor]:
    """kvpress's own way: the press's hooks compress the cache while `prefix` is prefilled."""
    with press(model):
        return prefill(model, prefix)


@dataclass
class KVzipScored:
    """KVzipPress's prefill and re-reading, kept for every ratio: the cache's `keys_values` per layer
    `(1, kv_heads, seq, head_dim)` (re-reading leaves them as prefill made them), the `logits` `(vocab,)`
    at the last position and KVzip's `scores` `(layers, 1, kv_heads, seq)`."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    scores: torch.Tensor

    def cache(self, model) -> DynamicCache:
        """A fresh DynamicCache of the prefilled keys and values (decoding appends to it, not to these)."""
        cache = DynamicCache(config=model.config)
        for i, (keys, values) in enumerate(self.keys_values):
            cache.update(keys, values, i)
        return cache


@torch.no_grad()
def kvzip_scored(model, prefix: list[int]) -> KVzipScored:
    """Run kvpress's KVzipPress on `prefix` (its prefill and re-reading passes) and keep its scores
    instead of masking: `mask_kvzip` then masks for any ratio."""
    press = make_press("kvzip", 2)  # any ratio: KVzipPress scores only when compression_ratio > 0
    saved = {}
    press.compress_post = lambda _model: saved.setdefault("scores", press.score_val.clone())  # instead of masking
    with press(model):
        cache, logits = prefill(model, prefix)
    return KVzipScored([(layer.keys, layer.values) for layer in cache.layers], logits, saved["scores"])


def mask_kvzip(model, scored: KVzipScored, ratio: float) -> None:
    """Hide the keys KVzipPress evicts at `ratio` (its own `compress_post` on the kept scores);
    `clear_masks(model)` after decoding."""
    press = make_press("kvzip", ratio)
    press.score_val = scored.scores.clone()  # compress_post raises the sinks' scores in place
    press.compress_post(model)


def dense_report(cache: DynamicCache, n_tokens: int, ratio: float) -> CompressionReport:
    """What a press left in a DynamicCache: bytes of its key/value tensors against `n_tokens`
    uncompressed (masking presses' hidden keys still count: they are still stored)."""
    layers = cache.layers
    kept = [[layer.keys.shape[2]] * layer.keys.shape[1] for layer in layers]
    now = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in layers)  # keys + values
    full = sum(2 * layer.keys[:, :, :1].numel() * n_tokens * layer.keys.element_size() for layer in layers)
    return CompressionReport(ratio, full, now, kept, [[n_tokens / max(k, 1) for k in row] for row in kept])


def answer_from(model, tokenizer, cache, logits: torch.Tensor, start: int, suffix: list[int], max_new_tokens: int) -> str:
    """Feed `suffix` into a press-compressed DynamicCache and decode greedily (the one loop); masks cleared after."""
    try:
        out = greedy_decode(model, cache, logits, start=start, max_new_tokens=max_new_tokens,
                            stop=stop_ids(model, tokenizer), suffix=suffix)
    finally:
        clear_masks(model)
    return tokenizer.decode(out, skip_special_tokens=True)


def kvpress_answer(model, tokenizer, press: str = "snapkv", ratio: float = 8, max_new_tokens: int = 32,
                   reports: list | None = None) -> Callable[[list[int], list[int]], str]:
    """answer_fn(prefix, suffix) for a press run inside prefill; a `dense_report` of each call is
    appended to `reports` if given."""
    check_model(model)
    made = make_press(press, ratio)

    def answer(prefix: list[int], suffix: list[int]) -> str:
        cache, logits = prefill_with_press(model, prefix, made)
        if reports is not None:
            reports.append(dense_report(cache, len(prefix), ratio))
        return answer_from(model, tokenizer, cache, logits, len(prefix), suffix, max_new_tokens)

    return answer
