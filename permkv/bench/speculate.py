"""`python -m permkv.bench speculate`: tokens/s of plain greedy, HF's prompt lookup and permkv's
speculator on each workload, side by side in one run, output identity checked; JSON to
reports/bench/speculate.json."""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from permkv.models import load_model
from permkv.experiments.speculative_decoding import WORKLOADS, MethodConfig, compare, pooled, summarize, workload_texts


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m permkv.bench speculate")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per workload")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=10, help="draft length, same for HF and permkv")
    ap.add_argument("--max-ngram", type=int, default=3, help="longest suffix matched, same for both")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", default="reports/bench/speculate.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, spec = load_model(args.model)
    prompts = {w: workload_texts(w, args.prompts) for w in args.workloads.split(",")}
    methods = [
        MethodConfig("greedy"),
        MethodConfig("hf_lookup", args.k, args.max_ngram),
        MethodConfig("permkv", args.k, args.max_ngram),
    ]
    t0 = time.perf_counter()
    timings = compare(model, tok, spec, prompts, methods, args.max_new_tokens, args.repeats)
    rows = summarize(timings) + pooled(timings)
    result = {
        "args": vars(args),
        "device": f"{platform.processor() or platform.machine()} cpu, torch threads {torch.get_num_threads()}",
        "wall_s": time.perf_counter() - t0,
        "summary": rows,
        "timings": [asdict(t) for t in timings],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'workload':<11} {'method':<22} {'tok/s':>7} {'speedup':>8} {'decode':>7} {'ident':>5} "
          f"{'acc':>5} {'tok/pass':>8}")
    for r in rows:
        acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        tpp = "" if r["tokens_per_pass"] is None else f"{r['tokens_per_pass']:.2f}"
        dec = "" if r["decode_speedup"] is None else f"{r['decode_speedup']:.2f}x"
        print(f"{r['workload']:<11} {r['method']:<22} {r['tokens_per_s']:7.2f} {r['speedup']:7.2f}x "
              f"{dec:>7} {str(r['all_identical']):>5} {acc:>5} {tpp:>8}")
    print(f"wrote {out}")
