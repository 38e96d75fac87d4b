"""Requests, the engine's per-request state, and what comes back."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from permkv.checks import check_ratio, positive_int


@dataclass
class Request:
    """Greedy generation of up to `max_new_tokens` tokens after `prompt_ids`, with the KV cache kept
    `ratio` times smaller than the tokens seen (prompt and generated tokens alike)."""

    prompt_ids: list[int]
    max_new_tokens: int = 128
    ratio: float = 1.0  # 1 = no compression; 8 = the cache holds ~1/8 of the tokens seen

    def __post_init__(self):
        if not self.prompt_ids or not all(isinstance(t, int) for t in self.prompt_ids):
            raise ValueError(f"prompt_ids must be a non-empty list of ints, got {self.prompt_ids!r:.80}")
        positive_int("max_new_tokens", self.max_new_tokens)
        check_ratio(self.ratio)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request inside the engine. While running, its next input is `tokens[-1]` at `position`."""

    id: int
    request: Request
    arrival: float  # perf_counter when added
    status: Status = Status.WAITING
    tokens: list[int] = field(default_factory=list)  # generated so far (this attempt)
    admitted: int = -1  # admission order of the current attempt (preemption takes the largest)
    first_token_time: float | None = None  # kept across preemptions: the user saw that token then
    finish_time: float | None = None
    preemptions: int = 0
    compressions: int = 0
    compressed_at: int = 0  # `seen` at the last compression
    queries: deque = field(default_factory=deque)  # last decode queries, each (q_heads, layers, head_dim)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def seen(self) -> int:
        """Tokens in the cache's history once `tokens[-1]` is fed (positions 0 .. seen - 1)."""
        return self.prompt_len + len(self.tokens)

    @property
    def position(self) -> int:
        """Position of the next input, `tokens[-1]`."""
        return self.seen - 1

    def restart(self) -> None:
        """Back to the waiting state with nothing generated: it will be prefilled and decoded again
        (recompute; greedy decoding gives the same tokens)."""
        self.status, self.tokens, self.admitted = Status.WAITING, [], -1
        self.compressions, self.compressed_at = 0, 0
        self.queries.clear()
        self.preemptions += 1


@dataclass(frozen=True)
class Result:
    """A finished request. Times in seconds from its arrival."""

    id: int
    prompt_tokens: int
    tokens: list[int]
    ttft: float  # time to first token
    latency: float  # end to end
    preemptions: int
    compressions: int  # decode-time compressions of the final attempt

