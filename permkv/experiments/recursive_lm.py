"""05_recursive_lm: a Recursive Language Model over compressed caches, against the plain model truncated
to its window and the official RLM client (`rlms`) driving the same model through `permkv serve`.

The seed's geometry, scaled: a 100K-token document read 4K tokens per call is 25 calls; a document
`doc_tokens` long read `context_chunk_size` tokens per call keeps the same 25:1 proportion
(16K / 640), and at ratio r one call reads chunk x r tokens into the same KV budget (8x: 4 calls).
Documents are Paul Graham essays with 7-digit needles (single needle; four needles of which one is
asked, so that pieces hold wrong candidates and the aggregation step matters).

How a compressed call chooses the tokens it keeps (`SCORINGS`): "kvzip" re-reads each chunk after
reading it (KVzip-style, query-agnostic, one global top-k), "attention" scores with the last 64
queries of each chunk (KV-Compress's score, the same budget per head). The first scoring is the
headline `permkv_rlm`; the others are `permkv_rlm_<scoring>` at the ratios > 1 (ratio 1 keeps all).
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from permkv.checks import positive_int
from permkv.compress import InferenceKVCacheCompression
from permkv.data import Sample, load_essays
from permkv.data.tasks import KEY_WORDS, NEEDLE, NEEDLE_QUESTION
from permkv.eval import TASK_METRIC, bootstrap_ci, first_line
from permkv.models import encode_prompt, model_source
from permkv.rlm import READ, RecursiveLanguageModel, RLMBudgetExceeded, sentences
from permkv.serve import SequentialBackend, create_app, running

TASKS = ("niah_single", "niah_multikey")
SCORINGS = {"kvzip": "kvzip", "attention": "kvcompress"}  # scoring -> the compression's scorer


@dataclass
class RecursiveLMConfig:
    model: str = "smollm2-135m"  # a bundled name, a saved folder or a GGUF file (permkv.models.load_model)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # needle tasks (see module docstring)
    doc_tokens: int = 16000  # document length in tokens (essay tokens; needles add ~20 each)
    context_chunk_size: int = 640  # context tokens one call holds in KV: the seed's 4K, scaled to keep 25 calls at 1x
    ratios: list[float] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # KV compression ratios of the RLM
    scorings: list[str] = field(default_factory=lambda: ["kvzip", "attention"])  # see SCORINGS; the first is the headline
    n_docs: int = 30  # documents per task (each read at every ratio: paired)
    n_needles: int = 4  # needles in a niah_multikey document
    max_new_tokens: int = 24  # answer tokens per call (the needle answer sentence is ~20)
    max_depth: int = 3  # levels of the scripted RLM
    chunk_tokens: int = 256  # chunk of the compressed prefill
    truncated: bool = True  # also run the plain model on the document cut to its window
    official_docs: int = 2  # documents per task for the official rlms client (0: skip it)
    official_iterations: int = 3  # rlms max_iterations (root turns)
    official_max_tokens: int = 256  # tokens per rlms call
    official_timeout_s: float = 600.0  # rlms max_timeout per document
    threads: int = 1  # torch CPU threads (the machine is shared)
    seed: int = 0

    def __post_init__(self):
        model_source(self.model)
        if not self.scorings or any(s not in SCORINGS for s in self.scorings) or len(set(self.scorings)) < len(self.scorings):
            raise ValueError(f"scorings must be a non-empty list of distinct names from {list(SCORINGS)}, got {self.scorings!r}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list from {TASKS}, got {self.tasks!r}")
        if not self.ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be a non-empty list of numbers >= 1, got {self.ratios!r}")
        for name in ("doc_tokens", "context_chunk_size", "n_docs", "n_needles", "max_new_tokens", "max_depth",
                     "chunk_tokens", "official_iterations", "official_max_tokens"):
            positive_int(name, getattr(self, name))
        if self.doc_tokens < 2 * self.context_chunk_size:
            raise ValueError(f"doc_tokens must be >= 2 x context_chunk_size ({2 * self.context_chunk_size}) so that "
                             f"the RLM has pieces to read, got {self.doc_tokens}")
        if not isinstance(self.official_docs, int) or self.official_docs < 0:
            raise ValueError(f"official_docs must be an int >= 0, got {self.official_docs!r}")


# --------------------------------------------------------------------------------------------- documents

@functools.cache
def _essay_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer(load_essays(), add_special_tokens=False).input_ids)


def _insert(text: str, needles: list[str], depths: list[float]) -> str:
    """Insert each needle after the sentence that ends nearest its depth (fraction of the text)."""
    spans = sentences(text)
    ends = np.cumsum([len(s) for s in spans]) / max(len(text), 1)
    out = list(spans)
    for needle, depth in sorted(zip(needles, depths), key=lambda x: -x[1]):  # back to front keeps indices
        i = int(np.argmin(np.abs(ends - depth)))
        out.insert(i + 1, needle + " ")
    return "".join(out)


def build_documents(tokenizer, task: str, n: int, doc_tokens: int, seed: int = 0, n_needles: int = 4) -> list[Sample]:
    """`n` seeded documents of about `doc_tokens` essay tokens with 7-digit needles.

    niah_single: one needle, asked. niah_multikey: `n_needles` needles under different keys, one asked.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    ids = _essay_ids(tokenizer)
    if doc_tokens >= len(ids):
        raise ValueError(f"doc_tokens={doc_tokens} is longer than the essays ({len(ids)} tokens)")
    rng = random.Random(f"rlm-{task}-{seed}-{doc_tokens}")
    docs = []
    for _ in range(n):
        start = rng.randrange(0, len(ids) - doc_tokens)
        hay = tokenizer.decode(list(ids[start : start + doc_tokens])).strip()
        count = 1 if task == "niah_single" else n_needles
        keys: list[str] = []
        while len(keys) < count:
            key = f"{rng.choice(KEY_WORDS)}-{rng.choice(KEY_WORDS)}"
            if key not in keys:
                keys.append(key)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        depths = [rng.random() for _ in keys]
        target = rng.randrange(count)
        context = _insert(hay, [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)], depths)
        docs.append(Sample(task, context, NEEDLE_QUESTION.format(key=keys[target]), [values[target]],
                           dict(depth=depths[target], keys=keys, values=values)))
    return docs


def score(sample: Sample, answer: str) -> float:
    return TASK_METRIC[sample.task](first_line(answer or ""), sample.answers)


# --------------------------------------------------------------------------------------------- methods

def run_rlm(backend, docs: Sequence[Sample], ratios: Sequence[float], cfg: RecursiveLMConfig,
            method: str = "permkv_rlm") -> list[dict]:
    """permkv's scripted RLM on every document at every ratio (paired: same documents); rows named `method`."""
    rows = []
    for i, doc in enumerate(tqdm(docs, desc=method, leave=False)):
        for ratio in ratios:
            rlm = RecursiveLanguageModel(backend, max_depth=cfg.max_depth, context_chunk_size=cfg.context_chunk_size,
                                         kv_cache_compression_ratio=ratio, max_new_tokens=cfg.max_new_tokens)
            try:
                res = rlm.completion(doc.question, doc.context)
                trace = [dict(level=c.level, role=c.role, prompt_tokens=c.prompt_tokens, call_ratio=c.ratio,
                              kv_tokens=round(c.kv_tokens), kv_bytes=c.kv_bytes, seconds=round(c.seconds, 2),
                              answer=c.answer) for c in res.calls]
                rows.append(dict(method=method, ratio=float(ratio), task=doc.task, doc=i,
                                 score=score(doc, res.answer), answer=res.answer, error=None, **res.stats(), trace=trace))
            except RLMBudgetExceeded as err:
                rows.append(dict(method=method, ratio=float(ratio), task=doc.task, doc=i, score=0.0,
                                 answer="", error=str(err)))
    return rows


def truncate_middle(ids: list[int], keep: int) -> list[int]:
    """The first and last keep/2 tokens (LongBench's truncation), or `ids` if they fit."""
    if len(ids) <= keep:
        return ids
    return ids[: keep // 2] + ids[len(ids) - (keep - keep // 2) :]


def run_truncated(backend, docs: Sequence[Sample], cfg: RecursiveLMConfig) -> list[dict]:
    """The plain model, one call, the document cut in the middle to fit the model's window."""
    tok, spec = backend.tokenizer, backend.spec
    rows = []
    for i, doc in enumerate(tqdm(docs, desc="truncated", leave=False)):
        overhead = len(encode_prompt(tok, spec, READ.format(context="", query=doc.question)))
        ids = tok(doc.context, add_special_tokens=False).input_ids
        keep = spec.max_positions - overhead - cfg.max_new_tokens - 16
        text = tok.decode(truncate_middle(ids, keep))
        t0 = time.perf_counter()
        gen = backend.generate(encode_prompt(tok, spec, READ.format(context=text, query=doc.question)), cfg.max_new_tokens)
        answer = tok.decode(gen.tokens, skip_special_tokens=True)
        rows.append(dict(method="truncated", ratio=1.0, task=doc.task, doc=i, score=score(doc, answer), answer=answer,
                         error=None, calls=1, read_calls=1, depth_reached=1, tokens_read=gen.prompt_tokens,
                         context_tokens=len(ids), max_kv_tokens=gen.kv_tokens, achieved_ratio=1.0,
                         peak_kv_bytes=gen.kv_pool_bytes, wall_s=time.perf_counter() - t0))
    return rows


def run_official(backend, docs: Sequence[Sample], cfg: RecursiveLMConfig) -> list[dict]:
    """The official RLM client (`rlms`, alexzhang13/rlm) through `permkv serve` on the same model:
    the root sees only the query and metadata of `context` and must write ```repl``` code."""
    from rlm import RLM

    rows = []
    with running(create_app(backend, ratio=1.0)) as url:
        for i, doc in enumerate(tqdm(docs, desc="official rlms", leave=False)):
            client = RLM(backend="openai", backend_kwargs=dict(model_name=backend.name, base_url=url, api_key="permkv"),
                         environment="local", max_depth=1, max_iterations=cfg.official_iterations,
                         max_timeout=cfg.official_timeout_s, sampling_args=dict(max_tokens=cfg.official_max_tokens))
            t0 = time.perf_counter()
            try:
                out = client.completion(doc.context, root_prompt=doc.question)
                usage = out.usage_summary.model_usage_summaries.get(backend.name)
                answer, error = str(out.response), None
                calls = usage.total_calls if usage else 0
                tokens = usage.total_input_tokens if usage else 0
            except Exception as err:  # the client's own limits and the server's 4xx end a run: a result
                answer, error, calls, tokens = "", f"{type(err).__name__}: {str(err)[:300]}", math.nan, math.nan
            rows.append(dict(method="official_rlm", ratio=1.0, task=doc.task, doc=i, score=score(doc, answer),
                             answer=answer[:500], error=error, calls=calls, tokens_read=tokens,
                             wall_s=time.perf_counter() - t0))
    return rows


def run_grid(model, tokenizer, spec, cfg: RecursiveLMConfig) -> list[dict]:
    """Every method on the same documents: the RLM at each ratio and scoring, the truncated model, the
    official client."""
    backends = {name: SequentialBackend(model, tokenizer, spec, chunk_tokens=cfg.chunk_tokens,
                                        compression=InferenceKVCacheCompression(SCORINGS[name]))
                for name in cfg.scorings}
    backend = backends[cfg.scorings[0]]
    rows = []
    for task in cfg.tasks:
        docs = build_documents(tokenizer, task, cfg.n_docs, cfg.doc_tokens, cfg.seed, cfg.n_needles)
        rows += run_rlm(backend, docs, cfg.ratios, cfg)
        for name in cfg.scorings[1:]:
            rows += run_rlm(backends[name], docs, [r for r in cfg.ratios if r > 1], cfg, f"permkv_rlm_{name}")
        if cfg.truncated:
            rows += run_truncated(backend, docs, cfg)
        if cfg.official_docs:
            rows += run_official(backend, docs[: cfg.official_docs], cfg)
    return rows


# --------------------------------------------------------------------------------------------- summaries

def summarize(rows: Sequence[dict]) -> list[dict]:
    """One row per (method, ratio, task) and per (method, ratio) over all tasks: score with 95% CI, n,
    mean calls, read calls, tokens read, wall time, peak KV bytes."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["ratio"], r["task"]), []).append(r)
        groups.setdefault((r["method"], r["ratio"], "all"), []).append(r)
    out = []
    for (method, ratio, task), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        scores = [r["score"] for r in rs]
        low, high = bootstrap_ci(scores)

        def mean(key):
            values = [r[key] for r in rs if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
            return float(np.mean(values)) if values else math.nan

        out.append(dict(method=method, ratio=ratio, task=task, score=float(np.mean(scores)), ci_low=low, ci_high=high,
                        n=len(rs), errors=sum(r.get("error") is not None for r in rs), calls=mean("calls"),
                        read_calls=mean("read_calls"), depth=mean("depth_reached"), tokens_read=mean("tokens_read"),
                        wall_s=mean("wall_s"), peak_kv_bytes=mean("peak_kv_bytes"), achieved_ratio=mean("achieved_ratio")))
    return out


def claim_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Ledger metrics: read calls at 8x and 1x, and the 8x RLM's score over the 1x RLM's on the same
    documents (retention; NaN when the 1x score is 0), plus per-ratio and per-method summaries."""
    table = summarize(rows)
    pooled = {(t["method"], t["ratio"]): t for t in table if t["task"] == "all"}
    metrics: dict[str, float] = {}
    for (method, ratio), t in pooled.items():
        tag = f"{method}.{ratio:g}x"
        for key in ("score", "ci_low", "ci_high", "n", "calls", "read_calls", "tokens_read", "wall_s", "peak_kv_bytes"):
            metrics[f"{tag}.{key}"] = t[key]
    rlm = pooled.get(("permkv_rlm", 1.0)), pooled.get(("permkv_rlm", 8.0))
    if rlm[0] and rlm[1]:
        one = {(r["task"], r["doc"]): r["score"] for r in rows if r["method"] == "permkv_rlm" and r["ratio"] == 1.0}
        eight = {(r["task"], r["doc"]): r["score"] for r in rows if r["method"] == "permkv_rlm" and r["ratio"] == 8.0}
        both = sorted(set(one) & set(eight))
        base = float(np.mean([one[k] for k in both])) if both else math.nan
        metrics["claim.rlm_read_calls_1x"] = rlm[0]["read_calls"]
        metrics["claim.rlm_read_calls_8x"] = rlm[1]["read_calls"]
        metrics["claim.rlm_quality_retention_8x"] = (float(np.mean([eight[k] for k in both])) / base) if base else math.nan
    return metrics
