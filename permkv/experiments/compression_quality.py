"""02_compression_quality: every compression method against the full cache on the same samples.

One prefill per sample serves both modes (`permkv.compress.prefill_shared`, then `Prefilled.extend`): the
query-agnostic prefix (instruction and context) is read and answered first, then the question is
read on top of it, as a chunked prefill would, and the query-aware answers follow. permkv methods
compress a copy-on-write fork of the paged sequence and release it; kvpress presses are applied post
hoc per layer to the saved hidden states / keys / values
(`permkv.baselines.kvpress.compress_post_hoc`, same kept tokens as in prefill); KVzip runs its own
prefill and re-reading, once for every ratio. The full-cache answer decodes an uncompressed fork of
the same prefill and is notebook 00's (`permkv.experiments.scoring.full_cache_answer`; exactly for a
prefix read in one piece, up to rounding after `extend`: tests pin both). The methods and their names
are `permkv.experiments.compression_methods.METHODS`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from permkv.checks import positive_int
from permkv.compress import CompressionReport, Prefilled, prefill_shared, repeat_prompt_ids
from permkv.data import MODES, TASKS, Sample, build_task, encode_sample
from permkv.eval import TASK_METRIC, bootstrap_ci, first_line, paired_difference, retention_ci
from permkv.experiments.compression_methods import (
    FULL,
    METHODS,
    RANDOM,
    Permkv,
    check_methods,
    is_permkv,
    is_press,
)
from permkv.experiments.workers import process_pool
from permkv.models import load_model, model_source


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
    kvpress = any(is_press(m) for m in methods)  # presses read the attention layers' saved inputs
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
                pre = prefill_shared(model, prefix, suffix, max_new_tokens, observe, keep_inputs=kvpress)
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
    for method in [FULL] + [m for m in methods if m != FULL]:
        for ratio in [1.0] if method == FULL else ratios:
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
    bootstrap 95% CI (`permkv.eval.retention_ci`), n and the tasks; retention NaN where nothing was measured
    or the full cache scores 0."""
    picked = list(_picked(per_sample, method, ratio, mode).values())
    tasks = sorted({s["task"] for s in picked})
    if not picked:
        return dict(retention=float("nan"), ci_low=float("nan"), ci_high=float("nan"), full_score=float("nan"), n=0, tasks=tasks)
    score, full = [s["score"] for s in picked], [s["full_score"] for s in picked]
    kept, low, high = retention_ci(score, full, seed=seed)
    return dict(retention=kept, ci_low=low, ci_high=high, full_score=float(np.mean(full)), n=len(picked), tasks=tasks)


def method_difference(per_sample: Sequence[dict], a: str, b: str, ratio: float, mode: str) -> dict:
    """Mean score of method `a` minus method `b` on the same samples (all tasks pooled) at one ratio
    and mode, with a paired bootstrap 95% CI (`permkv.eval.paired_difference`): `a` beats `b` when
    ci_low > 0."""
    sa, sb = _picked(per_sample, a, ratio, mode), _picked(per_sample, b, ratio, mode)
    if not sa or sa.keys() != sb.keys():
        raise ValueError(f"{a} and {b} must have answered the same samples at {ratio}x {mode}")
    d = paired_difference([sa[k]["score"] for k in sa], [sb[k]["score"] for k in sa])
    return dict(a=a, b=b, ratio=float(ratio), mode=mode, **d)


def _best(per_sample: Sequence[dict], ratio: float, mode: str, wanted) -> str | None:
    """The method with `wanted(name)` and the highest pooled retention at (ratio, mode), or None."""
    names = sorted({s["method"] for s in per_sample if wanted(s["method"]) and s["ratio"] == float(ratio) and s["mode"] == mode})
    if not names:
        return None
    return max(names, key=lambda m: np.nan_to_num(pooled_retention(per_sample, m, ratio, mode)["retention"], nan=-1))


def best_press(per_sample: Sequence[dict], ratio: float, mode: str) -> str | None:
    """The kvpress method with the highest pooled retention at (ratio, mode), or None if none ran."""
    return _best(per_sample, ratio, mode, is_press)


def best_permkv(per_sample: Sequence[dict], ratio: float, mode: str) -> str | None:
    """permkv's method (random eviction aside) with the highest pooled retention at (ratio, mode), or None."""
    return _best(per_sample, ratio, mode, lambda m: is_permkv(m) and m != RANDOM)


def claim_metrics(per_sample: Sequence[dict], headline: str, ratios: Sequence[float], modes: Sequence[str]) -> dict[str, float]:
    """Ledger metrics: `claim.retention_<r>x_<mode>` (headline, pooled), `claim.beats_kvpress_<r>x_<mode>`
    (lower end of the paired CI of headline - best press), `claim.best_beats_kvpress_<r>x_<mode>` (the same
    for permkv's best method, `best_permkv`), `claim.vs_random_<r>x_<mode>` (headline - random eviction), with
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
                d = method_difference(per_sample, headline, best, ratio, mode)
                metrics[f"claim.beats_kvpress_{tag}"] = d["ci_low"]
                metrics[f"diff_vs_kvpress_{tag}"] = d["diff"]
            ours = best_permkv(per_sample, ratio, mode)
            if ours:  # permkv's best method, not only the headline
                metrics[f"claim.best_retention_{tag}"] = pooled_retention(per_sample, ours, ratio, mode)["retention"]
            if best and ours:
                d = method_difference(per_sample, ours, best, ratio, mode)
                metrics[f"claim.best_beats_kvpress_{tag}"] = d["ci_low"]
                metrics[f"diff_best_vs_kvpress_{tag}"] = d["diff"]
            if RANDOM in methods and headline != RANDOM and r["n"]:
                d = method_difference(per_sample, headline, RANDOM, ratio, mode)
                metrics[f"claim.vs_random_{tag}"] = d["ci_low"]
                metrics[f"diff_vs_random_{tag}"] = d["diff"]
    return metrics


# ----- the measured-quality table (QualityTable.load) ----------------------------------------------
def quality_table(per_sample: Sequence[dict]) -> list[dict]:
    """Pooled retention per (model, mode, ratio) of every permkv method, with its compression settings
    (scorer, allocator, observe; KVzip-style re-reading: scorer "kvzip", observe 0), CI, n and tasks:
    what `permkv.compress.QualityTable` reads."""
    out = []
    keys = sorted({(s["model"], s["mode"], s["method"], s["ratio"]) for s in per_sample if is_permkv(s["method"])})
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
    """Notebook 02's parameters (upper-case names in its `parameters` cell). These defaults are the
    notebook's (a small smoke run); params/<profile>/02_compression_quality.yaml overrides them."""

    model: str = "smollm2-135m"  # a bundled name, a saved folder or a GGUF file (permkv.models.load_model)
    tasks: list = field(default_factory=lambda: ["niah_single"])  # question-answering tasks of permkv.data.TASKS
    lengths: list = field(default_factory=lambda: [512])  # context tokens
    n_samples: int = 1  # samples per (task, length); every method and ratio answers the same ones
    ratios: list = field(default_factory=lambda: [8, 64])  # x times smaller: tokens seen / tokens kept
    methods: list = field(default_factory=lambda: [  # of permkv.experiments.compression_methods.METHODS
        "kvcompress/uniform/w64", "kvcompress/global/w8", "kvpress/snapkv", RANDOM])
    modes: list = field(default_factory=lambda: list(MODES))
    headline: str = "kvcompress/uniform/w64"  # the method the claim metrics measure
    max_new_tokens: int = 32
    heatmap_method: str = "kvcompress/global/w8"  # whose kept tokens per (layer, KV head) the heatmap shows
    claim_tokens: int = 0  # claim metrics pool samples of at least this many context tokens (the anchor: thousands)
    long_model: str = "gemma3-270m"  # a second model at long context (permkv methods: kvpress cannot run Gemma-3)
    long_tasks: list = field(default_factory=lambda: ["niah_single"])
    long_lengths: list = field(default_factory=lambda: [640])  # past Gemma-3's 512-token sliding window
    long_n: int = 1
    long_ratios: list = field(default_factory=lambda: [8])
    long_methods: list = field(default_factory=lambda: ["kvcompress/uniform/w64"])
    long_modes: list = field(default_factory=lambda: ["query_aware"])
    seed: int = 0
    workers: int = 1  # processes answering samples (both modes each), one torch thread each (2 on a 2-core CPU)

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
