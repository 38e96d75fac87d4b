"""06_recursive_verification: a reasoning trace compressed into a fixed KV budget, with and without
verification, against the full cache and self-consistency.

Task ("list walk"): k distinct words; the model writes them back in order, one lookup per step
("what comes after X?"), so the trace grows with k. Scores: `exact` (the whole list right, in
order) and `recall` (longest in-order match / k). Sizes are picked from the full-cache accuracy
(`pick_sizes`), the budget from the full-cache trace lengths (`pick_budget`): at 8x the longest
kept trace just fits, at 1x it is cut to 1/8.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from permkv.checks import positive_int
from permkv.compress import SCORERS, get_scorer
from permkv.eval import bootstrap_ci, generate, paired_difference
from permkv.models import encode_prompt, model_source
from permkv.rvs import RecursiveVerificationSystem, RKVScore, list_prompt, parse_items

# Common concrete nouns (one or two SmolLM2 tokens each), distinct.
VOCAB = tuple("""apple river stone cloud tiger lemon piano candle forest rocket garden mirror pencil island violin
basket dragon feather window planet bottle castle spider orange button wallet carpet helmet ladder jacket
bridge camera cherry desert engine finger guitar hammer jungle kettle lizard magnet needle ocean parrot
pepper pillow pocket rabbit saddle silver summer tomato turtle valley wagon wizard yellow zebra anchor
barrel butter cactus cotton donkey falcon ginger harbor igloo marble meadow muffin napkin oyster
""".split())

# Instruction phrasings for self-consistency (greedy decoding: the votes come from different prompts).
PHRASINGS = (
    "Write each word on its own line, in the same order.",
    "Repeat the words above in the same order, one per line.",
    "List all of these words again, keeping their order.",
)


@dataclass
class RVSConfig:
    model: str = "smollm2-135m"  # a bundled name, saved folder or GGUF file (an instruct model: the task uses its chat template)
    sizes: list[int] = field(default_factory=lambda: [8, 16, 32])  # candidate list lengths (words)
    n_size_probe: int = 4  # instances per size for the full-cache accuracy that picks the sizes
    metric: str = "recall"  # headline score: "recall" (in-order fraction of the list) or "exact" (whole list)
    min_full_accuracy: float = 0.75  # keep sizes whose full-cache `metric` reaches this
    n_samples: int = 30  # instances per kept size (every cell answers the same ones)
    ratios: list[float] = field(default_factory=lambda: [1, 2, 4, 8])  # tokens reasoned / tokens held
    budget: int = 0  # trace tokens held per (layer, KV head); 0: median full trace of the longest size / max(ratios)
    buffer: int = 1  # generated tokens between compressions (R-KV's 128, scaled to these ~20-token traces)
    window: int = 2  # recent tokens never evicted (R-KV keeps its 8 observation tokens; scaled likewise)
    scorer: str = "rkv"  # "rkv" or one of permkv.compress SCORERS
    subcall_tokens: int = 48  # KV tokens a verification sub-call may take; larger inputs are halved
    max_depth: int = 3  # most halvings of the input for a sub-call
    sc_votes: int = 3  # self-consistency: traces voted per instance (one per phrasing)
    sc_ratios: list[float] = field(default_factory=lambda: [8])  # ratios that also run self-consistency
    seed: int = 0

    def __post_init__(self):
        model_source(self.model)
        if not self.sizes or any(not isinstance(k, int) or not 2 <= k <= len(VOCAB) for k in self.sizes):
            raise ValueError(f"sizes must be ints in [2, {len(VOCAB)}], got {self.sizes!r}")
        for name in ("n_size_probe", "n_samples", "buffer", "window", "subcall_tokens"):
            positive_int(name, getattr(self, name))
        if not self.ratios or any(r < 1 for r in self.ratios) or 1 not in self.ratios:
            raise ValueError(f"ratios must be numbers >= 1 and include 1 (the truncated trace), got {self.ratios!r}")
        if any(r not in self.ratios for r in self.sc_ratios):
            raise ValueError(f"sc_ratios must be a subset of ratios {self.ratios}, got {self.sc_ratios!r}")
        if not 1 <= self.sc_votes <= len(PHRASINGS):
            raise ValueError(f"sc_votes must be in [1, {len(PHRASINGS)}], got {self.sc_votes!r}")
        if self.scorer != "rkv" and self.scorer not in SCORERS:
            raise ValueError(f"scorer must be 'rkv' or one of {sorted(SCORERS)}, got {self.scorer!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or 0 < self.budget < self.window + self.buffer \
                or self.budget < 0:
            raise ValueError(f"budget must be 0 (picked) or an int >= window + buffer, got {self.budget!r}")
        if self.metric not in ("recall", "exact"):
            raise ValueError(f"metric must be 'recall' or 'exact', got {self.metric!r}")
        if not 0 <= self.min_full_accuracy <= 1:
            raise ValueError(f"min_full_accuracy must be in [0, 1], got {self.min_full_accuracy!r}")


def instances(k: int, n: int, seed: int) -> list[list[str]]:
    """n seeded lists of k distinct words."""
    rng = random.Random(f"{seed}-{k}")
    return [rng.sample(VOCAB, k) for _ in range(n)]


def in_order_recall(answer: Sequence[str], gold: Sequence[str]) -> float:
    """Longest common subsequence of answer and gold, over len(gold)."""
    prev = [0] * (len(gold) + 1)
    for a in answer:
        cur = [0]
        for j, g in enumerate(gold):
            cur.append(prev[j] + 1 if a == g else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(gold)


def scores(answer: Sequence[str], gold: Sequence[str]) -> dict:
    return dict(exact=float(list(answer) == list(gold)), recall=in_order_recall(answer, gold))


def full_cache_trace(model, tokenizer, items: Sequence[str], phrasing: str = PHRASINGS[0]) -> tuple[list[str], int]:
    """The uncompressed reference trace: (its items, tokens generated)."""
    ids = encode_prompt(tokenizer, None, list_prompt(items, phrasing), chat=True)
    out = generate(model, tokenizer, ids, max_new_tokens=4 * len(items) + 16)
    return parse_items(out), len(tokenizer(out).input_ids)


def probe_sizes(model, tokenizer, cfg: RVSConfig) -> list[dict]:
    """Full-cache accuracy and trace length at every candidate size (instances not reused later)."""
    rows = []
    for k in cfg.sizes:
        for i, items in enumerate(tqdm(instances(k, cfg.n_size_probe, cfg.seed + 1000), desc=f"full cache k={k}", leave=False)):
            t0 = time.perf_counter()
            answer, n_tokens = full_cache_trace(model, tokenizer, items)
            rows.append(dict(size=k, sample=i, tokens=n_tokens, seconds=time.perf_counter() - t0, **scores(answer, items)))
    return rows


def pick_sizes(probe: Sequence[dict], min_accuracy: float, metric: str = "recall") -> list[int]:
    """Sizes whose full-cache `metric` reaches `min_accuracy` (the smallest size if none does:
    then the grid measures a failing model, which the report says)."""
    sizes = sorted({r["size"] for r in probe})
    acc = {k: np.mean([r[metric] for r in probe if r["size"] == k]) for k in sizes}
    kept = [k for k in sizes if acc[k] >= min_accuracy]
    return kept or sizes[:1]


def choose(model, tokenizer, cfg: RVSConfig) -> tuple[list[dict], list[int], int]:
    """Probe the candidate sizes at full cache, keep the ones the model does, size the budget:
    (probe rows, kept sizes, budget). The budget's floor is the protected window plus the buffer."""
    probe = probe_sizes(model, tokenizer, cfg)
    sizes = pick_sizes(probe, cfg.min_full_accuracy, cfg.metric)
    budget = cfg.budget or pick_budget(probe, sizes, max(cfg.ratios), cfg.window + cfg.buffer)
    return probe, sizes, budget


def pick_budget(probe: Sequence[dict], sizes: Sequence[int], ratio: float, floor: int) -> int:
    """Trace tokens held: the longest kept size's median full-cache trace / `ratio` (at least `floor`)."""
    longest = np.median([r["tokens"] for r in probe if r["size"] == max(sizes)])
    return max(int(np.ceil(longest / ratio)), floor)


def make_scorer(name: str):
    return RKVScore() if name == "rkv" else get_scorer(name)


def vote(drafts: Sequence[Sequence[str]]) -> list[str]:
    """Self-consistency: per position, the most common item (ties: the earliest draft's); the
    length is the most common length."""
    length = Counter(len(d) for d in drafts).most_common(1)[0][0]
    out = []
    for i in range(length):
        votes = [d[i] for d in drafts if i < len(d)]
        out.append(Counter(votes).most_common(1)[0][0])
    return out


def run_grid(model, tokenizer, cfg: RVSConfig, sizes: Sequence[int], budget: int) -> list[dict]:
    """One row per (size, instance, method): full cache, then per ratio the draft ("no_verify"), its
    verified revision ("verify", same draft: paired) and self-consistency ("self_consistency")."""
    rows = []
    scorer = make_scorer(cfg.scorer)
    for k in sizes:
        for i, items in enumerate(tqdm(instances(k, cfg.n_samples, cfg.seed), desc=f"rvs k={k}", leave=False)):
            base = dict(size=k, sample=i, budget=budget)
            t0 = time.perf_counter()
            answer, n_tokens = full_cache_trace(model, tokenizer, items)
            rows.append(dict(base, method="full", ratio=0.0, tokens_generated=n_tokens, seconds=time.perf_counter() - t0,
                             **scores(answer, items)))
            memo: dict = {}
            for ratio in cfg.ratios:
                rvs = RecursiveVerificationSystem(model, tokenizer, budget, ratio, cfg.max_depth, cfg.buffer, cfg.window,
                                                  scorer=scorer, subcall_tokens=cfg.subcall_tokens, memo=memo)
                res = rvs.run(items, verify=True)
                st = res.stats.as_dict()
                draft_seconds = res.stats.trace.seconds
                rows.append(dict(base, method="no_verify", ratio=float(ratio), **{**st, "sub_calls": 0, "sub_call_tokens": 0,
                                 "max_depth_used": 0, "failed_claims": 0, "seconds": draft_seconds, "answer_flipped": False}, **scores(res.draft, items)))
                rows.append(dict(base, method="verify", ratio=float(ratio), **st, **scores(res.answer, items)))
                if ratio in cfg.sc_ratios:
                    t0 = time.perf_counter()
                    drafts, generated = [res.draft], res.stats.trace.generated
                    for phrasing in PHRASINGS[1 : cfg.sc_votes]:
                        d, _, tr = rvs.draft(items, phrasing)
                        drafts.append(d)
                        generated += tr.generated
                    rows.append(dict(base, method="self_consistency", ratio=float(ratio), tokens_generated=generated,
                                     seconds=draft_seconds + time.perf_counter() - t0, **scores(vote(drafts), items)))
    return rows


def summary(rows: Sequence[dict], metric: str = "recall") -> list[dict]:
    """Mean, 95% bootstrap CI and n per (size, method, ratio)."""
    out = []
    keys = sorted({(r["size"], r["method"], r["ratio"]) for r in rows})
    for size, method, ratio in keys:
        vals = [r[metric] for r in rows if (r["size"], r["method"], r["ratio"]) == (size, method, ratio)]
        lo, hi = bootstrap_ci(vals)
        cell = [r for r in rows if (r["size"], r["method"], r["ratio"]) == (size, method, ratio)]
        out.append(dict(size=size, method=method, ratio=ratio, metric=metric, mean=float(np.mean(vals)), ci_low=lo,
                        ci_high=hi, n=len(vals), tokens_generated=float(np.mean([r.get("tokens_generated", np.nan) for r in cell])),
                        sub_calls=float(np.mean([r.get("sub_calls", 0) for r in cell]))))
    return out


def _paired(rows, size, a: tuple[str, float], b: tuple[str, float], metric: str) -> dict:
    """Mean and 95% bootstrap CI of (a - b) over the instances both answered."""
    def by_sample(method, ratio):
        return {r["sample"]: r[metric] for r in rows if r["size"] == size and r["method"] == method and r["ratio"] == ratio}
    x, y = by_sample(*a), by_sample(*b)
    common = sorted(set(x) & set(y))
    return paired_difference([x[s] for s in common], [y[s] for s in common])


def paired_table(rows: Sequence[dict], metric: str = "recall") -> list[dict]:
    """Per size and ratio: verify - no_verify, and verify - self_consistency (where run), paired."""
    out = []
    for size in sorted({r["size"] for r in rows}):
        for ratio in sorted({r["ratio"] for r in rows if r["method"] == "verify"}):
            out.append(dict(size=size, ratio=ratio, comparison="verify - no_verify",
                            **_paired(rows, size, ("verify", ratio), ("no_verify", ratio), metric)))
            out.append(dict(size=size, ratio=ratio, comparison="no_verify - full",
                            **_paired(rows, size, ("no_verify", ratio), ("full", 0.0), metric)))
            if any(r["method"] == "self_consistency" and r["ratio"] == ratio for r in rows):
                out.append(dict(size=size, ratio=ratio, comparison="verify - self_consistency",
                                **_paired(rows, size, ("verify", ratio), ("self_consistency", ratio), metric)))
    return out


def claim_metrics(rows: Sequence[dict], metric: str = "recall") -> dict[str, float]:
    """Ledger metrics, on the largest size (the longest traces):
    - rvs_tokens_reasoned_ratio_8x: mean tokens generated at 8x / at 1x, same KV budget;
    - rvs_quality_retention_8x: accuracy at 8x (no verification) / full-cache accuracy, same instances;
    - rvs_accuracy_gap_8x: full-cache accuracy - accuracy at 8x (target: <= 0.05);
    - rvs_verification_gain_ci_low: lower end of the paired 95% CI of verify - no_verify, at the
      size and ratio where the gain is largest (a verdict needs it above 0).
    NaN where the grid lacks the cell."""
    nan = float("nan")
    if not rows:
        raise ValueError("rows must not be empty")
    k = max(r["size"] for r in rows)

    def mean(method, ratio, key):
        vals = [r[key] for r in rows if r["size"] == k and r["method"] == method and r["ratio"] == ratio]
        return float(np.mean(vals)) if vals else nan

    full = mean("full", 0.0, metric)
    at8, at1 = mean("no_verify", 8.0, metric), mean("no_verify", 1.0, metric)
    tok8, tok1 = mean("no_verify", 8.0, "tokens_generated"), mean("no_verify", 1.0, "tokens_generated")
    pairs = [p for p in paired_table(rows, metric) if p["comparison"] == "verify - no_verify" and p["n"]]
    best = max(pairs, key=lambda p: p["diff"], default=None)
    out = {
        "claim.rvs_tokens_reasoned_ratio_8x": tok8 / tok1 if tok1 else nan,
        "claim.rvs_quality_retention_8x": at8 / full if full else nan,
        "claim.rvs_accuracy_gap_8x": full - at8,
        "claim.rvs_verification_gain_ci_low": best["ci_low"] if best else nan,
        "rvs_full_accuracy": full,
        "rvs_accuracy_1x": at1,
        "rvs_accuracy_8x": at8,
        "rvs_accuracy_8x_verified": mean("verify", 8.0, metric),
        "rvs_accuracy_8x_self_consistency": mean("self_consistency", 8.0, metric),
        "rvs_verification_gain_best": best["diff"] if best else nan,
        "rvs_largest_size": float(k),
    }
    return out
