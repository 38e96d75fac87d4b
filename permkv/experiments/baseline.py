"""00_baseline: full-cache score of every task and length, and prefill / decode time vs length."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from permkv.data import build_task
from permkv.eval import time_prefill_decode
from permkv.experiments.scoring import evaluate, summarize


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

    rows = []
    for length in tqdm(lengths, desc=f"{spec.name} timing", leave=False):
        ids = tokenizer(build_task("perplexity", tokenizer, spec, 1, length)[0].context, add_special_tokens=False).input_ids
        rows.append(dict(model=spec.name, context_tokens=length, **time_prefill_decode(model, ids[:length], n_decode, repeats)))
    return rows
