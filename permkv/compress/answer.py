"""Answer functions for `permkv.eval.evaluate`: prefill the prefix, compress, feed the suffix, decode.

`answer_fn(prefix_ids, suffix_ids) -> text`. Query-aware: the question ends the prefix (inside the
protected window) and the suffix is only the chat template's tail. Query-agnostic: the context is
compressed before the question, which comes in the suffix. The split is `permkv.data.encode_sample`'s.
Our `ratio` is "x times smaller"; kvpress's `compression_ratio` is the fraction removed, 1 - 1/ratio.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from transformers import DynamicCache

from permkv.cache import BlockPool, PagedCache, paged_attention
from permkv.compress.compressor import CompressionReport, InferenceKVCacheCompression, check_ratio
from permkv.compress.observe import observing
from permkv.data import MODES

# permkv methods: (scorer, allocator). "permkv_adaptive" is the headline (KV-Compress's setting).
PERMKV_METHODS = {
    "permkv_adaptive": ("kvcompress", "global"),
    "permkv_layer_adaptive": ("kvcompress", "layer"),
    "permkv_uniform": ("kvcompress", "uniform"),
    "permkv_snapkv": ("snapkv", "global"),
    "permkv_streaming": ("streaming", "uniform"),
    "permkv_knorm": ("knorm", "uniform"),
    "permkv_random": ("random", "uniform"),
}
KVPRESS_METHODS = (
    "kvpress_snapkv", "kvpress_streaming", "kvpress_knorm", "kvpress_expected_attention",
    "kvpress_adakv_snapkv", "kvpress_pyramidkv",
)
METHODS = ("full",) + tuple(PERMKV_METHODS) + KVPRESS_METHODS

AnswerFn = Callable[[list[int], list[int]], str]


def _check(method: str, allowed, mode: str, ratio) -> float:
    if method not in allowed:
        raise ValueError(f"method must be one of {list(allowed)}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return check_ratio(ratio)


def _stop_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def _decode(model, tokenizer, cache, last_logits, suffix: list[int], start: int, max_new_tokens: int) -> str:
    """Feed `suffix` at positions `start..`, then greedy decode; positions are explicit because a
    compressed cache holds fewer tokens than it has seen."""
    device = model.device
    logits = last_logits
    if suffix:
        pos = torch.arange(start, start + len(suffix), device=device)[None]
        logits = model(torch.tensor([suffix], device=device), past_key_values=cache, position_ids=pos,
                       logits_to_keep=1).logits[0, -1]
    stop, out, pos = _stop_ids(model, tokenizer), [], start + len(suffix)
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop:
            break
        out.append(token)
        if step == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[token]], device=device), past_key_values=cache,
                       position_ids=torch.tensor([[pos]], device=device)).logits[0, -1]
        pos += 1
    return tokenizer.decode(out, skip_special_tokens=True)


def paged_cache_for(model, n_tokens: int, block_size: int = 16) -> PagedCache:
    """An empty PagedCache whose pool holds one sequence of `n_tokens` tokens uncompressed."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    blocks = text.num_hidden_layers * text.num_key_value_heads * (-(-n_tokens // block_size) + 1)
    pool = BlockPool(blocks, block_size=block_size, head_dim=head_dim, dtype=model.dtype, device=model.device)
    return PagedCache(pool, model.config)


@torch.no_grad()
def prefill_and_compress(model, prefix: list[int], ratio: float, compression: InferenceKVCacheCompression,
                         extra_tokens: int = 64, chunk_tokens: int | None = None, cache: PagedCache | None = None,
                         ) -> tuple[PagedCache, torch.Tensor, CompressionReport]:
    """Prefill `prefix` into a fresh PagedCache (recording queries), compress it to 1/ratio.

    With `chunk_tokens`, the prefix is read `chunk_tokens` at a time and the cache is compressed
    after every chunk back to 1/ratio of the tokens seen so far, so the pool only ever holds about
    len(prefix) / ratio + chunk_tokens tokens per head: a context larger than memory can be read.
    Each chunk's last queries score everything cached so far (chunks must be >= the observation
    window). Returns the cache, the last position's logits `(vocab,)` and the final report (its
    original_bytes are what the whole prefix would take uncompressed).
    `cache`: an empty PagedCache to fill (e.g. one of many on a shared pool) instead of a new one
    sized for this prefix; CacheFull propagates when its pool runs out.
    """
    ratio = check_ratio(ratio)
    if cache is not None and cache.num_sequences:
        raise ValueError("cache must be empty")
    if chunk_tokens is None or chunk_tokens >= len(prefix):
        cache = paged_cache_for(model, len(prefix) + extra_tokens) if cache is None else cache
        with observing(model, window=compression.observe) as recorder:
            logits = model(torch.tensor([prefix], device=model.device), past_key_values=cache, logits_to_keep=1).logits[0, -1]
        return cache, logits, compression.compress_auto(cache, ratio, recorder.queries)
    if chunk_tokens < max(compression.observe, compression.window + compression.sinks):
        raise ValueError(f"chunk_tokens must be >= the protected tokens and the observation window "
                         f"({max(compression.observe, compression.window + compression.sinks)}), got {chunk_tokens}")
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None) or 0
    held = max(math.ceil(len(prefix) / ratio), window) + chunk_tokens + extra_tokens
    cache = paged_cache_for(model, held) if cache is None else cache
    compressor = compression.compressor()
    full_layers = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
    for start in range(0, len(prefix), chunk_tokens):
        chunk = prefix[start : start + chunk_tokens]
        pos = torch.arange(start, start + len(chunk), device=model.device)[None]
        with observing(model, window=compression.observe) as recorder:
            logits = model(torch.tensor([chunk], device=model.device), past_key_values=cache, position_ids=pos,
                           logits_to_keep=1).logits[0, -1]
        seen, lengths = start + len(chunk), cache.stats().lengths[0]
        cached = sum(sum(lengths[i]) for i in full_layers)
        step = ratio * cached / (seen * len(full_layers) * cache.n_kv_heads)  # back to seen / ratio
        if step > 1:
            compressor.compress(cache, step, recorder.queries)
    stats = cache.stats()
    lengths = stats.lengths[0]
    blocks = sum(cache.n_kv_heads * cache.pool.blocks_for(min(len(prefix), layer.sliding_window or len(prefix)))
                 for layer in cache.layers)  # what an unchunked, uncompressed prefill holds
    report = CompressionReport(ratio, blocks * cache.pool.bytes_per_block, stats.allocated_bytes, lengths,
                               [[len(prefix) / max(k, 1) for k in row] for row in lengths])
    return cache, logits, report


def compressed_answer(model, tokenizer, method: str = "permkv_adaptive", ratio: float = 8, mode: str = "query_aware",
                      max_new_tokens: int = 32, reports: list | None = None) -> AnswerFn:
    """answer_fn for a permkv method; each call's CompressionReport is appended to `reports` if given."""
    ratio = _check(method, PERMKV_METHODS, mode, ratio)
    scorer, allocator = PERMKV_METHODS[method]
    compression = InferenceKVCacheCompression(scorer=scorer, allocator=allocator)

    def answer(prefix: list[int], suffix: list[int]) -> str:
        cache, logits, report = prefill_and_compress(model, prefix, ratio, compression, len(suffix) + max_new_tokens + 16)
        if reports is not None:
            reports.append(report)
        with paged_attention(model):
            return _decode(model, tokenizer, cache, logits, suffix, len(prefix), max_new_tokens)

    return answer


def make_press(method: str, ratio: float):
    """The kvpress press for `method` at our `ratio` (compression_ratio = 1 - 1/ratio)."""
    import kvpress

    fraction = 1 - 1 / ratio
    if method == "kvpress_adakv_snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=fraction))
    press = {
        "kvpress_snapkv": kvpress.SnapKVPress,
        "kvpress_streaming": kvpress.StreamingLLMPress,
        "kvpress_knorm": kvpress.KnormPress,
        "kvpress_expected_attention": kvpress.ExpectedAttentionPress,
        "kvpress_pyramidkv": kvpress.PyramidKVPress,
    }[method]
    return press(compression_ratio=fraction)


def dense_report(cache: DynamicCache, n_tokens: int, ratio: float) -> CompressionReport:
    """What a kvpress press left in a DynamicCache: bytes of its key/value tensors against
    `n_tokens` uncompressed (AdaKV's masked keys still count: they are still stored)."""
    layers = cache.layers
    kept = [[layer.keys.shape[2]] * layer.keys.shape[1] for layer in layers]
    now = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in layers)  # keys + values
    full = sum(2 * layer.keys[:, :, :1].numel() * n_tokens * layer.keys.element_size() for layer in layers)
    rates = [[n_tokens / max(k, 1) for k in row] for row in kept]
    return CompressionReport(ratio, full, now, kept, rates)


def kvpress_answer(model, tokenizer, method: str = "kvpress_snapkv", ratio: float = 8, mode: str = "query_aware",
                   max_new_tokens: int = 32, reports: list | None = None) -> AnswerFn:
    """answer_fn for a kvpress press: its hooks compress a DynamicCache during the prefix's prefill
    (AdaKV masks keys, so its memory does not shrink), then the suffix and greedy decoding as ours.
    A `dense_report` of each call is appended to `reports` if given."""
    ratio = _check(method, KVPRESS_METHODS, mode, ratio)
    if getattr(model.config.get_text_config(decoder=True), "sliding_window", None):
        raise ValueError(f"kvpress 0.5.5 cannot run on {type(model).__name__}: it compresses the sliding-window "
                         "layers too and their attention mask no longer fits (tested on Gemma-3-270m)")
    press = make_press(method, ratio)

    @torch.no_grad()
    def answer(prefix: list[int], suffix: list[int]) -> str:
        cache = DynamicCache(config=model.config)
        with press(model):
            logits = model(torch.tensor([prefix], device=model.device), past_key_values=cache, logits_to_keep=1).logits[0, -1]
        if reports is not None:
            reports.append(dense_report(cache, len(prefix), ratio))
        return _decode(model, tokenizer, cache, logits, suffix, len(prefix), max_new_tokens)

    return answer


def full_answer(model, tokenizer, max_new_tokens: int = 32) -> AnswerFn:
    """The full-cache reference through the same prefill / suffix / decode path."""

    @torch.no_grad()
    def answer(prefix: list[int], suffix: list[int]) -> str:
        cache = DynamicCache(config=model.config)
        logits = model(torch.tensor([prefix], device=model.device), past_key_values=cache, logits_to_keep=1).logits[0, -1]
        return _decode(model, tokenizer, cache, logits, suffix, len(prefix), max_new_tokens)

    return answer


def method_answer(model, tokenizer, method: str, ratio: float, mode: str, max_new_tokens: int = 32,
                  reports: list | None = None) -> AnswerFn:
    """Any of METHODS ("full" ignores ratio)."""
    if method == "full":
        return full_answer(model, tokenizer, max_new_tokens)
    if method in KVPRESS_METHODS:
        return kvpress_answer(model, tokenizer, method, ratio, mode, max_new_tokens, reports)
    return compressed_answer(model, tokenizer, method, ratio, mode, max_new_tokens, reports)
