"""Engine throughput and the answers it keeps at a fixed KV memory vs compression ratio, against its
peers (notebook 03's run).

`python -m permkv.bench throughput [--requests 30] [--prompt-range 500 1500] [--output-tokens 256]
[--pool-requests 3] [--ratios 1 2 8 16 64] [--scorers kvzip kvcompress] [--attention-ratios 8 64]
[--repeats 2] [--no-peers]` (defaults: notebook 03's cpu profile, `ThroughputConfig`)
Every (scorer, ratio) of `permkv.engine` and the peers (transformers' continuous batching with the same
KV blocks, sequential `model.generate`) run on the same needle requests in one process; gains are
ratios to the ratio-1 engine of the same repeat (medians over repeats), retention is the ratio-1
score kept on the same requests (paired CI). Also the decode-step cost model.
JSON in reports/bench/throughput.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from permkv.bench import write_result
from permkv.eval import stop_ids
from permkv.experiments.throughput import (
    ThroughputConfig, claim_metrics, decode_cost, fit_cost, make_requests, quality, run_grid, summarize,
)
from permkv.models import load_model


def main(argv: list[str]) -> None:
    d = ThroughputConfig()
    ap = argparse.ArgumentParser(prog="python -m permkv.bench throughput")
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--requests", type=int, default=d.n_requests)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=d.prompt_range)
    ap.add_argument("--output-tokens", type=int, default=d.output_tokens)
    ap.add_argument("--pool-requests", type=float, default=d.pool_requests, help="KV pool in average uncompressed requests")
    ap.add_argument("--ratios", type=float, nargs="+", default=d.ratios)
    ap.add_argument("--scorers", nargs="+", default=d.scorers)
    ap.add_argument("--attention-ratios", type=float, nargs="+", default=[8, 64])
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=d.clock, help="speeds per second of CPU time or wall time")
    ap.add_argument("--cost-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--cost-tokens", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--out-name", default="throughput")
    args = ap.parse_args(argv)
    whole = lambda rs: [int(r) if r == int(r) else r for r in rs]  # noqa: E731
    cfg = ThroughputConfig(model=args.model, n_requests=args.requests, prompt_range=args.prompt_range,
                           output_tokens=args.output_tokens, pool_requests=args.pool_requests, ratios=whole(args.ratios),
                           scorers=args.scorers, attention_ratios=whole(args.attention_ratios), repeats=args.repeats,
                           peers=not args.no_peers, clock=args.clock, cost_batches=args.cost_batches, cost_tokens=args.cost_tokens)
    model, tok, spec = load_model(cfg.model)
    t0 = time.perf_counter()
    requests = make_requests(tok, spec, cfg)
    rows, tokens = run_grid(model, tok, spec, requests, cfg)
    summary = summarize(rows)
    quality_rows = quality(tok, requests, tokens, stop_ids(model, tok), cfg.task)
    cost = decode_cost(model, requests, cfg)
    fit = fit_cost(cost)
    metrics = claim_metrics(summary, quality_rows, fit, spec.n_layers * spec.n_kv_heads, cfg.block_size)
    result = dict(config=vars(cfg) | {}, args=vars(args), wall_s=time.perf_counter() - t0,
                  device=f"{platform.processor() or platform.machine()} cpu, torch threads {torch.get_num_threads()}, "
                         f"load average at end {os.getloadavg()}",
                  summary=summary, quality=quality_rows, cost=cost, cost_fit=fit, metrics=metrics,
                  rows=rows, prompt_tokens=[len(r.prompt_ids) for r in requests])
    path = write_result(args.out_name, result)
    q = {r["system"]: r for r in quality_rows}
    print(f"{'system':<26} {'total tok/s':>11} {'gain':>6} {'batch':>6} {'preempt':>7} {'prefill%':>8} "
          f"{'score':>6} {'retention [95% CI]':>20}")
    for r in summary:
        k = q.get(r["system"], {})
        kept = f"{k.get('retention', float('nan')):.2f} [{k.get('retention_low', float('nan')):.2f}, " \
               f"{k.get('retention_high', float('nan')):.2f}]"
        print(f"{r['system']:<26} {r['total_tps']:11.2f} {r['total_gain']:5.2f}x {r.get('mean_batch', float('nan')):6.1f} "
              f"{r.get('preemptions', 0):7.0f} {100 * r.get('prefill_share', float('nan')):7.0f}% "
              f"{k.get('score', float('nan')):6.2f} {kept:>20} {r.get('error') or ''}")
    print(f"cost model: {fit}; Amdahl bound 1/prefill share at 1x = {metrics['throughput.amdahl_bound']:.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(__import__("sys").argv[1:])
