"""02_compression_quality: every compression method against the full cache on the same samples.

One prefill per sample serves both modes (`prefill_once`, then `Prefilled.extend`): the
query-agnostic prefix (instruction and context) is read and answered first, then the question is
read on top of it, as a chunked prefill would, and the query-aware answers follow. permkv methods
compress a copy-on-write fork of the paged sequence and release it; kvpress presses are applied post
hoc per layer to the saved hidden states / keys / values
(`permkv.baselines.kvpress.compress_post_hoc`, same kept tokens as in prefill); KVzip runs its own
prefill and re-reading, once for every ratio. The full-cache answer decodes an uncompressed fork of
the same prefill and is notebook 00's (`permkv.experiments.scoring.full_cache_answer`; exactly for a
prefix read in one piece, up to rounding after `extend`: tests pin both). Methods are a registry of
small dataclasses (`METHODS`), each with `answer(...) -> (text, report)`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from permkv.baselines import kvpress as kvp
from permkv.cache import PagedCache, forward, paged_attention
from permkv.checks import positive_int
from permkv.compress import (
    KVZIP_SCORER,
    CompressionReport,
    InferenceKVCacheCompression,
    QueryRecorder,
    fork_sequence,
    kvzip_scores,
    observing,
    paged_cache_for,
    repeat_prompt_ids,
)
from permkv.data import MODES, TASKS, Sample, build_task, encode_sample
from permkv.eval import TASK_METRIC, bootstrap_ci, first_line, greedy_decode, stop_ids
from permkv.experiments.workers import process_pool
from permkv.models import load_model, model_source


# ----- one prefill per sample, both modes -------------------------------------------------------------
@dataclass
class Prefilled:
    """One sample's prefix read once. `cache` holds it uncompressed in sequence 0 (methods compress forks;
    only `extend` reads more into it), `queries[layer]` `(1, q_heads, w, head_dim)` are the last
    w <= `observe` queries, `inputs` the attention layers' inputs for kvpress presses."""

    prefix: list[int]
    suffix: list[int]
    cache: PagedCache
    logits: torch.Tensor  # (vocab,) at the last prefix position
    queries: dict[int, torch.Tensor]
    inputs: dict[int, kvp.LayerInputs]
    observe: int = 64
    repeat_prompt: list[int] = field(default_factory=list)  # KVzip's request to repeat the context
    _keys_values: list | None = field(default=None, repr=False)
    _kvzip: dict | None = field(default=None, repr=False)
    _kvpress_kvzip: kvp.KVzipScored | None = field(default=None, repr=False)

    def kvzip(self, model, prompt: list[int], chunk_tokens: int) -> dict[int, torch.Tensor]:
        """KVzip-style scores of the prefix (computed once, on forks of the cache)."""
        if self._kvzip is None:
            self._kvzip = kvzip_scores(model, self.cache, self.prefix, prompt, chunk_tokens)
        return self._kvzip

    def kvpress_kvzip(self, model) -> kvp.KVzipScored:
        """kvpress KVzipPress's own prefill and re-reading of the prefix (done once, for every ratio)."""
        if self._kvpress_kvzip is None:
            self._kvpress_kvzip = kvp.kvzip_scored(model, self.prefix)
        return self._kvpress_kvzip

    def keys_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's uncompressed keys, values `(1, kv_heads, len(prefix), head_dim)` (gathered once)."""
        if self._keys_values is None:
            n = len(self.prefix)
            self._keys_values = [(k[:, :, :n], v[:, :, :n]) for k, v, _, _ in
                                 (self.cache.gather(i) for i in range(len(self.cache.layers)))]
        return self._keys_values

    @torch.no_grad()
    def extend(self, model, ids: list[int], suffix: list[int]) -> "Prefilled":
        """The prefix read further by `ids` on the same cache (a second prefill chunk): the query-aware
        prefix after the query-agnostic one, without reading the context twice. Queries and inputs
        continue this prefix's (the same as one prefill of the longer prefix, up to rounding). This
        object's scores and gathered keys are dropped; its cache now belongs to the returned one."""
        positive_int("len(ids)", len(ids))
        self._keys_values = self._kvzip = self._kvpress_kvzip = None
        n = len(self.prefix)
        positions = torch.arange(n, n + len(ids), device=model.device)[None]
        with observing(model, window=self.observe) as recorder, kvp.capture_inputs(model) as inputs:
            logits = forward(model, self.cache, torch.tensor([ids], device=model.device), positions)[0, -1]
        continued = QueryRecorder(self.observe, dict(self.queries))  # this prefix's last queries, then the new ones
        for i, query in recorder.queries.items():
            continued.record(i, query)
        joined = {i: old.followed_by(inputs[i]) for i, old in self.inputs.items()}
        return Prefilled(self.prefix + list(ids), suffix, self.cache, logits, continued.queries, joined,
                         self.observe, self.repeat_prompt)

    def release(self) -> None:
        self.cache.reset()
        self._keys_values = self._kvzip = self._kvpress_kvzip = None


@torch.no_grad()
def prefill_once(model, prefix: list[int], suffix: list[int], max_new_tokens: int, observe: int = 64) -> Prefilled:
    """Prefill `prefix` into a PagedCache whose pool also has room for one compressed fork and its
    decode (of any longer prefix of `prefix + suffix`: `extend`), recording the last `observe` queries
    and every attention layer's inputs."""
    cache = paged_cache_for(model, 2 * (len(prefix) + len(suffix)) + max_new_tokens + 64)
    with observing(model, window=observe) as recorder, kvp.capture_inputs(model) as inputs:
        logits = forward(model, cache, torch.tensor([prefix], device=model.device))[0, -1]
    return Prefilled(prefix, suffix, cache, logits, recorder.queries, inputs, observe)


def answer_on_fork(model, tokenizer, pre: Prefilled, max_new_tokens: int, compress) -> tuple[str, CompressionReport]:
    """Compress a copy-on-write fork of the prefilled sequence with `compress(fork) -> report`, feed
    the suffix and decode greedily on it (the one loop), then release the fork."""
    fork = fork_sequence(pre.cache, model.config)
    try:
        report = compress(fork)
        with paged_attention(model):
            out = greedy_decode(model, fork, pre.logits, start=len(pre.prefix), max_new_tokens=max_new_tokens,
                                stop=stop_ids(model, tokenizer), suffix=pre.suffix)
    finally:
        fork.reset()
    return tokenizer.decode(out, skip_special_tokens=True), report


# ----- methods ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Full:
    """The uncompressed reference, decoded from an uncompressed fork of the one prefill (no second
    prefill: a third of 02's time at 4K on a CPU). It is notebook 00's answer (`full_cache_answer`):
    the same loop over the same keys and values (up to rounding after `Prefilled.extend`), pinned by
    tests."""

    kind = "full"

    def answer(self, model, tokenizer, pre: Prefilled, ratio: float, max_new_tokens: int):
        text, _ = answer_on_fork(model, tokenizer, pre, max_new_tokens, lambda fork: None)
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
        return answer_on_fork(model, tokenizer, pre, max_new_tokens,
                              lambda fork: self.compression().compress_auto(fork, ratio, pre.queries))


@dataclass(frozen=True)
class PermkvKVzip:
    """permkv's compressor with KVzip-style scores (query-agnostic: the model re-reads the context on
    forks of the cache), the same budget per head."""

    allocator: str = "uniform"
    chunk_tokens: int = 1024  # context tokens re-read per pass
    kind = "permkv"

    def setting(self) -> dict:
        """Quality-table key: scorer "kvzip", no observed queries (`InferenceKVCacheCompression.setting()`)."""
        return dict(scorer=KVZIP_SCORER, allocator=self.allocator, observe=0)

    def answer(self, model, tokenizer, pre: Prefilled, ratio: float, max_new_tokens: int):
        scores = pre.kvzip(model, pre.repeat_prompt, self.chunk_tokens)
        compressor = InferenceKVCacheCompression(KVZIP_SCORER, self.allocator).compressor()
        return answer_on_fork(model, tokenizer, pre, max_new_tokens, lambda fork: compressor.compress(fork, ratio, scores=scores))


@dataclass(frozen=True)
class Press:
    """A kvpress press, post hoc on the saved prefill (KVzip: its own prefill and re-reading passes,
    once per sample for every ratio)."""

    press: str
    kind = "kvpress"

    def answer(self, model, tokenizer, pre: Prefilled, ratio: float, max_new_tokens: int):
        kvp.check_model(model)
        if self.press == "kvzip":  # its own prefill and re-reading, once per sample; masks per ratio
            scored = pre.kvpress_kvzip(model)
            cache, logits = scored.cache(model), scored.logits
            kvp.mask_kvzip(model, scored, ratio)
        else:
            press = kvp.make_press(self.press, ratio)
            cache, logits = kvp.compress_post_hoc(model, press, pre.inputs, pre.keys_values()), pre.logits
        report = kvp.dense_report(cache, len(pre.prefix), ratio)
        return kvp.answer_from(model, tokenizer, cache, logits, len(pre.prefix), pre.suffix, max_new_tokens), report


METHODS: dict[str, object] = {
    "full": Full(),
    # the headline after issue 11: KV-Compress's score, 64 observed queries, the same budget per head
    "permkv": Permkv("kvcompress", "uniform", 64),
    # KV-Compress's own setting (the headline before issue 11): one global top-k, 8 observed queries
    "permkv_adaptive": Permkv("kvcompress", "global", 8),
    "permkv_global": Permkv("kvcompress", "global", 64),
    "permkv_layer": Permkv("kvcompress", "layer", 64),
    "permkv_uniform_w8": Permkv("kvcompress", "uniform", 8),
    "permkv_snapkv": Permkv("snapkv", "uniform", 64),
    # SnapKV's score from the last query only: Gemma-3's best query-aware method (base-model prompt ending
    # in "Answer:", whose last query retrieves; README, issue 11's window sweep)
    "permkv_snapkv_w1": Permkv("snapkv", "uniform", 1),
    "permkv_pooled": Permkv("kvcompress_pooled", "uniform", 64),  # SnapKV's pooling on KV-Compress's score
    "permkv_recency": Permkv("kvcompress_recency", "uniform", 64),  # half score, half recency
    "permkv_snapkv_global_w8": Permkv("snapkv", "global", 8),
    "permkv_streaming": Permkv("streaming"),
    "permkv_knorm": Permkv("knorm"),
    "permkv_random": Permkv("random"),
    "permkv_kvzip": PermkvKVzip(),
    # KVzip's scores are attention maxima, comparable across heads: one global top-k (as KVzipPress) works
    # here where it failed on KV-Compress's scores; the best query-agnostic method on issue 11's 6 needles
    "permkv_kvzip_global": PermkvKVzip("global"),
    **{f"kvpress_{name}": Press(name) for name in kvp.PRESSES},
}


def check_methods(methods: Sequence[str]) -> None:
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty list of {list(METHODS)}, got {list(methods)!r}")


# ----- the grid --------------------------------------------------------------------------------------
def score_text(sample: Sample, text: str) -> float:
    """The task's metric on the first line of an answer (as `permkv.experiments.scoring.evaluate`)."""
    return TASK_METRIC[sample.task](first_line(text), sample.answers)


def answer_sample(model, tokenizer, sample: Sample, spec, modes: str | Sequence[str], methods: Sequence[str],
                  ratios: Sequence[float], max_new_tokens: int = 32) -> list[dict]:
    """Every (mode, method, ratio) on one sample; "full" answers once per mode (ratio 1).

    One prefill serves every mode: the shortest prefix (query-agnostic) is read and answered first,
    then each longer one extends it (`Prefilled.extend`, its `prefill_seconds` the extension's). Rows
    come in the order of `modes`."""
    modes = [modes] if isinstance(modes, str) else list(modes)
    parts = {mode: encode_sample(tokenizer, spec, sample, mode) for mode in modes}
    observe = max([METHODS[m].observe for m in methods if isinstance(METHODS[m], Permkv)] + [1])
    rows: dict[str, list[dict]] = {}
    pre = None
    try:
        for mode in sorted(modes, key=lambda m: len(parts[m][0])):
            prefix, suffix = parts[mode]
            t0 = time.perf_counter()
            if pre is not None and len(prefix) > len(pre.prefix) and prefix[: len(pre.prefix)] == pre.prefix:
                pre = pre.extend(model, prefix[len(pre.prefix) :], suffix)
            else:
                if pre is not None:
                    pre.release()
                pre = prefill_once(model, prefix, suffix, max_new_tokens, observe)
                pre.repeat_prompt = repeat_prompt_ids(tokenizer, spec)
            rows[mode] = _answer_prefilled(model, tokenizer, sample, pre, mode, methods, ratios, max_new_tokens,
                                           time.perf_counter() - t0)
    finally:
        if pre is not None:
            pre.release()
    return [row for mode in modes for row in rows[mode]]


def _answer_prefilled(model, tokenizer, sample: Sample, pre: Prefilled, mode: str, methods: Sequence[str],
                      ratios: Sequence[float], max_new_tokens: int, prefill_s: float) -> list[dict]:
    """The full cache, then every (method, ratio), on one prefilled prefix."""
    out = []
    for method in ["full"] + [m for m in methods if m != "full"]:
        for ratio in [1.0] if method == "full" else ratios:
            t0 = time.perf_counter()
            text, report = METHODS[method].answer(model, tokenizer, pre, float(ratio), max_new_tokens)
            out.append(dict(task=sample.task, mode=mode, method=method, ratio=float(ratio), output=text,
                            score=score_text(sample, text), n_tokens=len(pre.prefix) + len(pre.suffix),
                            seconds=time.perf_counter() - t0, prefill_seconds=prefill_s,
                            **(_report_fields(report) if report else {})))
    for row in out:
        row["full_score"] = out[0]["score"]
    return out


def _report_fields(report: CompressionReport) -> dict:
    return dict(original_bytes=report.original_bytes, compressed_bytes=report.compressed_bytes,
                achieved_ratio=report.achieved_ratio, kept=report.kept)


def quality_grid(model, tokenizer, spec, tasks: Sequence[str], lengths: Sequence[int], n: int, ratios: Sequence[float],
                 methods: Sequence[str], modes: Sequence[str] = MODES, seed: int = 0, max_new_tokens: int = 32,
                 workers: int = 1) -> tuple[list[dict], list[dict]]:
    """Score every (task, length, mode, method, ratio) and the full cache on the same samples.

    Returns `rows` (one per cell: score, bootstrap CI, n, full-cache score on the same samples,
    retention, measured bytes and achieved ratio) and `per_sample` (one per answer, with the
    per-(layer, head) tokens kept, for the budget heatmap).

    Each sample is one job (`answer_sample`: one prefill for all modes). workers > 1: the jobs go to that
    many processes with one torch thread each (each loads the model by `spec.name`), longest contexts
    first; rows come back in the same order as with one worker."""
    positive_int("workers", workers)
    check_methods(methods)
    if "perplexity" in tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be question-answering tasks of {TASKS[:-1]}, got {list(tasks)!r}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes must be of {MODES}, got {list(modes)!r}")
    jobs = [(length, i, sample) for task in tasks for length in lengths for i, sample in
            enumerate(build_task(task, tokenizer, spec, n, length, seed=seed, max_new_tokens=max_new_tokens))]
    desc = f"{spec.name}: {len(jobs)} samples x {len(modes)} modes"
    if workers == 1:
        answers = [answer_sample(model, tokenizer, sample, spec, modes, methods, ratios, max_new_tokens)
                   for _, _, sample in tqdm(jobs, desc=desc)]
    else:
        longest_first = sorted(range(len(jobs)), key=lambda j: -jobs[j][0])  # no worker ends on a long job alone
        with process_pool(workers) as pool:
            futures = {j: pool.submit(_answer_in_worker, spec.name, str(model.device), jobs[j][2], modes, methods,
                                      ratios, max_new_tokens) for j in longest_first}
            done = {j: futures[j].result() for j in tqdm(longest_first, desc=f"{desc}, {workers} workers")}
        answers = [done[j] for j in range(len(jobs))]
    per_sample = [dict(model=spec.name, context_tokens=length, sample=i, **row)
                  for (length, i, _), rows in zip(jobs, answers) for row in rows]
    # rows by (task, length, mode, sample), as the tables read them
    per_sample.sort(key=lambda s: (tasks.index(s["task"]), lengths.index(s["context_tokens"]), modes.index(s["mode"])))
    return summarize_cells(per_sample), per_sample


@cache
def _worker_model(name: str, device: str):
    return load_model(name, device=device)


def _answer_in_worker(name: str, device: str, sample: Sample, modes: Sequence[str], methods: Sequence[str],
                      ratios: Sequence[float], max_new_tokens: int) -> list[dict]:
    """`answer_sample` in a worker process, which loads the model once."""
    model, tokenizer, spec = _worker_model(name, device)
    return answer_sample(model, tokenizer, sample, spec, modes, methods, ratios, max_new_tokens)


def summarize_cells(per_sample: Sequence[dict]) -> list[dict]:
    """One row per (model, task, length, mode, method, ratio) of the per-sample answers."""
    keys = ("model", "task", "context_tokens", "mode", "method", "ratio")
    cells: dict[tuple, list[dict]] = {}
    for s in per_sample:
        cells.setdefault(tuple(s[k] for k in keys), []).append(s)
    rows = []
    for key, picked in cells.items():
        scores = [s["score"] for s in picked]
        full = float(np.mean([s["full_score"] for s in picked]))
        low, high = bootstrap_ci(scores)
        row = dict(zip(keys, key), score=float(np.mean(scores)), ci_low=low, ci_high=high, n=len(scores), full_score=full,
                   retention=float(np.mean(scores)) / full if full else float("nan"))
        for name in ("original_bytes", "compressed_bytes", "achieved_ratio"):
            row[name] = float(np.mean([s[name] for s in picked])) if name in picked[0] else (1.0 if name == "achieved_ratio" else float("nan"))
        rows.append(row)
    return rows


# ----- statistics ------------------------------------------------------------------------------------
def _picked(per_sample, method, ratio, mode):
    return {(s.get("model"), s["task"], s["context_tokens"], s.get("sample", i)): s for i, s in enumerate(
        s for s in per_sample if s["method"] == method and s["ratio"] == float(ratio) and s["mode"] == mode)}


def pooled_retention(per_sample: Sequence[dict], method: str, ratio: float, mode: str, seed: int = 0) -> dict:
    """Retention over all tasks pooled (mean score / mean full-cache score, same samples) with a paired
    bootstrap 95% CI, n and the tasks; retention NaN where nothing was measured or the full cache scores 0."""
    picked = list(_picked(per_sample, method, ratio, mode).values())
    tasks = sorted({s["task"] for s in picked})
    if not picked:
        return dict(retention=float("nan"), ci_low=float("nan"), ci_high=float("nan"), full_score=float("nan"), n=0, tasks=tasks)
    score = np.array([s["score"] for s in picked], dtype=float)
    full = np.array([s["full_score"] for s in picked], dtype=float)
    if full.mean() == 0:
        return dict(retention=float("nan"), ci_low=float("nan"), ci_high=float("nan"), full_score=0.0, n=len(picked), tasks=tasks)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(picked), size=(1000, len(picked)))
    boot = score[idx].mean(1) / np.maximum(full[idx].mean(1), 1e-12)
    return dict(retention=float(score.mean() / full.mean()), ci_low=float(np.quantile(boot, 0.025)),
                ci_high=float(np.quantile(boot, 0.975)), full_score=float(full.mean()), n=len(picked), tasks=tasks)


def paired_difference(per_sample: Sequence[dict], a: str, b: str, ratio: float, mode: str) -> dict:
    """Mean score of method `a` minus method `b` on the same samples (all tasks pooled) at one ratio
    and mode, with a paired bootstrap 95% CI: `a` beats `b` when ci_low > 0."""
    sa, sb = _picked(per_sample, a, ratio, mode), _picked(per_sample, b, ratio, mode)
    if not sa or sa.keys() != sb.keys():
        raise ValueError(f"{a} and {b} must have answered the same samples at {ratio}x {mode}")
    diff = [sa[k]["score"] - sb[k]["score"] for k in sa]
    low, high = bootstrap_ci(diff)
    return dict(a=a, b=b, ratio=float(ratio), mode=mode, diff=float(np.mean(diff)), ci_low=low, ci_high=high, n=len(diff))


def _best(per_sample: Sequence[dict], ratio: float, mode: str, wanted) -> str | None:
    """The method with `wanted(name)` and the highest pooled retention at (ratio, mode), or None."""
    names = sorted({s["method"] for s in per_sample if wanted(s["method"]) and s["ratio"] == float(ratio) and s["mode"] == mode})
    if not names:
        return None
    return max(names, key=lambda m: np.nan_to_num(pooled_retention(per_sample, m, ratio, mode)["retention"], nan=-1))


def best_press(per_sample: Sequence[dict], ratio: float, mode: str) -> str | None:
    """The kvpress method with the highest pooled retention at (ratio, mode), or None if none ran."""
    return _best(per_sample, ratio, mode, lambda m: m.startswith("kvpress_"))


def best_permkv(per_sample: Sequence[dict], ratio: float, mode: str) -> str | None:
    """permkv's method (random eviction aside) with the highest pooled retention at (ratio, mode), or None."""
    return _best(per_sample, ratio, mode, lambda m: m.startswith("permkv") and m != "permkv_random")


def claim_metrics(per_sample: Sequence[dict], headline: str, ratios: Sequence[float], modes: Sequence[str]) -> dict[str, float]:
    """Ledger metrics: `claim.retention_<r>x_<mode>` (headline, pooled), `claim.beats_kvpress_<r>x_<mode>`
    (lower end of the paired CI of headline - best press), `claim.best_beats_kvpress_<r>x_<mode>` (the same
    for permkv's best method, `best_permkv`), `claim.vs_random_<r>x_<mode>` (headline - permkv_random), with
    the full-cache score and differences beside them."""
    metrics: dict[str, float] = {}
    methods = {s["method"] for s in per_sample}
    for mode in modes:
        for ratio in ratios:
            tag = f"{ratio:g}x_{mode}"
            r = pooled_retention(per_sample, headline, ratio, mode)
            if r["n"]:
                metrics.update({f"claim.retention_{tag}": r["retention"], f"retention_ci_low_{tag}": r["ci_low"],
                                f"full_score_{tag}": r["full_score"], f"n_{tag}": r["n"]})
            best = best_press(per_sample, ratio, mode)
            if best and r["n"]:
                d = paired_difference(per_sample, headline, best, ratio, mode)
                metrics[f"claim.beats_kvpress_{tag}"] = d["ci_low"]
                metrics[f"diff_vs_kvpress_{tag}"] = d["diff"]
            ours = best_permkv(per_sample, ratio, mode)
            if ours:  # issue 11's query-agnostic target: permkv's best method, not only the headline
                metrics[f"claim.best_retention_{tag}"] = pooled_retention(per_sample, ours, ratio, mode)["retention"]
            if best and ours:
                d = paired_difference(per_sample, ours, best, ratio, mode)
                metrics[f"claim.best_beats_kvpress_{tag}"] = d["ci_low"]
                metrics[f"diff_best_vs_kvpress_{tag}"] = d["diff"]
            if "permkv_random" in methods and headline != "permkv_random" and r["n"]:
                d = paired_difference(per_sample, headline, "permkv_random", ratio, mode)
                metrics[f"claim.vs_random_{tag}"] = d["ci_low"]
                metrics[f"diff_vs_random_{tag}"] = d["diff"]
    return metrics


# ----- the measured-quality table (QualityTable.load) ----------------------------------------------
def quality_table(per_sample: Sequence[dict]) -> list[dict]:
    """Pooled retention per (model, mode, ratio) of every permkv method, with its compression settings
    (scorer, allocator, observe; KVzip-style re-reading: scorer "kvzip", observe 0), CI, n and tasks:
    what `permkv.compress.QualityTable` reads."""
    out = []
    keys = sorted({(s["model"], s["mode"], s["method"], s["ratio"]) for s in per_sample
                   if isinstance(METHODS.get(s["method"]), (Permkv, PermkvKVzip))})
    for model, mode, method, ratio in keys:
        picked = [s for s in per_sample if s["model"] == model]
        r = pooled_retention(picked, method, ratio, mode)
        lengths = sorted({s["context_tokens"] for s in picked if s["method"] == method})
        out.append(dict(model=model, mode=mode, ratio=ratio, method=method, **METHODS[method].setting(),
                        context_tokens=lengths, **r))
    return out


def write_quality_table(per_sample: Sequence[dict], path: str | Path) -> Path:
    """Write `quality_table(per_sample)` as JSON to `path` (the file `QualityTable.load` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(quality_table(per_sample), indent=1, default=float))
    return path


# ----- config ----------------------------------------------------------------------------------------
@dataclass
class CompressionQualityConfig:
    """Notebook 02's parameters (upper-case names in its `parameters` cell)."""

    model: str = "smollm2-135m"  # a bundled name, a saved folder or a GGUF file (permkv.models.load_model)
    tasks: list = field(default_factory=lambda: ["niah_single"])  # question-answering tasks
    lengths: list = field(default_factory=lambda: [512])  # context tokens
    n_samples: int = 1  # samples per (task, length); every method and ratio answers the same ones
    ratios: list = field(default_factory=lambda: [8, 64])  # x times smaller
    methods: list = field(default_factory=lambda: ["permkv", "kvpress_snapkv"])  # of METHODS
    modes: list = field(default_factory=lambda: list(MODES))
    headline: str = "permkv"  # the method the claim metrics measure
    max_new_tokens: int = 32
    heatmap_method: str = "permkv_adaptive"  # whose kept tokens per (layer, head) the heatmap shows
    claim_tokens: int = 0  # claim metrics pool samples of at least this many context tokens (the anchor: thousands)
    long_model: str = "gemma3-270m"  # a second model at long context (permkv methods: kvpress cannot run Gemma-3)
    long_tasks: list = field(default_factory=lambda: ["niah_single"])
    long_lengths: list = field(default_factory=lambda: [640])
    long_n: int = 1
    long_ratios: list = field(default_factory=lambda: [8])
    long_methods: list = field(default_factory=lambda: ["permkv"])
    long_modes: list = field(default_factory=lambda: ["query_aware"])
    seed: int = 0
    workers: int = 1  # processes answering samples (both modes each), one torch thread each

    def __post_init__(self):
        model_source(self.model)
        model_source(self.long_model)
        check_methods(self.methods)
        check_methods(self.long_methods)
        if self.headline not in self.methods:
            raise ValueError(f"headline must be one of methods {self.methods}, got {self.headline!r}")
        for name in ("n_samples", "long_n", "max_new_tokens", "workers"):
            positive_int(name, getattr(self, name))
        for name in ("ratios", "long_ratios"):
            if not getattr(self, name) or any(not isinstance(r, (int, float)) or r < 1 for r in getattr(self, name)):
                raise ValueError(f"{name} must be a non-empty list of numbers >= 1, got {getattr(self, name)!r}")
        for name in ("modes", "long_modes"):
            if not getattr(self, name) or any(m not in MODES for m in getattr(self, name)):
                raise ValueError(f"{name} must be a non-empty list of {MODES}, got {getattr(self, name)!r}")
