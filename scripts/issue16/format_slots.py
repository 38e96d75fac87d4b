"""Issue 16, the format-slot hypothesis: does sparse memory finetuning forget because the slots it
writes are the ones the QA scaffolding ("Q", ":", "?", newline, "A") reads?

Same start as notebook 07's cpu profile (SmolLM2 + 65,536-slot memory at layer 4, 24 facts, 45 steps,
lr 3e4), sparse finetuning at t = 2000 and 500, each twice: slots chosen from all tokens' reads (the
paper's TF-IDF, notebook 07) and with the scaffolding tokens' reads left out of the counts. Per
checkpoint: fact EM, the forgetting probes, and which tokens read the written slots.

    OMP_NUM_THREADS=1 python scripts/issue16/format_slots.py   # writes reports/issue16/format_slots.json
    OMP_NUM_THREADS=1 python scripts/issue16/format_slots.py --seed 1 --ts 500   # ..._seed1.json
"""

import argparse

from _common import cpu_config, run_all

from permkv.harness.tracking import ROOT

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=0, help="memory init, background, facts and probes")
parser.add_argument("--ts", type=int, nargs="+", default=[2000, 500], help="slots written per step")
args = parser.parse_args()
name = "format_slots.json" if args.seed == 0 else f"format_slots_seed{args.seed}.json"
run_all(cpu_config(args.seed), [("sparse", 3e4, t, skip) for t in args.ts for skip in (False, True)],
        ROOT / "reports" / "issue16" / name)
