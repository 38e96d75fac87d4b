"""`RecursiveLanguageModel`: answer a query over a context far larger than one call's KV budget.

Policies:
- "scripted" (works with small models): split the context into pieces that fit one call, ask every
  piece the query (sub-calls of one level, issued together so that a batching server can batch them),
  keep the answers that are grounded in their piece (`evidence`: not NONE, and the answer's own
  words occur in one sentence of the piece), and ask the query once more over those sentences; if they
  are themselves too long for one call, recurse on them. A call holds `context_chunk_size` tokens of
  context in its KV cache; with compression ratio r it reads `context_chunk_size x r` tokens through
  chunked prefill into the same budget, so reading N tokens takes ceil(N / (chunk x r)) calls
  (the seed: 100K tokens, 4K per call: 25 calls at 1x, 4 at 8x).
- "repl" (the RLM paper's protocol, `permkv.rlm.repl`): the model writes Python that calls
  `llm_query` on slices of a `context` variable; needs a model that can write code.

Every number in `RLMResult` is measured on the calls that ran (`Call`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from permkv.checks import check_ratio, positive_int
from permkv.eval import normalize
from permkv.rlm.lm import LM, as_lm
from permkv.rlm.pieces import sentences, split_pieces

POLICIES = ("scripted", "repl")
READ = ("Read the text below and answer the question. If the text does not contain the answer, reply NONE.\n\n"
        "{context}\n\nQuestion: {query}\nAnswer:")
AGGREGATE = ("Readers of the parts of a long document found these sentences for the question:\n\n{context}\n\n"
             "Using these sentences, answer the question.\n\nQuestion: {query}\nAnswer:")


class RLMBudgetExceeded(RuntimeError):
    """A completion would need more calls, levels or tokens than its budget allows."""


@dataclass
class Call:
    """One model call an RLM made, as measured."""

    level: int  # 1 = reading the context, 2 = reading level-1 answers, ...; repl: 0 = root, 1+ = sub-calls
    role: str  # "read", "aggregate", "root", "sub"
    prompt_tokens: int  # tokens the call read (template included)
    context_tokens: int  # tokens of context (a piece or the notes) in it
    ratio: float  # KV compression ratio used (1 when the prompt fits the budget uncompressed)
    kv_tokens: float | None  # prompt tokens held per (layer, head) after reading, mean (None: not measured)
    kv_bytes: int  # KV bytes held after reading
    kv_pool_bytes: int  # bytes of the KV store the call ran in (the most it could hold at any time)
    seconds: float
    answer: str
    completion_tokens: int = 0
    greedy_decode_s: float | None = None  # speculative calls: decode time of plain greedy on the same prompt
    speculative_decode_s: float | None = None


@dataclass
class RLMResult:
    answer: str
    calls: list[Call]
    context_tokens: int  # tokens of the context
    wall_s: float
    position_limited: bool = False  # pieces were capped by the model's positions, not by the KV budget
    error: str | None = None  # repl: why it stopped without a final answer (budget), else None

    @property
    def n_calls(self) -> int:
        return len(self.calls)

    @property
    def read_calls(self) -> int:
        """Calls that read the context itself (the seed's "25 calls" / "4 calls")."""
        return sum(c.role == "read" and c.level == 1 for c in self.calls)

    @property
    def depth_reached(self) -> int:
        return max((c.level for c in self.calls), default=0)

    @property
    def tokens_read(self) -> int:
        return sum(c.prompt_tokens for c in self.calls)

    @property
    def max_kv_tokens(self) -> float:
        """Most prompt tokens any call held per (layer, head)."""
        return max((c.kv_tokens for c in self.calls if c.kv_tokens is not None), default=0.0)

    @property
    def achieved_ratio(self) -> float:
        """Prompt tokens read / tokens held, over the calls that compressed (1.0 if none did)."""
        compressed = [c for c in self.calls if c.ratio > 1 and c.kv_tokens]
        if not compressed:
            return 1.0
        return sum(c.prompt_tokens for c in compressed) / sum(c.kv_tokens for c in compressed)

    @property
    def peak_kv_bytes(self) -> int:
        """Largest KV store any call ran in (calls run one after another per process: the peak)."""
        return max((c.kv_pool_bytes for c in self.calls), default=0)

    @property
    def speculative_speedup(self) -> float | None:
        """Greedy decode time / speculative decode time over the speculative calls (None if none)."""
        spec = [c for c in self.calls if c.speculative_decode_s]
        if not spec:
            return None
        return sum(c.greedy_decode_s for c in spec) / sum(c.speculative_decode_s for c in spec)

    def stats(self) -> dict:
        return dict(calls=self.n_calls, read_calls=self.read_calls, depth_reached=self.depth_reached,
                    tokens_read=self.tokens_read, context_tokens=self.context_tokens,
                    max_kv_tokens=self.max_kv_tokens, achieved_ratio=self.achieved_ratio,
                    peak_kv_bytes=self.peak_kv_bytes, wall_s=self.wall_s,
                    speculative_speedup=self.speculative_speedup, position_limited=self.position_limited)


def first_line(text: str) -> str:
    """The answer proper: the first non-empty line (base models run on into a next "Question:")."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def is_none(answer: str) -> bool:
    """An answer that says the piece held nothing (NONE, empty)."""
    words = normalize(answer).split()
    return not words or words[0] in ("none", "no", "not", "unknown", "nothing")


FILLER = frozenset("is are was were be answer text provided mentioned document question in of for to and or it this that".split())


def evidence(answer: str, piece: str, query: str) -> str | None:
    """The first sentence of `piece` that holds all of the answer's own words (those not in the query),
    or None: the answer is NONE or not grounded in the piece.

    Small models answer every piece, inventing a value where there is none; an invented value is not
    in the piece. This is the check a REPL program would run on a sub-call's answer, and the sentence
    is what it would pass up to the aggregation call."""
    if is_none(answer):
        return None
    asked = set(normalize(query).split()) | FILLER
    own = [w for w in normalize(answer).split() if w not in asked]
    if not own:
        return None
    for sentence in sentences(piece):
        words = set(normalize(sentence).split())
        if all(w in words for w in own):
            return sentence.strip()
    return None


@dataclass
class RecursiveLanguageModel:
    """The seed's `RecursiveLanguageModel(max_depth, context_chunk_size, kv_cache_compression_ratio,
    enable_speculative_decoding)`, measured: `.completion(query, context) -> RLMResult`.

    `model_or_client`: an LM, a permkv Backend, a `(model, tokenizer, spec)` tuple or an openai client
    (then `model` names the served model and `tokenizer` counts tokens).
    """

    model_or_client: object
    max_depth: int = 3  # scripted: most levels (1 = the context fits one call); repl: most nested rlm_query
    context_chunk_size: int = 4000  # context tokens one call holds in its KV cache (the per-call budget)
    kv_cache_compression_ratio: float = 1.0  # x times smaller KV: a call reads chunk x ratio tokens
    enable_speculative_decoding: bool = False  # suffix-tree speculation on uncompressed calls, speedup measured vs greedy
    policy: str = "scripted"  # "scripted" or "repl"
    max_calls: int = 256  # most model calls per completion
    max_new_tokens: int = 32  # answer tokens per call (repl root turns: repl_max_new_tokens)
    concurrency: int = 1  # sub-calls of one level in flight at once (a batching server batches them)
    model: str | None = None  # served model name (openai client)
    tokenizer: object = None  # token counter (openai client)
    max_iterations: int = 8  # repl: root turns
    max_total_tokens: int | None = None  # repl: prompt + completion tokens over all calls
    repl_max_new_tokens: int = 256  # repl: tokens per root turn
    lm: LM = field(init=False, repr=False)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("max_depth", "context_chunk_size", "max_calls", "max_new_tokens", "concurrency", "max_iterations",
                     "repl_max_new_tokens"):
            positive_int(name, getattr(self, name))
        check_ratio(self.kv_cache_compression_ratio, "kv_cache_compression_ratio")
        if self.max_total_tokens is not None:
            positive_int("max_total_tokens", self.max_total_tokens)
        self.lm = as_lm(self.model_or_client, self.model, self.tokenizer)

    # ----- one call ----------------------------------------------------------------------------------
    def call(self, prompt, *, level: int, role: str, context_tokens: int, calls: list[Call],
             max_new_tokens: int | None = None) -> str:
        """One model call, budget-checked and recorded in `calls`. Compresses only when the context
        is over the per-call budget; speculates (and times greedy beside it) only uncompressed."""
        if len(calls) >= self.max_calls:
            raise RLMBudgetExceeded(f"max_calls={self.max_calls} reached")
        max_new = max_new_tokens or self.max_new_tokens
        ratio = float(self.kv_cache_compression_ratio) if context_tokens > self.context_chunk_size else 1.0
        speculate = self.enable_speculative_decoding and ratio == 1
        reply = self.lm.complete(prompt, max_new, ratio, speculate=speculate)
        g = reply.gen
        call = Call(level, role, g.prompt_tokens, context_tokens, ratio, g.kv_tokens, g.kv_bytes, g.kv_pool_bytes,
                    g.seconds, reply.text.strip(), len(g.tokens))
        if speculate:
            greedy = self.lm.complete(prompt, max_new, 1.0)
            if greedy.gen.tokens != g.tokens:
                raise AssertionError("speculative decoding changed the answer: it must equal greedy's (a bug)")
            call.greedy_decode_s, call.speculative_decode_s = greedy.gen.decode_s, g.decode_s
        calls.append(call)
        return call.answer

    def _many(self, prompts: list[tuple[str, int]], level: int, role: str, calls: list[Call]) -> list[str]:
        """Calls of one level, `concurrency` at a time; budget checked for the whole level first."""
        if len(calls) + len(prompts) > self.max_calls:
            raise RLMBudgetExceeded(f"level {level} needs {len(prompts)} calls; {len(calls)} made, max_calls={self.max_calls}")
        if self.concurrency == 1 or len(prompts) == 1:
            bar = tqdm(prompts, desc=f"rlm level {level}", leave=False, disable=len(prompts) < 4)
            return [self.call(p, level=level, role=role, context_tokens=n, calls=calls) for p, n in bar]
        with ThreadPoolExecutor(self.concurrency) as pool:
            level_calls: list[list[Call]] = [[] for _ in prompts]
            answers = list(pool.map(lambda i: self.call(prompts[i][0], level=level, role=role,
                                                        context_tokens=prompts[i][1], calls=level_calls[i]),
                                    range(len(prompts))))
        calls += [c for group in level_calls for c in group]
        return answers

    # ----- scripted policy ---------------------------------------------------------------------------
    def piece_tokens(self, query: str, template: str = READ) -> tuple[int, bool]:
        """Context tokens one call may read: chunk x ratio, capped by the model's positions.
        Returns (tokens, position_limited)."""
        overhead = self.lm.prompt_tokens(template.format(context="", query=query))
        budget = int(self.context_chunk_size * self.kv_cache_compression_ratio)
        room = self.lm.max_positions - overhead - self.max_new_tokens - 16
        if room < 1:
            raise ValueError(f"the query alone ({overhead} tokens) leaves no room in {self.lm.max_positions} positions")
        return min(budget, room), room < budget

    def completion(self, query: str, context: str) -> RLMResult:
        """Answer `query` over `context`; the result carries the answer and the measured calls."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty string, got {query!r}")
        if not isinstance(context, str):
            raise ValueError(f"context must be a str, got {type(context).__name__}")
        t0 = time.perf_counter()
        calls: list[Call] = []
        if self.policy == "repl":
            from permkv.rlm.repl import run_repl

            answer, error = run_repl(self, query, context, calls)
            return RLMResult(answer, calls, self.lm.count(context), time.perf_counter() - t0, error=error)
        _, limited = self.piece_tokens(query)
        answer = self._solve(query, context, 1, calls)
        return RLMResult(answer, calls, self.lm.count(context), time.perf_counter() - t0, position_limited=limited)

    def _solve(self, query: str, text: str, level: int, calls: list[Call]) -> str:
        """Read `text` at `level`: one call if it fits, else every piece, then the answers above it."""
        template = READ if level == 1 else AGGREGATE
        limit, _ = self.piece_tokens(query, template)
        pieces = split_pieces(text, limit, self.lm.count) or [text]
        if len(pieces) > 1 and level >= self.max_depth:
            raise RLMBudgetExceeded(f"level {level} of {len(pieces)} pieces is not the last level, but max_depth={self.max_depth}")
        prompts = [(template.format(context=p.strip(), query=query), self.lm.count(p)) for p in pieces]
        role = "read" if level == 1 else "aggregate"
        answers = [first_line(a) for a in self._many(prompts, level, role, calls)]
        if len(pieces) == 1:
            return answers[0]
        if level == 1:  # pass up the evidence sentence of each grounded answer
            found = {evidence(a, p, query): a for a, p in zip(answers, pieces)}
        else:
            found = {a: a for a in answers if not is_none(a)}
        found.pop(None, None)
        if len(found) <= 1:  # nothing or one answer found: no need to ask again
            return next(iter(found.values()), "NONE")
        return self._solve(query, "".join(f"- {note}\n\n" for note in found), level + 1, calls)
