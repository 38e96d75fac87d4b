"""Requests, the engine's per-request state, and what comes back."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from permkv.cache import PagedCache
from permkv.checks import check_ratio, positive_int


@dataclass
class Request:
    """Generate up to `max_new_tokens` tokens after `prompt_ids`, with the KV cache kept `ratio` times
    smaller than the tokens seen (prompt and generated tokens alike).

    `temperature` 0 is greedy; above 0 samples (nucleus `top_p`) from a generator seeded with `seed`,
    so the same request gives the same tokens. `ignore_eos` generates exactly `max_new_tokens`
    (a throughput benchmark's fixed output length).
    """

    prompt_ids: list[int]
    max_new_tokens: int = 128
    ratio: float = 1.0  # 1 = no compression; 8 = the cache holds ~1/8 of the tokens seen
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    context: int | None = None  # a context the engine holds (`Engine.add_context`): prompt_ids follow it

    def __post_init__(self):
        if not self.prompt_ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.prompt_ids):
            raise ValueError(f"prompt_ids must be a non-empty list of ints, got {self.prompt_ids!r:.80}")
        positive_int("max_new_tokens", self.max_new_tokens)
        check_ratio(self.ratio)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


class Phase(Enum):
    WAITING = "waiting"  # queued, holds no blocks
    PREFILL = "prefill"  # reading its context chunk by chunk
    SCORE = "score"  # re-reading its context chunk by chunk (KVzip-style scores), then compressed
    DECODE = "decode"  # one token per step
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request inside the engine. While decoding, its next input is `tokens[-1]` at `position`.

    `context` is what a prefill reads: the prompt, or after a preemption the prompt and every token
    generated so far (recompute: the tokens already given out are kept, not generated again).
    """

    id: int
    request: Request
    arrival: float  # perf_counter when added
    builds_context: bool = False  # read (and compress) the prompt, then keep it as a context; no decoding
    base: int = 0  # positions before its own tokens: a forked context's
    phase: Phase = Phase.WAITING
    tokens: list[int] = field(default_factory=list)  # generated so far
    cache: PagedCache | None = None  # its own one-sequence cache on the engine's pool, while it runs
    context: list[int] = field(default_factory=list)
    read: int = 0  # tokens of `context` in the cache
    scored: int = 0  # tokens of `context` re-read (SCORE)
    scores: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> per re-read chunk (kv_heads, c)
    prompt_kept: dict[int, list[int]] = field(default_factory=dict)  # layer -> per head: context tokens kept
    queries: deque = field(default_factory=deque)  # last decode queries, each {layer: (1, q_heads, 1, head_dim)}
    admitted: int = -1  # admission order of the current attempt (preemption takes the largest)
    shared_blocks: int = 0  # blocks its cache shared with a context when admitted
    reserved_blocks: int = 0  # free blocks admission set aside for reading its context
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    preemptions: int = 0
    compressions: int = 0
    compressed_at: int = 0  # `seen` at the last compression
    kv_tokens: float | None = None  # context tokens held per (full-attention layer, KV head) after reading, mean
    kv_bytes: int = 0  # KV bytes the cache held after reading its context
    generator: torch.Generator | None = None
    context_logits: torch.Tensor | None = None  # a context build: the logits after its last token

    def __post_init__(self):
        self.context = list(self.request.prompt_ids)
        if self.request.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.request.seed if self.request.seed is not None else self.id)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def seen(self) -> int:
        """Tokens in the cache's history once `tokens[-1]` is fed (positions 0 .. seen - 1)."""
        return self.base + self.prompt_len + len(self.tokens)

    @property
    def position(self) -> int:
        """Position of the next input, `tokens[-1]`."""
        return self.seen - 1

    @property
    def done(self) -> bool:
        return self.phase is Phase.FINISHED

    def restart(self) -> None:
        """Back to waiting without blocks: its context becomes the prompt and what it generated, to be
        read again (recompute preemption)."""
        self.phase, self.cache, self.admitted = Phase.WAITING, None, -1
        self.context = list(self.request.prompt_ids) + self.tokens
        self.read = self.scored = 0
        self.scores, self.prompt_kept = {}, {}
        self.queries.clear()
        self.compressed_at = 0
        self.preemptions += 1


@dataclass(frozen=True)
class Result:
    """A finished request. Times in seconds from its arrival."""

    id: int
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token, not kept), "length" (max_new_tokens) or "abort"
    ttft: float | None  # time to first token (None: aborted before it)
    latency: float  # end to end
    preemptions: int
    compressions: int  # decode-time compressions of the final attempt
    kv_tokens: float | None  # context tokens held per (full-attention layer, KV head) after reading, mean
    kv_bytes: int  # KV bytes held after reading the context

    @property
    def achieved_ratio(self) -> float | None:
        """Context tokens read / tokens held per head, after reading; None when not measured."""
        return self.prompt_tokens / self.kv_tokens if self.kv_tokens else None


@dataclass(frozen=True)
class RequestOutput:
    """What one `step` did for one request: the tokens it added, and, once finished, its `Result`."""

    id: int
    new_tokens: list[int]
    finished: bool
    result: Result | None = None
