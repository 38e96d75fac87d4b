"""Who runs in the next step: one token budget shared by every running decode and the prefill work.

Each step takes, in this order (vLLM v1's scheduler, simplified):
1. one token for every decoding sequence, oldest first. When the pool cannot hold them, the most
   recently admitted sequence gives all its blocks back and goes to the front of the queue
   (recompute preemption: it will read its prompt and what it generated again), until they fit;
2. the next piece of work of every sequence still reading its context, oldest first, within what is
   left of `step_tokens`: a prefill chunk of at most `chunk_tokens`, or one KVzip-style re-read;
3. waiting requests, first come first served, while the budget lasts and the pool holds each one's
   peak during prefill on top of what the sequences already reading will still take, plus
   `watermark` of the pool for the decoders' growth. Nothing is admitted after a preemption until a
   sequence finishes (else the one just preempted would come back and be preempted again).

The first piece of prefill work of a step is taken even beyond the budget, so a long re-read never
waits behind a large batch of decodes. Sequences are keyed by request id, never by position.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum

from permkv.cache import BlockPool, PagedCache
from permkv.engine.sequence import Phase, Sequence


class Work(Enum):
    DECODE = "decode"  # feed tokens[-1]
    PREFILL = "prefill"  # read `count` more tokens of the context
    REREAD = "reread"  # re-read one chunk of the context after the repeat prompt, on a fork


@dataclass(frozen=True)
class Item:
    """One sequence's share of a step: `count` tokens of `work`."""

    seq: Sequence
    work: Work
    count: int


class Scheduler:
    """`waiting` (FIFO) and `running` (admission order, by request id) sequences on one pool.

    `admit_blocks(seq)` is how many free blocks a sequence takes while it reads its context (at its
    peak); `new_cache(seq)` its cache when admitted (empty, or a fork of a context);
    `reread_len(seq)` the tokens of a sequence's next re-read.
    """

    def __init__(self, pool: BlockPool, probe: PagedCache, step_tokens: int, chunk_tokens: int, watermark: float,
                 admit_blocks, new_cache, reread_len):
        self.pool = pool
        self.probe = probe  # an empty cache of the model: block counts per layer and head
        self.step_tokens = step_tokens
        self.chunk_tokens = chunk_tokens
        self.watermark_blocks = math.ceil(watermark * pool.num_blocks)
        self.admit_blocks = admit_blocks
        self.new_cache = new_cache
        self.reread_len = reread_len
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.hold = False  # set by a preemption, cleared when a sequence finishes
        self._admissions = 0
        self.preempted: list[Sequence] = []  # preempted in the last `schedule`

    def schedule(self) -> list[Item]:
        """The next step's work (empty when nothing can run)."""
        self.preempted = []
        items = self._decodes()
        budget = self.step_tokens - len(items)
        free = self.pool.num_free - sum(self._blocks(i) for i in items)
        first = True  # no prefill work taken yet this step
        for seq in [s for s in self.running.values() if s.phase in (Phase.PREFILL, Phase.SCORE)]:
            item = self._next_work(seq, budget, first)
            need = 0 if item is None else self._blocks(item)
            if item is None or need > free:
                continue
            items.append(item)
            budget, free, first = budget - item.count, free - need, False
        reserved = sum(self._still_needed(s) for s in self.running.values() if s.phase in (Phase.PREFILL, Phase.SCORE))
        while self.waiting and budget > 0 and not (self.hold and self.running):
            seq = self.waiting[0]
            peak = self.admit_blocks(seq)
            if peak + reserved + (self.watermark_blocks if self.running else 0) > free:
                break
            self.waiting.popleft()
            self._admit(seq)
            item = self._next_work(seq, budget, first)
            need = self._blocks(item)
            items.append(item)
            budget, free, first = budget - item.count, free - need, False
            reserved += peak - need
        return items

    # ----- pieces of a step -------------------------------------------------------------------------
    def _decoding(self) -> list[Sequence]:
        return [s for s in self.running.values() if s.phase is Phase.DECODE]

    def _decodes(self) -> list[Item]:
        """One token for each decoding sequence, preempting the youngest until the pool holds them."""
        while True:
            decoding = self._decoding()
            need = sum(s.cache.blocks_to_grow([1]) for s in decoding)
            if need <= self.pool.num_free:
                return [Item(s, Work.DECODE, 1) for s in decoding]
            if len(self.running) == 1:
                raise RuntimeError(f"the one running request ({next(iter(self.running))}) cannot grow: it needs "
                                   f"{need} blocks, {self.pool.num_free} of {self.pool.num_blocks} are free")
            self.preempt(max(self.running.values(), key=lambda s: s.admitted))

    def _next_work(self, seq: Sequence, budget: int, first: bool) -> Item | None:
        """The next prefill chunk or re-read of `seq` within `budget` (`first`: the step's first prefill
        work, taken whole whatever the budget)."""
        if seq.phase is Phase.PREFILL:
            count = min(self.chunk_tokens, len(seq.context) - seq.read)
            count = count if first else min(count, budget)
            return Item(seq, Work.PREFILL, count) if count > 0 else None
        count = self.reread_len(seq)
        return Item(seq, Work.REREAD, count) if first or count <= budget else None

    def _blocks(self, item: Item) -> int:
        """Free blocks `item` takes: its tokens' new blocks; a re-read's fork also copies each head's
        partly filled last block (copy-on-write)."""
        cache = item.seq.cache
        need = cache.blocks_to_grow([item.count])
        if item.work is Work.REREAD:
            bs = self.pool.block_size
            need += sum((t.start + t.length) % bs != 0 for layer in cache.layers for t in layer.tables[0])
        return need

    @staticmethod
    def _held(seq: Sequence) -> int:
        return sum(len(t.blocks) for layer in seq.cache.layers for t in layer.tables[0])

    def _still_needed(self, seq: Sequence) -> int:
        """Blocks a sequence reading its context will still take before its peak."""
        return max(seq.reserved_blocks - (self._held(seq) - seq.shared_blocks), 0)

    # ----- state changes ----------------------------------------------------------------------------
    def _admit(self, seq: Sequence) -> None:
        seq.cache = self.new_cache(seq)
        seq.shared_blocks, seq.reserved_blocks = self._held(seq), self.admit_blocks(seq)
        seq.phase, seq.admitted = Phase.PREFILL, self._admissions
        self._admissions += 1
        self.running[seq.id] = seq

    def preempt(self, seq: Sequence) -> None:
        """Give all of `seq`'s blocks back and queue it first, to read its context again."""
        del self.running[seq.id]
        seq.cache.reset()
        seq.restart()
        self.waiting.appendleft(seq)
        self.hold = True
        self.preempted.append(seq)

    def finish(self, seq: Sequence) -> None:
        """`seq` is done (or aborted): its blocks go back to the pool (unless a context took them)."""
        if seq.id in self.running:
            del self.running[seq.id]
            if seq.cache is not None:
                seq.cache.reset()
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.cache = None
        self.hold = False
