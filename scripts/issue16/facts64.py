"""Issue 16 at the paper protocol's fact count, one seed: 64 facts x 6 training texts, 120 steps of 8
(2.5 passes, as the cpu profile's 45 steps over 24 facts), checkpoints every 30, the cpu profile's arms and
learning rates. Since then notebook 07's cpu profile runs this protocol itself, with 3-point lr grids. The most telling runs go first (the
headline sparse arm, then full finetuning and LoRA at the lr each matched at last time), so a stopped job
still has a matched comparison.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/issue16/facts64.py --seed 0   # reports/issue16/facts64_seed0.json
"""

import argparse
from dataclasses import replace

from _common import cpu_config, run_all

from permkv.harness.tracking import ROOT

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=0, help="memory init, background, facts and probes")
args = parser.parse_args()
cfg = replace(cpu_config(args.seed), n_facts=64, steps=120, eval_every=30)
runs = [("sparse", 3e4, 500, True), ("full", 1e-4, None, False), ("lora", 1e-3, None, False),
        ("sparse", 3e4, 500, False), ("full", 3e-5, None, False), ("lora", 3e-3, None, False)]
run_all(cfg, runs, ROOT / "reports" / "issue16" / f"facts64_seed{args.seed}.json")
