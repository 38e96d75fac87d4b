"""Draft sources for speculation, behind `start(ids)`, `get_candidates(ids) -> drafts or None` and
`update(num_matches)`; `None` means "no draft": the step is plain decoding. Drafts are a list of
tokens (one chain) or a `DraftTree` (several branches, verified in one pass).

- `PromptLookup` (apoorvumang/prompt-lookup-decoding): match the last n tokens against the prompt and
  the text generated so far, propose the k tokens that followed the most recent match.
- `Backoff`: wraps a draft source and shrinks or pauses drafting while drafts keep failing, so that
  open-ended text (where lookups mostly miss) costs almost nothing over plain greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens as a tree below the last accepted token (the root, not stored).

    `tokens[i]` is proposed to follow node `parents[i]` (-1: the root); a parent comes before its
    children (`parents[i] < i`) and siblings hold different tokens, so at most one branch can match the
    model's choice at each depth. A chain (one branch) has parents -1, 0, 1, ...
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"tokens and parents must have the same length, got {len(self.tokens)} and {len(self.parents)}")
        seen = set()
        for i, (tok, parent) in enumerate(zip(self.tokens, self.parents)):
            if not -1 <= parent < i:
                raise ValueError(f"parents[{i}] must be in [-1, {i}) (a parent comes first), got {parent}")
            if (parent, tok) in seen:
                raise ValueError(f"node {i} repeats token {tok} under parent {parent} (siblings must differ)")
            seen.add((parent, tok))

    @classmethod
    def chain(cls, tokens) -> "DraftTree":
        tokens = tuple(tokens)
        return cls(tokens, tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node below the root (the root's children have depth 1)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def children(self) -> dict[int, list[int]]:
        """Node -> its children, in order (-1: the root)."""
        out: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            out.setdefault(p, []).append(i)
        return out

    def pruned(self, max_depth: int) -> "DraftTree":
        """The nodes at depth <= `max_depth` (renumbered; parents still come first)."""
        keep = [i for i, d in enumerate(self.depths()) if d <= max_depth]
        new = {old: j for j, old in enumerate(keep)}
        return DraftTree(tuple(self.tokens[i] for i in keep),
                         tuple(-1 if self.parents[i] < 0 else new[self.parents[i]] for i in keep))

    def accept(self, preds: list[int], stop: set[int] = frozenset()) -> list[int]:
        """The longest branch the model agrees with: node indices from the root down.

        `preds[0]` is the model's greedy token after the root, `preds[1 + i]` after node i. A draft
        equal to a stop token is never accepted (the model's own token still ends the output there).
        """
        kids = self.children()
        path, cur = [], -1
        while True:
            want = preds[cur + 1]
            nxt = next((c for c in kids.get(cur, ()) if self.tokens[c] == want), None)
            if nxt is None or want in stop:
                return path
            path.append(nxt)
            cur = nxt


class DraftSource(Protocol):
    """Proposes draft tokens; learns from how many of them the model accepted."""

    def start(self, ids: list[int]) -> None:
        """Forget the previous call; `ids` is the new prompt."""

    def get_candidates(self, ids: list[int]) -> list[int] | DraftTree | None:
        """Draft tokens (a chain or a tree) to follow `ids` (the prompt plus accepted tokens), or None."""

    def update(self, num_matches: int) -> None:
        """How many of the last drafts the model accepted (the accepted branch's length for a tree)."""


class _NgramIndex:
    """Where each n-gram (n = min_n..max_n) of a growing token list last occurred.

    `last[n][gram]` is the position just after the most recent occurrence of `gram` that is followed by
    at least one token, so lookups of the current suffix find an earlier occurrence, never themselves.
    Appending a token costs O(max_n); a lookup costs O(max_n).
    """

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}

    def extend(self, new: list[int]) -> None:
        """Append tokens; register every n-gram that now has a following token."""
        toks = self.tokens
        for tok in new:
            j = len(toks)  # the n-grams ending at j - 1 are followed by the token at j
            toks.append(tok)
            for n in range(self.min_n, min(self.max_n, j) + 1):
                self.last[n][tuple(toks[j - n : j])] = j

    def find(self, gram: tuple[int, ...]) -> int | None:
        """Position after the most recent occurrence of `gram` that has a continuation, or None."""
        return self.last[len(gram)].get(gram)


@dataclass
class PromptLookup:
    """Draft the k tokens that followed the most recent earlier match of the last n tokens.

    n goes from `max_ngram` down to `min_ngram`; at each n the prompt-plus-generated text is searched
    first (most recent match), then `corpus` (extra token ids to look up in, e.g. earlier outputs).
    Uses an incremental n-gram index, so a lookup does not rescan the prompt.
    """

    k: int = 10  # most draft tokens per step (the reference implementation's default)
    max_ngram: int = 3  # longest suffix to match (reference: 3)
    min_ngram: int = 1  # shortest suffix to match
    corpus: list[int] = field(default_factory=list)  # extra lookup tokens, searched after the history

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k (draft length) must be >= 1, got {self.k}")
        if self.min_ngram < 1:
            raise ValueError(f"min_ngram must be >= 1, got {self.min_ngram}")
        if self.max_ngram < self.min_ngram:
            raise ValueError(
                f"max_ngram must be >= min_ngram ({self.min_ngram}), got {self.max_ngram}"
            )
        self._corpus = _NgramIndex(self.min_ngram, self.max_ngram)
        self._corpus.extend(list(self.corpus))
        self._history = _NgramIndex(self.min_ngram, self.max_ngram)

    def start(self, ids: list[int]) -> None:
        self._history = _NgramIndex(self.min_ngram, self.max_ngram)
        self._history.extend(list(ids))

    def get_candidates(self, ids: list[int]) -> list[int] | None:
        hist = self._history
        if len(ids) < len(hist.tokens):
            raise ValueError("get_candidates: ids shrank since the last call; call start() first")
        hist.extend(ids[len(hist.tokens) :])
        for n in range(min(self.max_ngram, len(ids)), self.min_ngram - 1, -1):
            gram = tuple(ids[-n:])
            for index in (hist, self._corpus):
                pos = index.find(gram)
                if pos is not None:
                    return index.tokens[pos : pos + self.k]
        return None

    def update(self, num_matches: int) -> None:
        """Prompt lookup itself keeps no acceptance state (see `Backoff`)."""


@dataclass
class Backoff:
    """Shorten drafts after misses and pause drafting while drafts keep failing.

    A draft with nothing accepted halves the draft length; any accepted token restores the source's
    own k, since in copied text a miss is usually followed by hits again. After `patience` drafts in a row with nothing accepted, drafting pauses
    for `cooldown` plain steps, a pause that doubles each time it recurs (up to `max_cooldown`) and
    resets once a draft is accepted, so open-ended text, where lookups rarely hit, runs at about plain
    greedy speed while copied text keeps long drafts.
    """

    source: DraftSource
    patience: int = 3  # drafts in a row with nothing accepted before pausing
    cooldown: int = 4  # plain-decoding steps in the first pause
    max_cooldown: int = 64  # longest pause

    def __post_init__(self):
        for name in ("patience", "cooldown", "max_cooldown"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._reset()

    def _reset(self) -> None:
        self._limit: int | None = None  # current draft length; None = the source's own
        self._last_len = 0  # length of the draft now being verified (0: none)
        self._misses = 0
        self._pause = 0
        self._next_cooldown = self.cooldown

    def start(self, ids: list[int]) -> None:
        self._reset()
        self.source.start(ids)

    def get_candidates(self, ids: list[int]) -> list[int] | None:
        if self._pause > 0:
            self._pause -= 1
            self._last_len = 0
            return None
        drafts = self.source.get_candidates(ids)
        if drafts and self._limit is not None:
            drafts = drafts[: self._limit]
        self._last_len = len(drafts) if drafts else 0
        return drafts or None

    def update(self, num_matches: int) -> None:
        self.source.update(num_matches)
        if self._last_len == 0:
            return
        if num_matches == 0:
            self._limit = max(1, self._last_len // 2)
            self._misses += 1
            if self._misses >= self.patience:
                self._pause = self._next_cooldown
                self._next_cooldown = min(2 * self._next_cooldown, self.max_cooldown)
                self._misses = 0
            return
        self._misses = 0
        self._next_cooldown = self.cooldown
        self._limit = None
