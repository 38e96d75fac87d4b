"""Answer metrics (SQuAD normalisation, contains, exact match, token F1) and which one each task uses."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains(output: str, answers: Sequence[str]) -> float:
    """1.0 if any gold answer appears in the output (normalised), else 0.0."""
    out = normalize(output)
    return float(any(normalize(a) in out for a in answers if normalize(a)))


def contains_all(output: str, answers: Sequence[str]) -> float:
    """Fraction of gold answers that appear in the output (multi-value needles, variable tracking)."""
    out = normalize(output)
    return sum(normalize(a) in out for a in answers) / len(answers)


def exact_match(output: str, answers: Sequence[str]) -> float:
    return float(any(normalize(output) == normalize(a) for a in answers))


def token_f1(output: str, answers: Sequence[str]) -> float:
    """Best SQuAD token F1 of the output against any gold answer."""

    def f1(pred: str, gold: str) -> float:
        p, g = normalize(pred).split(), normalize(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(output, a) for a in answers)


# The score each task reports (perplexity is scored separately: lower is better).
TASK_METRIC: dict[str, Callable[[str, Sequence[str]], float]] = {
    "niah_single": contains,
    "niah_multikey": contains,
    "niah_multivalue": contains_all,
    "variable_tracking": contains_all,
    "squad": contains,
    "hotpot": contains,
}


def first_line(text: str) -> str:
    """The answer proper: generation up to its first blank line."""
    return text.strip().split("\n\n")[0]
