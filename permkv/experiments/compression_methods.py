"""The compression methods notebook 02 compares, each answering on one shared prefill (`Prefilled`).

A method's name says what it is:
- permkv's compressor: `<scorer>/<allocator>/w<N>` for a scorer that reads the last N observed queries
  (`InferenceKVCacheCompression(scorer, allocator, observe=N)`), `<scorer>/<allocator>` for one that reads
  none (`kvzip`: the model re-reads the context; `streaming`, `knorm`, `random`). Scorers are
  `permkv.compress.SCORERS`, allocators `permkv.compress.ALLOCATORS` ("uniform": the same budget per head,
  "layer": per layer, "global": one top-k over all heads);
- `kvpress/<press>`: a kvpress press (`permkv.baselines.kvpress.PRESSES`), post hoc on the saved prefill;
- `full`: the uncompressed reference.
Each method is a small frozen dataclass with `answer(model, tokenizer, pre, ratio, max_new_tokens) ->
(text, report)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from permkv.baselines import kvpress as kvp
from permkv.compress import KVZIP_SCORER, InferenceKVCacheCompression, Prefilled


@dataclass(frozen=True)
class Full:
    """The uncompressed reference, decoded from an uncompressed fork of the one prefill (no second
    prefill: a third of 02's time at 4K on a CPU). It is notebook 00's answer (`full_cache_answer`):
    the same loop over the same keys and values (up to rounding after `Prefilled.extend`), pinned by
    tests."""

    kind = "full"

    def answer(self, model, tokenizer, pre: Prefilled, ratio: float, max_new_tokens: int):
        text, _ = pre.answer(model, tokenizer, max_new_tokens, lambda fork: None)
        return text, None


@dataclass(frozen=True)
class Permkv:
    """permkv's compressor (scorer, allocator, observation window) on a fork of the prefilled sequence."""

    scorer: str
    allocator: str = "uniform"
    observe: int = 64  # last queries that score the cache
    kind = "permkv"

    def compression(self) -> InferenceKVCacheCompression:
        return InferenceKVCacheCompression(scorer=self.scorer, allocator=self.allocator, observe=self.observe)

    def setting(self) -> dict:
        """What the quality table keys this method's rows by (`InferenceKVCacheCompression`'s fields)."""
        return dict(scorer=self.scorer, allocator=self.allocator, observe=self.observe)

    def answer(self, model, tokenizer, pre: Prefilled, ratio: float, max_new_tokens: int):
        return pre.answer(model, tokenizer, max_new_tokens,
                          lambda fork: self.compression().compress_auto(fork, ratio, pre.queries))


@dataclass(frozen=True)
class PermkvKVzip:
    """permkv's compressor with KVzip-style scores (query-agnostic: the model re-reads the context on
    forks of the cache)."""

    allocator: str = "uniform"
    chunk_tokens: int = 1024  # context tokens re-read per pass
    kind = "permkv"

    def setting(self) -> dict:
        """Quality-table key: scorer "kvzip", no observed queries (`InferenceKVCacheCompression.setting()`)."""
        return dict(scorer=KVZIP_SCORER, allocator=self.allocator, observe=0)

    def answer(self, model, tokenizer, pre: Prefilled, ratio: float, max_new_tokens: int):
        scores = pre.kvzip(model, pre.repeat_prompt, self.chunk_tokens)
        compressor = InferenceKVCacheCompression(KVZIP_SCORER, self.allocator).compressor()
        return pre.answer(model, tokenizer, max_new_tokens, lambda fork: compressor.compress(fork, ratio, scores=scores))


@dataclass(frozen=True)
class Press:
    """A kvpress press, post hoc on the saved prefill's layer inputs (KVzip: its own prefill and
    re-reading passes, once per sample for every ratio)."""

    press: str
    kind = "kvpress"

    def answer(self, model, tokenizer, pre: Prefilled, ratio: float, max_new_tokens: int):
        kvp.check_model(model)
        if self.press == "kvzip":  # its own prefill and re-reading, once per sample; masks per ratio
            scored = pre.memo("kvpress_kvzip", lambda: kvp.kvzip_scored(model, pre.prefix))
            cache, logits = scored.cache(model), scored.logits
            kvp.mask_kvzip(model, scored, ratio)
        else:
            press = kvp.make_press(self.press, ratio)
            cache, logits = kvp.compress_post_hoc(model, press, pre.inputs, pre.keys_values()), pre.logits
        report = kvp.dense_report(cache, len(pre.prefix), ratio)
        return kvp.answer_from(model, tokenizer, cache, logits, len(pre.prefix), pre.suffix, max_new_tokens), report


FULL = "full"
RANDOM = "random/uniform"  # the floor every permkv method is compared with

METHODS: dict[str, Full | Permkv | PermkvKVzip | Press] = {
    FULL: Full(),  # the uncompressed cache
    "kvcompress/uniform/w64": Permkv("kvcompress", "uniform", 64),  # KV-Compress's score, the same budget per head
    "kvcompress/uniform/w8": Permkv("kvcompress", "uniform", 8),  # the same from 8 observed queries
    "kvcompress/layer/w64": Permkv("kvcompress", "layer", 64),  # KV-Compress's score, a budget per layer
    "kvcompress/global/w64": Permkv("kvcompress", "global", 64),  # KV-Compress's score, one top-k over all heads
    "kvcompress/global/w8": Permkv("kvcompress", "global", 8),  # KV-Compress's own setting (it drains some heads)
    "kvcompress_pooled/uniform/w64": Permkv("kvcompress_pooled", "uniform", 64),  # SnapKV's pooling on KV-Compress's score
    "kvcompress_recency/uniform/w64": Permkv("kvcompress_recency", "uniform", 64),  # half KV-Compress's score, half recency
    "snapkv/uniform/w64": Permkv("snapkv", "uniform", 64),  # SnapKV's pooled attention score, the same budget per head
    # SnapKV's score from the last query only: Gemma-3's best query-aware method (its base-model prompt ends
    # in "Answer:", whose query retrieves)
    "snapkv/uniform/w1": Permkv("snapkv", "uniform", 1),
    "snapkv/global/w8": Permkv("snapkv", "global", 8),  # SnapKV's score, one top-k over all heads
    "streaming/uniform": Permkv("streaming"),  # StreamingLLM: sinks and the most recent tokens
    "knorm/uniform": Permkv("knorm"),  # the smallest key norms kept
    RANDOM: Permkv("random"),  # random eviction
    "kvzip/uniform": PermkvKVzip("uniform"),  # KVzip-style re-reading scores, the same budget per head
    # KVzip-style scores are attention maxima, comparable across heads, so one global top-k works where it
    # drains heads on KV-Compress's scores: the best query-agnostic method measured (the library default)
    "kvzip/global": PermkvKVzip("global"),
    **{f"kvpress/{name}": Press(name) for name in kvp.PRESSES},  # each kvpress press, post hoc
}


def is_permkv(name: str) -> bool:
    """Whether `name` is one of permkv's own methods (not the full cache, not a kvpress press)."""
    return getattr(METHODS.get(name), "kind", None) == "permkv"


def is_press(name: str) -> bool:
    """Whether `name` is a kvpress press."""
    return getattr(METHODS.get(name), "kind", None) == "kvpress"


def check_methods(methods: Sequence[str]) -> None:
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty list of {list(METHODS)}, got {list(methods)!r}")
