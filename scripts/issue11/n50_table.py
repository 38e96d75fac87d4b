"""02's SmolLM2 4K cells at n = 50: the cpu profile's 30 samples (reports/cpu/02_compression_quality/samples.json)
plus samples 30-49 of the same seeded set answered by `gpu_grid.py --device cpu` with 02's methods and ratios
(build_task draws samples one after another from one seeded generator, so samples 0-29 of n=50 are 02's 30).
Prints every cell with its bootstrap CI and the ledger's claim metrics (`claim_metrics`) on all 50.

    PYTHONPATH=. python scripts/issue11/n50_table.py > reports/issue11/n50/table.md
"""

import argparse
import json

from permkv.experiments.compression_quality import claim_metrics, summarize_cells
from scripts.issue11.tables import cell_text, load

LENGTH, MODEL = 4096, "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="reports/issue11/n50", help="folder of gpu_grid.py's grid_*.json")
    ap.add_argument("--profile", default="reports/cpu/02_compression_quality/samples.json")
    ap.add_argument("--headline", default="permkv_kvzip_global")
    args = ap.parse_args()
    profile = [r for r in json.load(open(args.profile)) if r["context_tokens"] == LENGTH and r["model"] == MODEL]
    grid = [dict(r, model=MODEL) for r in load(f"{args.grid}/grid_*.json")]
    overlap = {r["sample"] for r in profile} & {r["sample"] for r in grid}
    if overlap:
        raise SystemExit(f"samples {sorted(overlap)} are in both the profile and the grid")
    rows = profile + grid
    modes = sorted({r["mode"] for r in rows})
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "full"})
    cells = summarize_cells(rows)
    print(f"SmolLM2, niah_single, {LENGTH:,} tokens: samples {min(r['sample'] for r in rows)}-{max(r['sample'] for r in rows)} "
          f"(02's cpu profile: {len({r['sample'] for r in profile})}, gpu_grid.py: {len({r['sample'] for r in grid})}).\n")
    print("| method | mode | " + " | ".join(f"{r:g}x" for r in ratios) + " |\n|---|---|" + "---|" * len(ratios))
    for mode in modes:
        full = next(c for c in cells if c["method"] == "full" and c["mode"] == mode)
        print(f"| full cache | {mode} | {full['score']:.2f} (n={full['n']}) |" + " |" * (len(ratios) - 1))
        for m in sorted({c["method"] for c in cells if c["mode"] == mode} - {"full"}):
            cell = {c["ratio"]: c for c in cells if c["method"] == m and c["mode"] == mode}
            print(f"| {m} | {mode} | " + " | ".join(cell_text(cell[r]) if r in cell else "" for r in ratios) + " |")
    m = claim_metrics(rows, args.headline, ratios, modes)
    print(f"\nThe ledger's claim metrics of {args.headline} on all samples (beats: lower end of the paired CI of the"
          " difference, > 0 = beats):\n")
    print("| ratio | mode | n | retention [CI low] | - best press (CI low) | - permkv_random (CI low) |\n|---|---|---|---|---|---|")
    for mode in modes:
        for r in ratios:
            t = f"{r:g}x_{mode}"
            print(f"| {r:g}x | {mode} | {m[f'n_{t}']} | {m[f'claim.retention_{t}']:.3f} [{m[f'retention_ci_low_{t}']:.3f}] | "
                  f"{m[f'diff_vs_kvpress_{t}']:+.2f} ({m[f'claim.beats_kvpress_{t}']:+.2f}) | "
                  f"{m[f'diff_vs_random_{t}']:+.2f} ({m[f'claim.vs_random_{t}']:+.2f}) |")


if __name__ == "__main__":
    main()
