"""Issue 16, the baselines beside the format-slot test: full finetuning and LoRA on the same start, facts
and probes as scripts/issue16/format_slots.py (notebook 07's cpu settings: SmolLM2 + 65,536-slot memory at
layer 4, 24 facts, 45 steps), over a learning-rate grid, so that forgetting can be compared at matched
acquisition per seed (scripts/issue16/seeds.py). Writes after every run, so a stopped job keeps its runs.

    OMP_NUM_THREADS=1 python scripts/issue16/baselines.py --seed 1   # reports/issue16/baselines_seed1.json
"""

import argparse
import json
import time
from itertools import zip_longest
from dataclasses import asdict

from permkv.experiments.continual_learning import ExperimentConfig, prepare, run_method
from permkv.harness.tracking import ROOT
from permkv.knowledge import MemoryConfig

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=0, help="memory init, background, facts and probes")
parser.add_argument("--full-lrs", type=float, nargs="*", default=[1e-4, 3e-5, 3e-4])
parser.add_argument("--lora-lrs", type=float, nargs="*", default=[1e-3, 3e-3, 3e-4])
args = parser.parse_args()
OUT = ROOT / "reports" / "issue16" / f"baselines_seed{args.seed}.json"
cfg = ExperimentConfig(  # params/cpu/07_continual_learning_forgetting.yaml
    memory=MemoryConfig(n_keys=256, heads=4, top_k=8), layer=4, pretrain_steps=60, background_batches=32,
    n_facts=24, batch_size=8, steps=45, eval_every=15, n_squad=24, world_max=24, essay_tokens=512, seed=args.seed,
)
t0 = time.time()
start = prepare(cfg, progress=False)
result = {"config": asdict(cfg) | {"memory": cfg.memory.to_params()}, "before": start.before,
          "facts_before": start.facts_before, "probe_sizes": start.probes.sizes(), "runs": []}
# interleaved so that a stopped job has both methods at the middle learning rates
grid = [run for pair in zip_longest([("full", lr) for lr in args.full_lrs], [("lora", lr) for lr in args.lora_lrs])
        for run in pair if run is not None]
for method, lr in grid:
    records = run_method(start, method, lr, progress=False)
    result["runs"] += records
    result["seconds"] = time.time() - t0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for r in records:
        print(f"{method} lr={lr:g} step {r['step']}: fact EM {r['fact_em']:.3f}, world {r['world_acc']:.3f} "
              f"(forget {r['forget_world_acc']:+.2f}), SQuAD F1 {r['squad_f1']:.3f}, ppl {r['essay_ppl']:.1f}",
              flush=True)
print(f"{(time.time() - t0) / 60:.1f} min; wrote {OUT}")
