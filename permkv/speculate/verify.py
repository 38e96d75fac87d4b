"""The speculative decoding loop: verify a drafter's tokens in one forward pass per step, lossless.

The longest prefix of the draft that agrees with the model's own greedy choices is kept, plus the
model's next token, so the output is the greedy output; the cache is cropped back past the rejected
drafts. The cache only needs `crop(n)` and `get_seq_length()` (transformers' `DynamicCache`, the
paged cache). With `drafter=None` the same loop and cache decode plainly, which makes speed
comparisons fair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from permkv.cache import forward
from permkv.speculate.drafts import DraftSource
class RollbackCache(Protocol):
    """What the decoding loop needs from a KV cache to undo rejected drafts."""

    def crop(self, max_length: int) -> None:
        """Keep only the first `max_length` cached tokens."""

    def get_seq_length(self) -> int:
        """Number of cached tokens."""


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
    logits = forward(model, cache, torch.tensor([seq], device=dev))  # (1, 1, vocab)
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
        logits = forward(model, cache, torch.tensor([chunk], device=dev), logits_to_keep=len(chunk))  # (1, len(chunk), vocab)
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
