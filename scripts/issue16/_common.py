"""Shared by the issue 16 scripts: notebook 07's earlier cpu settings, and a loop that runs and saves after every run
(so a stopped job keeps what it finished)."""

import json
import time
from dataclasses import asdict
from pathlib import Path

from permkv.experiments.continual_learning import ExperimentConfig, prepare, run_method
from permkv.knowledge import MemoryConfig


def cpu_config(seed: int) -> ExperimentConfig:
    """Notebook 07's cpu settings before issue 16's 64-fact profile (24 facts, 45 steps), for one seed; the
    64-fact scripts override the fact count, steps and checkpoints."""
    return ExperimentConfig(
        memory=MemoryConfig(n_keys=256, heads=4, top_k=8), layer=4, pretrain_steps=60, background_batches=32,
        n_facts=24, batch_size=8, steps=45, eval_every=15, n_squad=24, world_max=24, essay_tokens=512, seed=seed,
    )


def run_all(cfg: ExperimentConfig, runs: list[tuple[str, float, int | None, bool]], out: Path) -> None:
    """Each (method, lr, t, skip_format) from one shared start; all checkpoints to `out` (JSON) after each run."""
    t0 = time.time()
    start = prepare(cfg, progress=False)
    result = {"config": asdict(cfg) | {"memory": cfg.memory.to_params()}, "before": start.before,
              "facts_before": start.facts_before, "memory_used_fraction": start.background.used_fraction,
              "probe_sizes": start.probes.sizes(), "runs": []}
    for method, lr, t, skip in runs:
        records = run_method(start, method, lr, t, progress=False, skip_format=skip)
        result["runs"] += records
        result["seconds"] = time.time() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        for r in records:
            extra = (f", format reads {r['format_read_share']:.2f}, top readers {r['top_readers'][:5]}"
                     if method == "sparse" else "")
            print(f"{r['arm']} lr={lr:g} t={t} step {r['step']}: fact EM {r['fact_em']:.3f}, world {r['world_acc']:.3f} "
                  f"(forget {r['forget_world_acc']:+.2f}), SQuAD F1 {r['squad_f1']:.3f}, ppl {r['essay_ppl']:.1f}{extra}",
                  flush=True)
    print(f"{(time.time() - t0) / 60:.1f} min; wrote {out}")
