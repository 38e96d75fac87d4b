"""How many requests fit in a fixed KV memory: contiguous max-length reservation vs paged blocks.

Both allocators really admit requests one by one, cycling through a request mix, until the next
one does not fit (so the count measures the memory, not the size of the mix):
`ReservationPool` is the pre-vLLM scheme (every request reserves `reserve_tokens` slots up front)
and `admit_paged` reserves each request's real length in a `PagedCache`'s block pool.
Request lengths come from the project's SQuAD / HotpotQA prompts at their natural length plus
seeded output lengths.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from permkv.cache.paged import PagedCache
from permkv.cache.pool import CacheFull


@dataclass(frozen=True)
class Request:
    """Token counts of one request; its KV cache holds `total` tokens when it finishes."""

    prompt_tokens: int
    output_tokens: int
    prompt_ids: tuple[int, ...] = ()  # the real prompt, for admissions that prefill it (compression)

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class Admission:
    """What an allocator holds after admitting requests until one did not fit."""

    admitted: int
    allocated_bytes: int  # bytes the allocator set aside for the admitted requests
    used_bytes: int  # bytes of tokens the admitted requests really hold

    @property
    def waste_pct(self) -> float:
        """Percent of allocated KV bytes that hold no token."""
        return 100.0 * (self.allocated_bytes - self.used_bytes) / self.allocated_bytes if self.allocated_bytes else 0.0


def natural_prompts(tokenizer, spec, task: str, n: int, seed: int = 0) -> list[list[int]]:
    """Token ids of `n` seeded SQuAD or HotpotQA prompts with their own context only (no padding
    to a target length), in the project's prompt format (`permkv.data.encode_sample`)."""
    from permkv.data import Sample, encode_sample, load_hotpot, load_squad

    if task not in ("squad", "hotpot"):
        raise ValueError(f"task must be 'squad' or 'hotpot', got {task!r}")
    records = list(load_squad() if task == "squad" else load_hotpot())
    random.Random(f"{task}-{seed}").shuffle(records)
    prompts = []
    for r in records[:n]:
        if task == "squad":
            sample = Sample("squad", r["context"], r["question"], r["answers"])
        else:
            context = "\n\n".join(f"{t}: {p}" for t, p in r["paragraphs"])
            sample = Sample("hotpot", context, r["question"], [r["answer"]])
        prefix, suffix = encode_sample(tokenizer, spec, sample, "query_aware")
        prompts.append(prefix + suffix)
    return prompts


def request_mix(prompts: list[int] | list[list[int]], output_range: tuple[int, int], seed: int = 0) -> list[Request]:
    """Requests in a seeded random order, each with an output length uniform in `output_range`.

    `prompts` are prompt lengths, or prompts' token ids (kept in the requests for a real prefill).
    """
    low, high = output_range
    if not 1 <= low <= high:
        raise ValueError(f"output_range must be (low, high) with 1 <= low <= high, got {output_range}")
    rng = random.Random(seed)
    order = list(prompts)
    rng.shuffle(order)
    return [Request(p, rng.randint(low, high)) if isinstance(p, int) else Request(len(p), rng.randint(low, high), tuple(p))
            for p in order]


class ReservationPool:
    """Contiguous KV memory where every request reserves `reserve_tokens` token slots when admitted,
    as servers did before paging (the slots stay reserved until the request ends)."""

    def __init__(self, capacity_bytes: int, bytes_per_token: int, reserve_tokens: int):
        for name, value in (("capacity_bytes", capacity_bytes), ("bytes_per_token", bytes_per_token),
                            ("reserve_tokens", reserve_tokens)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.capacity_bytes, self.bytes_per_token = capacity_bytes, bytes_per_token
        self.reserve_tokens = reserve_tokens
        self.reserved_bytes = 0
        self.used_bytes = 0
        self.admitted = 0

    def admit(self, request: Request) -> bool:
        """Reserve a slot for `request` if one fits; False (nothing reserved) if not."""
        if request.total > self.reserve_tokens:
            raise ValueError(f"request of {request.total} tokens exceeds reserve_tokens={self.reserve_tokens}")
        size = self.reserve_tokens * self.bytes_per_token
        if self.reserved_bytes + size > self.capacity_bytes:
            return False
        self.reserved_bytes += size
        self.used_bytes += request.total * self.bytes_per_token
        self.admitted += 1
        return True


def _cycle(requests: list[Request]):
    if not requests:
        raise ValueError("requests must not be empty")
    return itertools.cycle(requests)


def admit_reserved(pool: ReservationPool, requests: list[Request]) -> Admission:
    """Admit requests in order, cycling through them, until the first that does not fit."""
    for r in _cycle(requests):
        if not pool.admit(r):
            break
    return Admission(pool.admitted, pool.reserved_bytes, pool.used_bytes)


def admit_paged(cache: PagedCache, requests: list[Request]) -> Admission:
    """Reserve each request's final length in `cache` (real blocks from its pool), cycling through
    the requests, until CacheFull."""
    for r in _cycle(requests):
        try:
            cache.reserve(r.total)
        except CacheFull:
            break
    stats = cache.stats()
    return Admission(cache.num_sequences, stats.allocated_bytes, stats.used_bytes)


def model_config(name: str):
    """The transformers config of a converted model, without loading its weights."""
    from transformers import AutoConfig

    from permkv.models import cache_dir, get_spec

    get_spec(name)
    folder: Path = cache_dir() / "models" / name
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; load the model once with permkv.models.load_model")
    return AutoConfig.from_pretrained(folder)
