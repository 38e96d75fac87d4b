"""How many requests fit in a fixed KV memory: contiguous max-length reservation vs paged blocks.

Both allocators really admit requests one by one, cycling through a request mix, until the next
one does not fit (so the count measures the memory, not the size of the mix):
`ReservationPool` is the pre-vLLM scheme (every request reserves `reserve_tokens` slots up front)
and `admit_paged` reserves each request's real length in a `PagedCache`'s block pool.
Request lengths come from the project's SQuAD / HotpotQA prompts at their natural length plus
seeded output lengths.

`admit_compressed` gives the compressed rows (KV-Compress's argument, ANCHORS.md s1: freed blocks
admit more sequences): each request gets its own `PagedCache` on one shared `BlockPool`; its prompt is
really prefilled (in chunks, so the pool only needs room for the compressed cache plus one chunk) and
compressed to 1/ratio, then the blocks for its output tokens are taken uncompressed, as a server must
before it decodes them.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from permkv.cache import BlockPool, CacheFull, PagedBatch, PagedCache, Segment, paged_attention, run
from permkv.compress import InferenceKVCacheCompression, chunked_prefill_and_compress
from permkv.data import Sample, encode_sample, load_hotpot, load_squad
from permkv.models import model_config, model_source


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


@torch.no_grad()
def admit_compressed(model, pool: BlockPool, requests: list[Request], ratio: float,
                     compression: InferenceKVCacheCompression | None = None, chunk_tokens: int = 256,
                     limit: int = 10_000, progress: bool = True) -> tuple[Admission, list[PagedCache]]:
    """Admit requests (with `prompt_ids`) into `pool` compressed to 1/ratio until one does not fit.

    Returns the admission (bytes as the pool holds them) and the admitted caches, which still hold
    their blocks (release them to reuse the pool). `limit` stops a runaway cycle.
    """
    if not requests or not all(r.prompt_ids for r in requests):
        raise ValueError("requests must be non-empty and carry prompt_ids (request_mix of token ids)")
    compression = compression or InferenceKVCacheCompression(scorer="kvcompress")  # bytes, not quality: the cheap scorer
    caches: list[PagedCache] = []
    used_tokens = 0
    bar = tqdm(desc=f"admit {ratio:g}x", disable=not progress)
    for r in itertools.islice(itertools.cycle(requests), limit):
        cache = PagedCache(pool, model.config)
        try:
            chunked_prefill_and_compress(model, list(r.prompt_ids), ratio, compression, chunk_tokens, cache=cache)
            zeros = torch.zeros(cache.n_kv_heads, r.output_tokens, pool.head_dim, dtype=pool.keys.dtype, device=pool.keys.device)
            for i in range(len(cache.layers)):  # the output tokens' slots, uncompressed
                cache.append(i, 0, zeros, zeros)
                cache.trim(i, 0)
        except CacheFull:
            cache.reset()
            break
        caches.append(cache)
        used_tokens += cache.stats().used_tokens
        bar.update()
    bar.close()
    return Admission(len(caches), pool.stats().allocated_bytes, used_tokens * pool.bytes_per_block // pool.block_size), caches


# ------------------------------------------------------------------------------------------- notebook 01


@dataclass(frozen=True)
class PagedAttentionConfig:
    """Parameters of notebook 01 (names match its parameters cell in lower case)."""

    model: str = "smollm2-135m"  # a bundled name, a saved folder or a GGUF file (permkv.models.load_model)
    n_prompts: int = 20  # prompts per task (SQuAD and HotpotQA)
    output_range: tuple[int, int] = (16, 512)  # output tokens per request, uniform
    pool_gib: float = 1.0  # KV memory for both allocators
    block_size: int = 16
    demo_prompts: int = 2  # requests that really generate through the paged cache
    demo_new_tokens: int = 8
    compress_ratios: tuple[float, ...] = (8, 64)  # compressed admission (1x is run the same way as reference)
    compress_pool_gib: float = 0.1  # KV memory for the compressed admission (each prompt is really prefilled)
    chunk_tokens: int = 256  # compressed admission prefills in chunks, compressing after each
    seed: int = 0

    def __post_init__(self):
        model_source(self.model)
        object.__setattr__(self, "output_range", tuple(self.output_range))
        object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
        if self.n_prompts < 1 or self.demo_prompts < 1:
            raise ValueError(f"n_prompts and demo_prompts must be >= 1, got {self.n_prompts}, {self.demo_prompts}")
        if self.pool_gib <= 0 or self.compress_pool_gib <= 0:
            raise ValueError(f"pool sizes must be > 0 GiB, got {self.pool_gib}, {self.compress_pool_gib}")
        if any(r < 1 for r in self.compress_ratios):
            raise ValueError(f"compress_ratios are x-times-smaller factors >= 1, got {self.compress_ratios}")


def request_mix_for(tokenizer, spec, cfg: PagedAttentionConfig) -> list[Request]:
    """The notebook's mix: `n_prompts` SQuAD + `n_prompts` HotpotQA prompts, seeded output lengths."""
    prompts = [p for task in ("squad", "hotpot") for p in natural_prompts(tokenizer, spec, task, cfg.n_prompts, cfg.seed)]
    return request_mix(prompts, cfg.output_range, cfg.seed)


def reservation_vs_paged(spec, requests: list[Request], cfg: PagedAttentionConfig) -> list[dict]:
    """Admission into `pool_gib` of KV memory: reserving the model's maximum context, reserving the
    longest request of the mix, and paged blocks. One row per allocator."""
    pool_bytes = int(cfg.pool_gib * 2**30)
    longest = max(r.total for r in requests)
    rows = []
    for label, reserve in (("reserve max context", spec.max_positions), ("reserve longest", longest)):
        got = admit_reserved(ReservationPool(pool_bytes, spec.kv_bytes_per_token, reserve), requests)
        rows.append(dict(allocator=label, reserve_tokens=reserve, admitted=got.admitted, waste_pct=got.waste_pct,
                         allocated_mib=got.allocated_bytes / 2**20, used_mib=got.used_bytes / 2**20))
    cache = PagedCache(BlockPool.from_bytes(pool_bytes, cfg.block_size, spec.head_dim), model_config(spec.name))
    got = admit_paged(cache, requests)
    rows.append(dict(allocator="paged", reserve_tokens=0, admitted=got.admitted, waste_pct=got.waste_pct,
                     allocated_mib=got.allocated_bytes / 2**20, used_mib=got.used_bytes / 2**20))
    return rows


def compressed_admission(model, spec, requests: list[Request], cfg: PagedAttentionConfig) -> list[dict]:
    """Requests admitted into `compress_pool_gib` with really compressed prompts, at 1x and every
    ratio; `gain` is admitted / admitted at 1x (the same code at 1x, so the ratio is like for like)."""
    rows = []
    for ratio in (1, *cfg.compress_ratios):
        pool = BlockPool.from_bytes(int(cfg.compress_pool_gib * 2**30), cfg.block_size, spec.head_dim, device=model.device)
        got, caches = admit_compressed(model, pool, requests, ratio, chunk_tokens=cfg.chunk_tokens)
        rows.append(dict(ratio=ratio, admitted=got.admitted, waste_pct=got.waste_pct,
                         allocated_mib=got.allocated_bytes / 2**20, used_mib=got.used_bytes / 2**20))
        for cache in caches:
            cache.reset()
    for row in rows:
        row["gain"] = row["admitted"] / max(rows[0]["admitted"], 1)
    return rows


@torch.no_grad()
def paged_demo(model, tokenizer, spec, cfg: PagedAttentionConfig) -> dict:
    """Real greedy generation of `demo_prompts` SQuAD prompts (one per article, so lengths differ) as one
    batch on one pool: the prompts packed into one forward, then one batched decode forward per token.
    The paged caches' waste vs a padded (batch, longest) tensor per table."""
    first_of_article: dict[str, dict] = {}
    for r in load_squad():
        first_of_article.setdefault(r["title"], r)
    ids = [sum(encode_sample(tokenizer, spec, Sample("squad", r["context"], r["question"], r["answers"]), "query_aware"), [])
           for r in list(first_of_article.values())[: cfg.demo_prompts]]
    pool = BlockPool.from_bytes(int(cfg.pool_gib * 2**30), cfg.block_size, spec.head_dim, device=model.device)
    caches = [PagedCache(pool, model.config) for _ in ids]
    for cache in caches:
        cache.ensure_batch(1)
    with paged_attention(model):
        batch = PagedBatch([Segment(c, 0, len(p)) for c, p in zip(caches, ids)])
        tokens = torch.tensor([t for p in ids for t in p], device=model.device)
        positions = torch.cat([torch.arange(len(p)) for p in ids]).to(model.device)
        nxt = run(model, batch, tokens, positions).argmax(-1)
        for _ in range(cfg.demo_new_tokens - 1):
            batch = PagedBatch([Segment(c, 0, 1) for c in caches])
            nxt = run(model, batch, nxt, torch.tensor([c.seen[0] for c in caches], device=model.device)).argmax(-1)
    stats = [c.stats() for c in caches]
    allocated = sum(s.allocated_blocks for s in stats)
    used = sum(s.used_tokens for s in stats)
    seen = [c.seen[0] for c in caches]
    slots = len(ids) * max(seen)  # a padded (batch, longest) tensor per table
    for cache in caches:
        cache.reset()
    return dict(tokens_seen=seen, paged_blocks=allocated,
                paged_waste_pct=100 * (allocated * cfg.block_size - used) / (allocated * cfg.block_size),
                padded_waste_pct=100 * (slots - sum(seen)) / slots)


def claim_metrics(admission: list[dict], compressed: list[dict], demo: dict, mean_request_tokens: float) -> dict[str, float]:
    """Ledger metrics of notebook 01 (permkv.harness.claims: paged.*, compress concurrency gains)."""
    by = {r["allocator"]: r for r in admission}
    metrics = {
        "claim.paged_waste_pct": by["paged"]["waste_pct"],
        "claim.concurrent_requests_1x": by["paged"]["admitted"],
        "claim.reservation_waste_pct": by["reserve max context"]["waste_pct"],
        "reservation_waste_pct.max_context": by["reserve max context"]["waste_pct"],
        "reservation_waste_pct.longest": by["reserve longest"]["waste_pct"],
        "concurrent_requests.reserve_max_context": by["reserve max context"]["admitted"],
        "concurrent_requests.reserve_longest": by["reserve longest"]["admitted"],
        "concurrent_requests.paged": by["paged"]["admitted"],
        "mean_request_tokens": mean_request_tokens,
        "demo_paged_waste_pct": demo["paged_waste_pct"],
        "demo_padded_waste_pct": demo["padded_waste_pct"],
    }
    for row in compressed:
        metrics[f"concurrent_requests.compressed_{row['ratio']:g}x"] = row["admitted"]
        if row["ratio"] in (8, 64):
            metrics[f"claim.concurrent_gain_{row['ratio']:g}x"] = row["gain"]
    return metrics
