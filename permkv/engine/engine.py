"""The engine loop: admit and prefill what fits, then one batched decode step over all running sequences.

    from permkv.engine import Engine, EngineConfig, Request
    pool = BlockPool(6000, block_size=16, head_dim=spec.head_dim)
    engine = Engine(model, pool, EngineConfig(), stop=stop_ids(model, tok))
    results = engine.generate([Request(ids, max_new_tokens=64, ratio=8) for ids in prompts])
    engine.stats.output_tps, engine.stats.mean_batch, engine.stats.preemptions

All sequences live in one batch `PagedCache` on the pool, one row each, with per-(layer, KV head)
block tables. A new request is prefilled into its own cache on the same pool and then `adopt`ed as the
batch's last row; a finished one is `release`d, giving its blocks back. With ratio > 1 the prompt is
compressed chunk by chunk while it is read, and every `compress_every` generated tokens the sequence is
compressed again back to 1/ratio of all it has seen (KV-Compress's continual compression), so the
freed blocks admit more requests. Greedy decoding only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from permkv.cache import BlockPool, CacheFull, PagedCache, paged_attention
from permkv.checks import positive_int
from permkv.compress import InferenceKVCacheCompression
from permkv.engine.runner import ModelRunner
from permkv.engine.scheduler import Scheduler
from permkv.engine.sequence import Request, Result, Sequence, Status
from permkv.eval import stop_ids


@dataclass
class EngineConfig:
    """How the engine runs; a request's own `ratio` says how much its cache is compressed."""

    chunk_tokens: int = 512  # prompt tokens per prefill forward (the pool needs room for one chunk)
    compress_every: int = 32  # generated tokens between two compressions of a sequence (ratio > 1)
    watermark: float = 0.01  # fraction of the pool kept free at admission for running sequences to grow
    # the attention scorer: this engine scores prompts and decode steps from observed queries only
    compression: InferenceKVCacheCompression = field(default_factory=lambda: InferenceKVCacheCompression(scorer="kvcompress"))

    def __post_init__(self):
        for name in ("chunk_tokens", "compress_every"):
            positive_int(name, getattr(self, name))
        protected = self.compression.sinks + self.compression.window
        if self.chunk_tokens < max(self.compression.observe, protected):
            raise ValueError(f"chunk_tokens must be >= the observation window and the protected tokens "
                             f"({max(self.compression.observe, protected)}), got {self.chunk_tokens}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")


@dataclass
class EngineStats:
    """What one `run` did. Times are wall-clock seconds; `batch_sizes[i]` is decode step i's batch."""

    wall: float = 0.0
    prompt_tokens: int = 0  # of finished requests
    output_tokens: int = 0  # of finished requests
    prefill_seconds: float = 0.0  # includes compression during prefill
    decode_seconds: float = 0.0
    compress_seconds: float = 0.0  # decode-time compression
    preemptions: int = 0
    recomputed_tokens: int = 0  # generated tokens thrown away by preemption
    compressions: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    used_blocks: list[int] = field(default_factory=list)  # pool blocks in use at each decode step
    capacity_blocks: int = 0

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall if self.wall else 0.0

    @property
    def total_tps(self) -> float:
        """Prompt plus output tokens per second (vLLM's benchmark_throughput "total")."""
        return (self.prompt_tokens + self.output_tokens) / self.wall if self.wall else 0.0

    @property
    def mean_batch(self) -> float:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes, default=0)

    @property
    def mean_occupancy(self) -> float:
        """Mean fraction of the pool in use over decode steps."""
        return sum(self.used_blocks) / len(self.used_blocks) / self.capacity_blocks if self.used_blocks else 0.0

    @property
    def blocks_per_sequence(self) -> float:
        """Mean pool blocks one running sequence holds during decoding (generated tokens included):
        `capacity_blocks / blocks_per_sequence` sequences fit in the pool at once."""
        per = [u / b for u, b in zip(self.used_blocks, self.batch_sizes)]
        return sum(per) / len(per) if per else 0.0

    @property
    def prefill_share(self) -> float:
        return self.prefill_seconds / self.wall if self.wall else 0.0

    def summary(self) -> dict[str, float]:
        return dict(wall=self.wall, output_tps=self.output_tps, total_tps=self.total_tps, mean_batch=self.mean_batch,
                    max_batch=self.max_batch, preemptions=self.preemptions, recomputed_tokens=self.recomputed_tokens,
                    compressions=self.compressions, prefill_share=self.prefill_share,
                    decode_seconds=self.decode_seconds, compress_seconds=self.compress_seconds,
                    mean_occupancy=self.mean_occupancy, blocks_per_sequence=self.blocks_per_sequence,
                    output_tokens=self.output_tokens,
                    prompt_tokens=self.prompt_tokens)


class Engine:
    """Continuous batching of greedy requests over one `BlockPool` (see the module docstring)."""

    def __init__(self, model, pool: BlockPool, config: EngineConfig | None = None, stop: set[int] | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.cache = PagedCache(pool, model.config)  # the batch: one row per running sequence
        self.pool = pool
        self.stop = stop_ids(model) if stop is None else set(stop)
        self.runner = ModelRunner(model, self.config.compression, self.config.chunk_tokens)
        self.scheduler = Scheduler(self.cache, self.config.chunk_tokens, self.config.compress_every, self.config.watermark)
        self.max_positions = model.config.get_text_config(decoder=True).max_position_embeddings
        self.n_layers = len(self.cache.layers)
        self.sequences: list[Sequence] = []
        self.stats = EngineStats(capacity_blocks=pool.num_blocks)

    # ----- requests --------------------------------------------------------------------------------
    def add(self, request: Request) -> int:
        """Queue a request; returns its id. Raises ValueError if it could never run."""
        if not isinstance(request, Request):
            raise ValueError(f"request must be a permkv.engine.Request, got {type(request).__name__}")
        seq = Sequence(len(self.sequences), request, time.perf_counter())
        if seq.prompt_len + request.max_new_tokens > self.max_positions:
            raise ValueError(f"prompt ({seq.prompt_len} tokens) + max_new_tokens ({request.max_new_tokens}) must fit "
                             f"the model's context of {self.max_positions} tokens")
        if request.ratio > min(self.config.chunk_tokens, seq.prompt_len):
            raise ValueError(f"ratio must be <= the prompt's length ({seq.prompt_len}) and chunk_tokens "
                             f"({self.config.chunk_tokens}): every head keeps at least one token, got {request.ratio:g}")
        needed = self.cache.blocks_needed(self.scheduler.peak_tokens(seq))
        if needed > self.pool.num_blocks:
            raise ValueError(f"request needs up to {needed} KV blocks at ratio {request.ratio:g} (prompt {seq.prompt_len} "
                             f"+ {request.max_new_tokens} new tokens) but the whole pool has {self.pool.num_blocks}")
        self.sequences.append(seq)
        self.scheduler.waiting.append(seq)
        return seq.id

    def generate(self, requests: list[Request], progress: bool = True) -> list[Result]:
        """Add `requests` and run them all; results in the order given."""
        ids = [self.add(r) for r in requests]
        done = {r.id: r for r in self.run(progress)}
        return [done[i] for i in ids]

    # ----- the loop --------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> list[Result]:
        """Run until every queued request has finished; returns the results of this run in finishing order."""
        sched = self.scheduler
        compressing = any(s.request.ratio > 1 for s in sched.waiting)
        results: list[Result] = []
        bar = tqdm(total=len(sched.waiting), desc="engine", disable=not progress)
        start = time.perf_counter()
        with paged_attention(self.model):
            while sched.waiting or sched.running:
                finished = self._admit() + self._decode(compressing)
                for seq in finished:
                    results.append(self._finish(seq))
                bar.update(len(finished))
                bar.set_postfix(batch=len(sched.running), waiting=len(sched.waiting), preempted=self.stats.preemptions)
        bar.close()
        self.stats.wall += time.perf_counter() - start
        return results

    def _admit(self) -> list[Sequence]:
        """Prefill waiting requests, oldest first, while the pool has room; returns those already done."""
        sched, finished = self.scheduler, []
        while (seq := sched.next_waiting()) is not None:
            sched.admit(seq)
            t0 = time.perf_counter()
            single = PagedCache(self.pool, self.model.config)
            try:
                logits = self.runner.prefill(single, seq.request.prompt_ids, seq.request.ratio)
            except CacheFull:  # the estimate was short: give the blocks back, retry when memory frees
                single.reset()
                sched.waiting.appendleft(seq)
                if not sched.running:
                    raise RuntimeError(f"request {seq.id} cannot be prefilled even in an empty pool of "
                                       f"{self.pool.num_blocks} blocks") from None
                break
            finally:
                self.stats.prefill_seconds += time.perf_counter() - t0
            seq.compressed_at = seq.prompt_len
            if seq.first_token_time is None:
                seq.first_token_time = time.perf_counter()
            if self._append(seq, int(logits.argmax())):
                single.reset()
                finished.append(seq)
            else:
                self.cache.adopt(single)
                sched.start(seq)
        return finished

    def _append(self, seq: Sequence, token: int) -> bool:
        """Add a sampled token to `seq`; returns whether it finished (stop token not kept, as greedy_decode)."""
        if token in self.stop:
            return True
        seq.tokens.append(token)
        return len(seq.tokens) >= seq.request.max_new_tokens

    def _make_room(self) -> None:
        """Preempt the youngest running sequences until every running one can write one more token."""
        sched = self.scheduler
        while True:
            try:
                self.cache.check_room([1] * len(sched.running))
                return
            except CacheFull as full:
                if len(sched.running) == 1:
                    raise RuntimeError(f"the one running request cannot grow: {full}") from None
            i = sched.youngest()
            seq = sched.running.pop(i)
            self.cache.release(i)
            self.stats.preemptions += 1
            self.stats.recomputed_tokens += len(seq.tokens)
            sched.requeue(seq)

    def _decode(self, observe: bool) -> list[Sequence]:
        """One batched decode step over all running sequences (recording their queries when some
        compress), then compression where due."""
        sched = self.scheduler
        if not sched.running:
            return []
        self._make_room()
        t0 = time.perf_counter()
        logits, step_queries = self.runner.decode(self.cache, [s.tokens[-1] for s in sched.running],
                                                  [s.position for s in sched.running], observe)
        next_tokens = logits.argmax(-1).tolist()
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.batch_sizes.append(len(sched.running))
        self.stats.used_blocks.append(self.pool.num_blocks - self.pool.num_free)
        if step_queries is not None:  # (batch, q_heads, layers, head_dim)
            window = self.config.compression.observe
            for b, seq in enumerate(sched.running):
                seq.queries.append(step_queries[b])
                while len(seq.queries) > window:
                    seq.queries.popleft()
        finished, done_rows = [], []
        for b, (seq, token) in enumerate(zip(sched.running, next_tokens)):
            if self._append(seq, token):
                finished.append(seq)
                done_rows.append(b)
        for b in reversed(done_rows):
            sched.running.pop(b)
            self.cache.release(b)
        if finished:
            sched.hold = False
        self._compress_due()
        return finished

    def _compress_due(self) -> None:
        """Compress every running sequence that generated `compress_every` tokens since its last compression."""
        sched = self.scheduler
        due = [s for s in sched.running if s.request.ratio > 1 and s.seen - s.compressed_at >= self.config.compress_every]
        if not due:
            return
        t0 = time.perf_counter()
        for seq in due:
            row = sched.running.index(seq)
            single = self.cache.detach(row)
            # the cache holds tokens[:-1] (tokens[-1] is the next input) and their queries
            if self.runner.compress(single, seq.request.ratio, torch.stack(list(seq.queries), dim=2)):
                seq.compressions += 1
                self.stats.compressions += 1
            seq.compressed_at = seq.seen
            self.cache.adopt(single)
            sched.running.append(sched.running.pop(row))
        self.stats.compress_seconds += time.perf_counter() - t0

    def _finish(self, seq: Sequence) -> Result:
        seq.status, seq.finish_time = Status.FINISHED, time.perf_counter()
        self.stats.prompt_tokens += seq.prompt_len
        self.stats.output_tokens += len(seq.tokens)
        return Result(seq.id, seq.prompt_len, list(seq.tokens), seq.first_token_time - seq.arrival,
                      seq.finish_time - seq.arrival, seq.preemptions, seq.compressions)
