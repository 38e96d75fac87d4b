"""Issue 16 across seeds at matched acquisition: every arm (sparse with all tokens' reads, sparse with the QA
scaffolding's reads left out, full finetuning, LoRA) at its checkpoint closest to the fact EM all arms of
that seed reach (the plain sparse arm, which learns least, is read at the level the others set), with
notebook 07's own matching (`matched_by_seed`). Inputs, all at notebook 07's earlier cpu
settings (24 facts, 45 steps, checkpoints every 15): the sparse runs of scripts/issue16/format_slots.py
(t=500, the t every seed ran) and the baselines of scripts/issue16/baselines.py (seed 0's: the full / LoRA runs
of notebook 07's cpu run at commit c5fce2a, kept in baselines_seed0.json since the notebook's 3-seed run
rewrote its records.json).

    PYTHONPATH=. python scripts/issue16/matched.py   # writes reports/issue16/matched.md and matched.json
    PYTHONPATH=. python scripts/issue16/matched.py --facts64   # scripts/issue16/facts64.py's runs -> matched64.*
"""

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from permkv.experiments.continual_learning import FORGET_PROBES, arm, matched_by_seed, seed_table

DIR = Path("reports/issue16")
HEADLINE = "sparse_skip_format"  # the arm whose acquisition, with full finetuning's and LoRA's, sets the target


def load(facts64: bool) -> list[dict]:
    """Records of every seed, tagged with their seed (sparse runs at t=500, the t every seed ran)."""
    if facts64:
        paths = sorted(DIR.glob("facts64_seed*.json"))
    else:
        paths = sorted(DIR.glob("format_slots*.json")) + sorted(DIR.glob("baselines_seed*.json"))
    records = []
    for path in paths:
        d = json.loads(path.read_text())
        records += [r | {"seed": d["config"]["seed"]} for r in d["runs"] if r["method"] != "sparse" or r["t"] == 500]
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts64", action="store_true", help="the 64-fact runs (reports/issue16/facts64_seed*.json)")
    args = parser.parse_args()
    stem = "matched64" if args.facts64 else "matched"
    records = load(args.facts64)
    arms_of = {s: {arm(r) for r in records if r["seed"] == s} for s in {r["seed"] for r in records}}
    complete = [s for s, arms in sorted(arms_of.items()) if {HEADLINE, "full", "lora"} <= arms]
    print(f"seeds with every arm: {complete}; left out: {sorted(set(arms_of) - set(complete))}")
    records = [r for r in records if r["seed"] in complete]
    grids = [{(arm(r), r["lr"]) for r in records if r["seed"] == s} for s in complete]
    common = set.intersection(*grids)  # every seed gets the same grid: runs some seeds lack are left out
    print(f"runs left out (not in every seed): {sorted(set.union(*grids) - common)}")
    records = [r for r in records if (arm(r), r["lr"]) in common]
    matched = matched_by_seed(records, key="forget_world_acc", over=(HEADLINE, "full", "lora"))
    table = pd.DataFrame(seed_table(matched))
    for p in FORGET_PROBES:
        table[f"forget_{p}"] *= 100
    cols = ["seed", "arm", "target_em", "lr", "step", "fact_em", *[f"forget_{p}" for p in FORGET_PROBES], "format_read_share"]
    lines = ["Per seed, every arm at matched acquisition (forgetting in %, relative drop):", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             *("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |"
               for row in table[cols].itertuples(index=False)), "",
             "Mean over seeds (range):", "", "| arm | seeds | fact EM | world facts forgotten | essay ppl rise |", "|---|---|---|---|---|"]
    for name, rows in table.groupby("arm", sort=False):
        def cell(col: str, fmt: str) -> str:
            v = [x for x in rows[col] if math.isfinite(x)]
            return f"{fmt.format(sum(v) / len(v))} ({fmt.format(min(v))} to {fmt.format(max(v))})"
        lines.append(f"| {name} | {len(rows)} | {cell('fact_em', '{:.2f}')} | {cell('forget_world_acc', '{:.0f}%')} | "
                     f"{cell('forget_essay_ppl', '{:.0f}%')} |")
    runs = sorted({(r["seed"], arm(r), r["lr"]) for r in records})
    lines += ["", f"Runs: {len(runs)} (seed, arm, lr): {runs}"]
    (DIR / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (DIR / f"{stem}.json").write_text(json.dumps({"matched": {str(s): m for s, m in matched.items()}}, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
