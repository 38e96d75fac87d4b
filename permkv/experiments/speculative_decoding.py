"""Workloads, side-by-side timing and verdict statistics for speculative decoding (notebook 04, the benchmark).

Workloads, all from data that ships here:
- `code_edit`: rename a function of a Python standard-library module, return the whole code;
- `quote`: copy a Paul Graham essay passage word for word;
- `squad_qa`: answer a SQuAD question by quoting the sentence of the context that holds the answer;
- `open_ended`: free writing, the negative control (little to look up).
Input-grounded workloads are the first three.

`compare` runs every method on the same prompts in one process, interleaving methods within each
repeat (in a rotating order) so that load on the machine hits them alike, and checks every output
against plain greedy. `speedup_table` gives per workload and pooled over the input-grounded ones the
pooled speedup (greedy seconds / method seconds over all prompts) and the per-prompt speedups, with
bootstrap CIs over prompts, and the paired difference to HF's built-in prompt lookup. `replay_table`
replays other drafters on the greedy outputs: exact forward-pass counts, no extra model time.
"""

from __future__ import annotations

import importlib
import inspect
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from permkv.baselines.hf import hf_generate
from permkv.data import load_essays, load_squad
from permkv.eval import bootstrap_ci, bootstrap_ratio_ci
from permkv.models import encode_prompt, model_source
from permkv.speculate import (
    Backoff,
    DraftSource,
    PromptLookup,
    SpecResult,
    SuffixDraft,
    VerifyCost,
    greedy_generate_ids,
    replay,
    speculative_generate,
)

GROUNDED = ("code_edit", "quote", "squad_qa")

# Pure-Python standard-library modules whose functions become code-edit prompts.
CODE_MODULES = (
    "argparse", "base64", "bisect", "calendar", "colorsys", "configparser", "csv", "difflib", "email.utils",
    "fnmatch", "fractions", "genericpath", "gettext", "glob", "heapq", "html", "http.cookies", "inspect",
    "ipaddress", "json.decoder", "json.encoder", "mimetypes", "ntpath", "posixpath", "pprint", "quopri",
    "random", "reprlib", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap", "tokenize",
    "urllib.parse",
)

OPEN_PROMPTS = (
    "Write a short story about a dragon who learns to cook.",
    "What are the benefits of regular exercise? Explain in detail.",
    "Describe your ideal weekend in a small mountain town.",
    "Give me advice on how to start learning to play the piano.",
    "Why do people enjoy watching sports? Discuss several reasons.",
    "Write a letter to a friend describing a recent trip to the sea.",
    "Invent a new holiday and explain how people celebrate it.",
    "What would a day on Mars be like for the first settlers?",
    "Write a poem about the first snow of winter.",
    "How can a small town attract more visitors? Give some ideas.",
    "Tell me about a memorable meal and why it mattered.",
    "Describe a robot that helps old people at home.",
    "What makes a good teacher? Share your thoughts.",
    "Write a fairy tale about a clever fox and a proud crow.",
    "Explain why people keep pets, with a few examples.",
    "Plan a three-day trip to a city you have never visited.",
    "Write a diary entry of a lighthouse keeper during a storm.",
    "What are some ways to stay calm before an exam?",
    "Describe the perfect library for a small village.",
    "Write a speech for the opening of a new public park.",
    "Why is music important to so many people?",
    "Imagine you wake up able to speak with birds. What happens next?",
    "Give tips for growing tomatoes on a balcony.",
    "Write a story about a lost umbrella that travels the world.",
    "What would you change about your morning routine, and why?",
    "Describe an invention that would make cities quieter.",
    "Write a conversation between the sun and the moon.",
    "How should a family prepare for a long road trip?",
    "What is the best way to make new friends in a new city?",
    "Write a short mystery set on a night train.",
    "Describe a festival of lights in a village by a river.",
    "Explain to a child why the sky changes colour at sunset.",
    "Write a review of an imaginary restaurant on the moon.",
    "What hobbies would you recommend for a rainy afternoon?",
    "Tell a story about a painter who can only paint at night.",
    "Describe how a bakery smells and sounds early in the morning.",
)


def code_functions() -> list[tuple[str, str, str]]:
    """(module, function name, source) of every top-level function of `CODE_MODULES` with 12-30 lines,
    in a fixed order (the source is read from this Python's own files)."""
    out = []
    for module in CODE_MODULES:
        mod = importlib.import_module(module)
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__:
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            if 12 <= source.count("\n") <= 30 and source.startswith("def "):
                out.append((module, name, source))
    return out


def code_edit_texts(n: int, seed: int = 0) -> list[str]:
    """Rename-a-function prompts over `n` standard-library functions drawn with `seed`; the model must
    return the whole code, so most of the answer is copied from the prompt."""
    funcs = code_functions()
    if n > len(funcs):
        raise ValueError(f"n must be <= {len(funcs)} (functions available), got {n}")
    picks = random.Random(seed).sample(funcs, n)
    return [
        f"Rename the function `{name}` to `{name}_v2` in the following Python code. "
        f"Return the whole code.\n\n```python\n{source}```"
        for _, name, source in picks
    ]


def open_ended_texts(n: int, seed: int = 0) -> list[str]:
    """`n` of the open-ended prompts (free writing, little to look up), drawn with `seed`."""
    if n > len(OPEN_PROMPTS):
        raise ValueError(f"n must be <= {len(OPEN_PROMPTS)} (open-ended prompts available), got {n}")
    return random.Random(seed).sample(list(OPEN_PROMPTS), n)


def quote_texts(n: int, chars: int = 800, seed: int = 0) -> list[str]:
    """Copy-the-passage prompts over essay passages of about `chars` characters, starting at a sentence."""
    text, rng = load_essays(), random.Random(seed)
    out = []
    for _ in range(n):
        start = text.index(". ", rng.randrange(0, len(text) - 2 * chars)) + 2
        passage = text[start : start + chars].rsplit(" ", 1)[0]
        out.append(f"Copy the following passage exactly, word for word:\n\n{passage}")
    return out


def squad_texts(n: int, seed: int = 0) -> list[str]:
    """Extractive QA prompts: a SQuAD context and question, answered by quoting the sentence."""
    records = load_squad()
    rng = random.Random(seed)
    picks = rng.sample(range(len(records)), n)
    return [
        f"{records[i]['context']}\n\nQuestion: {records[i]['question']}\n"
        "Answer by quoting the sentence of the text that contains the answer."
        for i in picks
    ]


WORKLOADS = ("code_edit", "quote", "squad_qa", "open_ended")

# Workload name -> builder(n, seed) of prompt texts.
WORKLOAD_BUILDERS: dict[str, Callable[[int, int], list[str]]] = {
    "code_edit": code_edit_texts,
    "quote": lambda n, seed: quote_texts(n, seed=seed),
    "squad_qa": lambda n, seed: squad_texts(n, seed=seed),
    "open_ended": open_ended_texts,
}


def workload_texts(name: str, n: int, seed: int = 0) -> list[str]:
    """`n` prompt texts of one workload."""
    if name not in WORKLOAD_BUILDERS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    return WORKLOAD_BUILDERS[name](n, seed)


# ------------------------------------------------------------------------------------------- methods

HEADLINE = "suffix"  # the method the ledger reads
REFERENCES = ("greedy", "hf_lookup")  # every comparison needs plain greedy and HF's built-in prompt lookup
KINDS = ("greedy", "hf_greedy", "hf_lookup", "lookup", "lookup_raw", "suffix", "suffix_chain")


@dataclass(frozen=True)
class MethodConfig:
    """One decoding method to time.

    greedy: permkv's loop without drafts; hf_greedy / hf_lookup: `model.generate`, plain or with HF's
    built-in prompt lookup (k, max_ngram); lookup / lookup_raw: permkv's prompt lookup with / without
    `Backoff` (k, max_ngram); suffix: `SuffixDraft` trees sized by the measured verify cost;
    suffix_chain: the same drafter with one branch (what trees add).
    """

    kind: str
    k: int = 10  # draft length (lookup methods)
    max_ngram: int = 3  # longest suffix matched (lookup methods)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")

    @property
    def label(self) -> str:
        return f"{self.kind}(k={self.k},n={self.max_ngram})" if "lookup" in self.kind else self.kind

    def drafter(self, cost: VerifyCost | None) -> DraftSource | None:
        """A fresh draft source for one request (None: greedy and HF's methods)."""
        if self.kind.startswith("suffix"):
            if cost is None:
                raise ValueError(f"{self.kind} needs the measured verify cost (VerifyCost.measure)")
            return SuffixDraft(cost=cost, max_width=1 if self.kind == "suffix_chain" else None)
        if self.kind in ("lookup", "lookup_raw"):
            source = PromptLookup(k=self.k, max_ngram=self.max_ngram)
            return Backoff(source) if self.kind == "lookup" else source
        return None

    def run(self, model, ids: list[int], max_new_tokens: int, eos: int, cost: VerifyCost | None = None) -> SpecResult:
        if self.kind == "hf_greedy":
            return hf_generate(model, ids, max_new_tokens, eos_token_id=eos)
        if self.kind == "hf_lookup":
            return hf_generate(model, ids, max_new_tokens, self.k, self.max_ngram, eos)
        return speculative_generate(model, ids, max_new_tokens, self.drafter(cost), eos)


@dataclass
class Timing:
    """Median wall time of one method on one prompt, and what it produced."""

    workload: str
    prompt: int
    method: str
    new_tokens: int
    median_s: float
    median_decode_s: float | None  # median wall time after the prefill (None: not timed, HF)
    identical: bool  # output token-identical to plain greedy
    stats: dict = field(default_factory=dict)  # the last repeat's SpecStats.as_dict()
    tokens: list[int] = field(default_factory=list)  # the output


def encode_workloads(tokenizer, spec, prompts: dict[str, list[str]]) -> list[tuple[str, int, list[int]]]:
    """(workload, prompt index, token ids) of every prompt, in order."""
    return [(w, i, encode_prompt(tokenizer, spec, t)) for w, texts in prompts.items() for i, t in enumerate(texts)]


def compare(
    model,
    tokenizer,
    spec,
    prompts: dict[str, list[str]],
    methods: list[MethodConfig],
    max_new_tokens: int = 128,
    repeats: int = 3,
    cost: VerifyCost | None = None,
) -> list[Timing]:
    """Time every method on every prompt; median of `repeats`, methods interleaved within a repeat.

    `prompts` maps a workload name to its prompt texts. The order of the methods rotates from one
    repeat to the next, so that none always runs first after a prompt switch. A warm-up run of each
    method comes first. `cost` is the measured verify cost the suffix methods size their drafts with.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    eos = tokenizer.eos_token_id
    jobs = encode_workloads(tokenizer, spec, prompts)
    for m in methods:
        m.run(model, jobs[0][2], 8, eos, cost)
    out = []
    for w, i, ids in tqdm(jobs, desc="speculate compare"):
        times: dict[str, list[float]] = {m.label: [] for m in methods}
        decode: dict[str, list[float | None]] = {m.label: [] for m in methods}
        last: dict[str, SpecResult] = {}
        for r in range(repeats):
            for m in methods[r % len(methods):] + methods[: r % len(methods)]:
                res = m.run(model, ids, max_new_tokens, eos, cost)
                times[m.label].append(res.stats.wall_s)
                decode[m.label].append(res.stats.decode_s)
                last[m.label] = res
        greedy = next((last[m.label].tokens for m in methods if m.kind == "greedy"), None)
        reference = greedy if greedy is not None else greedy_generate_ids(model, ids, max_new_tokens, eos).tokens
        for m in methods:
            res = last[m.label]
            dec = None if None in decode[m.label] else statistics.median(decode[m.label])
            out.append(Timing(w, i, m.label, res.stats.new_tokens, statistics.median(times[m.label]), dec,
                              res.tokens == reference, res.stats.as_dict(), list(res.tokens)))
    return out


# ---------------------------------------------------------------------------------------- statistics


def _seconds(timings: list[Timing]) -> dict[tuple[str, int], dict[str, float]]:
    """(workload, prompt) -> method -> median seconds."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for t in timings:
        out.setdefault((t.workload, t.prompt), {})[t.method] = t.median_s
    return out


def _row(timings: list[Timing], workload: str, method: str, baseline: str, versus: str | None) -> dict:
    ts = [t for t in timings if t.method == method]
    secs = _seconds(timings)
    keys = [k for k, v in secs.items() if method in v and baseline in v]
    base_s, own_s = [secs[k][baseline] for k in keys], [secs[k][method] for k in keys]
    speedups = [b / o for b, o in zip(base_s, own_s)]
    low, high = bootstrap_ratio_ci(base_s, own_s)
    mean_low, mean_high = bootstrap_ci(speedups)
    drafted = sum(t.stats.get("drafted", 0) for t in ts)
    passes = sum(t.stats.get("forward_passes", 0) for t in ts)
    row = {
        "workload": workload, "method": method, "n": len(speedups), "new_tokens": sum(t.new_tokens for t in ts),
        "speedup": sum(base_s) / sum(own_s), "speedup_ci_low": low, "speedup_ci_high": high,
        "mean_speedup": statistics.fmean(speedups), "mean_ci_low": mean_low, "mean_ci_high": mean_high,
        "median_speedup": statistics.median(speedups), "min_speedup": min(speedups), "max_speedup": max(speedups),
        "slower_prompts": sum(s < 1 for s in speedups),
        "identical": sum(t.identical for t in ts), "all_identical": all(t.identical for t in ts),
        "acceptance_rate": sum(t.stats.get("accepted", 0) for t in ts) / drafted if drafted else None,
        "tokens_per_pass": sum(t.new_tokens for t in ts) / passes if passes else None,
    }
    if versus is not None and method not in (versus, baseline):
        both = [k for k in keys if versus in secs[k]]
        theirs, mine = [secs[k][versus] for k in both], [secs[k][method] for k in both]
        diffs = [secs[k][baseline] / secs[k][method] - secs[k][baseline] / secs[k][versus] for k in both]
        r_low, r_high = bootstrap_ratio_ci(theirs, mine)
        d_low, d_high = bootstrap_ci(diffs)
        row.update({"over_hf": sum(theirs) / sum(mine), "over_hf_ci_low": r_low, "over_hf_ci_high": r_high,
                    "minus_hf": statistics.fmean(diffs), "minus_hf_ci_low": d_low, "minus_hf_ci_high": d_high,
                    "faster_than_hf": sum(d > 0 for d in diffs)})
    return row


def per_prompt(timings: list[Timing], baseline: str = "greedy") -> list[dict]:
    """One row per (workload, prompt, method): median seconds, speedup over `baseline` on that prompt,
    identity, tokens per forward pass."""
    secs = _seconds(timings)
    return [{"workload": t.workload, "prompt": t.prompt, "method": t.method, "new_tokens": t.new_tokens,
             "seconds": t.median_s, "speedup": secs[(t.workload, t.prompt)][baseline] / t.median_s,
             "identical": t.identical, "forward_passes": t.stats.get("forward_passes")} for t in timings]


def speedup_table(timings: list[Timing], baseline: str = "greedy", versus: str | None = None,
                  pooled: tuple[str, ...] = GROUNDED, pooled_name: str = "grounded") -> list[dict]:
    """Per workload (and `pooled` workloads as `pooled_name`) and method, on the same prompts:

    speedup = sum of `baseline`'s median seconds / sum of the method's (the pooled speedup: tokens are
    identical, so it is the ratio of tokens/s), with a bootstrap 95% CI over prompts; the mean, median,
    min and max of the per-prompt speedups (mean with its CI); and against `versus` (HF's built-in
    prompt lookup) the pooled ratio `over_hf` and the paired mean difference of per-prompt speedups
    `minus_hf` with CIs (the method beats HF when minus_hf_ci_low > 0). Seconds include the prefill.
    """
    rows = []
    workloads = list(dict.fromkeys(t.workload for t in timings))
    groups = [(w, [t for t in timings if t.workload == w]) for w in workloads]
    if any(w in pooled for w in workloads):  # prompts stay keyed by their own workload
        groups.append((pooled_name, [t for t in timings if t.workload in pooled]))
    for name, ts in groups:
        for method in dict.fromkeys(t.method for t in ts):
            if method != baseline:
                rows.append(_row(ts, name, method, baseline, versus))
    return rows


# ------------------------------------------------------------------------------------------- replays

REPLAYED = ("suffix", "suffix_chain", "suffix_no_cost", "lookup", "lookup_raw")


def _replay_drafter(kind: str, cost: VerifyCost, k: int, max_ngram: int) -> DraftSource:
    if kind == "suffix_no_cost":
        return SuffixDraft()
    return MethodConfig(kind, k, max_ngram).drafter(cost)


def replay_table(tokenizer, spec, prompts: dict[str, list[str]], timings: list[Timing], cost: VerifyCost,
                 kinds: tuple[str, ...] = REPLAYED, k: int = 10, max_ngram: int = 3) -> list[dict]:
    """Each drafter of `kinds` replayed on every prompt's greedy output (`replay`): exact forward passes,
    drafted and accepted tokens, and the decode time the measured `cost` implies, as a speedup over
    plain decoding (a model from the cost, not a wall-time measurement; `speedup_table` has those).
    suffix_no_cost drafts every node it finds (no cost model, no fallback)."""
    greedy = {(t.workload, t.prompt): t.tokens for t in timings if t.method == "greedy"}
    rows = []
    for w, i, ids in encode_workloads(tokenizer, spec, prompts):
        out = greedy.get((w, i))
        if not out:
            continue
        for kind in kinds:
            res = replay(_replay_drafter(kind, cost, k, max_ngram), ids, out, tokenizer.eos_token_id)
            rows.append({"workload": w, "prompt": i, "method": kind, "new_tokens": res.stats.new_tokens,
                         "forward_passes": res.stats.forward_passes, "drafted": res.stats.drafted,
                         "accepted": res.stats.accepted, "plain_passes": sum(n == 1 for n in res.widths),
                         "plain_decode_s": (res.stats.new_tokens - 1) * cost(1),
                         "modelled_decode_s": sum(cost(n) for n in res.widths)})
    return rows


def summarize_replays(rows: list[dict]) -> list[dict]:
    """Per workload and drafter: new tokens per decode pass, acceptance, the share of plain passes,
    and the pooled decode speedup the cost model gives (plain decode seconds / modelled seconds)."""
    out = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        for kind in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["workload"] == w and r["method"] == kind]
            passes = sum(r["forward_passes"] - 1 for r in rs)  # decode passes (the prefill left out)
            drafted = sum(r["drafted"] for r in rs)
            spent = sum(r["modelled_decode_s"] for r in rs)
            out.append({"workload": w, "method": kind, "n": len(rs),
                        "tokens_per_decode_pass": sum(r["new_tokens"] - 1 for r in rs) / passes if passes else None,
                        "acceptance_rate": sum(r["accepted"] for r in rs) / drafted if drafted else None,
                        "plain_share": sum(r["plain_passes"] for r in rs) / passes if passes else None,
                        "modelled_decode_speedup": sum(r["plain_decode_s"] for r in rs) / spent if spent else None})
    return out


# ------------------------------------------------------------------------------------------- notebook 04


@dataclass(frozen=True)
class SpeculationConfig:
    """Parameters of notebook 04 (names match its parameters cell in lower case)."""

    model: str = "smollm2-135m"  # a bundled name, a saved folder or a GGUF file (permkv.models.load_model)
    workloads: tuple[str, ...] = WORKLOADS
    n_prompts: int = 1  # prompts per workload (a verdict needs >= 30)
    max_new_tokens: int = 16
    repeats: int = 1  # timing repeats per (prompt, method); the median is kept
    methods: tuple[str, ...] = ("greedy", "hf_lookup", "lookup", "suffix")  # kinds of `MethodConfig`
    k: int = 10  # draft length, the same for HF's built-in and permkv's prompt lookup
    max_ngram: int = 3  # longest suffix matched, the same for both
    cost_context: int = 512  # cached tokens under the verify-cost measurement
    cost_repeats: int = 5  # passes timed per size for the verify cost (median kept)
    threads: int = 1  # torch CPU threads (the machine is shared; 0 keeps torch's default)
    seed: int = 0

    def __post_init__(self):
        model_source(self.model)
        for name in ("workloads", "methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [w for w in self.workloads if w not in WORKLOADS]
        if bad:
            raise ValueError(f"workloads must be among {WORKLOADS}, got {bad}")
        for kind in self.methods:
            MethodConfig(kind)
        missing = [r for r in REFERENCES + (HEADLINE,) if r not in self.methods]
        if missing:
            raise ValueError(f"methods must include {list(REFERENCES + (HEADLINE,))}; missing {missing}")
        for name in ("n_prompts", "max_new_tokens", "repeats", "k", "max_ngram", "cost_context", "cost_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def method_configs(self) -> list[MethodConfig]:
        return [MethodConfig(kind, self.k, self.max_ngram) for kind in self.methods]

    def label(self, kind: str) -> str:
        return MethodConfig(kind, self.k, self.max_ngram).label


def claim_metrics(table: list[dict], cfg: SpeculationConfig, knock_speedup: float | None = None) -> dict[str, float]:
    """Ledger metrics of notebook 04 from `speedup_table` rows (versus HF's prompt lookup).

    The headline (suffix trees) pooled over the input-grounded workloads: speedup over plain greedy with
    its CI, and the paired CI of its per-prompt speedup minus HF's; its speedup on open-ended text; and
    whether every output of every method equals greedy's. Per workload and method: pooled and mean
    speedups (`speedup.<workload>.<kind>`, `mean_speedup.<workload>.<kind>`)."""
    rows = {(r["workload"], r["method"]): r for r in table}
    head = rows.get(("grounded", cfg.label(HEADLINE)), {})
    open_ended = rows.get(("open_ended", cfg.label(HEADLINE)), {})
    metrics = {
        "claim.speculative_speedup_grounded": head.get("speedup"),
        "claim.speculative_speedup_grounded_ci_low": head.get("speedup_ci_low"),
        "claim.speculative_minus_hf_grounded_ci_low": head.get("minus_hf_ci_low"),
        "claim.speculative_speedup_open_ended": open_ended.get("speedup"),
        "knock_knock_speedup": knock_speedup,
        "all_identical": float(all(r["all_identical"] for r in table)),
    }
    for (w, method), r in rows.items():
        kind = next((k for k in cfg.methods if cfg.label(k) == method), method)
        metrics[f"speedup.{w}.{kind}"] = r["speedup"]
        metrics[f"mean_speedup.{w}.{kind}"] = r["mean_speedup"]
        if "minus_hf" in r:
            metrics[f"minus_hf.{w}.{kind}"] = r["minus_hf"]
    return {k: v for k, v in metrics.items() if v is not None}
