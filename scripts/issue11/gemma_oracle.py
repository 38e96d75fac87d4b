"""Issue 11: why Gemma-3 loses the needle between 2x and 4x. Query-agnostic niah_single at 4K, per sample:
the full cache, an *oracle* cache (the needle's line up to its answer kept, the rest by recency, same budget per head) at 8x
and 32x, KVzip-style scores at 4x and 8x (uniform / global budgets, raw and max-pooled over 7 and 15 tokens, and
the same kept tokens in every global layer: each token's best percentile over the layers, `consensus`),
and how KVzip-style scores look on each global layer (median percentile of the needle line's tokens; share
of tokens some re-reading query gives > 0.5 of its attention). The oracle uses where the needle is: a
diagnosis, not a method. One JSON line per sample in <out>/oracle_<start>.jsonl; `--table` summarises.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/issue11/gemma_oracle.py --out reports/issue11/gemma_oracle --start 0 --stop 15
    PYTHONPATH=. python scripts/issue11/gemma_oracle.py --out reports/issue11/gemma_oracle --table
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from permkv.compress import InferenceKVCacheCompression, kvzip_scores, repeat_prompt_ids
from permkv.data import build_task, encode_sample
from permkv.eval import bootstrap_ci
from permkv.experiments.compression_quality import Full, answer_on_fork, prefill_once, score_text
from permkv.models import load_model
from scripts.issue11.sample_log import append, pending, run_or_table


def needle_tokens(tokenizer, prefix: list[int], answer: str) -> list[int]:
    """Indices of the prefix tokens from the start of the needle's line through its answer."""
    pieces = [tokenizer.decode([t]) for t in prefix]
    ends = np.cumsum([len(p) for p in pieces])
    text = "".join(pieces)
    at = text.find(answer)
    if at < 0:
        raise ValueError(f"answer {answer!r} not in the prompt")
    line = text.rfind("\n", 0, at)
    return [i for i, end in enumerate(ends) if end > line + 1 and end - len(pieces[i]) < at + len(answer)]


def pooled(scores: dict, kernel: int) -> dict:
    """Each token's score -> the max over `kernel` neighbouring tokens (a kept token keeps its neighbours)."""
    return {i: F.max_pool1d(s.view(-1, 1, s.shape[-1]), kernel, stride=1, padding=kernel // 2).view(s.shape)
            for i, s in scores.items()}


def consensus(scores: dict) -> dict:
    """Every layer gets the same scores: each token's highest percentile over the layers (a token that one
    layer ranks high is kept in all of them)."""
    ranks = torch.stack([s.argsort(-1).argsort(-1).float() / s.shape[-1] for s in scores.values()]).amax(0)
    return {i: ranks.clone() for i in scores}


def run(args) -> None:
    model, tok, spec = load_model("gemma3-270m")
    samples = build_task("niah_single", tok, spec, args.n, args.length, seed=0)
    path = Path(args.out) / f"oracle_{args.start}.jsonl"
    for i, s in pending(path, samples, args.start, args.stop):
        prefix, suffix = encode_sample(tok, spec, s, "query_agnostic")
        needle = needle_tokens(tok, prefix, s.answers[0])
        pre = prefill_once(model, prefix, suffix, 32)
        try:
            row = dict(sample=i, context_tokens=len(prefix), needle_tokens=len(needle))

            def answer(name, ratio, scores, allocator="uniform"):
                compressor = InferenceKVCacheCompression(allocator=allocator).compressor()
                text, _ = answer_on_fork(model, tok, pre, 32, lambda fork: compressor.compress(fork, ratio, scores=scores))
                row[name] = score_text(s, text)

            row["full"] = score_text(s, Full().answer(model, tok, pre, 1.0, 32)[0])
            kv = kvzip_scores(model, pre.cache, prefix, repeat_prompt_ids(tok, spec))
            recency = torch.linspace(0, 1e-3, len(prefix))  # ties (every other token) broken by recency
            oracle = {layer: (recency + torch.isin(torch.arange(len(prefix)), torch.tensor(needle)).float()).expand_as(v)
                      for layer, v in kv.items()}
            for r in (8, 32):
                answer(f"oracle_{r}x", r, oracle)
            variants = {"kvzip_max7": pooled(kv, 7), "kvzip_max15": pooled(kv, 15), "kvzip_consensus": consensus(kv),
                        "kvzip_consensus_max7": pooled(consensus(kv), 7)}  # scored once, answered at each ratio
            for r in (4, 8):
                answer(f"kvzip_uniform_{r}x", r, kv)
                answer(f"kvzip_global_{r}x", r, kv, "global")
                for name, scores in variants.items():
                    answer(f"{name}_uniform_{r}x", r, scores)
            for layer, v in kv.items():
                rank = v[0, 0].argsort().argsort().float() / len(prefix)
                row[f"needle_percentile_layer{layer}"] = float(rank[needle].median())
                row[f"share_above_half_layer{layer}"] = float((v[0, 0] > 0.5).float().mean())
        finally:
            pre.release()
        append(path, row)


def table(out: Path) -> str:
    rows = [json.loads(line) for p in sorted(out.glob("oracle_*.jsonl")) for line in p.open()]
    keys = [k for k in rows[0] if k not in ("sample", "context_tokens", "needle_tokens")]
    tokens = [r["context_tokens"] for r in rows]
    lines = [f"Gemma-3-270m, niah_single, {min(tokens):,}-{max(tokens):,}-token contexts, query-agnostic, n={len(rows)} "
             f"(samples {min(r['sample'] for r in rows)}-{max(r['sample'] for r in rows)}, seed 0); the ratio applies "
             "to the 3 global layers.", "", "| cell | mean | 95% CI |", "|---|---|---|"]
    for k in keys:
        v = [r[k] for r in rows]
        low, high = bootstrap_ci(v)
        lines.append(f"| {k} | {np.mean(v):.2f} | [{low:.2f}, {high:.2f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=30)
    run_or_table(ap, run, table)


if __name__ == "__main__":
    main()
