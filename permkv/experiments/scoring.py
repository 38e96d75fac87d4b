"""Answer and score task samples: the loop every quality experiment shares (00, 02, ...).

`evaluate` answers each sample with an `answer_fn(prefix_ids, suffix_ids) -> text`; the full-cache
answer (`permkv.eval.generate`) by default, so that a compressed method's `retention` compares like
with like: same samples, same decode loop, same stops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from permkv.data import Sample, encode_sample
from permkv.eval import TASK_METRIC, bootstrap_ci, first_line, generate, perplexity

AnswerFn = Callable[[list[int], list[int]], str]


@dataclass
class Record:
    """One answered sample."""

    task: str
    score: float
    output: str
    answers: list[str]
    n_tokens: int


def full_cache_answer(model, tokenizer, max_new_tokens: int = 32) -> AnswerFn:
    """The reference answer_fn: prefill the prefix, feed the suffix, greedy decode (uncompressed)."""

    def answer(prefix: list[int], suffix: list[int]) -> str:
        return generate(model, tokenizer, prefix, max_new_tokens, suffix=suffix)

    return answer


def evaluate(
    model,
    tokenizer,
    spec,
    samples: Sequence[Sample],
    mode: str = "query_aware",
    answer_fn: AnswerFn | None = None,
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
