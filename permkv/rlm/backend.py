"""What the RLM and `permkv serve` call to generate: `Backend.generate(prompt_ids, max_new_tokens, ratio)`,
or `Backend.stream(...)` for the tokens as they come.

`SequentialBackend` answers one request at a time on one model: ratio 1 reads the prompt into a full
`DynamicCache`; ratio > 1 reads it through chunked prefill with compression into a `PagedCache`
(`permkv.compress.chunked_prefill_and_compress`), so a call holds about len(prompt) / ratio + one chunk of
tokens (by default what it keeps is scored by KVzip-style re-reading of each chunk). Both decode with
`permkv.eval.greedy_decode`, the one decode loop; greedy only. `EngineBackend` serves the same calls
from the step-driven engine (`permkv.engine`) on one paged pool: concurrent calls join the next step
and decode together; it also samples (temperature, top_p, seed).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from permkv.cache import BlockPool, forward, paged_attention
from permkv.checks import check_ratio, positive_int
from permkv.compress import (
    ContextCache,
    ContextReport,
    InferenceKVCacheCompression,
    chunked_prefill_and_compress,
    prefill_and_compress,
    repeat_prompt_ids,
)
from permkv.engine import Engine, EngineConfig, EngineLoop, Request
from permkv.eval import greedy_decode, prefill, stop_ids
from permkv.models import ModelSpec
from permkv.speculate import SuffixDraft, SuffixIndex, VerifyCost, speculative_generate


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
    ttft: float | None = None  # time to the first token
    context_tokens: int = 0  # tokens of a shared compressed context it read from (not computed again)
    forward_passes: int | None = None  # model calls of a speculative call (prefill included); None: not counted

    @property
    def achieved_ratio(self) -> float | None:
        """Prompt tokens read / prompt tokens held (per head, mean); None when not measured."""
        return self.prompt_tokens / self.kv_tokens if self.kv_tokens else None

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, ratio=self.ratio, kv_tokens=self.kv_tokens,
                    kv_bytes=self.kv_bytes, kv_pool_bytes=self.kv_pool_bytes, achieved_ratio=self.achieved_ratio,
                    seconds=self.seconds, finish_reason=self.finish_reason, ttft=self.ttft,
                    context_tokens=self.context_tokens, forward_passes=self.forward_passes)


@dataclass(frozen=True)
class Context:
    """A context a backend read and compressed once, for later requests to continue (`create_context`)."""

    id: int
    ids: list[int]
    ratio: float
    report: ContextReport


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: temperature 0 is greedy; above 0 nucleus sampling, seeded."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


class TokenStream:
    """One generation's tokens as they come: iterating yields lists of new token ids; then `generation`
    holds the finished call. `abort()` stops it (the backend gives its memory back)."""

    def __init__(self, abort=None):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._abort = abort
        self.generation: Generation | None = None

    def put(self, item) -> None:
        """New tokens (list), the finished `Generation`, or an exception; None ends an aborted stream."""
        self._queue.put(item)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            if isinstance(item, Generation):
                self.generation = item
                return
            yield item

    def abort(self) -> None:
        if self._abort is not None:
            self._abort()


class Backend(Protocol):
    """A model behind `generate` / `stream`; `check` says whether a request fits before any compute."""

    name: str
    tokenizer: object
    spec: ModelSpec

    def check(self, n_prompt: int, max_new_tokens: int, ratio: float, sampling: Sampling = GREEDY,
              speculate: bool = False) -> None:
        """Raise ValueError / ContextTooLong for a request that cannot run."""

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
                 speculate: bool = False, sampling: Sampling = GREEDY) -> Generation:
        """The continuation of `prompt_ids` with the KV cache compressed `ratio` times."""

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
               speculate: bool = False, sampling: Sampling = GREEDY, context: int | None = None) -> TokenStream:
        """The same, its tokens as they come; `context`: continue a context made by `create_context`."""

    def create_context(self, ids: Sequence[int], ratio: float) -> Context:
        """Read `ids` once, compressed to 1/ratio (KVzip-style, query-agnostic), for later requests."""

    def release_context(self, context_id: int) -> None:
        """Give a context's memory back (KeyError if unknown, ValueError while a request reads it)."""

    def has_context(self, context_id: int) -> bool:
        """Whether the context is still held (the engine releases idle ones when it needs blocks)."""


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
    compression: InferenceKVCacheCompression = field(default_factory=InferenceKVCacheCompression)  # KVzip-style
    verify_cost: VerifyCost | None = None  # speculation's verify cost; None: measured on the first speculative call
    history_tokens: int = 65536  # earlier outputs the speculative drafter also searches (0: none)

    def __post_init__(self):
        self.name = self.name or self.spec.name
        self.max_kv_tokens = self.max_kv_tokens or self.spec.max_positions
        if self.max_kv_tokens < 1:
            raise ValueError(f"max_kv_tokens must be >= 1, got {self.max_kv_tokens}")
        floor = max(self.compression.observe, self.compression.window + self.compression.sinks)
        if not self.compression.rereads and self.chunk_tokens < floor:
            raise ValueError(f"chunk_tokens must be >= {floor} (the compressor's protected and observed tokens), "
                             f"got {self.chunk_tokens}")
        if self.history_tokens < 0:
            raise ValueError(f"history_tokens must be >= 0, got {self.history_tokens}")
        self._lock = threading.Lock()
        self._outputs: deque[list[int]] = deque()  # earlier outputs, newest last
        self._history = SuffixIndex()
        self._stop = stop_ids(self.model, self.tokenizer)
        self._repeat = repeat_prompt_ids(self.tokenizer, self.spec)
        self._reread = self._repeat if self.compression.rereads else None
        self._contexts: dict[int, ContextCache] = {}
        self._next_context = 0

    def check(self, n_prompt: int, max_new_tokens: int, ratio: float, sampling: Sampling = GREEDY,
              speculate: bool = False, context: int | None = None) -> None:
        if context is not None:
            ctx = self._context(context)
            check_request(n_prompt, max_new_tokens, 1, self.chunk_tokens, self.max_kv_tokens,
                          self.spec.max_positions - ctx.seen)
            if ratio not in (1, ctx.ratio):
                raise ValueError(f"a request on context {context} reads its own tokens whole after the context "
                                 f"compressed {ctx.ratio:g}x: ratio must be 1 or {ctx.ratio:g}, got {ratio:g}")
            if speculate:
                raise ValueError("speculate is not available on a shared context (it rolls back an uncompressed cache)")
        else:
            check_request(n_prompt, max_new_tokens, ratio, self.chunk_tokens, self.max_kv_tokens, self.spec.max_positions)
        if not sampling.greedy:
            raise ValueError("temperature > 0 needs the engine backend (`permkv serve --engine`): the sequential "
                             "backend decodes greedily")
        if speculate and ratio != 1:
            raise ValueError(f"speculate needs ratio 1 (prompt lookup rolls back an uncompressed cache), got {ratio}")

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
                 speculate: bool = False, sampling: Sampling = GREEDY, context: int | None = None) -> Generation:
        """Greedy continuation; `speculate` (ratio 1 only) decodes with prompt lookup (lossless)."""
        ids = list(prompt_ids)
        self.check(len(ids), max_new_tokens, ratio, sampling, speculate, context)
        with self._lock:
            return self._generate(ids, max_new_tokens, ratio, speculate, None, context)

    def create_context(self, ids: Sequence[int], ratio: float) -> Context:
        """Read `ids` once, compressed by KVzip-style re-reading with one global top-k, on a pool of its own
        with room for one request's tokens on top (the backend answers one request at a time)."""
        ids = list(ids)
        check_request(len(ids), 1, ratio, len(ids), self.max_kv_tokens, self.spec.max_positions)
        with self._lock:
            ctx = ContextCache.build(self.model, ids, ratio, self._repeat,
                                     extra_tokens=min(self.max_kv_tokens, self.spec.max_positions))
            cid, self._next_context = self._next_context, self._next_context + 1
            self._contexts[cid] = ctx
        return Context(cid, ids, ctx.ratio, ctx.report)

    def release_context(self, context_id: int) -> None:
        with self._lock:
            self._context(context_id).release()
            del self._contexts[context_id]

    def has_context(self, context_id: int) -> bool:
        return context_id in self._contexts

    def _context(self, context_id: int) -> ContextCache:
        if context_id not in self._contexts:
            raise KeyError(f"context {context_id} does not exist (never made, or released)")
        return self._contexts[context_id]

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
               speculate: bool = False, sampling: Sampling = GREEDY, context: int | None = None) -> TokenStream:
        """`generate` in a thread of its own, each token handed over as soon as it is chosen."""
        ids = list(prompt_ids)
        self.check(len(ids), max_new_tokens, ratio, sampling, speculate, context)
        stop = threading.Event()
        stream = TokenStream(abort=stop.set)

        def on_token(token: int) -> None:
            if stop.is_set():
                raise _Aborted
            stream.put([token])

        def work() -> None:
            try:
                with self._lock:
                    gen = self._generate(ids, max_new_tokens, ratio, speculate, on_token, context)
            except _Aborted:
                stream.put(None)
            except Exception as err:  # the caller sees the failure
                stream.put(err)
            else:
                if speculate:  # speculation hands its tokens over at the end
                    stream.put(list(gen.tokens))
                stream.put(gen)

        threading.Thread(target=work, daemon=True).start()
        return stream

    @torch.no_grad()
    def _generate(self, ids: list[int], max_new_tokens: int, ratio: float, speculate: bool, on_token,
                  context: int | None = None) -> Generation:
        t0 = time.perf_counter()
        if speculate:
            return self._speculative(ids, max_new_tokens, t0)
        if context is not None:
            return self._on_context(self._context(context), ids, max_new_tokens, on_token, t0)
        if ratio == 1:
            cache, logits = prefill(self.model, ids)
            kv_tokens, kv_bytes = float(len(ids)), _dense_bytes(cache)
            t_read = time.perf_counter()
            out = greedy_decode(self.model, cache, logits, start=len(ids), max_new_tokens=max_new_tokens,
                                stop=self._stop, on_token=on_token)
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
                                    stop=self._stop, on_token=on_token)
            pool = cache.pool.stats().capacity_bytes
        reason = "length" if len(out) == max_new_tokens else "stop"
        end = time.perf_counter()
        return Generation(out, len(ids), float(ratio), kv_tokens, kv_bytes, pool, end - t0, reason, end - t_read,
                          t_read - t0)

    def _on_context(self, ctx: ContextCache, ids: list[int], max_new_tokens: int, on_token, t0: float) -> Generation:
        """`ids` read on a fork of the shared context (never read again), then greedy decoding."""
        fork = ctx.fork()
        try:
            with paged_attention(self.model):
                logits = forward(self.model, fork, torch.tensor([ids], device=self.model.device))[0, -1]
                t_read = time.perf_counter()
                out = greedy_decode(self.model, fork, logits, start=ctx.seen + len(ids), max_new_tokens=max_new_tokens,
                                    stop=self._stop, on_token=on_token)
            kv_bytes = fork.stats().allocated_bytes
        finally:
            fork.reset()
        end = time.perf_counter()
        reason = "length" if len(out) == max_new_tokens else "stop"
        return Generation(out, len(ids), ctx.ratio, ctx.report.kept + len(ids), kv_bytes,
                          ctx.cache.pool.stats().capacity_bytes, end - t0, reason, end - t_read, t_read - t0,
                          ctx.report.tokens)

    def _speculative(self, ids: list[int], max_new_tokens: int, t0: float) -> Generation:
        """Suffix-tree drafts over the prompt, the output so far and this backend's earlier outputs,
        sized by the verify cost of this machine (measured once); the tokens are greedy's."""
        if self.verify_cost is None:
            self.verify_cost = VerifyCost.measure(self.model, repeats=3)
        drafter = SuffixDraft(cost=self.verify_cost, history=self._history if self.history_tokens else None)
        result = speculative_generate(self.model, ids, max_new_tokens, drafter, sorted(self._stop))
        out = result.tokens
        reason = "length"
        for i, token in enumerate(out):
            if token in self._stop:
                out, reason = out[:i], "stop"
                break
        self._remember(out)
        kv = _dense_bytes(result.cache)  # the prompt and the answer but its last token
        return Generation(out, len(ids), 1.0, float(len(ids)), kv, kv, time.perf_counter() - t0, reason,
                          decode_s=result.stats.decode_s, forward_passes=result.stats.forward_passes)

    def _remember(self, tokens: list[int]) -> None:
        """Add an output to the drafter's history, dropping the oldest beyond `history_tokens`."""
        if not self.history_tokens or not tokens:
            return
        self._outputs.append(list(tokens))
        if sum(len(t) + 1 for t in self._outputs) <= self.history_tokens:
            self._history.add_document(tokens)
            return
        while len(self._outputs) > 1 and sum(len(t) + 1 for t in self._outputs) > self.history_tokens:
            self._outputs.popleft()
        self._history = SuffixIndex()
        for t in self._outputs:
            self._history.add_document(t)


class _Aborted(Exception):
    """Raised inside a sequential generation whose stream was aborted."""


class EngineBackend:
    """`generate` / `stream` on the step-driven engine (`permkv.engine.Engine`), driven by one background
    loop (`permkv.engine.EngineLoop`): a call joins the next step whenever it arrives, so concurrent calls
    (the server's requests, one RLM level's sub-calls) decode together over one paged pool of
    `pool_bytes`. Compressed requests are scored as `config.compression` says (default KVzip-style
    re-reading with one global top-k) and kept `ratio` times smaller while they decode too.
    """

    def __init__(self, model, tokenizer, spec: ModelSpec, name: str = "", pool_bytes: int = 2**30,
                 max_kv_tokens: int | None = None, config: EngineConfig | None = None):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.name = name or spec.name
        self.max_kv_tokens = max_kv_tokens or spec.max_positions
        self.config = config or EngineConfig()
        pool = BlockPool.from_bytes(pool_bytes, block_size=16, head_dim=spec.head_dim, dtype=model.dtype,
                                    device=model.device)
        reread = repeat_prompt_ids(tokenizer, spec) if self.config.kvzip else None
        self.engine = Engine(model, pool, self.config, stop=stop_ids(model, tokenizer), reread=reread)
        self.loop = EngineLoop(self.engine)

    def close(self) -> None:
        """Stop the engine's loop; the model gets its own attention implementation back."""
        self.loop.close()

    def __enter__(self) -> EngineBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, n_prompt: int, max_new_tokens: int, ratio: float, sampling: Sampling = GREEDY,
              speculate: bool = False, context: int | None = None) -> None:
        seen = 0
        if context is not None:
            if context not in self.engine.contexts:
                raise KeyError(f"context {context} does not exist (never made, or released to free its blocks)")
            seen = self.engine.contexts[context].seen
        check_request(n_prompt, max_new_tokens, 1 if context is not None else ratio, self.config.chunk_tokens,
                      self.max_kv_tokens, self.spec.max_positions - seen)
        if speculate:
            raise ValueError("speculate is not available on the engine backend (batched decoding)")

    def create_context(self, ids: Sequence[int], ratio: float) -> Context:
        """Read `ids` in the engine's steps, compressed as the engine's config says, into its pool."""
        ids = list(ids)
        check_request(len(ids), 1, ratio, len(ids), self.max_kv_tokens, self.spec.max_positions)
        stream = self.loop.submit_context(ids, ratio)
        stream.wait()
        return Context(stream.id, ids, float(ratio), self.engine.contexts[stream.id].report)

    def has_context(self, context_id: int) -> bool:
        return context_id in self.engine.contexts

    def release_context(self, context_id: int) -> None:
        if not self.loop.call(lambda e: e.release_context(context_id)):
            raise KeyError(f"context {context_id} does not exist (never made, or released)")

    def _request(self, prompt_ids, max_new_tokens, ratio, sampling: Sampling, context: int | None) -> Request:
        return Request(list(prompt_ids), max_new_tokens, float(ratio), sampling.temperature, sampling.top_p, sampling.seed,
                       context=context)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
                 speculate: bool = False, sampling: Sampling = GREEDY, context: int | None = None) -> Generation:
        stream = self.stream(prompt_ids, max_new_tokens, ratio, speculate, sampling, context)
        for _ in stream:
            pass
        return stream.generation

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, ratio: float = 1.0,
               speculate: bool = False, sampling: Sampling = GREEDY, context: int | None = None) -> TokenStream:
        self.check(len(prompt_ids), max_new_tokens, ratio, sampling, speculate, context)
        shared = self.engine.contexts[context].report.tokens if context is not None else 0
        inner = self.loop.submit(self._request(prompt_ids, max_new_tokens, ratio, sampling, context))
        stream = TokenStream(abort=lambda: self.loop.abort(inner))
        pool = self.engine.pool.stats().capacity_bytes

        def relay() -> None:
            try:
                for out in inner:
                    if out.new_tokens:
                        stream.put(list(out.new_tokens))
            except Exception as err:
                stream.put(err)
                return
            r = inner.result
            if r is None:  # aborted
                stream.put(None)
                return
            reason = "length" if r.finish_reason == "length" else "stop"
            stream.put(Generation(list(r.tokens), r.prompt_tokens, float(ratio), r.kv_tokens, r.kv_bytes, pool,
                                  r.latency, reason, None, r.ttft, shared))

        threading.Thread(target=relay, daemon=True).start()
        return stream

    def metrics(self) -> dict[str, float]:
        """The engine's gauges and counters, for the server's /metrics."""
        e, s = self.engine, self.engine.stats
        return {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
                "kv_blocks_used": e.pool.num_blocks - e.pool.num_free, "kv_blocks_free": e.pool.num_free,
                "preemptions": s.preemptions, "steps": s.steps, "computed_tokens": s.computed_tokens}
