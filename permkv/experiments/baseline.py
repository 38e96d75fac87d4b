"""00_baseline: full-cache score of every task and length, and prefill / decode time vs length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from permkv.data import MODES, TASKS, build_task
from permkv.eval import time_prefill_decode
from permkv.experiments.scoring import evaluate, summarize
from permkv.models import model_source


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


@dataclass(frozen=True)
class BaselineConfig:
    """Parameters of notebook 00 (names match its parameters cell in lower case)."""

    models: tuple[str, ...] = ("smollm2-135m",)  # bundled names, saved folders or GGUF files (permkv.models.load_model)
    tasks: tuple[str, ...] = TASKS
    lengths: dict = field(default_factory=lambda: {"smollm2-135m": [512], "gemma3-270m": [512]})  # context tokens per model
    n_samples: int = 2  # samples per (model, task, length)
    mode: str = "query_aware"  # or "query_agnostic": same prompts, only the compressor's view differs
    max_new_tokens: int = 24
    timing_lengths: dict = field(default_factory=lambda: {"smollm2-135m": [512], "gemma3-270m": [512]})
    timing_repeats: int = 2
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        for model in self.models:
            model_source(model)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"tasks must be among {list(TASKS)}, got {bad}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        missing = [m for m in self.models if m not in self.lengths or m not in self.timing_lengths]
        if missing:
            raise ValueError(f"lengths and timing_lengths need an entry for every model; missing {missing}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")


def claim_metrics(scores: Sequence[dict], timings: Sequence[dict]) -> dict[str, float]:
    """Ledger metrics of notebook 00: the needle score at up to 4K tokens (ANCHORS.md s8 saw 6/6 at
    3.5K), Gemma-3's held-out essay perplexity (about 22 with a correct tokenizer), and every cell."""
    metrics: dict[str, float] = {}
    for row in scores:
        key = f"{row['model']}.{row['task']}.{row['context_tokens']}"
        metrics |= {f"score.{key}": row["score"], f"ci_low.{key}": row["ci_low"], f"ci_high.{key}": row["ci_high"]}
    for row in timings:
        metrics[f"prefill_s.{row['model']}.{row['context_tokens']}"] = row["prefill_s"]
        metrics[f"decode_step_s.{row['model']}.{row['context_tokens']}"] = row["decode_step_s"]
    needle = [r["score"] for r in scores if r["task"] == "niah_single" and r["context_tokens"] <= 4096]
    if needle:
        metrics["claim.niah_single_full_cache"] = sum(needle) / len(needle)
    ppl = [r["score"] for r in scores if r["task"] == "perplexity" and r["model"] == "gemma3-270m"]
    if ppl:
        metrics["claim.gemma_perplexity"] = sum(ppl) / len(ppl)
    return metrics


def curves(scores: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Score against context length per (model, task), as step-indexed MLflow curves (step = tokens)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in sorted(scores, key=lambda r: r["context_tokens"]):
        steps, values = out.setdefault(f"score_vs_length.{row['model']}.{row['task']}", ([], []))
        steps.append(int(row["context_tokens"]))
        values.append(row["score"])
    return out
