"""Issue 16 across seeds: the format-slot test's last checkpoint (step 45) per seed, plain TF-IDF slots vs the
scaffolding's reads left out, from reports/issue16/format_slots*.json (scripts/issue16/format_slots.py).

    PYTHONPATH=. python scripts/issue16/seeds.py > reports/issue16/seeds.md
"""

import glob
import json

import numpy as np


def main() -> None:
    cells: dict[tuple, list[dict]] = {}
    for path in sorted(glob.glob("reports/issue16/format_slots*.json")):
        d = json.load(open(path))
        last = max(r["step"] for r in d["runs"])
        for r in d["runs"]:
            if r["step"] == last:
                cells.setdefault((r["t"], r["skip_format"]), []).append(dict(r, seed=d["config"]["seed"]))
    print("| t | slots | seeds | fact EM | world facts forgotten | essay ppl | scaffold share of reads |")
    print("|---|---|---|---|---|---|---|")
    for (t, skip), rows in sorted(cells.items()):
        def cell(key, scale=1.0, fmt="{:.2f}"):
            v = np.array([r[key] * scale for r in rows])
            return f"{fmt.format(v.mean())} ({', '.join(fmt.format(x) for x in v)})"
        print(f"| {t} | {'scaffolding left out' if skip else 'TF-IDF (plain)'} | {sorted(r['seed'] for r in rows)} | "
              f"{cell('fact_em')} | {cell('forget_world_acc', 100, '{:.0f}%')} | {cell('essay_ppl', fmt='{:.1f}')} | "
              f"{cell('format_read_share', 100, '{:.0f}%')} |")
    print("\nMean (per seed in brackets); the paper's protocol (equal acquisition, >= 64 facts, lr grids) is not this.")


if __name__ == "__main__":
    main()
