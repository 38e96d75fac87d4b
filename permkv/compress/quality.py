"""Quality of compression methods against the full cache on the same samples, per task, ratio and mode."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from permkv.compress.answer import method_answer
from permkv.data import build_task
from permkv.eval import bootstrap_ci
from permkv.experiments.scoring import evaluate, summarize


def quality_grid(
    model,
    tokenizer,
    spec,
    tasks: Sequence[str],
    lengths: Sequence[int],
    n: int,
    ratios: Sequence[float],
    methods: Sequence[str],
    modes: Sequence[str] = ("query_aware", "query_agnostic"),
    seed: int = 0,
    max_new_tokens: int = 32,
) -> tuple[list[dict], list[dict]]:
    """Score every (task, length, mode, method, ratio) and the full cache on the same samples.

    Returns `rows` (one per cell: score, bootstrap CI, n, the full-cache score on the same samples,
    retention, measured bytes and achieved ratio) and `samples` (one per answered sample, with
    the per-(layer, head) tokens kept, for the budget heatmap).
    """
    if "perplexity" in tasks:
        raise ValueError("tasks must be question-answering tasks; perplexity is not decoded from a compressed cache")
    rows, per_sample = [], []
    cells = [(t, length, mode) for t in tasks for length in lengths for mode in modes]
    for task, length, mode in tqdm(cells, desc=f"{spec.name} quality"):
        samples = build_task(task, tokenizer, spec, n, length, seed=seed, max_new_tokens=max_new_tokens)
        full = evaluate(model, tokenizer, spec, samples, mode, method_answer(model, tokenizer, "full", 1, mode, max_new_tokens),
                        max_new_tokens, desc=f"full {task}")
        base = [r.score for r in full]
        rows.append(dict(model=spec.name, task=task, context_tokens=length, mode=mode, method="full", ratio=1.0,
                         full_score=float(np.mean(base)), retention=1.0, achieved_ratio=1.0, **summarize(full)))
        for method in methods:
            for ratio in ratios:
                reports: list = []
                fn = method_answer(model, tokenizer, method, ratio, mode, max_new_tokens, reports)
                records = evaluate(model, tokenizer, spec, samples, mode, fn, max_new_tokens, desc=f"{method} {ratio}x")
                scores = [r.score for r in records]
                base_mean = float(np.mean(base))
                rows.append(dict(
                    model=spec.name, task=task, context_tokens=length, mode=mode, method=method, ratio=float(ratio),
                    full_score=base_mean, retention=float(np.mean(scores)) / base_mean if base_mean else float("nan"),
                    original_bytes=float(np.mean([r.original_bytes for r in reports])),
                    compressed_bytes=float(np.mean([r.compressed_bytes for r in reports])),
                    achieved_ratio=float(np.mean([r.achieved_ratio for r in reports])), **summarize(records)))
                for rec, b, rep in zip(records, base, reports):
                    per_sample.append(dict(task=task, context_tokens=length, mode=mode, method=method, ratio=float(ratio),
                                           score=rec.score, full_score=b, output=rec.output, kept=rep.kept,
                                           n_tokens=rec.n_tokens))
    return rows, per_sample


def pooled_retention(per_sample: Sequence[dict], method: str, ratio: float, mode: str) -> tuple[float, float, int]:
    """(retention, full-cache mean, n) over all tasks: mean score / mean full-cache score, same samples."""
    picked = [s for s in per_sample if s["method"] == method and s["ratio"] == float(ratio) and s["mode"] == mode]
    if not picked:
        return float("nan"), float("nan"), 0
    full = float(np.mean([s["full_score"] for s in picked]))
    score = float(np.mean([s["score"] for s in picked]))
    return (score / full if full else float("nan")), full, len(picked)


def paired_difference(per_sample: Sequence[dict], a: str, b: str, ratio: float, mode: str) -> dict:
    """Mean score of method `a` minus method `b` on the same samples (all tasks pooled) at one ratio
    and mode, with a paired bootstrap 95% CI: `a` beats `b` when ci_low > 0."""
    def scores(method):
        return {(s["task"], s["context_tokens"], i): s["score"] for i, s in enumerate(
            s for s in per_sample if s["method"] == method and s["ratio"] == float(ratio) and s["mode"] == mode)}

    sa, sb = scores(a), scores(b)
    if not sa or sa.keys() != sb.keys():
        raise ValueError(f"{a} and {b} must have answered the same samples at {ratio}x {mode}")
    diff = [sa[k] - sb[k] for k in sa]
    low, high = bootstrap_ci(diff)
    return dict(a=a, b=b, ratio=float(ratio), mode=mode, diff=float(np.mean(diff)), ci_low=low, ci_high=high, n=len(diff))
