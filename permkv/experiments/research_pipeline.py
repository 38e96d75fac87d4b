"""08_research_pipeline: a three-module research pipeline whose every module reads the same corpus, at the
same KV budget per module: the corpus cut to the budget, recompressed by each module, or compressed once
and forked by every module.

The seed's setting: a "deep research agent" whose modules 1, 2, 3 each take 8K tokens of input, so a 64K
corpus is truncated between modules; with 8x compression each module holds the 64K corpus in the same
8K of KV. Scaled to the model: the corpus is `corpus_tokens` long and each module's budget for it is
`corpus_tokens / ratio` KV tokens per head.

Per question (a corpus of essay filler with a 7-digit needle; or several needles, one asked: SmolLM2 then
confuses their keys even on the full corpus; or HotpotQA's gold paragraphs among distractors), three
scripted modules:
  1. plan: name the key terms of the question (what to look for);
  2. search: quote the corpus's sentence that answers the question, given the plan (its notes);
  3. answer: the final short answer, given the question, the notes and the corpus.
Every module's prompt is the corpus (a prefix common to all three) followed by its own text.

Arms, at the same KV budget for the corpus in every module:
  - truncated: the corpus cut in the middle to the budget (LongBench's cut); one prefix cache of the cut
    corpus forked by the modules (the cheapest truncated pipeline);
  - recompressed: each module reads the whole corpus and compresses it to the budget itself (KVzip-style
    re-reading, one global top-k: one prefill and one re-read per module);
  - shared: ONE `ContextCache` of the corpus at the ratio, forked by every module (one prefill and one
    re-read for the whole pipeline). Same compression as recompressed, so the same answers, token for
    token (checked on every question: `same_as_shared`);
  - full: the whole corpus uncompressed, one prefix cache forked by the modules (the reference).

Measured per arm and question: the final answer's score (the task's metric: the gold needle or answer
contained in the first line), prompt tokens the model computed (prefill, re-reading and each module's
own prompt; counted at the input embedding), decode tokens, KV bytes each module's sequence holds
(corpus and its own tokens), wall and CPU seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from permkv.cache import forward, paged_attention
from permkv.checks import check_ratio, positive_int
from permkv.compress import ContextCache, InferenceKVCacheCompression, repeat_prompt_ids
from permkv.compress.context import context_report
from permkv.compress.forks import paged_cache_for
from permkv.compress.prefill import chunked_prefill_and_compress, prefill_and_compress
from permkv.data import Sample, build_task
from permkv.eval import TASK_METRIC, bootstrap_ci, bootstrap_ratio_ci, first_line, greedy_decode, stop_ids
from permkv.eval.stats import retention_ci
from permkv.experiments.recursive_lm import truncate_middle
from permkv.models import encode_prompt, model_source

ARMS = ("truncated", "recompressed", "shared", "full")
TASKS = ("niah_multikey", "niah_single", "hotpot")
MODULES = ("plan", "search", "answer")

INTRO = "Read the documents below. Questions about them follow.\n\n"
AFTER = "\n\n"  # ends the corpus part of the prompt (the prefix every module shares)
PROMPTS = {  # the question comes last in each module, so that a module answers it rather than copy the last one
    "plan": "Question: {question}\nWhich words of the question name what to look for in the documents? List "
            "them, separated by commas.\nKey terms:",
    "search": "Key terms: {plan}\nQuestion: {question}\nQuote the sentence of the documents above that answers "
              "the question.\nQuote:",
    "answer": "Notes from the search: {notes}\nQuestion: {question}\nUsing the documents and the notes, answer the "
              "question in one short sentence.\nAnswer:",
}


@dataclass
class PipelineConfig:
    model: str = "smollm2-135m"  # a bundled name, a saved folder or a GGUF file (permkv.models.load_model)
    task: str = "niah_single"  # corpus builder (TASKS): needles in essays, or HotpotQA among distractors
    n_questions: int = 30  # questions, each with its own corpus (every arm answers the same ones: paired)
    corpus_tokens: int = 6000  # corpus length in tokens (the task builder's target)
    ratio: float = 8.0  # corpus tokens / KV budget per module: the budget is corpus_tokens / ratio
    n_needles: int = 4  # needles per corpus in niah_multikey (one is asked; SmolLM2 confuses their keys)
    max_new_tokens: int = 48  # tokens each module may write (SmolLM2's needle sentence is 25-35: digits are tokens)
    arms: list[str] = field(default_factory=lambda: list(ARMS))  # see ARMS
    chunk_tokens: int = 0  # read the corpus this many tokens at a time (compressing after each); 0: one pass
    threads: int = 1  # torch CPU threads (the machine is shared); 0: leave torch's default
    seed: int = 0

    def __post_init__(self):
        model_source(self.model)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.arms or any(a not in ARMS for a in self.arms) or len(set(self.arms)) < len(self.arms):
            raise ValueError(f"arms must be a non-empty list of distinct names from {list(ARMS)}, got {self.arms!r}")
        check_ratio(self.ratio)
        for name in ("n_questions", "corpus_tokens", "n_needles", "max_new_tokens"):
            positive_int(name, getattr(self, name))
        if self.corpus_tokens < 64 * self.ratio:
            raise ValueError(f"corpus_tokens must be >= 64 x ratio ({math.ceil(64 * self.ratio)}) so that the "
                             f"budget holds 64 tokens or more, got {self.corpus_tokens}")
        positive_int("chunk_tokens", self.chunk_tokens, minimum=0)
        positive_int("threads", self.threads, minimum=0)

    @property
    def budget(self) -> int:
        """The nominal KV budget per module for the corpus, in tokens per KV head."""
        return module_budget(self.corpus_tokens, self.ratio)


# --------------------------------------------------------------------------------------------- budget

def module_budget(prefix_tokens: int, ratio: float) -> int:
    """KV tokens per head a prefix of `prefix_tokens` keeps at `ratio` (what a compressed module holds)."""
    return max(1, round(prefix_tokens / check_ratio(ratio)))


def truncation_keep(prefix_tokens: int, overhead: int, ratio: float) -> int:
    """Corpus tokens the truncated arm keeps so that its prefix (the `overhead` tokens around the corpus
    plus the kept corpus) takes the compressed prefix's budget."""
    keep = module_budget(prefix_tokens, ratio) - overhead
    if keep < 1:
        raise ValueError(f"a budget of {module_budget(prefix_tokens, ratio)} tokens leaves no room for the corpus "
                         f"after {overhead} prompt tokens")
    return keep


# --------------------------------------------------------------------------------------------- corpora

def build_corpora(tokenizer, spec, cfg: PipelineConfig) -> list[Sample]:
    """`cfg.n_questions` seeded corpora of about `cfg.corpus_tokens` tokens, each with its question and gold
    answers, from the task builders (`permkv.data.build_task`)."""
    extra = dict(n_needles=cfg.n_needles) if cfg.task == "niah_multikey" else {}
    return build_task(cfg.task, tokenizer, spec, cfg.n_questions, cfg.corpus_tokens, cfg.seed,
                      max_new_tokens=3 * cfg.max_new_tokens + 200, **extra)


def _chat_frame(tokenizer, spec) -> tuple[list[int], list[int]]:
    """The prompt ids before and after a user message (the chat template's head and tail; plain text: none)."""
    a, b = encode_prompt(tokenizer, spec, "alpha"), encode_prompt(tokenizer, spec, "beta gamma")
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return a[:head], a[len(a) - tail :]


@dataclass
class Prompts:
    """One question's prompt pieces as ids: `head` + corpus + `after` is the prefix every module shares;
    a module's own ids follow (`module_ids`)."""

    head: list[int]
    corpus: list[int]
    after: list[int]
    tail: list[int]

    @property
    def prefix(self) -> list[int]:
        return self.head + self.corpus + self.after

    @property
    def overhead(self) -> int:
        return len(self.head) + len(self.after)

    def truncated(self, keep: int) -> list[int]:
        return self.head + truncate_middle(self.corpus, keep) + self.after


def prompts_for(tokenizer, spec, sample: Sample) -> Prompts:
    frame_head, tail = _chat_frame(tokenizer, spec)
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    return Prompts(frame_head + enc(INTRO), enc(sample.context), enc(AFTER), tail)


def module_ids(tokenizer, prompts: Prompts, module: str, question: str, plan: str = "", notes: str = "") -> list[int]:
    """A module's own ids after the shared prefix: its scripted text and the chat template's tail."""
    text = PROMPTS[module].format(question=question, plan=plan, notes=notes)
    return tokenizer(text, add_special_tokens=False).input_ids + prompts.tail


def score(sample: Sample, answer: str) -> float:
    return TASK_METRIC[sample.task](first_line(answer or ""), sample.answers)


# --------------------------------------------------------------------------------------------- counting

class TokenCounter:
    """Tokens the model computes: every id that enters its input embedding (prefill, re-reading, decode)."""

    def __init__(self, model):
        self.total = 0
        self._handle = model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.total += int(args[0].numel())

    def close(self):
        self._handle.remove()


@contextmanager
def counting(model):
    counter = TokenCounter(model)
    try:
        yield counter
    finally:
        counter.close()


# --------------------------------------------------------------------------------------------- the pipeline

COMPRESSION = dict(allocator="global")  # KVzip-style re-reading, one global top-k (ContextCache's default)


def prefix_cache(model, ids: Sequence[int], chunk_tokens: int = 0, extra_tokens: int = 1024) -> ContextCache:
    """An uncompressed ContextCache of `ids` (ratio 1: a prefix cache), read `chunk_tokens` at a time (0: at once)."""
    cache = paged_cache_for(model, len(ids) + extra_tokens)
    cache.ensure_batch(1)
    step = chunk_tokens or len(ids)
    with torch.no_grad(), paged_attention(model):
        for start in range(0, len(ids), step):
            chunk = list(ids[start : start + step])
            pos = torch.arange(start, start + len(chunk), device=model.device)[None]
            logits = forward(model, cache, torch.tensor([chunk], device=model.device), pos)[0, -1]
    return ContextCache(cache, ids, logits, 1.0)


def compressed_cache(model, ids: Sequence[int], ratio: float, reread: Sequence[int], chunk_tokens: int = 0,
                     extra_tokens: int = 1024):
    """The corpus read and compressed on its own (the recompressed arm: what one module does by itself):
    (cache, logits after the prefix)."""
    compression = InferenceKVCacheCompression(**COMPRESSION)
    if chunk_tokens and chunk_tokens < len(ids):
        cache, logits, _ = chunked_prefill_and_compress(model, list(ids), ratio, compression, chunk_tokens,
                                                        extra_tokens=extra_tokens, reread=reread)
    else:
        cache, logits, _ = prefill_and_compress(model, list(ids), ratio, compression, extra_tokens=extra_tokens,
                                                reread=reread)
    return cache, logits


def run_module(model, cache, logits, start: int, ids: Sequence[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """One module on a one-sequence cache holding the prefix (`start` positions): its ids, then greedy decoding."""
    return greedy_decode(model, cache, logits, start=start, max_new_tokens=max_new_tokens, stop=stop, suffix=list(ids))


def run_pipeline(model, tokenizer, sample: Sample, prompts: Prompts, arm: str, cfg: PipelineConfig, reread, stop) -> dict:
    """The three modules on one question in one arm; a row with the final answer's score, the tokens
    computed, the KV bytes per module and the seconds it took, and each module's tokens."""
    prefix_tokens = len(prompts.prefix)
    keep = truncation_keep(prefix_tokens, prompts.overhead, cfg.ratio)
    chunk = cfg.chunk_tokens
    t0, c0 = time.perf_counter(), time.process_time()
    outputs, module_kv, context_kv, kept = [], [], [], []
    plan = notes = ""
    with counting(model) as counter:
        ctx = None
        if arm == "shared":
            ctx = ContextCache.build(model, prompts.prefix, cfg.ratio, reread, chunk_tokens=chunk or None,
                                     compression=InferenceKVCacheCompression(**COMPRESSION))
        elif arm == "full":
            ctx = prefix_cache(model, prompts.prefix, chunk)
        elif arm == "truncated":
            ctx = prefix_cache(model, prompts.truncated(keep), chunk)
        context_computed = counter.total
        module_prompt = 0
        for module in MODULES:
            ids = module_ids(tokenizer, prompts, module, sample.question, plan, notes)
            module_prompt += len(ids)
            if ctx is None:  # recompressed: this module reads and compresses the corpus itself
                before = counter.total
                cache, logits = compressed_cache(model, prompts.prefix, cfg.ratio, reread, chunk)
                context_computed += counter.total - before
                start = len(prompts.prefix)
            else:
                cache, logits, start = ctx.fork(), ctx.logits, ctx.seen
            report = context_report(cache)
            context_kv.append(report.bytes)
            kept.append(report.kept)
            out = run_module(model, cache, logits, start, ids, cfg.max_new_tokens, stop)
            module_kv.append(context_report(cache).bytes)
            cache.reset()
            text = tokenizer.decode(out, skip_special_tokens=True)
            outputs.append(out)
            if module == "plan":
                plan = first_line(text).split("\n")[0].strip() or sample.question
            elif module == "search":
                notes = first_line(text).split("\n")[0].strip()
        if ctx is not None:
            ctx.release()
        computed = counter.total
    answer = tokenizer.decode(outputs[-1], skip_special_tokens=True)
    return dict(arm=arm, question=None, task=sample.task, score=score(sample, answer),
                notes_score=score(sample, notes), answer=answer, plan=plan, notes=notes, gold=sample.answers[0],
                prefix_tokens=prefix_tokens, budget=module_budget(prefix_tokens, cfg.ratio),
                kept_tokens=float(np.mean(kept)), context_prompt_tokens=context_computed,
                module_prompt_tokens=module_prompt, prompt_tokens=context_computed + module_prompt,
                tokens_computed=computed, decode_tokens=computed - context_computed - module_prompt,
                context_kv_bytes=float(np.mean(context_kv)), kv_bytes=max(module_kv),
                wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, tokens=outputs)


def check_positions(spec, prompts: Prompts, cfg: PipelineConfig) -> None:
    """Compression saves KV, not positions: the corpus and the modules must fit the model's window."""
    need = len(prompts.prefix) + 3 * cfg.max_new_tokens + 160 + len(prompts.tail)
    if need > spec.max_positions:
        raise ValueError(f"a {len(prompts.prefix)}-token corpus and its modules need ~{need} positions, more than "
                         f"{spec.name}'s {spec.max_positions}")


def run_grid(model, tokenizer, spec, cfg: PipelineConfig, progress: bool = True) -> list[dict]:
    """Every arm on every question (paired). Recompressed rows record whether every module's tokens are
    the shared arm's (`same_as_shared`; None when shared did not run)."""
    samples = build_corpora(tokenizer, spec, cfg)
    reread, stop = repeat_prompt_ids(tokenizer, spec), stop_ids(model, tokenizer)
    rows = []
    for i, sample in enumerate(tqdm(samples, desc="questions", disable=not progress, leave=False)):
        prompts = prompts_for(tokenizer, spec, sample)
        check_positions(spec, prompts, cfg)
        got = {}
        for arm in cfg.arms:
            row = run_pipeline(model, tokenizer, sample, prompts, arm, cfg, reread, stop)
            row["question"] = i
            got[arm] = row
        if "recompressed" in got:
            got["recompressed"]["same_as_shared"] = (got["recompressed"]["tokens"] == got["shared"]["tokens"]
                                                     if "shared" in got else None)
        rows += got.values()
    return rows


# --------------------------------------------------------------------------------------------- summaries

NUMERIC = ("score", "notes_score", "prompt_tokens", "context_prompt_tokens", "tokens_computed", "decode_tokens",
           "kept_tokens", "context_kv_bytes", "kv_bytes", "wall_s", "cpu_s")


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One row per arm: mean score with a 95% bootstrap CI, n, and the means of the costs."""
    out = []
    for arm in [a for a in ARMS if any(r["arm"] == a for r in rows)]:
        rs = [r for r in rows if r["arm"] == arm]
        scores = [r["score"] for r in rs]
        low, high = bootstrap_ci(scores)
        row = dict(arm=arm, n=len(rs), ci_low=low, ci_high=high)
        row.update({k: float(np.mean([r[k] for r in rs])) for k in NUMERIC})
        out.append(row)
    return out


def _by_question(rows, arm, key):
    return {r["question"]: r[key] for r in rows if r["arm"] == arm}


def paired(rows: Sequence[dict], a: str, b: str, key: str = "score") -> dict:
    """Mean of `a` - `b` over the questions both answered, with its 95% bootstrap CI (NaN without pairs)."""
    x, y = _by_question(rows, a, key), _by_question(rows, b, key)
    common = sorted(set(x) & set(y))
    if not common:
        return dict(diff=math.nan, low=math.nan, high=math.nan, n=0)
    d = [x[q] - y[q] for q in common]
    low, high = bootstrap_ci(d)
    return dict(diff=float(np.mean(d)), low=low, high=high, n=len(d))


def claim_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Ledger metrics, each on the questions both arms answered:
    - claim.pipeline_shared_vs_truncated (.low, .high, .n): shared - truncated score, paired bootstrap CI;
    - claim.pipeline_shared_retention (.low, .high): shared score / full score (NaN when full scores 0);
    - claim.pipeline_prefill_saving (.low, .high): prompt tokens computed by recompressed / by shared;
    plus per-arm means (`<arm>.<key>`) and the share of questions where recompressed gave shared's tokens."""
    metrics: dict[str, float] = {}
    for t in summarize(rows):
        for key in ("score", "ci_low", "ci_high", "n") + NUMERIC[1:]:
            metrics[f"{t['arm']}.{key}"] = t[key]
    arms = {r["arm"] for r in rows}
    if {"shared", "truncated"} <= arms:
        d = paired(rows, "shared", "truncated")
        metrics["claim.pipeline_shared_vs_truncated"] = d["diff"]
        metrics["claim.pipeline_shared_vs_truncated.low"] = d["low"]
        metrics["claim.pipeline_shared_vs_truncated.high"] = d["high"]
        metrics["claim.pipeline_shared_vs_truncated.n"] = d["n"]
    if {"shared", "full"} <= arms:
        s, f = _by_question(rows, "shared", "score"), _by_question(rows, "full", "score")
        common = sorted(set(s) & set(f))
        kept, low, high = retention_ci([s[q] for q in common], [f[q] for q in common]) if common else (math.nan,) * 3
        metrics["claim.pipeline_shared_retention"] = kept
        metrics["claim.pipeline_shared_retention.low"] = low
        metrics["claim.pipeline_shared_retention.high"] = high
    if {"shared", "recompressed"} <= arms:
        r, s = _by_question(rows, "recompressed", "prompt_tokens"), _by_question(rows, "shared", "prompt_tokens")
        common = sorted(set(r) & set(s))
        num, den = [r[q] for q in common], [s[q] for q in common]
        metrics["claim.pipeline_prefill_saving"] = sum(num) / sum(den) if common else math.nan
        if common:
            metrics["claim.pipeline_prefill_saving.low"], metrics["claim.pipeline_prefill_saving.high"] = \
                bootstrap_ratio_ci(num, den)
        same = [row["same_as_shared"] for row in rows if row["arm"] == "recompressed" and row.get("same_as_shared") is not None]
        metrics["pipeline.recompressed_same_as_shared"] = float(np.mean(same)) if same else math.nan
    return metrics
