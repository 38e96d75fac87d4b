"""Reduced cpu measurement for notebook 06 (issue 15): probe sizes, pick sizes and budget, then run
the grid one instance per size at a time (so that a stopped run still has equal n per cell).

    OMP_NUM_THREADS=1 python scripts/issue15/measure.py --minutes 25 --out reports/issue15/measure.json
"""

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from permkv.experiments.recursive_verification import (
    RVSConfig, choose, claim_metrics, paired_table, run_grid, summary,
)
from permkv.models import load_model

p = argparse.ArgumentParser()
p.add_argument("--minutes", type=float, default=25)
p.add_argument("--out", default="reports/issue15/measure.json")
p.add_argument("--sizes", default="8,16,24,32")
p.add_argument("--probe", type=int, default=4)
p.add_argument("--first-round", type=int, default=0, help="continue another run's seeds (its rounds)")
p.add_argument("--keep", default="", help="sizes already picked by an earlier run (skips the probe; needs --budget)")
p.add_argument("--budget", type=int, default=0)
args = p.parse_args()

t0 = time.time()
cfg = RVSConfig(sizes=[int(s) for s in args.sizes.split(",")], n_size_probe=args.probe, n_samples=1, subcall_tokens=48)
model, tok, spec = load_model(cfg.model, device="cpu")
if args.keep:
    probe, sizes, budget = [], [int(s) for s in args.keep.split(",")], args.budget
else:
    probe, sizes, budget = choose(model, tok, cfg)
print("probe", [(r["size"], round(r["recall"], 2), r["tokens"]) for r in probe], "sizes", sizes, "budget", budget, flush=True)
rows, out = [], Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
rnd = args.first_round
while time.time() - t0 < args.minutes * 60:
    new = run_grid(model, tok, replace(cfg, seed=cfg.seed + rnd), sizes, budget)
    for r in new:
        r["sample"] = rnd
    rows += new
    rnd += 1
    doc = dict(config=asdict(cfg), sizes=sizes, budget=budget, probe=probe, rounds=rnd, minutes=(time.time() - t0) / 60,
               summary=summary(rows, "recall"), summary_exact=summary(rows, "exact"), paired=paired_table(rows, "recall"),
               paired_exact=paired_table(rows, "exact"), metrics=claim_metrics(rows, cfg.metric),
               metrics_exact=claim_metrics(rows, "exact"), rows=rows)
    out.write_text(json.dumps(doc, indent=1, default=float))
    print(f"round {rnd} done at {(time.time() - t0) / 60:.1f} min", flush=True)
