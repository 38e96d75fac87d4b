"""Throughput and answer quality of the serving engine at a fixed KV memory vs compression ratio
(notebook 03, `python -m permkv.bench throughput`).

KV-Compress (ANCHORS.md s1) measured total throughput against vanilla vLLM with 256 prompts of 500-6000
tokens and 500 output tokens on one L4: 3.44x at 8x, 5.18x at 64x, because the memory compression frees
admits larger decode batches. Here the same shape, scaled to this CPU: needle-in-a-haystack prompts
(query-aware: the question ends the prompt, as in the anchor's LongBench templates) whose lengths are
drawn uniformly from `prompt_range`, a fixed number of output tokens with EOS ignored (as vLLM's
benchmark_throughput; the answer is scored on the first line), and one KV pool sized so that ratio 1 is
memory-bound (`pool_requests` average requests). Every (scorer, ratio) of the engine and the peers run
on the same requests in one process, in alternating order per repeat; speed is reported as ratios within
a repeat, and quality as the retention of the ratio-1 engine's score on the same requests (paired CI).

The decode-step cost model (step time vs batch size and cached tokens, measured on this machine) and
the prefill share of the ratio-1 run bound what a larger batch can buy (Amdahl): prefill does not get
cheaper with compression (KVzip-style scoring even re-reads the context), so the gain is bounded by
how much of the time decoding takes.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from permkv.baselines.hf import continuous_batching, sequential_generate
from permkv.cache import BlockPool, PagedCache, forward, paged_attention
from permkv.checks import positive_int
from permkv.compress import InferenceKVCacheCompression
from permkv.data import build_task, encode_sample
from permkv.engine import Engine, EngineConfig, Request
from permkv.eval import TASK_METRIC, bootstrap_ci, first_line
from permkv.eval.stats import retention_ci
from permkv.models import kv_layout, model_source

@dataclass
class ThroughputConfig:
    model: str = "smollm2-135m"  # a bundled name, a saved folder or a GGUF file (permkv.models.load_model)
    dtype: str = "float32"  # model and KV pool dtype: "float32" (CPU) or "bfloat16" (GPU)
    task: str = "niah_single"  # a task the full cache answers (00: 0.95 at 4K), so retention means something
    n_requests: int = 30  # the anchor: 256 prompts
    prompt_range: list[int] = field(default_factory=lambda: [500, 1500])  # prompt tokens, uniform (anchor: 500-6000)
    output_tokens: int = 256  # generated per request, EOS ignored (anchor: 500)
    pool_requests: float = 3.0  # KV pool = this many average requests (prompt + output) uncompressed
    ratios: list[float] = field(default_factory=lambda: [1, 2, 8, 16, 64])  # x times smaller; 1 must be in
    scorers: list[str] = field(default_factory=lambda: ["kvzip", "kvcompress"])  # how compressed requests are scored
    attention_ratios: list[float] | None = None  # ratios of the scorers other than kvzip (None: all of `ratios`)
    repeats: int = 2  # every system once per repeat, order reversed on odd repeats; medians reported
    clock: str = "cpu"  # speeds per second of "cpu" (this process's CPU time: one torch thread, robust to other
    # processes on a shared machine) or "wall" (a GPU, or a machine of one's own)
    peers: bool = True  # also run transformers' continuous batching and sequential generate
    sequential_repeats: int = 1  # sequential generate (slow, a reference) runs in this many repeats only
    block_size: int = 16  # tokens per KV block (ours and transformers')
    step_tokens: int = 2048  # tokens per engine step (every decode, then prefill chunks and re-reads)
    chunk_tokens: int = 512  # prompt tokens one sequence reads per step (transformers' max_batch_tokens too)
    compress_every: int = 32  # generated tokens between two compressions of a sequence
    cost_batches: list[int] = field(default_factory=lambda: [1, 4, 16, 32])  # decode cost model: batch sizes
    cost_tokens: list[int] = field(default_factory=lambda: [128, 512])  # ... and cached tokens per sequence
    cost_max_tokens: int = 16384  # skip cost points holding more cached tokens in all (memory)
    seed: int = 0

    def __post_init__(self):
        model_source(self.model)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        lo, hi = self.prompt_range
        if not 128 <= lo <= hi:
            raise ValueError(f"prompt_range must be [low, high] with 128 <= low <= high, got {self.prompt_range}")
        if self.clock not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', got {self.clock!r}")
        for name in ("n_requests", "output_tokens", "repeats", "block_size", "step_tokens", "chunk_tokens",
                     "compress_every", "cost_max_tokens"):
            positive_int(name, getattr(self, name))
        positive_int("sequential_repeats", self.sequential_repeats, 0)
        if not self.pool_requests > 0:
            raise ValueError(f"pool_requests must be > 0, got {self.pool_requests}")
        if 1 not in self.ratios or any(r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be >= 1 and include 1 (the reference), got {self.ratios}")
        if not self.scorers:
            raise ValueError("scorers must name at least one scorer")
        for scorer in self.scorers:
            EngineConfig(compression=InferenceKVCacheCompression(scorer=scorer))  # a clear error for an unknown scorer
        if not self.cost_batches or not self.cost_tokens or min(self.cost_batches + self.cost_tokens) < 1:
            raise ValueError(f"cost_batches and cost_tokens must be non-empty positive ints, got "
                             f"{self.cost_batches}, {self.cost_tokens}")

    def systems(self) -> list[tuple[str, float, str | None]]:
        """(kind, ratio, scorer) of every system of a repeat: the engine at 1x, each scorer at each ratio, peers."""
        out = [("engine", 1.0, None)]
        for scorer in self.scorers:
            ratios = self.ratios if scorer == "kvzip" or self.attention_ratios is None else self.attention_ratios
            out += [("engine", float(r), scorer) for r in ratios if r > 1]
        if self.peers:
            out += [("hf_continuous_batching", 1.0, None), ("hf_sequential", 1.0, None)]
        return out


def system_name(kind: str, ratio: float, scorer: str | None) -> str:
    return kind if kind != "engine" else ("engine 1x" if scorer is None else f"engine {scorer} {ratio:g}x")


@dataclass(frozen=True)
class QARequest:
    prompt_ids: list[int]
    answers: list[str]


def make_requests(tokenizer, spec, cfg: ThroughputConfig) -> list[QARequest]:
    """`n_requests` seeded samples of `cfg.task`, each of a length drawn from `prompt_range`, query-aware."""
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.n_requests):
        length = rng.randint(*cfg.prompt_range)
        (sample,) = build_task(cfg.task, tokenizer, spec, 1, length, seed=cfg.seed * 100_003 + i,
                               max_new_tokens=cfg.output_tokens)
        prefix, suffix = encode_sample(tokenizer, spec, sample, "query_aware")
        out.append(QARequest(prefix + suffix, list(sample.answers)))
    return out


def pool_blocks(model, requests: list[QARequest], cfg: ThroughputConfig) -> int:
    """Blocks of a pool holding `pool_requests` average requests (prompt + output) uncompressed."""
    mean = statistics.mean(len(r.prompt_ids) for r in requests) + cfg.output_tokens
    probe = PagedCache(BlockPool(1, cfg.block_size, kv_layout(model.config).head_dim), model.config)
    return math.ceil(cfg.pool_requests * probe.blocks_needed(math.ceil(mean)))


def score(tokenizer, tokens: list[int], answers: list[str], stop: set[int], task: str) -> float:
    """The task's score of the answer's first line (generation after a stop token is ignored)."""
    end = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
    return TASK_METRIC[task](first_line(tokenizer.decode(tokens[:end], skip_special_tokens=True)), answers)


def run_engine(model, tokenizer, spec, requests: list[QARequest], ratio: float, scorer: str | None, blocks: int,
               cfg: ThroughputConfig, progress: bool = False) -> tuple[dict, list[list[int]]]:
    """All requests through a fresh engine on a pool of `blocks` blocks; (row of stats, tokens per request)."""
    pool = BlockPool(blocks, cfg.block_size, kv_layout(model.config).head_dim, dtype=model.dtype, device=model.device)
    config = EngineConfig(step_tokens=cfg.step_tokens, chunk_tokens=cfg.chunk_tokens, compress_every=cfg.compress_every,
                          compression=InferenceKVCacheCompression(scorer=scorer or "kvzip"))
    engine = Engine(model, pool, config, stop=set(), reread=config.compression.reread_ids(tokenizer))
    results = engine.generate([Request(r.prompt_ids, cfg.output_tokens, ratio) for r in requests], progress=progress)
    s = engine.stats
    achieved = [r.achieved_ratio for r in results if r.achieved_ratio]
    row = dict(system=system_name("engine", ratio, scorer), scorer=scorer or "none", ratio=ratio, **s.summary(),
               mean_ttft=statistics.mean(r.ttft for r in results), mean_latency=statistics.mean(r.latency for r in results),
               achieved_ratio=statistics.mean(achieved) if achieved else 1.0, batch_sizes=list(s.batch_sizes))
    return row, [r.tokens for r in results]


def run_grid(model, tokenizer, spec, requests: list[QARequest], cfg: ThroughputConfig, progress: bool = True
             ) -> tuple[list[dict], dict]:
    """Every system (`cfg.systems()`) on the same requests and pool, `repeats` times.

    Returns rows (one per system and repeat, with `output_tps`, `total_tps` per `cfg.clock` second,
    `wall`, `cpu_s`, ...) and the tokens of each system's first run (for answer quality; greedy, so every
    repeat gives the same)."""
    blocks = pool_blocks(model, requests, cfg)
    prompts = [r.prompt_ids for r in requests]
    n_prompt = sum(map(len, prompts))
    systems = cfg.systems()
    rows, tokens = [], {}
    # warm-up, not measured: the first engine run of a process pays for the CPU kernels' first calls
    # at each new shape (without it the first system of a grid ran up to 2.5x slower)
    run_engine(model, tokenizer, spec, requests[:2], 1, None, blocks, replace(cfg, output_tokens=min(cfg.output_tokens, 8)))
    total = sum(1 for rep in range(cfg.repeats) for s in systems if s[0] != "hf_sequential" or rep < cfg.sequential_repeats)
    bar = tqdm(total=total, desc="throughput grid", disable=not progress)
    for rep in range(cfg.repeats):
        for kind, ratio, scorer in (systems if rep % 2 == 0 else systems[::-1]):
            if kind == "hf_sequential" and rep >= cfg.sequential_repeats:
                continue
            cpu = time.process_time()
            if kind == "engine":
                row, toks = run_engine(model, tokenizer, spec, requests, ratio, scorer, blocks, cfg)
            else:
                if kind == "hf_continuous_batching":
                    peer = continuous_batching(model, prompts, cfg.output_tokens, set(), blocks, cfg.block_size, cfg.chunk_tokens)
                else:
                    peer = sequential_generate(model, prompts, cfg.output_tokens, set())
                toks = peer.tokens
                row = dict(system=kind, scorer="none", ratio=1.0, wall=peer.wall, output_tokens=peer.output_tokens,
                           prompt_tokens=n_prompt if not peer.error else 0, error=peer.error)
            row["cpu_s"] = time.process_time() - cpu
            seconds = row["cpu_s"] if cfg.clock == "cpu" else row["wall"]
            row |= dict(seconds=seconds, output_tps=row["output_tokens"] / seconds if not row.get("error") else math.nan,
                        total_tps=(row["prompt_tokens"] + row["output_tokens"]) / seconds if not row.get("error") else math.nan)
            rows.append(dict(repeat=rep, pool_blocks=blocks, **row))
            tokens.setdefault(row["system"], toks)
            bar.update()
    bar.close()
    return rows, tokens


def quality(tokenizer, requests: list[QARequest], tokens: dict, stop: set[int], task: str = "niah_single") -> list[dict]:
    """Per system: mean score with a 95% bootstrap CI, and its retention of the ratio-1 engine's score on
    the same requests with a paired bootstrap CI (n = requests)."""
    scores = {system: [score(tokenizer, t, r.answers, stop, task) for t, r in zip(toks, requests)]
              for system, toks in tokens.items() if toks}
    base = scores["engine 1x"]
    out = []
    for system, s in scores.items():
        low, high = bootstrap_ci(s)
        kept, kept_low, kept_high = retention_ci(s, base)
        out.append(dict(system=system, score=float(np.mean(s)), ci_low=low, ci_high=high, n=len(s),
                        retention=kept, retention_low=kept_low, retention_high=kept_high))
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per system: medians over repeats of its speed, and of its speed relative to the ratio-1 engine of
    the same repeat (ratios measured side by side)."""
    out = []
    names = list(dict.fromkeys(r["system"] for r in rows))
    ref = {r["repeat"]: r for r in rows if r["system"] == "engine 1x"}
    for name in names:
        mine = [r for r in rows if r["system"] == name]
        rel = lambda key: statistics.median(m[key] / ref[m["repeat"]][key] for m in mine)  # noqa: E731
        row = dict(system=name, scorer=mine[0].get("scorer", "none"), ratio=mine[0]["ratio"], repeats=len(mine),
                   pool_blocks=mine[0].get("pool_blocks"),
                   output_tps=statistics.median(m["output_tps"] for m in mine),
                   total_tps=statistics.median(m["total_tps"] for m in mine),
                   wall=statistics.median(m["wall"] for m in mine),
                   cpu_s=statistics.median(m["cpu_s"] for m in mine) if "cpu_s" in mine[0] else math.nan,
                   seconds=statistics.median(m.get("seconds", m["wall"]) for m in mine),
                   output_gain=rel("output_tps"), total_gain=rel("total_tps"),
                   error=mine[0].get("error"))
        for key in ("mean_batch", "max_batch", "preemptions", "prefill_share", "compressions", "mean_occupancy",
                    "blocks_per_sequence", "mean_ttft", "mean_latency", "achieved_ratio", "reread_tokens",
                    "mixed_steps", "steps"):
            if key in mine[0]:
                row[key] = statistics.median(m[key] for m in mine)
        out.append(row)
    return out


# ----- the decode-step cost model ------------------------------------------------------------------

def _copy_row(cache: PagedCache, seq: int) -> None:
    """Append a copy of sequence `seq` with blocks of its own (a fork, then every block made writable)."""
    row = cache.fork(seq)
    for layer in cache.layers:
        for table in layer.tables[row]:
            table.blocks = [cache.pool.writable(b) for b in table.blocks]
        layer.changed()


@torch.no_grad()
def decode_cost(model, requests: list[QARequest], cfg: ThroughputConfig, steps: int = 3, progress: bool = True) -> list[dict]:
    """Median seconds of one batched decode step for each (batch, cached tokens per sequence) of the grid.

    A real prompt (the requests' token ids laid end to end) is prefilled once to each length and
    copied into `batch` sequences with their own blocks; then `steps` decode steps are timed."""
    stream = [t for r in requests for t in r.prompt_ids]
    points = [(b, n) for n in cfg.cost_tokens for b in cfg.cost_batches if b * n <= cfg.cost_max_tokens]
    rows = []
    for n in tqdm(sorted({n for _, n in points}), desc="decode cost", disable=not progress):
        ids = (stream * (n // max(len(stream), 1) + 1))[:n]
        batches = sorted(b for b, m in points if m == n)
        probe = PagedCache(BlockPool(1, cfg.block_size, kv_layout(model.config).head_dim), model.config)
        pool = BlockPool(max(batches) * probe.blocks_needed(n + steps + cfg.block_size) + 1, cfg.block_size,
                         kv_layout(model.config).head_dim, dtype=model.dtype, device=model.device)
        with paged_attention(model):
            for batch in batches:
                cache = PagedCache(pool, model.config)
                for start in range(0, n, cfg.chunk_tokens):
                    forward(model, cache, torch.tensor([ids[start : start + cfg.chunk_tokens]], device=model.device))
                for _ in range(batch - 1):
                    _copy_row(cache, 0)
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    forward(model, cache, torch.tensor([[ids[-1]]] * batch, device=model.device))
                    times.append(time.perf_counter() - start)
                cache.reset()
                rows.append(dict(batch=batch, cached_tokens=n, step_s=statistics.median(times)))
    return rows


def fit_cost(rows: list[dict]) -> dict[str, float]:
    """Least-squares step_s = fixed + per_seq * batch + per_token * batch * cached_tokens."""
    X = np.array([[1.0, r["batch"], r["batch"] * r["cached_tokens"]] for r in rows])
    y = np.array([r["step_s"] for r in rows])
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    return dict(fixed_s=float(coef[0]), per_seq_s=float(coef[1]), per_token_s=float(coef[2]))


def predicted_gain(fit: dict[str, float], row: dict, ref: dict, heads: int, block_size: int) -> float:
    """Throughput gain over `ref` (the ratio-1 engine) the cost model predicts for `row`'s mean batch and
    cache size, with its own measured prefill time: 1 / (p_row + (1 - p_ref) * t_row / t_ref), p_row = the
    row's prefill (and re-reading) time over ref's time, p_ref = ref's prefill share, t = decode seconds per generated
    token = fixed / batch + per_seq + per_token * cached tokens per sequence (from the measured blocks per
    sequence, `heads` (layer, KV head) tables each)."""
    def per_token(r):
        cached = r["blocks_per_sequence"] * block_size / heads
        return fit["fixed_s"] / r["mean_batch"] + fit["per_seq_s"] + fit["per_token_s"] * cached
    prefill = row["prefill_share"] * row["seconds"] / ref["seconds"]  # the row's prefill time, in ref's time
    return 1 / (prefill + (1 - ref["prefill_share"]) * per_token(row) / per_token(ref))


# ----- ledger ----------------------------------------------------------------------------------------

def claim_metrics(summary: list[dict], quality_rows: list[dict], fit: dict[str, float] | None = None,
                  heads: int = 90, block_size: int = 16, headline: str = "kvzip") -> dict[str, float]:
    """Ledger metrics: per (scorer, ratio), the total-throughput gain over the ratio-1 engine (the anchor's
    measure) with the retention of its answers (paired CI), output gains, engine-measured concurrency
    gains (pool blocks one decoding sequence holds at ratio 1 over those at the ratio: how many more
    sequences the pool holds at once, generated tokens included), largest-batch gains, the peers, the
    ratio-1 prefill share and its Amdahl bound; with the cost model's `fit`, the gain it predicts at each
    row's measured batch and cache size. `headline`'s 8x / 64x rows are the ledger's claims."""
    by = {r["system"]: r for r in summary}
    q = {r["system"]: r for r in quality_rows}
    ref = by["engine 1x"]
    m = {"throughput.prefill_share_1x": ref["prefill_share"],
         "throughput.amdahl_bound": 1 / ref["prefill_share"] if ref["prefill_share"] else math.inf,
         "throughput.output_tps_1x": ref["output_tps"], "throughput.total_tps_1x": ref["total_tps"]}
    for r in summary:
        if not r["system"].startswith("engine"):
            continue
        k = f"{r['scorer']}_{r['ratio']:g}x" if r["ratio"] > 1 else "1x"
        m[f"throughput.total_gain_{k}"] = r["total_gain"]
        m[f"throughput.output_gain_{k}"] = r["output_gain"]
        m[f"throughput.mean_batch_{k}"] = r["mean_batch"]
        m[f"throughput.max_batch_{k}"] = r["max_batch"]
        m[f"throughput.preemptions_{k}"] = r["preemptions"]
        m[f"throughput.batch_gain_{k}"] = r["max_batch"] / ref["max_batch"] if ref["max_batch"] else math.nan
        m[f"throughput.concurrency_gain_{k}"] = ref["blocks_per_sequence"] / r["blocks_per_sequence"]
        m[f"throughput.concurrent_{k}"] = r["pool_blocks"] / r["blocks_per_sequence"]
        if r["system"] in q:
            m[f"quality.score_{k}"] = q[r["system"]]["score"]
            m[f"quality.retention_{k}"] = q[r["system"]]["retention"]
            m[f"quality.retention_low_{k}"] = q[r["system"]]["retention_low"]
        if fit is not None:
            m[f"throughput.cost_model_gain_{k}"] = predicted_gain(fit, r, ref, heads, block_size)
    for k in ("8x", "64x"):
        m[f"claim.throughput_gain_{k}"] = m.get(f"throughput.total_gain_{headline}_{k}", math.nan)
        m[f"claim.throughput_retention_{k}"] = m.get(f"quality.retention_{headline}_{k}", math.nan)
        m[f"claim.engine_concurrency_gain_{k}"] = m.get(f"throughput.concurrency_gain_{headline}_{k}", math.nan)
    m["quality.score_1x"] = q["engine 1x"]["score"] if "engine 1x" in q else math.nan
    for peer in ("hf_continuous_batching", "hf_sequential"):
        if peer in by and not by[peer].get("error"):
            m[f"throughput.engine_1x_vs_{peer}"] = 1 / by[peer]["output_gain"]  # median of same-repeat ratios
    return m
