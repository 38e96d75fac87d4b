"""Who runs next: a FIFO waiting queue, admission by the pool's free blocks, preemption of the youngest.

Block accounting asks the batch `PagedCache` (its `blocks_needed` knows layers, KV heads and sliding
windows). A request is admitted when the blocks its prefill can hold at its peak fit in the free blocks
with `watermark` of the pool left over for the running sequences' growth (vLLM's watermark). When a
decode step finds no room, the most recently admitted sequence gives all its blocks back and goes to
the front of the queue to be recomputed (vLLM's recompute preemption), so the oldest keep going; no
request is admitted again until a running one finishes (else the one just preempted would be prefilled
again at once and preempted again at the next step).
"""

from __future__ import annotations

import math
from collections import deque

from permkv.cache import PagedCache
from permkv.engine.sequence import Sequence, Status


class Scheduler:
    """`waiting` (FIFO) and `running` (in the batch cache's row order) sequences."""

    def __init__(self, cache: PagedCache, chunk_tokens: int, compress_every: int, watermark: float):
        self.cache = cache
        self.chunk_tokens = chunk_tokens
        self.compress_every = compress_every
        self.watermark_blocks = math.ceil(watermark * cache.pool.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admissions = 0
        self.hold = False  # set by a preemption, cleared when a running sequence finishes

    def prefill_tokens(self, seq: Sequence) -> int:
        """Most tokens per head the sequence's cache holds during its prefill: the whole prompt, or with
        compression the compressed part read so far plus one uncompressed chunk."""
        n, ratio = seq.prompt_len, seq.request.ratio
        return n if ratio == 1 else min(n, math.ceil(n / ratio) + self.chunk_tokens)

    def peak_tokens(self, seq: Sequence) -> int:
        """Most tokens per head the sequence holds alone: its prefill peak, or 1/ratio of all it has seen
        plus the tokens generated between two compressions (at most everything, uncompressed)."""
        r = seq.request
        everything = seq.prompt_len + r.max_new_tokens
        if r.ratio == 1:
            return everything
        return min(everything, max(self.prefill_tokens(seq), math.ceil(everything / r.ratio) + self.compress_every))

    def can_admit(self, seq: Sequence) -> bool:
        needed = self.cache.blocks_needed(self.prefill_tokens(seq))
        return needed + self.watermark_blocks <= self.cache.pool.num_free

    def next_waiting(self) -> Sequence | None:
        """The head of the queue if it can be admitted now (FIFO: nobody overtakes it)."""
        if self.hold and self.running:
            return None
        return self.waiting[0] if self.waiting and self.can_admit(self.waiting[0]) else None

    def admit(self, seq: Sequence) -> None:
        """Take `seq` off the queue; it joins `running` once prefilled (`start`)."""
        assert self.waiting[0] is seq, "admit must take the head of the waiting queue"
        self.waiting.popleft()
        seq.admitted = self._admissions
        self._admissions += 1

    def start(self, seq: Sequence) -> None:
        """`seq` was prefilled and its cache joined the batch cache as its last row."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """Put a sequence whose blocks were given back at the front of the queue, to run again."""
        seq.restart()
        self.waiting.appendleft(seq)
        self.hold = True

    def youngest(self) -> int:
        """Row of the most recently admitted running sequence."""
        return max(range(len(self.running)), key=lambda i: self.running[i].admitted)
