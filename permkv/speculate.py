"""Prompt-lookup speculative decoding: lossless greedy decoding that drafts from the input.

Prompt lookup (apoorvumang/prompt-lookup-decoding) needs no draft model: it matches the last n tokens
against the prompt and the text generated so far, proposes the k tokens that followed the most recent
match, and the target model verifies all of them in one forward pass. The longest prefix that agrees
with the model's own greedy choices is kept, plus the model's next token, so the output is the greedy
output; the cache is cropped back past the rejected drafts.

Pieces (each small, composable):
- `PromptLookup`: the draft source, behind `start(ids)`, `get_candidates(ids) -> drafts or None` and
  `update(num_matches)`. `None` means "no draft": the step is plain decoding.
- `Backoff`: wraps a draft source and shrinks or pauses drafting while drafts keep failing, so that
  open-ended text (where lookups mostly miss) costs almost nothing over plain greedy.
- `speculative_generate(model, ids, max_new_tokens, drafter)`: the decoding loop. With `drafter=None`
  it is plain greedy decoding with the same loop and cache, which makes speed comparisons fair.
- `SpeculativeDecodingEngine`: the seed's call shape, with a measured (never estimated) speedup.

The cache only needs `crop(n)` (keep the first n tokens) and `get_seq_length()`, so any cache with
those two methods (transformers' `DynamicCache`, a paged cache) can be rolled back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch


class DraftSource(Protocol):
    """Proposes draft tokens; learns from how many of them the model accepted."""

    def start(self, ids: list[int]) -> None:
        """Forget the previous call; `ids` is the new prompt."""

    def get_candidates(self, ids: list[int]) -> list[int] | None:
        """Draft tokens to follow `ids` (the prompt plus accepted tokens), or None for no draft."""

    def update(self, num_matches: int) -> None:
        """How many of the last drafts the model accepted."""


class RollbackCache(Protocol):
    """What the decoding loop needs from a KV cache to undo rejected drafts."""

    def crop(self, max_length: int) -> None:
        """Keep only the first `max_length` cached tokens."""

    def get_seq_length(self) -> int:
        """Number of cached tokens."""


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


@dataclass
class SpecStats:
    """What one decoding call did."""

    new_tokens: int = 0  # tokens generated (including a final EOS)
    forward_passes: int = 0  # model calls, prefill included
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the model agreed with
    wall_s: float = 0.0  # time of the whole call
    prefill_s: float | None = None  # time of the prompt's forward pass (None: not measured)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per forward pass (the prefill makes the first); exactly 1.0 for plain greedy."""
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def decode_s(self) -> float | None:
        """Wall time after the prefill (None when the prefill was not timed)."""
        return None if self.prefill_s is None else self.wall_s - self.prefill_s

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "forward_passes": self.forward_passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_pass": self.tokens_per_pass,
            "wall_s": self.wall_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class SpecResult:
    """Generated token ids (prompt excluded), the stats, and the cache (holding all but the last token)."""

    tokens: list[int]
    stats: SpecStats
    cache: object = None
    drafts: list[tuple[list[int], int]] = field(default_factory=list)  # (draft, accepted) per step


def new_cache(model):
    """An empty `DynamicCache` for `model`."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def speculative_generate(
    model,
    input_ids: list[int],
    max_new_tokens: int,
    drafter: DraftSource | None = None,
    eos_token_id: int | list[int] | None = None,
    cache: RollbackCache | None = None,
) -> SpecResult:
    """Greedy decoding of `input_ids` (batch 1), verifying the drafter's tokens in one pass per step.

    With `drafter=None` this is plain greedy decoding, one token per forward pass, with the same code
    and cache, so that the two can be timed against each other. Stops after `max_new_tokens` or at an
    EOS (which is kept). `cache` defaults to a fresh `DynamicCache`; any cache with `crop(n)` and
    `get_seq_length()` works. On return the cache holds the prompt and every generated token but the last.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not input_ids:
        raise ValueError("input_ids must hold at least one token")
    eos = set() if eos_token_id is None else (
        {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    )
    cache = new_cache(model) if cache is None else cache
    dev = model.device
    stats = SpecStats()
    t0 = time.perf_counter()
    seq = list(input_ids)
    trace: list[tuple[list[int], int]] = []
    if drafter is not None:
        drafter.start(seq)

    # Prefill: the prompt's K/V go into the cache; the last logit gives the first new token.
    logits = model(
        input_ids=torch.tensor([seq], device=dev), past_key_values=cache, use_cache=True, logits_to_keep=1
    ).logits  # (1, 1, vocab)
    stats.forward_passes = 1
    tok = int(logits[0, -1].argmax())
    stats.prefill_s = time.perf_counter() - t0
    seq.append(tok)
    new = [tok]

    while len(new) < max_new_tokens and tok not in eos:
        room = max_new_tokens - len(new) - 1  # drafts beyond this could never be kept
        drafts = drafter.get_candidates(seq) if (drafter is not None and room > 0) else None
        if drafts:
            drafts = drafts[:room]
        chunk = [tok] + (drafts or [])  # the last accepted token is not cached yet
        logits = model(
            input_ids=torch.tensor([chunk], device=dev),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=len(chunk),
        ).logits  # (1, len(chunk), vocab)
        stats.forward_passes += 1
        preds = logits[0].argmax(-1).tolist()  # the model's greedy choice after each chunk position
        n = 0
        if drafts:
            while n < len(drafts) and drafts[n] == preds[n] and drafts[n] not in eos:
                n += 1
            stats.drafted += len(drafts)
            stats.accepted += n
            drafter.update(n)
            trace.append((drafts, n))
            if n < len(drafts):
                cache.crop(len(seq) + n)  # drop K/V of the rejected drafts
        step = chunk[1 : n + 1] + [preds[n]]
        seq.extend(step)
        new.extend(step)
        tok = step[-1]

    stats.new_tokens = len(new)
    stats.wall_s = time.perf_counter() - t0
    return SpecResult(new, stats, cache, trace)


def greedy_generate_ids(model, input_ids: list[int], max_new_tokens: int, eos_token_id=None) -> SpecResult:
    """Plain greedy decoding with the same loop and cache as `speculative_generate`."""
    return speculative_generate(model, input_ids, max_new_tokens, None, eos_token_id)


@torch.inference_mode()
def hf_generate(
    model, input_ids: list[int], max_new_tokens: int, prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int | None = None, eos_token_id=None,
) -> SpecResult:
    """`model.generate(do_sample=False)`, optionally with HF's built-in prompt lookup, timed.

    Only `tokens`, `new_tokens` and `wall_s` of the stats are filled (HF does not report the rest).
    transformers 5.2's prompt lookup can return one token more than `max_new_tokens`; the output is
    cut to `max_new_tokens` (its time still includes the extra token).
    """
    inp = torch.tensor([input_ids], device=model.device)
    kwargs = {}
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
        if max_matching_ngram_size is not None:
            kwargs["max_matching_ngram_size"] = max_matching_ngram_size
    t0 = time.perf_counter()
    out = model.generate(
        inp,
        attention_mask=torch.ones_like(inp),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
        **kwargs,
    )
    wall = time.perf_counter() - t0
    tokens = out[0, len(input_ids) :].tolist()[:max_new_tokens]
    return SpecResult(tokens, SpecStats(new_tokens=len(tokens), wall_s=wall))


@dataclass
class SpeculationOutcome:
    """The seed's result shape: drafts proposed, text accepted, and the measured speedup."""

    candidates: list[list[str]]  # every draft sent for verification, as token strings
    accepted: str  # the generated continuation (identical to greedy decoding's)
    speedup: float | None  # greedy wall time / speculative wall time, measured; None if not asked
    stats: SpecStats
    greedy_stats: SpecStats | None = None


@dataclass
class SpeculativeDecodingEngine:
    """The seed's `SpeculativeDecodingEngine`, on a real model: prompt lookup + Backoff + verification."""

    model: object
    tokenizer: object
    spec: object  # permkv.models.ModelSpec (for the chat template)
    k: int = 10  # draft length (seed: maxCandidates)
    max_ngram: int = 3  # longest suffix matched (seed: lookupWindow plays this role)
    min_ngram: int = 1
    max_new_tokens: int = 128

    def __post_init__(self):
        PromptLookup(self.k, self.max_ngram, self.min_ngram)  # validates the arguments early

    def drafter(self, corpus: list[int] | None = None) -> Backoff:
        return Backoff(PromptLookup(self.k, self.max_ngram, self.min_ngram, list(corpus or [])))

    def generate_with_speculation(
        self,
        prompt: str,
        generated: str = "",
        lookup_corpus: str | list[str] | None = None,
        measure_speedup: bool = False,
    ) -> SpeculationOutcome:
        """Continue `prompt` (+ text already `generated`), drafting from both and `lookup_corpus`.

        With `measure_speedup`, plain greedy runs on the same input too, its output is checked to be
        identical, and the speedup is the ratio of the two wall times.
        """
        from permkv.models import encode_prompt

        tok = self.tokenizer
        ids = encode_prompt(tok, self.spec, prompt)
        if generated:
            ids += tok(generated, add_special_tokens=False).input_ids
        texts = [lookup_corpus] if isinstance(lookup_corpus, str) else list(lookup_corpus or [])
        corpus = [t for text in texts for t in tok(text, add_special_tokens=False).input_ids]
        eos = tok.eos_token_id
        res = speculative_generate(self.model, ids, self.max_new_tokens, self.drafter(corpus), eos)
        speedup, greedy_stats = None, None
        if measure_speedup:
            ref = greedy_generate_ids(self.model, ids, self.max_new_tokens, eos)
            if ref.tokens != res.tokens:
                raise AssertionError("speculative output differs from greedy: the verification is broken")
            greedy_stats = ref.stats
            speedup = ref.stats.wall_s / res.stats.wall_s
        return SpeculationOutcome(
            candidates=[tok.convert_ids_to_tokens(d) for d, _ in res.drafts],
            accepted=tok.decode(res.tokens, skip_special_tokens=True),
            speedup=speedup,
            stats=res.stats,
            greedy_stats=greedy_stats,
        )
