"""`python -m permkv.bench speculate`: notebook 04's measurement from the command line: plain greedy, HF's
prompt lookup, permkv's prompt lookup and suffix trees side by side on each workload (defaults: the
cpu profile's 30 prompts, 128 new tokens, median of 3), speedups with bootstrap CIs, output identity
checked; JSON to reports/bench/speculate.json. `--batches 1,4,16` adds the verify cost at those batch
sizes (does speculation pay inside a batched decode step?); `--cost-only` stops after the costs."""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from permkv.experiments.speculative_decoding import (
    WORKLOADS,
    SpeculationConfig,
    compare,
    replay_table,
    speedup_table,
    summarize_replays,
    workload_texts,
)
from permkv.models import load_model
from permkv.speculate import VerifyCost

BATCH_SIZES = (1, 2, 4, 8, 16)  # tokens fed per sequence in the batched verify-cost measurement


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m permkv.bench speculate")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=30, help="prompts per workload (a verdict needs >= 30)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="greedy,hf_lookup,lookup,suffix")
    ap.add_argument("--k", type=int, default=10, help="draft length of HF's and permkv's prompt lookup")
    ap.add_argument("--max-ngram", type=int, default=3, help="longest suffix matched by both")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="", help="also measure the verify cost at these batch sizes, e.g. 1,4,16")
    ap.add_argument("--cost-only", action="store_true", help="measure the verify cost(s) only, no workloads")
    ap.add_argument("--out", default="reports/bench/speculate.json")
    args = ap.parse_args(argv)
    cfg = SpeculationConfig(model=args.model, workloads=args.workloads.split(","), n_prompts=args.prompts,
                            max_new_tokens=args.max_new_tokens, repeats=args.repeats, methods=args.methods.split(","),
                            k=args.k, max_ngram=args.max_ngram, threads=args.threads, seed=args.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok, spec = load_model(cfg.model)
    t0 = time.perf_counter()
    cost = VerifyCost.measure(model, cfg.cost_context, repeats=cfg.cost_repeats)
    batched = [dict(batch=b, **VerifyCost.measure(model, cfg.cost_context, BATCH_SIZES, 3, batch=b).as_dict())
               for b in map(int, filter(None, args.batches.split(",")))]
    print("verify cost (plain decode steps): " + ", ".join(f"{n}: {cost.relative(n):.2f}" for n in cost.sizes))
    for b in batched:
        secs = [b[f"verify_s.{n}"] for n in BATCH_SIZES]
        print(f"batch {b['batch']:>3}: step {secs[0] * 1000:.0f} ms; " +
              ", ".join(f"{n} tokens {s / secs[0]:.2f}" for n, s in zip(BATCH_SIZES, secs)))
    if args.cost_only:
        return
    prompts = {w: workload_texts(w, cfg.n_prompts, cfg.seed) for w in cfg.workloads}
    timings = compare(model, tok, spec, prompts, cfg.method_configs(), cfg.max_new_tokens, cfg.repeats, cost)
    rows = speedup_table(timings, versus=cfg.label("hf_lookup"))
    replays = summarize_replays(replay_table(tok, spec, prompts, timings, cost, k=cfg.k, max_ngram=cfg.max_ngram))
    result = {
        "args": vars(args),
        "device": f"{platform.processor() or platform.machine()} cpu, torch threads {torch.get_num_threads()}",
        "wall_s": time.perf_counter() - t0,
        "verify_cost": cost.as_dict(),
        "batched_verify_cost": batched,
        "summary": rows,
        "replays": replays,
        "timings": [asdict(t) for t in timings],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'workload':<11} {'method':<22} {'n':>3} {'speedup [95% CI]':>20} {'mean':>6} {'min':>5} "
          f"{'- HF [95% CI]':>20} {'ident':>5} {'acc':>5} {'tok/pass':>8}")
    for r in rows:
        ci = f"{r['speedup']:.2f} [{r['speedup_ci_low']:.2f}, {r['speedup_ci_high']:.2f}]"
        hf = f"{r['minus_hf']:+.2f} [{r['minus_hf_ci_low']:+.2f}, {r['minus_hf_ci_high']:+.2f}]" if "minus_hf" in r else ""
        acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        tpp = "" if r["tokens_per_pass"] is None else f"{r['tokens_per_pass']:.2f}"
        print(f"{r['workload']:<11} {r['method']:<22} {r['n']:>3} {ci:>20} {r['mean_speedup']:6.2f} "
              f"{r['min_speedup']:5.2f} {hf:>20} {r['identical']:>5} {acc:>5} {tpp:>8}")
    print(f"wrote {out} ({result['wall_s'] / 60:.1f} min)")
