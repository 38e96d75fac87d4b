"""What the RLM and `permkv serve` call to generate: `Backend.generate(prompt_ids, max_new_tokens, ratio)`.

`SequentialBackend` answers one request at a time on one model: ratio 1 reads the prompt into a full
`DynamicCache`; ratio > 1 reads it through chunked prefill with compression into a `PagedCache`
(`permkv.compress.chunked_prefill_and_compress`), so a call holds about len(prompt) / ratio + one chunk of
tokens (`kvzip=True`: what it keeps is scored by KVzip-style re-reading of each chunk). Both decode with
`permkv.eval.greedy_decode`, the one decode loop. A batched backend over the engine, `EngineBackend`,
has the same `generate` shape and batches calls that arrive together.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from permkv.cache import BlockPool, paged_attention
from permkv.checks import check_ratio, positive_int
from permkv.compress import (
    InferenceKVCacheCompression,
    chunked_prefill_and_compress,
    prefill_and_compress,
    repeat_prompt_ids,
)
from permkv.engine import Engine, EngineConfig, Request
from permkv.eval import greedy_decode, prefill, stop_ids
from permkv.models import ModelSpec


class ContextTooLong(ValueError):
    """A request whose prompt does not fit the per-request KV budget or the model's positions."""


@dataclass
class Generation:
    """One answered request, with what it measured."""

    tokens: list[int]  # generated ids, stop token excluded
    prompt_tokens: int  # tokens read
    ratio: float  # requested compression ratio (1 = none)
    kv_tokens: float | None  # prompt tokens held per (full-attention layer, KV head) after reading, mean; None: not measured
    kv_bytes: int  # KV bytes held after reading the prompt (allocated blocks, or tensor bytes at ratio 1)
    kv_pool_bytes: int  # bytes of the KV store the call ran in: the most it could hold at any time
    seconds: float  # wall time of the call
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    decode_s: float | None = None  # wall time after the prompt was read

    @property
    def achieved_ratio(self) -> float | None:
        """Prompt tokens read / prompt tokens held (per head, mean); None when not measured."""
        return self.prompt_tokens / self.kv_tokens if self.kv_tokens else None

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, ratio=self.ratio, kv_tokens=self.kv_tokens,
                    kv_bytes=self.kv_bytes, kv_pool_bytes=self.kv_pool_bytes, achieved_ratio=self.achieved_ratio,
                    seconds=self.seconds, finish_reason=self.finish_reason)


class Backend(Protocol):
    """A model behind `generate`; `check` says whether a request fits before any compute."""

    name: str
    tokenizer: object
    spec: ModelSpec

    def check(self, n_prompt: int, max_new_tokens: int, ratio: float) -> None:
        """Raise ValueError / ContextTooLong for a request that cannot run."""

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
                 speculate: bool = False) -> Generation:
        """Greedy continuation of `prompt_ids` with the KV cache compressed `ratio` times."""


def check_request(n_prompt: int, max_new_tokens: int, ratio, chunk_tokens: int, max_kv_tokens: int,
                  max_positions: int) -> float:
    """Validate one request's sizes; returns the ratio as a float.

    A prompt of n tokens at ratio r holds ceil(n / r) tokens per head after reading, plus one chunk
    while it is read (r > 1) and the answer; that must fit `max_kv_tokens`. Positions must stay within
    the model's trained window (`max_positions`): compression saves memory, not positions.
    """
    ratio = check_ratio(ratio)
    positive_int("max_new_tokens", max_new_tokens)
    if n_prompt < 1:
        raise ValueError("the prompt is empty: it must hold at least one token")
    if n_prompt + max_new_tokens > max_positions:
        raise ContextTooLong(f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the model's "
                             f"{max_positions} positions (compression saves KV memory, not positions)")
    if ratio > min(chunk_tokens, n_prompt):  # every head keeps at least one token of what it read
        raise ValueError(f"ratio {ratio:g} must be <= the prompt's {n_prompt} tokens and the chunk of "
                         f"{chunk_tokens} tokens (each head keeps at least one token)")
    held = math.ceil(n_prompt / ratio) + (min(chunk_tokens, n_prompt) if ratio > 1 else 0) + max_new_tokens
    if held > max_kv_tokens:
        raise ContextTooLong(f"prompt of {n_prompt} tokens at ratio {ratio:g} holds {held} tokens per head "
                             f"(with the chunk being read and {max_new_tokens} new tokens), over the per-request "
                             f"KV budget of {max_kv_tokens} tokens: raise the ratio or shorten the prompt")
    return ratio


def _dense_bytes(cache) -> int:
    return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)


@dataclass
class SequentialBackend:
    """One model, one request at a time (a lock), compressed or not per request.

    `max_kv_tokens`: per-request KV budget in tokens per head (default: the model's window).
    `chunk_tokens`: chunk size of the compressed prefill (r > 1); must cover the compressor's
    protected window and observation window.
    """

    model: object
    tokenizer: object
    spec: ModelSpec
    name: str = ""  # the model name clients ask for (default: spec.name)
    max_kv_tokens: int | None = None
    chunk_tokens: int = 512
    compression: InferenceKVCacheCompression | None = None
    kvzip: bool = False  # score compressed reads by KVzip-style re-reading (query-agnostic, ~2x the reading compute)

    def __post_init__(self):
        self.name = self.name or self.spec.name
        self.max_kv_tokens = self.max_kv_tokens or self.spec.max_positions
        if self.max_kv_tokens < 1:
            raise ValueError(f"max_kv_tokens must be >= 1, got {self.max_kv_tokens}")
        # kvzip: re-reading with one global top-k (notebook 02's best); else KV-Compress's attention score
        self.compression = self.compression or InferenceKVCacheCompression(scorer="kvzip" if self.kvzip else "kvcompress")
        floor = max(self.compression.observe, self.compression.window + self.compression.sinks)
        if self.chunk_tokens < floor:
            raise ValueError(f"chunk_tokens must be >= {floor} (the compressor's protected and observed tokens), "
                             f"got {self.chunk_tokens}")
        self._lock = threading.Lock()
        self._stop = stop_ids(self.model, self.tokenizer)
        self._reread = repeat_prompt_ids(self.tokenizer, self.spec) if self.compression.rereads else None

    def check(self, n_prompt: int, max_new_tokens: int, ratio: float) -> None:
        check_request(n_prompt, max_new_tokens, ratio, self.chunk_tokens, self.max_kv_tokens, self.spec.max_positions)

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
                 speculate: bool = False) -> Generation:
        """Greedy continuation; `speculate` (ratio 1 only) decodes with prompt lookup (lossless)."""
        ids = list(prompt_ids)
        self.check(len(ids), max_new_tokens, ratio)
        if speculate and ratio != 1:
            raise ValueError(f"speculate needs ratio 1 (prompt lookup rolls back an uncompressed cache), got {ratio}")
        with self._lock:
            t0 = time.perf_counter()
            if speculate:
                return self._speculative(ids, max_new_tokens, t0)
            if ratio == 1:
                cache, logits = prefill(self.model, ids)
                kv_tokens, kv_bytes = float(len(ids)), _dense_bytes(cache)
                t_read = time.perf_counter()
                out = greedy_decode(self.model, cache, logits, start=len(ids), max_new_tokens=max_new_tokens,
                                    stop=self._stop)
                pool = max(kv_bytes, _dense_bytes(cache))
            else:
                if len(ids) > self.chunk_tokens:
                    cache, logits, report = chunked_prefill_and_compress(
                        self.model, ids, ratio, self.compression, self.chunk_tokens, extra_tokens=max_new_tokens + 16,
                        reread=self._reread)
                else:
                    cache, logits, report = prefill_and_compress(self.model, ids, ratio, self.compression,
                                                                 extra_tokens=max_new_tokens + 16, reread=self._reread)
                full = [row for row, layer in zip(report.kept, cache.layers) if not layer.is_sliding]
                kv_tokens = sum(map(sum, full)) / max(sum(map(len, full)), 1)
                kv_bytes = report.compressed_bytes
                t_read = time.perf_counter()
                with paged_attention(self.model):
                    out = greedy_decode(self.model, cache, logits, start=len(ids), max_new_tokens=max_new_tokens,
                                        stop=self._stop)
                pool = cache.pool.stats().capacity_bytes
            reason = "length" if len(out) == max_new_tokens else "stop"
            end = time.perf_counter()
            return Generation(out, len(ids), float(ratio), kv_tokens, kv_bytes, pool, end - t0, reason, end - t_read)

    def _speculative(self, ids: list[int], max_new_tokens: int, t0: float) -> Generation:
        from permkv.speculate import Backoff, PromptLookup, speculative_generate

        result = speculative_generate(self.model, ids, max_new_tokens, Backoff(PromptLookup()), sorted(self._stop))
        out = result.tokens
        reason = "length"
        for i, token in enumerate(out):
            if token in self._stop:
                out, reason = out[:i], "stop"
                break
        kv = _dense_bytes(result.cache)  # the prompt and the answer but its last token
        return Generation(out, len(ids), 1.0, float(len(ids)), kv, kv,
                          time.perf_counter() - t0, reason, decode_s=result.stats.decode_s)


class EngineBackend:
    """Concurrent `generate` calls batched on the continuous-batching engine (`permkv.engine.Engine`).

    Calls wait in a queue; a worker thread takes everything queued (after waiting `window_s` for
    stragglers) and runs it as one engine batch, so calls that arrive together (the server's concurrent
    requests, one RLM level's sub-calls) decode together over one paged pool of `pool_bytes`. The engine
    keeps each sequence `ratio` times smaller during decoding too (continual compression). Per-request
    KV numbers are not reported by the engine: `kv_tokens` is None and `kv_pool_bytes` is the shared
    pool's size.
    """

    def __init__(self, model, tokenizer, spec: ModelSpec, name: str = "", pool_bytes: int = 2**30,
                 max_kv_tokens: int | None = None, chunk_tokens: int = 512, window_s: float = 0.01):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.name = name or spec.name
        self.max_kv_tokens = max_kv_tokens or spec.max_positions
        self.chunk_tokens = chunk_tokens
        self.window_s = window_s
        pool = BlockPool.from_bytes(pool_bytes, block_size=16, head_dim=spec.head_dim, dtype=model.dtype,
                                    device=model.device)
        self.engine = Engine(model, pool, EngineConfig(chunk_tokens=chunk_tokens), stop=stop_ids(model, tokenizer))
        self.batches: list[int] = []  # size of every engine batch run (how much batching happened)
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()

    def check(self, n_prompt: int, max_new_tokens: int, ratio: float) -> None:
        check_request(n_prompt, max_new_tokens, ratio, self.chunk_tokens, self.max_kv_tokens, self.spec.max_positions)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
                 speculate: bool = False) -> Generation:
        if speculate:
            raise ValueError("speculate is not available on the engine backend (batched greedy decoding)")
        self.check(len(prompt_ids), max_new_tokens, ratio)
        done: Future = Future()
        self._queue.put((Request(list(prompt_ids), max_new_tokens, float(ratio)), done))
        return done.result()

    def _work(self) -> None:
        while True:
            batch = [self._queue.get()]
            time.sleep(self.window_s)
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self.batches.append(len(batch))
            waiting = {}
            for request, done in batch:  # a request the engine refuses fails alone
                try:
                    waiting[self.engine.add(request)] = (request, done)
                except ValueError as err:
                    done.set_exception(err)
            if not waiting:
                continue
            try:
                with torch.no_grad():
                    results = self.engine.run(progress=False)
            except Exception as err:  # every waiting caller gets the error, the worker goes on
                for _, done in waiting.values():
                    done.set_exception(err)
                continue
            pool = self.engine.pool.stats().capacity_bytes
            for result in results:
                request, done = waiting[result.id]
                reason = "length" if len(result.tokens) >= request.max_new_tokens else "stop"
                done.set_result(Generation(list(result.tokens), result.prompt_tokens, request.ratio, None, 0, pool,
                                           result.latency, reason))
