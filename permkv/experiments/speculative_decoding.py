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
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tqdm.auto import tqdm

from permkv.models import encode_prompt, model_source
from permkv.baselines.hf import hf_generate
from permkv.data import load_essays, load_squad
from permkv.speculate import Backoff, PromptLookup, SpecResult, greedy_generate_ids, speculative_generate

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
    "code_edit": lambda n, seed: code_edit_texts(n),
    "quote": lambda n, seed: quote_texts(n, seed=seed),
    "squad_qa": lambda n, seed: squad_texts(n, seed=seed),
    "open_ended": lambda n, seed: OPEN_PROMPTS[:n],
}


def workload_texts(name: str, n: int, seed: int = 0) -> list[str]:
    """`n` prompt texts of one workload."""
    if name not in WORKLOAD_BUILDERS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    return WORKLOAD_BUILDERS[name](n, seed)


def _permkv(model, ids, max_new_tokens, eos, k, n):
    return speculative_generate(model, ids, max_new_tokens, Backoff(PromptLookup(k=k, max_ngram=n)), eos)


def _permkv_raw(model, ids, max_new_tokens, eos, k, n):
    return speculative_generate(model, ids, max_new_tokens, PromptLookup(k=k, max_ngram=n), eos)


# Method kind -> run(model, ids, max_new_tokens, eos, k, max_ngram) -> SpecResult.
METHOD_KINDS: dict[str, Callable[..., SpecResult]] = {
    "greedy": lambda model, ids, m, eos, k, n: greedy_generate_ids(model, ids, m, eos),
    "hf_greedy": lambda model, ids, m, eos, k, n: hf_generate(model, ids, m, eos_token_id=eos),
    "hf_lookup": lambda model, ids, m, eos, k, n: hf_generate(model, ids, m, k, n, eos),
    "permkv": _permkv,  # prompt lookup behind Backoff (the default)
    "permkv_raw": _permkv_raw,  # prompt lookup drafting at every step
}


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

    def __post_init__(self):
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"kind must be one of {list(METHOD_KINDS)}, got {self.kind!r}")

    def run(self, model, ids: list[int], max_new_tokens: int, eos: int) -> SpecResult:
        return METHOD_KINDS[self.kind](model, ids, max_new_tokens, eos, self.k, self.max_ngram)


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
    return summarize([replace(t, workload=name) for t in timings if t.workload in workloads])


def sweep_methods(ngrams: list[int], ks: list[int], kind: str = "permkv") -> list[MethodConfig]:
    """Plain greedy plus one `kind` method per (max n-gram, draft length) pair, for `compare`."""
    return [MethodConfig("greedy")] + [MethodConfig(kind, k, n) for n in ngrams for k in ks]


# ------------------------------------------------------------------------------------------- notebook 04


@dataclass(frozen=True)
class SpeculationConfig:
    """Parameters of notebook 04 (names match its parameters cell in lower case)."""

    model: str = "smollm2-135m"  # a bundled name, a saved folder or a GGUF file (permkv.models.load_model)
    workloads: tuple[str, ...] = WORKLOADS
    n_prompts: int = 1  # prompts per workload
    max_new_tokens: int = 16
    repeats: int = 1  # timing repeats per (prompt, method); the median is kept
    k: int = 10  # draft length, the same for HF's built-in and permkv
    max_ngram: int = 3  # longest suffix matched, the same for both
    sweep_workloads: tuple[str, ...] = ("quote",)
    sweep_ngrams: tuple[int, ...] = (1, 3)
    sweep_ks: tuple[int, ...] = (4, 10)
    sweep_prompts: int = 1
    sweep_max_new_tokens: int = 16
    threads: int = 1  # torch CPU threads (the machine is shared; 0 keeps torch's default)
    seed: int = 0

    def __post_init__(self):
        model_source(self.model)
        for name in ("workloads", "sweep_workloads", "sweep_ngrams", "sweep_ks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [w for w in self.workloads + self.sweep_workloads if w not in WORKLOADS]
        if bad:
            raise ValueError(f"workloads must be among {WORKLOADS}, got {bad}")
        if min(self.n_prompts, self.sweep_prompts, self.max_new_tokens, self.repeats, self.k, self.max_ngram) < 1:
            raise ValueError("n_prompts, sweep_prompts, max_new_tokens, repeats, k and max_ngram must be >= 1")

    @property
    def methods(self) -> list[MethodConfig]:
        """Plain greedy, HF's built-in prompt lookup, permkv, and permkv without Backoff."""
        return [MethodConfig("greedy"), MethodConfig("hf_lookup", self.k, self.max_ngram),
                MethodConfig("permkv", self.k, self.max_ngram), MethodConfig("permkv_raw", self.k, self.max_ngram)]


def claim_metrics(table: list[dict], cfg: SpeculationConfig, knock_speedup: float | None = None) -> dict[str, float]:
    """Ledger metrics of notebook 04 from `summarize(...) + pooled(...)` rows: permkv's speedup over
    plain greedy pooled over the input-grounded workloads (prefill included, outputs identical),
    per workload for permkv / HF / permkv without Backoff, and permkv over HF."""
    def speedup(workload: str, method: str) -> float | None:
        return next((r["speedup"] for r in table if r["workload"] == workload and r["method"] == method), None)

    ours, hf = f"permkv(k={cfg.k},n={cfg.max_ngram})", f"hf_lookup(k={cfg.k},n={cfg.max_ngram})"
    raw = f"permkv_raw(k={cfg.k},n={cfg.max_ngram})"
    grounded = next((r for r in table if r["workload"] == "grounded" and r["method"] == ours), None)
    metrics = {
        "claim.speculative_speedup_grounded": speedup("grounded", ours),
        "hf_speedup_grounded": speedup("grounded", hf),
        "decode_speedup_grounded": grounded["decode_speedup"] if grounded else None,
        "knock_knock_speedup": knock_speedup,
        "all_identical": float(all(r["all_identical"] for r in table)),
    }
    for w in cfg.workloads:
        metrics[f"speedup.{w}.permkv"] = speedup(w, ours)
        metrics[f"speedup.{w}.hf_lookup"] = speedup(w, hf)
        metrics[f"speedup.{w}.permkv_raw"] = speedup(w, raw)
        if speedup(w, ours) and speedup(w, hf):
            metrics[f"permkv_over_hf.{w}"] = speedup(w, ours) / speedup(w, hf)
    return {k: v for k, v in metrics.items() if v is not None}


def sweep_curves(sweep: list[dict], workload: str = "all") -> dict[str, tuple[list[int], list[float]]]:
    """Speedup against draft length k per max n-gram (rows of the sweep table with `k` and `max_ngram`),
    as step-indexed MLflow curves (step = k)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in sorted((r for r in sweep if r["workload"] == workload), key=lambda r: r["k"]):
        steps, values = out.setdefault(f"sweep_speedup_vs_k.ngram{row['max_ngram']}", ([], []))
        steps.append(int(row["k"]))
        values.append(row["speedup"])
    return out
