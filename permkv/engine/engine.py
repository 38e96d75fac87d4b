"""A serving engine you call once per step, on one paged KV pool, compressing each request's cache.

    from permkv.engine import Engine, EngineConfig, Request
    pool = BlockPool(6000, block_size=16, head_dim=spec.head_dim)
    engine = Engine(model, pool, EngineConfig(), stop=stop_ids(model, tok), reread=repeat_prompt_ids(tok, spec))
    rid = engine.add_request(Request(ids, max_new_tokens=64, ratio=8))
    while engine.has_unfinished():
        for out in engine.step():            # new tokens of each request, and the finished ones
            ...
    engine.generate([Request(...), ...])     # the same loop, results in the order given

A step is schedule -> run -> postprocess (nano-vllm's `step`). The scheduler shares one token budget
between every decoding sequence and the prefill work of the others (`permkv.engine.scheduler`); the
runner packs it all into one forward (`permkv.cache.run`); postprocessing samples, compresses and
finishes. Each request owns a one-sequence `PagedCache` on the shared pool, found by its id.

Compression (ratio > 1), with KVzip-style scores (`compression.scorer == "kvzip"`, the default):
the request's context is read uncompressed, then re-read after KVzip's repeat prompt one
`reread_chunk` at a time on a copy-on-write fork (scored by the attention each cached token gets,
`permkv.compress.kvzip`), and compressed once to 1/ratio with the configured allocator (notebook
02's best measured method: one global top-k). This costs about one more prefill of the context,
counted in the engine's time. With an attention scorer (e.g. "kvcompress") the cache is compressed
after every prefill chunk from the chunk's last queries instead (KV-Compress). Either way, every
`compress_every` generated tokens the generated part is compressed again from the last decode
queries (continual compression), so the whole cache stays near 1/ratio of all it has seen; the
compressed context is never evicted by that.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from permkv.cache import BlockPool, PagedCache, paged_attention
from permkv.checks import positive_int
from permkv.compress import ALLOCATORS, Compressor, InferenceKVCacheCompression, KVCompressScore, get_scorer
from permkv.compress.context import ContextCache
from permkv.compress.kvzip import reread_scores
from permkv.engine.runner import ModelRunner, sample
from permkv.engine.scheduler import Item, Scheduler, Work
from permkv.engine.sequence import Phase, Request, RequestOutput, Result, Sequence
from permkv.eval import stop_ids
from permkv.models import kv_layout

@dataclass
class EngineConfig:
    """How the engine runs; a request's own `ratio` says how much its cache is compressed."""

    step_tokens: int = 2048  # tokens per forward: every running decode, then prefill chunks and re-reads
    chunk_tokens: int = 512  # most context tokens one sequence reads per step
    reread_chunk: int = 1024  # context tokens per KVzip-style re-read (the chunk notebook 02 measured)
    compress_every: int = 32  # generated tokens between two compressions of a sequence (ratio > 1)
    watermark: float = 0.01  # fraction of the pool kept free at admission for running sequences to grow
    compression: InferenceKVCacheCompression = field(default_factory=InferenceKVCacheCompression)  # KVzip-style

    def __post_init__(self):
        for name in ("step_tokens", "chunk_tokens", "reread_chunk", "compress_every"):
            positive_int(name, getattr(self, name))
        if self.chunk_tokens > self.step_tokens:
            raise ValueError(f"chunk_tokens must be <= step_tokens ({self.step_tokens}), got {self.chunk_tokens}")
        if not self.compression.rereads:  # also a clear error for an unknown scorer
            protected = max(self.compression.observe, self.compression.sinks + self.compression.window)
            if self.chunk_tokens < protected:
                raise ValueError(f"chunk_tokens must be >= the observation window and the protected tokens "
                                 f"({protected}) of the attention scorer, got {self.chunk_tokens}")
        if self.compression.allocator_in_use not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {sorted(ALLOCATORS)}, got {self.compression.allocator!r}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")

    @property
    def kvzip(self) -> bool:
        """KVzip-style re-reading (`compression.rereads`): the context is re-read after the repeat prompt."""
        return self.compression.rereads


@dataclass
class EngineStats:
    """What the engine did so far. Times are wall-clock seconds inside `step`; `batch_sizes[i]` is
    step i's number of decoding sequences."""

    wall: float = 0.0
    steps: int = 0
    mixed_steps: int = 0  # steps whose forward carried decodes and prefill work together
    prompt_tokens: int = 0  # of finished requests
    output_tokens: int = 0  # of finished requests
    computed_tokens: int = 0  # every token a forward ran: prefill, re-reads, decodes, recompute
    reread_tokens: int = 0  # of which KVzip-style re-reading
    prefill_seconds: float = 0.0  # steps that read or re-read a context (with the decodes riding along)
    decode_seconds: float = 0.0  # steps of decodes only
    compress_seconds: float = 0.0  # scoring and eviction after the forwards
    preemptions: int = 0
    recomputed_tokens: int = 0  # generated tokens read again after a preemption
    compressions: int = 0  # decode-time compressions
    aborted: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    used_blocks: list[int] = field(default_factory=list)  # pool blocks in use at each step with decodes
    ttfts: list[float] = field(default_factory=list)  # of finished requests
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
        """Mean fraction of the pool in use over steps with decodes."""
        return sum(self.used_blocks) / len(self.used_blocks) / self.capacity_blocks if self.used_blocks else 0.0

    @property
    def blocks_per_sequence(self) -> float:
        """Mean pool blocks one running sequence holds during decoding (generated tokens included):
        `capacity_blocks / blocks_per_sequence` sequences fit in the pool at once."""
        per = [u / b for u, b in zip(self.used_blocks, self.batch_sizes) if b]
        return sum(per) / len(per) if per else 0.0

    @property
    def prefill_share(self) -> float:
        return self.prefill_seconds / self.wall if self.wall else 0.0

    def summary(self) -> dict[str, float]:
        return dict(wall=self.wall, steps=self.steps, mixed_steps=self.mixed_steps, output_tps=self.output_tps, total_tps=self.total_tps,
                    mean_batch=self.mean_batch, max_batch=self.max_batch, preemptions=self.preemptions,
                    recomputed_tokens=self.recomputed_tokens, compressions=self.compressions,
                    prefill_share=self.prefill_share, decode_seconds=self.decode_seconds,
                    compress_seconds=self.compress_seconds, mean_occupancy=self.mean_occupancy,
                    blocks_per_sequence=self.blocks_per_sequence, output_tokens=self.output_tokens,
                    prompt_tokens=self.prompt_tokens, computed_tokens=self.computed_tokens,
                    reread_tokens=self.reread_tokens)


class Engine:
    """Continuous batching over one `BlockPool` (see the module docstring).

    `stop`: token ids that end a request (default: the model's EOS). `reread`: KVzip's repeat prompt
    as token ids (`permkv.compress.repeat_prompt_ids(tokenizer, spec)`), needed for ratio > 1 with the
    default KVzip-style scorer.
    """

    def __init__(self, model, pool: BlockPool, config: EngineConfig | None = None, stop: set[int] | None = None,
                 reread: list[int] | None = None):
        self.model = model
        self.pool = pool
        self.config = config or EngineConfig()
        self.stop = stop_ids(model) if stop is None else set(stop)
        c = self.config.compression
        self.reread = list(reread) if reread else None
        if self.reread and self.config.step_tokens < len(self.reread) + self.config.reread_chunk:
            raise ValueError(f"step_tokens must hold one re-read ({len(self.reread)} + {self.config.reread_chunk} "
                             f"tokens), got {self.config.step_tokens}")
        scorer = KVCompressScore() if self.config.kvzip else get_scorer(c.scorer)  # kvzip: decode-time part
        self.compressor = Compressor(scorer, ALLOCATORS[c.allocator_in_use](c.min_share), c.sinks, c.window, c.observe)
        self.runner = ModelRunner(model, self.reread)
        self.probe = PagedCache(pool, model.config)  # holds no sequence: block counts per layer and head
        self.scheduler = Scheduler(pool, self.probe, self.config.step_tokens, self.config.chunk_tokens,
                                   self.config.watermark, self._admit_blocks, self._new_cache, self._reread_len)
        self.contexts: OrderedDict[int, ContextCache] = OrderedDict()  # by id, least recently used first
        self.max_positions = kv_layout(model.config).max_positions
        self.sequences: dict[int, Sequence] = {}
        self._next_id = 0
        self.stats = EngineStats(capacity_blocks=pool.num_blocks)

    # ----- requests --------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise ValueError for a request that could never run here (nothing changes)."""
        if not isinstance(request, Request):
            raise ValueError(f"request must be a permkv.engine.Request, got {type(request).__name__}")
        if request.context is not None and request.context not in self.contexts:
            raise ValueError(f"context {request.context} does not exist (never built, or released)")
        n = len(request.prompt_ids)
        base = 0 if request.context is None else self.contexts[request.context].seen
        if base + n + request.max_new_tokens > self.max_positions:
            raise ValueError(f"prompt ({n} tokens" + (f" after a context of {base}" if base else "") +
                             f") + max_new_tokens ({request.max_new_tokens}) must fit the model's context of "
                             f"{self.max_positions} tokens")
        if request.ratio > 1:
            if self.config.kvzip and not self.reread:
                raise ValueError("ratio > 1 with KVzip-style scores needs the repeat prompt: "
                                 "Engine(..., reread=permkv.compress.repeat_prompt_ids(tokenizer, spec))")
            limit = n if self.config.kvzip else min(self.config.chunk_tokens, n)
            if request.ratio > limit:
                raise ValueError(f"ratio must be <= the prompt's length ({n})" + ("" if self.config.kvzip else
                                 f" and chunk_tokens ({self.config.chunk_tokens})") +
                                 f": every head keeps at least one token, got {request.ratio:g}")
        probe = Sequence(-1, request, 0.0)
        needed = self.probe.blocks_needed(max(self._peak_tokens(probe), self._decode_peak(probe)))
        if needed > self.pool.num_blocks:
            raise ValueError(f"request needs up to {needed} KV blocks at ratio {request.ratio:g} (prompt {n} "
                             f"+ {request.max_new_tokens} new tokens) but the whole pool has {self.pool.num_blocks}")

    def add_request(self, request: Request) -> int:
        """Queue a request (it joins the next step); returns its id. Raises ValueError if it could never run."""
        self.check(request)
        return self._queue(Sequence(self._next_id, request, time.perf_counter()))

    def add_context(self, ids: list[int], ratio: float = 1.0) -> int:
        """Queue a context to read once, compress to 1/ratio and keep (compress once, ask many): once a
        step reports it finished, `contexts[id]` is a `ContextCache` that requests name with
        `Request(..., context=id)`, their prompts read after it. Returns its id."""
        request = Request(list(ids), 1, ratio, ignore_eos=True)
        self.check(request)
        return self._queue(Sequence(self._next_id, request, time.perf_counter(), builds_context=True))

    def release_context(self, context_id: int) -> bool:
        """Give a context's own blocks back; False if unknown. Refused (ValueError) while a queued or
        running request reads it (a preempted one must fork it again)."""
        if any(s.request.context == context_id for s in self.sequences.values()):
            raise ValueError(f"context {context_id} is in use by a queued or running request")
        ctx = self.contexts.pop(context_id, None)
        if ctx is not None:
            ctx.release()
        return ctx is not None

    def _queue(self, seq: Sequence) -> int:
        if seq.request.context is not None:
            self.contexts.move_to_end(seq.request.context)
            seq.base = self.contexts[seq.request.context].seen
        self._next_id += 1
        self.sequences[seq.id] = seq
        self.scheduler.waiting.append(seq)
        return seq.id

    def abort(self, request_id: int) -> bool:
        """Stop a request now and give its blocks back; False if it is unknown or already finished."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.done:
            return False
        self._finish(seq, "abort")
        self.stats.aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def generate(self, requests: list[Request], progress: bool = True) -> list[Result]:
        """Add `requests` and step until all are done; results in the order given."""
        ids = [self.add_request(r) for r in requests]
        done: dict[int, Result] = {}
        bar = tqdm(total=len(ids), desc="engine", disable=not progress)
        with paged_attention(self.model):  # once for the whole loop, not per step
            self._run_until_done(done, bar)
        bar.close()
        return [done[i] for i in ids]

    def _run_until_done(self, done: dict[int, Result], bar) -> None:
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.id] = out.result
                    bar.update()
            bar.set_postfix(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                            preempted=self.stats.preemptions)

    # ----- one step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, postprocess. Returns what each touched request got."""
        start = time.perf_counter()
        items = self.scheduler.schedule()
        while not items and self.scheduler.waiting and self._release_idle_context():
            items = self.scheduler.schedule()  # the least recently used context nobody reads gave its blocks back
        self.stats.preemptions += len(self.scheduler.preempted)
        for seq in self.scheduler.preempted:
            self.stats.recomputed_tokens += len(seq.tokens)
        if not items:
            if self.has_unfinished():
                raise RuntimeError(f"nothing can run: {len(self.scheduler.waiting)} waiting requests do not fit "
                                   f"the {self.pool.num_free} free blocks of {self.pool.num_blocks}")
            return []
        observe = {i.seq.id: self._observe(i) for i in items}
        with paged_attention(self.model):
            logits, segments = self.runner.run(items, observe)
            forward_end = time.perf_counter()
            outputs = self._postprocess(items, logits, segments)
        end = time.perf_counter()
        decodes = sum(i.work is Work.DECODE for i in items)
        self.stats.steps += 1
        self.stats.computed_tokens += sum(i.count for i in items)
        self.stats.reread_tokens += sum(i.count for i in items if i.work is Work.REREAD)
        self.stats.compress_seconds += end - forward_end
        if decodes == len(items):
            self.stats.decode_seconds += end - start
        else:
            self.stats.prefill_seconds += end - start
            self.stats.mixed_steps += decodes > 0
        if decodes:
            self.stats.batch_sizes.append(decodes)
            self.stats.used_blocks.append(self.pool.num_blocks - self.pool.num_free)
        self.stats.wall += end - start
        return outputs

    def _observe(self, item: Item) -> int:
        """Queries that `item`'s segment keeps per layer: a re-read's own, a compressing decode's one,
        an attention scorer's last `observe` of a prefill chunk."""
        seq, c = item.seq, self.config.compression
        if item.work is Work.REREAD:
            return item.count
        if seq.request.ratio == 1:
            return 0
        if item.work is Work.DECODE:
            return 1
        return 0 if self.config.kvzip else c.observe

    def _postprocess(self, items: list[Item], logits: dict[int, torch.Tensor], segments) -> list[RequestOutput]:
        outputs = []
        for item, segment in zip(items, segments):
            seq = item.seq
            if seq.done:  # preempted or finished by an earlier item of this step
                continue
            if item.work is Work.REREAD:
                if self._score(seq, item, segment) and seq.builds_context:
                    outputs.append(self._keep_context(seq))
                continue
            if item.work is Work.PREFILL:
                seq.read += item.count
                if seq.request.ratio > 1 and not self.config.kvzip and seq.request.context is None:
                    self.compressor.compress(seq.cache, seq.request.ratio, segment.queries)
                if seq.read < len(seq.context):
                    continue
                self._context_read(seq)
                if seq.builds_context:
                    seq.context_logits = logits[seq.id]
                    if seq.phase is Phase.DECODE:
                        outputs.append(self._keep_context(seq))
                    continue
            elif seq.request.ratio > 1:
                seq.queries.append(segment.queries)
                while len(seq.queries) > self.config.compression.observe:
                    seq.queries.popleft()
            token = sample(logits[seq.id], seq)
            out = self._append(seq, token)
            if out is not None:
                outputs.append(out)
            if not seq.done and seq.phase is Phase.DECODE and seq.request.ratio > 1 \
                    and seq.cache.seen[0] - seq.compressed_at >= self.config.compress_every:
                self._compress_generated(seq)
        return outputs

    def _context_read(self, seq: Sequence) -> None:
        """The whole context is in the cache: re-read it next (KVzip) or decode. A request on a shared
        context reads its own tokens uncompressed: the context was compressed once for all."""
        if seq.request.ratio > 1 and self.config.kvzip and seq.request.context is None:
            seq.phase = Phase.SCORE
        else:
            self._start_decoding(seq)

    def _start_decoding(self, seq: Sequence) -> None:
        seq.phase = Phase.DECODE
        seq.compressed_at = seq.cache.seen[0]
        full = [layer for layer in seq.cache.layers if not layer.is_sliding]
        held = [t.length for layer in full for t in layer.tables[0]]
        seq.kv_tokens = sum(held) / len(held) if held else None
        seq.kv_bytes = seq.cache.stats().allocated_bytes
        seq.prompt_kept = {i: [t.length for t in layer.tables[0]] for i, layer in enumerate(seq.cache.layers)
                           if not layer.is_sliding}

    def _keep_context(self, seq: Sequence) -> RequestOutput:
        """A context build read (and compressed) its tokens: its cache becomes a `ContextCache`."""
        self.contexts[seq.id] = ContextCache(seq.cache, seq.context, seq.context_logits, seq.request.ratio)
        seq.cache = None  # the context owns the blocks now
        return self._finish(seq, "stop")

    def _release_idle_context(self) -> bool:
        """Release the least recently used context that no queued or running request reads; False if none."""
        used = {s.request.context for s in self.sequences.values()}
        for cid in self.contexts:
            if cid not in used:
                return self.release_context(cid)
        return False

    def _score(self, seq: Sequence, item: Item, segment) -> bool:
        """A re-read of one chunk ran on the fork `segment.row`: keep its scores, drop the fork; after the
        last chunk, compress the context once to 1/ratio (returns True then)."""
        t0 = time.perf_counter()
        c = item.count - len(self.reread)
        begin, sinks = seq.scored, min(self.config.compression.sinks, seq.scored)
        chunk = reread_scores(seq.cache, segment.row, segment.queries, item.count, c, begin, sinks)
        seq.cache.release(segment.row)
        for i, s in chunk.items():
            seq.scores.setdefault(i, []).append(s)
        seq.scored += c
        if seq.scored == len(seq.context):
            scores = {i: torch.cat(parts, dim=1)[None] for i, parts in seq.scores.items()}  # (1, kv_heads, context)
            self.compressor.compress(seq.cache, seq.request.ratio, scores=scores)
            seq.scores = {}
            self._start_decoding(seq)
        self.stats.compress_seconds += time.perf_counter() - t0
        return seq.phase is Phase.DECODE

    def _compress_generated(self, seq: Sequence) -> None:
        """Continual compression: the generated part back to 1/ratio, scored from the last decode queries;
        the compressed context stays."""
        queries = {i: torch.cat([q[i] for q in seq.queries], dim=2) for i in seq.queries[0]}  # (1, q_heads, w, D)
        before = seq.cache.stats().used_tokens
        self.compressor.compress(seq.cache, seq.request.ratio, queries, keep=seq.prompt_kept)
        if seq.cache.stats().used_tokens < before:
            seq.compressions += 1
            self.stats.compressions += 1
        seq.compressed_at = seq.cache.seen[0]

    def _append(self, seq: Sequence, token: int) -> RequestOutput | None:
        """Add a sampled token to `seq` (a stop token is not kept); finishes it at a stop or the length."""
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        if token in self.stop and not seq.request.ignore_eos:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        if len(seq.tokens) >= seq.request.max_new_tokens:
            return self._finish(seq, "length", [token])
        return RequestOutput(seq.id, [token], False)

    def _finish(self, seq: Sequence, reason: str, new: list[int] | None = None) -> RequestOutput:
        self.scheduler.finish(seq)
        seq.phase, seq.finish_time, seq.finish_reason = Phase.FINISHED, time.perf_counter(), reason
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival
        result = Result(seq.id, seq.prompt_len, list(seq.tokens), reason, ttft, seq.finish_time - seq.arrival,
                        seq.preemptions, seq.compressions, seq.kv_tokens, seq.kv_bytes)
        if reason != "abort":
            self.stats.prompt_tokens += seq.prompt_len
            self.stats.output_tokens += len(seq.tokens)
            if ttft is not None:
                self.stats.ttfts.append(ttft)
        del self.sequences[seq.id]
        return RequestOutput(seq.id, new or [], True, result)

    # ----- block accounting ------------------------------------------------------------------------
    def _new_cache(self, seq: Sequence) -> PagedCache:
        """An admitted sequence's cache: empty, or a copy-on-write fork of its context."""
        if seq.request.context is None:
            cache = PagedCache(self.pool, self.model.config)
            cache.ensure_batch(1)
            return cache
        self.contexts.move_to_end(seq.request.context)
        return self.contexts[seq.request.context].fork()

    def _admit_blocks(self, seq: Sequence) -> int:
        """Free blocks `seq` takes at its peak while reading its context: its own tokens (a context's are
        already held, but each head copies its shared, partly filled last block)."""
        if seq.request.context is None:
            return self.probe.blocks_needed(self._peak_tokens(seq))
        return self.probe.blocks_needed(len(seq.context) + self.pool.block_size)

    def _reread_len(self, seq: Sequence) -> int:
        """Tokens of `seq`'s next re-read: the repeat prompt and the next chunk of its context."""
        return len(self.reread or []) + min(self.config.reread_chunk, len(seq.context) - seq.scored)

    def _peak_tokens(self, seq: Sequence) -> int:
        """Most tokens per head `seq` holds while it reads its context (what admission reserves: growth
        while decoding is met by the watermark and by preemption, as in vLLM)."""
        n, r = len(seq.context), seq.request.ratio
        if r == 1:
            return n
        if self.config.kvzip:
            return n + len(self.reread or []) + min(self.config.reread_chunk, n) + self.pool.block_size
        return min(n, math.ceil(n / r) + self.config.chunk_tokens)

    def _decode_peak(self, seq: Sequence) -> int:
        """Most tokens per head `seq` holds while decoding at ratio > 1: 1/ratio of its prompt, and of its
        output beyond the protected window, plus the tokens generated between two compressions."""
        r, n, new = seq.request.ratio, seq.prompt_len, seq.request.max_new_tokens
        if r == 1:
            return n + new
        c = self.config.compression
        return min(n + new, math.ceil(n / r) + c.sinks + max(math.ceil(new / r), c.window) + self.config.compress_every)
