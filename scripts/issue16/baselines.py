"""Issue 16, the baselines beside the format-slot test: full finetuning and LoRA on the same start, facts
and probes as scripts/issue16/format_slots.py (notebook 07's cpu settings: SmolLM2 + 65,536-slot memory at
layer 4, 24 facts, 45 steps), over a learning-rate grid, so that forgetting can be compared at matched
acquisition per seed (scripts/issue16/matched.py). Full and LoRA runs alternate, so that a stopped job has
both methods at the first learning rates.

    OMP_NUM_THREADS=1 python scripts/issue16/baselines.py --seed 1   # reports/issue16/baselines_seed1.json
"""

import argparse
from itertools import zip_longest

from _common import cpu_config, run_all

from permkv.harness.tracking import ROOT

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=0, help="memory init, background, facts and probes")
parser.add_argument("--full-lrs", type=float, nargs="*", default=[1e-4, 3e-5, 3e-4])
parser.add_argument("--lora-lrs", type=float, nargs="*", default=[1e-3, 3e-3, 3e-4])
args = parser.parse_args()
pairs = zip_longest([("full", lr, None, False) for lr in args.full_lrs], [("lora", lr, None, False) for lr in args.lora_lrs])
run_all(cpu_config(args.seed), [run for pair in pairs for run in pair if run is not None],
        ROOT / "reports" / "issue16" / f"baselines_seed{args.seed}.json")
