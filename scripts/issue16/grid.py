"""Issue 16: were the baselines' lr grids wide enough, and how much does the matching rule matter?

Reads notebook 07's newest cpu run (reports/cpu/07_continual_learning_forgetting/records.json) and, per seed,
takes the notebook's acquisition target (the highest fact EM the headline sparse arm, full finetuning and
LoRA all reach). Per (arm, lr): the least world-fact forgetting among the checkpoints that reach the target,
or "-" where none does. Per arm, two readings: the notebook's (the checkpoint whose EM is closest to the
target) and "at least the target" (the least forgetting among checkpoints with EM >= target: each method's
best forgetting at no less acquisition, the reading most generous to the baselines).

    PYTHONPATH=. python scripts/issue16/grid.py   # writes reports/issue16/grid64.md
"""

import json
from pathlib import Path

from permkv.experiments.continual_learning import arm, matched_by_seed

RECORDS = Path("reports/cpu/07_continual_learning_forgetting/records.json")
OUT = Path("reports/issue16/grid64.md")
HEADLINE = "sparse_skip_format"


def least_at_target(records: list[dict], seed: int, name: str, target: float, lr: float | None = None) -> dict | None:
    """The checkpoint of arm `name` (at `lr`, or any lr) in `seed` that forgets the fewest world facts among
    those with fact EM >= `target`; None where none reaches it."""
    ok = [r for r in records if r["seed"] == seed and arm(r) == name and (lr is None or r["lr"] == lr)
          and r["fact_em"] >= target]
    return min(ok, key=lambda r: r["forget_world_acc"]) if ok else None


def main() -> None:
    records = json.loads(RECORDS.read_text())
    matched = matched_by_seed(records, key="forget_world_acc", over=(HEADLINE, "full", "lora"))
    seeds = sorted(matched)
    grid = sorted({(arm(r), r["lr"]) for r in records})
    lines = ["World facts forgotten (%), least among the checkpoints that reach the seed's target EM "
             "(- : no checkpoint reaches it; in brackets the step and EM of that checkpoint)", "",
             "| arm | lr | " + " | ".join(f"seed {s} (target {matched[s]['target_em']:.3f})" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for name, lr in grid:
        cells = []
        for s in seeds:
            best = least_at_target(records, s, name, matched[s]["target_em"], lr)
            cells.append(f"{100 * best['forget_world_acc']:.0f} ({best['step']}, {best['fact_em']:.2f})" if best else "-")
        lines.append(f"| {name} | {lr:g} | " + " | ".join(cells) + " |")
    lines += ["", "Per arm, mean over seeds (per seed): the notebook's reading (closest EM) and at least the target EM", "",
              "| arm | closest EM (notebook) | at least the target |", "|---|---|---|"]
    for name in sorted({arm(r) for r in records}):
        near = [100 * matched[s][name]["forget_world_acc"] for s in seeds]
        best = [least_at_target(records, s, name, matched[s]["target_em"]) for s in seeds]
        least = [100 * b["forget_world_acc"] if b else float("nan") for b in best]

        def show(v: list[float]) -> str:
            return f"{sum(v) / len(v):.1f} ({', '.join(f'{x:.0f}' for x in v)})"
        lines.append(f"| {name} | {show(near)} | {show(least)} |")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
