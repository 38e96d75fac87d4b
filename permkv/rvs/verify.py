"""`RecursiveVerificationSystem`: draft under a KV budget, verify claims with factored sub-calls, revise.

The input is a list of items (words, records); the question asks for the list in order, which a
trace answers item by item: a walk over the list where each step is one lookup ("what comes after
X?"). The steps are the trace's checkable claims (Chain-of-Verification, Dhuliawala 2023, arXiv
2309.11495, with the questions made by a template, not by the model): "X is followed by Y".
Each claim is checked by a factored sub-call that sees the original input and the question, never
the draft (the question is a cloze: the input, then the input's own words up to X; plain text). When the input does not fit the KV budget, it is split in halves (one shared item, so
every item keeps its successor) down to `max_depth` levels, and only the pieces that contain X are
asked (program-side routing, as an RLM's `grep`). The revision walks the draft: a step whose claim
held is kept; from the first failed one on, each next item is the sub-call's answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from permkv.checks import positive_int
from permkv.eval import generate, stop_ids
from permkv.models import encode_prompt
from permkv.rvs.decode import BudgetedDecoder, TraceStats
from permkv.rvs.scorers import RKVScore


INSTRUCTION = "Write each word on its own line, in the same order."


def list_prompt(items: Sequence[str], instruction: str = INSTRUCTION) -> str:
    """The drafting question: write the list back in order (a walk over the list)."""
    return "Words: " + ", ".join(items) + ".\n" + instruction


def next_prompt(items: Sequence[str], item: str) -> str:
    """The factored verification question, as a cloze on the input: the list, then the list again
    up to `item` and a comma; the model's next word is its answer to "what follows `item`?".
    (Measured on 12 lists of 12 words: SmolLM2 answers this 12/12, the chat question "Which word
    comes right after X?" 0/12.)"""
    items = list(items)
    return ", ".join(items) + "\n\n" + ", ".join(items[: items.index(item) + 1]) + ","


def parse_items(text: str) -> list[str]:
    """Items of a trace: its first paragraph that holds any, one per line or comma-separated piece
    (the piece's last word, lower case); pieces ending in ":" are headings ("The words are:")."""
    for paragraph in re.split(r"\n\s*\n", text):
        items = []
        for piece in re.split(r"[,\n;]", paragraph):
            words = re.findall(r"[A-Za-z]+", piece)
            if words and not piece.strip().endswith(":"):
                items.append(words[-1].lower())
        if items:
            return items
    return []


def answer_item(text: str, items: Sequence[str], asked: str) -> str | None:
    """The first word of a sub-call's answer that is one of `items` other than the `asked` one
    (a copy of the question's own item is no answer), else None."""
    allowed = set(items) - {asked}
    return next((w for w in (w.lower() for w in re.findall(r"[A-Za-z]+", text)) if w in allowed), None)


@dataclass
class VerifiedClaim:
    """A trace step "`item` is followed by `claimed`" and what the factored sub-call answered."""

    item: str
    claimed: str
    answer: str | None  # None: unverifiable (`item` is not in the input, or the answer names no item)

    @property
    def failed(self) -> bool:
        return self.answer is not None and self.answer != self.claimed


@dataclass
class RVSStats:
    """Measured cost of one `run`."""

    trace: TraceStats
    sub_calls: int = 0  # factored verification calls (each a short, full-cache generation)
    sub_call_tokens: int = 0  # prompt + generated tokens over all sub-calls
    max_depth_used: int = 0  # deepest split of the input a sub-call needed
    failed_claims: int = 0  # claims the sub-calls contradicted
    answer_flipped: bool = False  # the revision changed the answer
    seconds: float = 0.0

    def as_dict(self) -> dict:
        t = self.trace
        return dict(tokens_generated=t.generated, tokens_held=t.max_held, trace_held=t.max_held - t.input_tokens,
                    compressions=t.compressions, evicted=t.evicted, truncated=t.truncated, sub_calls=self.sub_calls,
                    sub_call_tokens=self.sub_call_tokens, max_depth_used=self.max_depth_used,
                    failed_claims=self.failed_claims, answer_flipped=self.answer_flipped, seconds=self.seconds)


@dataclass
class RVSResult:
    draft: list[str]  # items of the trace
    answer: list[str]  # after verification and revision (the draft when verify=False)
    claims: list[VerifiedClaim]
    stats: RVSStats


@dataclass
class RecursiveVerificationSystem:
    """Draft a list walk in `kv_budget_tokens` of KV (compressed `compression_ratio`x while written),
    verify each step with a factored sub-call whose input fits the budget, revise.

    `compression_ratio` 1: the trace is cut when the budget is full; r: up to r x budget tokens.
    """

    model: object
    tokenizer: object
    kv_budget_tokens: int  # trace tokens a (layer, KV head) holds; the input is held in full
    compression_ratio: float = 8.0
    max_depth: int = 3  # most times the input is halved for a sub-call
    buffer: int = 128  # generated tokens between compressions (R-KV)
    window: int = 8  # recent tokens never evicted
    scorer: object = field(default_factory=RKVScore)
    chat: bool = True  # chat template for the draft (instruct models); sub-calls are plain-text clozes
    answer_tokens: int = 6  # tokens a sub-call may generate
    subcall_tokens: int | None = None  # KV tokens a sub-call's prompt may take; None: the draft's (input + budget)
    memo: dict | None = None  # shared answers of identical sub-calls (greedy: same prompt, same answer); still counted

    def __post_init__(self):
        positive_int("max_depth", self.max_depth, 0)
        if self.subcall_tokens is not None:
            positive_int("subcall_tokens", self.subcall_tokens)
        self.decoder = BudgetedDecoder(self.model, self.kv_budget_tokens, self.compression_ratio, self.buffer,
                                       self.window, scorer=self.scorer)
        self.stop = stop_ids(self.model, self.tokenizer)

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, None, text, chat=self.chat if chat is None else chat)

    def draft(self, items: Sequence[str], instruction: str = INSTRUCTION) -> tuple[list[str], str, TraceStats]:
        """The budgeted trace: (its items, its text, stats)."""
        ids, st = self.decoder.generate(self.encode(list_prompt(items, instruction)), self.stop)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return parse_items(text), text, st

    def pieces(self, items: Sequence[str], item: str, limit: int, depth: int = 0) -> list[tuple[list[str], int]]:
        """Pieces of `items` whose verification prompt fits in `limit` tokens and that hold `item` with
        a successor, with their split depth; halves share one item. Beyond max_depth: ValueError."""
        items = list(items)
        if item not in items[:-1]:
            return []
        if len(self.encode(next_prompt(items, item), chat=False)) <= limit:
            return [(items, depth)]
        if depth >= self.max_depth or len(items) < 3:
            raise ValueError(f"the input does not fit a sub-call of {limit} tokens within "
                             f"max_depth={self.max_depth} halvings; raise either")
        mid = len(items) // 2
        return self.pieces(items[: mid + 1], item, limit, depth + 1) + self.pieces(items[mid:], item, limit, depth + 1)

    def ask_next(self, items: Sequence[str], item: str, stats: RVSStats) -> str | None:
        """The factored sub-call: what follows `item`, asked of the first piece of the input holding it."""
        limit = self.subcall_tokens or len(self.encode(list_prompt(items))) + self.kv_budget_tokens
        found = self.pieces(items, item, limit)
        if not found:
            return None
        piece, depth = found[0]
        key = (tuple(piece), item)
        if self.memo is None or key not in self.memo:
            ids = self.encode(next_prompt(piece, item), chat=False)
            out = generate(self.model, self.tokenizer, ids, self.answer_tokens)
            result = (answer_item(out, piece, item), len(ids) + len(self.tokenizer(out).input_ids))
            if self.memo is None:
                return self._count(stats, depth, *result)
            self.memo[key] = result
        return self._count(stats, depth, *self.memo[key])

    @staticmethod
    def _count(stats: RVSStats, depth: int, answer: str | None, tokens: int) -> str | None:
        stats.sub_calls += 1
        stats.sub_call_tokens += tokens
        stats.max_depth_used = max(stats.max_depth_used, depth)
        return answer

    def run(self, items: Sequence[str], verify: bool = True) -> RVSResult:
        """Draft, then (with `verify`) check every step and revise from the first failed one."""
        if not items or any(not isinstance(w, str) or not re.fullmatch(r"[a-z]+", w) for w in items):
            raise ValueError(f"items must be a non-empty list of lower-case words, got {list(items)[:5]!r}")
        t0 = time.perf_counter()
        draft, _, trace = self.draft(items)
        stats = RVSStats(trace)
        claims: list[VerifiedClaim] = []
        answer = list(draft)
        if verify and draft:
            answer = draft[:1]
            for i in range(1, len(draft)):
                prev = answer[-1]
                if prev == draft[i - 1]:  # still on the draft's path: check its claim
                    claim = VerifiedClaim(prev, draft[i], self.ask_next(items, prev, stats))
                    claims.append(claim)
                    stats.failed_claims += claim.failed
                    answer.append(claim.answer if claim.failed else draft[i])
                else:  # off the draft's path: the sub-calls continue the walk
                    answer.append(self.ask_next(items, prev, stats) or draft[i])
        stats.answer_flipped = answer != draft
        stats.seconds = time.perf_counter() - t0
        return RVSResult(draft, answer, claims, stats)
