"""Workloads and side-by-side timing for prompt-lookup speculation (notebook 04 and the benchmark).

Workloads, all from data that ships here:
- `code_edit`: rename a function in a slice of a Python standard-library module, return the whole code;
- `quote`: copy a Paul Graham essay passage word for word;
- `squad_qa`: answer a SQuAD question by quoting the sentence of the context that holds the answer;
- `open_ended`: free writing, the negative control (little to look up).
Input-grounded workloads are the first three.

`compare` runs every method on the same prompts in one process, interleaving methods within each
repeat so that load on the machine hits them alike, and checks every output against plain greedy.
"""

from __future__ import annotations

import importlib
import inspect
import random
import statistics
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from permkv.models import encode_prompt
from permkv.speculate import (
    Backoff,
    PromptLookup,
    SpecResult,
    greedy_generate_ids,
    hf_generate,
    speculative_generate,
)

WORKLOADS = ("code_edit", "quote", "squad_qa", "open_ended")
GROUNDED = ("code_edit", "quote", "squad_qa")

# (module, functions copied in order, function to rename, new name)
CODE_SLICES = [
    ("textwrap", ["dedent"], "dedent", "remove_common_indent"),
    ("textwrap", ["indent", "shorten"], "indent", "prefix_lines"),
    ("fnmatch", ["filter", "fnmatchcase"], "filter", "filter_names"),
    ("colorsys", ["rgb_to_hsv", "hls_to_rgb"], "rgb_to_hsv", "rgb_to_hue_sat_value"),
    ("string", ["capwords"], "capwords", "capitalize_words"),
    ("shlex", ["quote", "join"], "quote", "shell_quote"),
]

OPEN_PROMPTS = [
    "Write a short story about a dragon who learns to cook.",
    "What are the benefits of regular exercise? Explain in detail.",
    "Describe your ideal weekend in a small mountain town.",
    "Give me advice on how to start learning to play the piano.",
    "Why do people enjoy watching sports? Discuss several reasons.",
    "Write a letter to a friend describing a recent trip to the sea.",
]


def _essays() -> str:
    from permkv.data import load_essays

    return load_essays()


def _squad() -> list[dict]:
    from permkv.data import load_squad

    return load_squad()


def code_edit_texts(n: int) -> list[str]:
    """Rename-a-function prompts over slices of standard-library modules (source read from disk)."""
    out = []
    for module, funcs, old, new in CODE_SLICES[:n]:
        mod = importlib.import_module(module)
        source = "\n\n".join(inspect.getsource(getattr(mod, f)) for f in funcs)
        out.append(
            f"Rename the function `{old}` to `{new}` in the following Python code. "
            f"Return the whole code.\n\n```python\n{source}```"
        )
    return out


def quote_texts(n: int, chars: int = 800, seed: int = 0) -> list[str]:
    """Copy-the-passage prompts over essay passages of about `chars` characters, starting at a sentence."""
    text, rng = _essays(), random.Random(seed)
    out = []
    for _ in range(n):
        start = text.index(". ", rng.randrange(0, len(text) - 2 * chars)) + 2
        passage = text[start : start + chars].rsplit(" ", 1)[0]
        out.append(f"Copy the following passage exactly, word for word:\n\n{passage}")
    return out


def squad_texts(n: int, seed: int = 0) -> list[str]:
    """Extractive QA prompts: a SQuAD context and question, answered by quoting the sentence."""
    records = _squad()
    rng = random.Random(seed)
    picks = rng.sample(range(len(records)), n)
    return [
        f"{records[i]['context']}\n\nQuestion: {records[i]['question']}\n"
        "Answer by quoting the sentence of the text that contains the answer."
        for i in picks
    ]


def workload_texts(name: str, n: int, seed: int = 0) -> list[str]:
    """`n` prompt texts of one workload."""
    if name == "code_edit":
        return code_edit_texts(n)
    if name == "quote":
        return quote_texts(n, seed=seed)
    if name == "squad_qa":
        return squad_texts(n, seed=seed)
    if name == "open_ended":
        return OPEN_PROMPTS[:n]
    raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")


@dataclass
class MethodConfig:
    """One decoding method to time; `kind` is greedy, hf_greedy, hf_lookup, permkv or permkv_raw."""

    kind: str
    k: int = 10  # draft length (lookup methods)
    max_ngram: int = 3  # longest suffix matched (lookup methods)

    @property
    def label(self) -> str:
        if self.kind in ("greedy", "hf_greedy"):
            return self.kind
        return f"{self.kind}(k={self.k},n={self.max_ngram})"

    def run(self, model, ids: list[int], max_new_tokens: int, eos: int) -> SpecResult:
        if self.kind == "greedy":
            return greedy_generate_ids(model, ids, max_new_tokens, eos)
        if self.kind == "hf_greedy":
            return hf_generate(model, ids, max_new_tokens, eos_token_id=eos)
        if self.kind == "hf_lookup":
            return hf_generate(model, ids, max_new_tokens, self.k, self.max_ngram, eos)
        source = PromptLookup(k=self.k, max_ngram=self.max_ngram)
        if self.kind == "permkv":
            return speculative_generate(model, ids, max_new_tokens, Backoff(source), eos)
        if self.kind == "permkv_raw":
            return speculative_generate(model, ids, max_new_tokens, source, eos)
        raise ValueError(f"unknown method kind {self.kind!r}")


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


def compare(
    model,
    tokenizer,
    spec,
    prompts: dict[str, list[str]],
    methods: list[MethodConfig],
    max_new_tokens: int = 128,
    repeats: int = 3,
) -> list[Timing]:
    """Time every method on every prompt; median of `repeats`, methods interleaved within a repeat.

    `prompts` maps a workload name to its prompt texts. A warm-up run of each method comes first.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    eos = tokenizer.eos_token_id
    jobs = [(w, i, encode_prompt(tokenizer, spec, t)) for w, texts in prompts.items() for i, t in enumerate(texts)]
    warm_ids = jobs[0][2]
    for m in methods:
        m.run(model, warm_ids, 8, eos)
    out = []
    for w, i, ids in tqdm(jobs, desc="speculate compare"):
        # The reference output: the plain-greedy method's own, else a separate greedy run.
        reference = None if any(m.kind == "greedy" for m in methods) else (
            greedy_generate_ids(model, ids, max_new_tokens, eos).tokens
        )
        times: dict[str, list[float]] = {m.label: [] for m in methods}
        decode: dict[str, list[float | None]] = {m.label: [] for m in methods}
        last: dict[str, SpecResult] = {}
        for _ in range(repeats):
            for m in methods:
                res = m.run(model, ids, max_new_tokens, eos)
                times[m.label].append(res.stats.wall_s)
                decode[m.label].append(res.stats.decode_s)
                last[m.label] = res
        if reference is None:
            reference = next(last[m.label].tokens for m in methods if m.kind == "greedy")
        for m in methods:
            res = last[m.label]
            dec = None if None in decode[m.label] else statistics.median(decode[m.label])
            out.append(
                Timing(w, i, m.label, res.stats.new_tokens, statistics.median(times[m.label]), dec,
                       res.tokens == reference, res.stats.as_dict())
            )
    return out


def _decode_tps(ts: list[Timing]) -> float | None:
    """Tokens generated after the first one, per second of decoding (None if not timed)."""
    if any(t.median_decode_s is None for t in ts):
        return None
    return sum(t.new_tokens - 1 for t in ts) / sum(t.median_decode_s for t in ts)


def summarize(timings: list[Timing], baseline: str = "greedy") -> list[dict]:
    """Per workload and method: tokens/s over all its prompts, speedup vs `baseline`, identity, acceptance.

    tokens/s = total new tokens / total median wall time (prefill included), so long outputs weigh
    more. `decode_speedup` leaves the prefill out; it exists only for methods that time their prefill
    (permkv's loop, not HF's `generate`).
    """
    rows = []
    workloads = list(dict.fromkeys(t.workload for t in timings))
    methods = list(dict.fromkeys(t.method for t in timings))
    for w in workloads:
        base = [t for t in timings if t.workload == w and t.method == baseline]
        base_tps = sum(t.new_tokens for t in base) / sum(t.median_s for t in base)
        base_dec = _decode_tps(base)
        for m in methods:
            ts = [t for t in timings if t.workload == w and t.method == m]
            tps = sum(t.new_tokens for t in ts) / sum(t.median_s for t in ts)
            dec = _decode_tps(ts)
            drafted = sum(t.stats.get("drafted", 0) for t in ts)
            accepted = sum(t.stats.get("accepted", 0) for t in ts)
            passes = sum(t.stats.get("forward_passes", 0) for t in ts)
            rows.append({
                "workload": w,
                "method": m,
                "prompts": len(ts),
                "new_tokens": sum(t.new_tokens for t in ts),
                "tokens_per_s": tps,
                "speedup": tps / base_tps,
                "decode_speedup": dec / base_dec if dec and base_dec else None,
                "all_identical": all(t.identical for t in ts),
                "acceptance_rate": accepted / drafted if drafted else None,
                "tokens_per_pass": sum(t.new_tokens for t in ts) / passes if passes > 0 else None,
            })
    return rows


def pooled(timings: list[Timing], workloads: tuple[str, ...] = GROUNDED, name: str = "grounded") -> list[dict]:
    """`summarize` over several workloads pooled into one (e.g. all input-grounded ones)."""
    from dataclasses import replace

    return summarize([replace(t, workload=name) for t in timings if t.workload in workloads])


def sweep_methods(ngrams: list[int], ks: list[int], kind: str = "permkv") -> list[MethodConfig]:
    """Plain greedy plus one `kind` method per (max n-gram, draft length) pair, for `compare`."""
    return [MethodConfig("greedy")] + [MethodConfig(kind, k, n) for n in ngrams for k in ks]
