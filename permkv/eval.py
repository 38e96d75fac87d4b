"""Metrics, the evaluation loop, bootstrap confidence intervals and timing of a real model.

`evaluate` answers every sample with an `answer_fn(prefix_ids, suffix_ids) -> text`: the full-cache
greedy answer by default; a compression method passes its own function and gets scores on the same
samples, so that `retention` (score / full-cache score) compares like with like.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from permkv.data import Sample, encode_sample

# ------------------------------------------------------------------------------------------- metrics


PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains(output: str, answers: Sequence[str]) -> float:
    """1.0 if any gold answer appears in the output (normalised), else 0.0."""
    out = normalize(output)
    return float(any(normalize(a) in out for a in answers if normalize(a)))


def contains_all(output: str, answers: Sequence[str]) -> float:
    """Fraction of gold answers that appear in the output (multi-value needles, variable tracking)."""
    out = normalize(output)
    return sum(normalize(a) in out for a in answers) / len(answers)


def exact_match(output: str, answers: Sequence[str]) -> float:
    return float(any(normalize(output) == normalize(a) for a in answers))


def token_f1(output: str, answers: Sequence[str]) -> float:
    """Best SQuAD token F1 of the output against any gold answer."""

    def f1(pred: str, gold: str) -> float:
        p, g = normalize(pred).split(), normalize(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(output, a) for a in answers)


# The score each task reports (perplexity is scored separately: lower is better).
TASK_METRIC: dict[str, Callable[[str, Sequence[str]], float]] = {
    "niah_single": contains,
    "niah_multikey": contains,
    "niah_multivalue": contains_all,
    "variable_tracking": contains_all,
    "squad": contains,
    "hotpot": contains,
}


def first_line(text: str) -> str:
    """The answer proper: generation up to its first blank line."""
    return text.strip().split("\n\n")[0]


@torch.no_grad()
def perplexity(model, ids: Sequence[int], stride: int | None = None) -> float:
    """Perplexity of `ids` under the model (one forward pass; the first token is not scored)."""
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    inp = torch.tensor([list(ids)], device=model.device)
    logits = model(inp).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, inp[0, 1:], reduction="mean")
    return math.exp(nll.item())


# ------------------------------------------------------------------------------------------- statistics


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n, arr.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def retention(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Quality retention: mean score / mean full-cache score on the same samples."""
    if len(scores) != len(baseline):
        raise ValueError(f"retention needs paired samples, got {len(scores)} and {len(baseline)}")
    base = float(np.mean(baseline))
    if base == 0:
        return float("nan")
    return float(np.mean(scores)) / base


# ------------------------------------------------------------------------------------------- loop


@dataclass
class Record:
    """One answered sample."""

    task: str
    score: float
    output: str
    answers: list[str]
    n_tokens: int


def full_cache_answer(model, tokenizer, max_new_tokens: int = 32) -> Callable[[list[int], list[int]], str]:
    """The reference answer_fn: greedy decoding over the whole, uncompressed prompt."""
    from permkv.models import greedy_generate

    def answer(prefix: list[int], suffix: list[int]) -> str:
        return greedy_generate(model, tokenizer, prefix + suffix, max_new_tokens)

    return answer


def evaluate(
    model,
    tokenizer,
    spec,
    samples: Sequence[Sample],
    mode: str = "query_aware",
    answer_fn: Callable[[list[int], list[int]], str] | None = None,
    max_new_tokens: int = 32,
    desc: str = "evaluate",
) -> list[Record]:
    """Answer and score every sample; perplexity samples score their perplexity."""
    answer_fn = answer_fn or full_cache_answer(model, tokenizer, max_new_tokens)
    records = []
    for sample in tqdm(samples, desc=desc, leave=False):
        prefix, suffix = encode_sample(tokenizer, spec, sample, mode)
        if sample.task == "perplexity":
            records.append(Record(sample.task, perplexity(model, prefix), "", [], len(prefix)))
            continue
        output = answer_fn(prefix, suffix)
        score = TASK_METRIC[sample.task](first_line(output), sample.answers)
        records.append(Record(sample.task, score, output, sample.answers, len(prefix) + len(suffix)))
    return records


def summarize(records: Sequence[Record]) -> dict[str, float]:
    """Mean score, 95% bootstrap CI and sample count of a list of records of one task."""
    scores = [r.score for r in records]
    low, high = bootstrap_ci(scores)
    return dict(score=float(np.mean(scores)), ci_low=low, ci_high=high, n=len(scores))


# ------------------------------------------------------------------------------------------- timing


def _sync(model) -> None:
    """Wait for queued GPU work so that wall-clock timings mean something."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_prefill_decode(model, ids: Sequence[int], n_decode: int = 16, repeats: int = 3) -> dict[str, float]:
    """Median seconds of prefilling `ids` and of one greedy decode step after it (DynamicCache)."""
    inp = torch.tensor([list(ids)], device=model.device)
    prefill, decode = [], []
    for _ in range(repeats):
        _sync(model)
        t0 = time.perf_counter()
        out = model(inp, use_cache=True)
        _sync(model)
        t1 = time.perf_counter()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(n_decode):
            ts = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            _sync(model)
            steps.append(time.perf_counter() - ts)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        prefill.append(t1 - t0)
        decode.append(float(np.median(steps)))
    return dict(prefill_s=float(np.median(prefill)), decode_step_s=float(np.median(decode)))


# ------------------------------------------------------------------------------------------- grids


def score_grid(
    model,
    tokenizer,
    spec,
    tasks: Sequence[str],
    lengths: Sequence[int],
    n: int,
    mode: str = "query_aware",
    seed: int = 0,
    max_new_tokens: int = 32,
) -> list[dict]:
    """Full-cache score (with CI and sample count) of every task at every context length."""
    from permkv.data import build_task

    rows = []
    for length in lengths:
        for task in tasks:
            samples = build_task(task, tokenizer, spec, n, length, seed=seed, max_new_tokens=max_new_tokens)
            records = evaluate(model, tokenizer, spec, samples, mode, max_new_tokens=max_new_tokens,
                               desc=f"{spec.name} {task} {length}")
            rows.append(dict(model=spec.name, task=task, context_tokens=length, mode=mode, **summarize(records)))
    return rows


def timing_grid(model, tokenizer, spec, lengths: Sequence[int], repeats: int = 3, n_decode: int = 16) -> list[dict]:
    """Prefill and per-token decode seconds at each context length (held-out essay text)."""
    from permkv.data import build_task

    rows = []
    for length in tqdm(lengths, desc=f"{spec.name} timing", leave=False):
        ids = tokenizer(build_task("perplexity", tokenizer, spec, 1, length)[0].context, add_special_tokens=False).input_ids
        rows.append(dict(model=spec.name, context_tokens=length, **time_prefill_decode(model, ids[:length], n_decode, repeats)))
    return rows
