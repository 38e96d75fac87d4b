"""Measuring a real model: answer metrics, bootstrap statistics, the one greedy decode loop, timing.

Knows no tasks: experiments (`permkv.experiments`) feed it samples.
"""

from permkv.eval.decode import generate, greedy_decode, perplexity, prefill, stop_ids
from permkv.eval.metrics import (
    TASK_METRIC,
    contains,
    contains_all,
    exact_match,
    first_line,
    normalize,
    token_f1,
)
from permkv.eval.stats import bootstrap_ci, bootstrap_ratio_ci, paired_difference, retention, retention_ci
from permkv.eval.timing import sync, time_prefill_decode

__all__ = [
    "TASK_METRIC", "bootstrap_ci", "bootstrap_ratio_ci", "contains", "contains_all", "exact_match", "first_line",
    "generate", "greedy_decode", "normalize", "paired_difference", "perplexity", "prefill", "retention",
    "retention_ci", "stop_ids", "sync", "time_prefill_decode", "token_f1",
]
