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
import json
import time
from dataclasses import asdict

from permkv.experiments.continual_learning import ExperimentConfig, prepare, run_method
from permkv.harness.tracking import ROOT
from permkv.knowledge import MemoryConfig

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=0, help="memory init, background, facts and probes")
parser.add_argument("--ts", type=int, nargs="+", default=[2000, 500], help="slots written per step")
args = parser.parse_args()
OUT = ROOT / "reports" / "issue16" / ("format_slots.json" if args.seed == 0 else f"format_slots_seed{args.seed}.json")
cfg = ExperimentConfig(  # params/cpu/07_continual_learning_forgetting.yaml
    memory=MemoryConfig(n_keys=256, heads=4, top_k=8), layer=4, pretrain_steps=60, background_batches=32,
    n_facts=24, batch_size=8, steps=45, eval_every=15, n_squad=24, world_max=24, essay_tokens=512, seed=args.seed,
)
t0 = time.time()
start = prepare(cfg, progress=False)
result = {"config": asdict(cfg) | {"memory": cfg.memory.to_params()}, "before": start.before,
          "facts_before": start.facts_before, "memory_used_fraction": start.background.used_fraction,
          "probe_sizes": start.probes.sizes(), "runs": []}
for t in args.ts:
    for skip in (False, True):
        records = run_method(start, "sparse", 3e4, t, progress=False, skip_format=skip)
        result["runs"] += records
        result["seconds"] = time.time() - t0
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=1, default=str) + "\n")
        for r in records:
            print(f"t={t} skip_format={skip} step {r['step']}: fact EM {r['fact_em']:.3f}, world {r['world_acc']:.3f} "
                  f"(forget {r['forget_world_acc']:+.2f}), SQuAD F1 {r['squad_f1']:.3f}, ppl {r['essay_ppl']:.1f}, "
                  f"format reads {r['format_read_share']:.2f}, top readers {r['top_readers'][:5]}", flush=True)
print(f"{(time.time() - t0) / 60:.1f} min; wrote {OUT}")
