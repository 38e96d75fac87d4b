"""Engine throughput at a fixed KV memory vs compression ratio, against its peers (notebook 03's run).

`python -m permkv.bench throughput [--requests 10] [--prompt-range 128 320] [--output-tokens 64]
[--pool-requests 2] [--ratios 1 2 8 16 64] [--repeats 2] [--no-peers]` (defaults: notebook 03's cpu profile)
Every ratio of `permkv.engine` and the peers (transformers' continuous batching with the same KV
blocks, sequential `model.generate`) run on the same SQuAD requests in one process; gains are ratios
to the ratio-1 engine of the same repeat (medians over repeats). Also the decode-step cost model.
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
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[128, 320])
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--pool-requests", type=float, default=2.0, help="KV pool in average uncompressed requests")
    ap.add_argument("--ratios", type=float, nargs="+", default=[1, 2, 8, 16, 64])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--cost-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--cost-tokens", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--out-name", default="throughput")
    args = ap.parse_args(argv)
    cfg = ThroughputConfig(model=args.model, n_requests=args.requests, prompt_range=args.prompt_range,
                           output_tokens=args.output_tokens, pool_requests=args.pool_requests,
                           ratios=[int(r) if r == int(r) else r for r in args.ratios], repeats=args.repeats,
                           peers=not args.no_peers, cost_batches=args.cost_batches, cost_tokens=args.cost_tokens)
    model, tok, spec = load_model(cfg.model)
    t0 = time.perf_counter()
    requests = make_requests(tok, spec, cfg)
    rows, tokens = run_grid(model, tok, requests, cfg)
    summary = summarize(rows)
    quality_rows = quality(tok, requests, tokens, stop_ids(model, tok))
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
    print(f"{'system':<24} {'out tok/s':>9} {'total tok/s':>11} {'out gain':>8} {'total gain':>10} {'batch':>6} "
          f"{'preempt':>7} {'prefill%':>8} {'quality':>7}")
    for r in summary:
        print(f"{r['system']:<24} {r['output_tps']:9.2f} {r['total_tps']:11.2f} {r['output_gain']:7.2f}x {r['total_gain']:9.2f}x "
              f"{r.get('mean_batch', float('nan')):6.1f} {r.get('preemptions', 0):7.0f} {100 * r.get('prefill_share', float('nan')):7.0f}% "
              f"{q.get(r['system'], {}).get('score', float('nan')):7.2f} {r.get('error') or ''}")
    predicted = ", ".join(f"{r:g}x {metrics[f'throughput.cost_model_gain_{r:g}x']:.2f}" for r in cfg.ratios)
    print(f"cost model: {fit}; its predicted gains: {predicted}; "
          f"Amdahl bound 1/prefill share = {metrics['throughput.amdahl_bound']:.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(__import__("sys").argv[1:])
