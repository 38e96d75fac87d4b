"""Gemma-3-270m at 4K tokens on this CPU, query-agnostic, permkv methods only (kvpress cannot run Gemma-3):
`gpu_grid.py --model gemma3-270m --device cpu ...` -> reports/issue11/gemma4k/. Scores with bootstrap CIs, the
whole cache's achieved ratio (only the 3 global layers of 18 are compressed; the 512-token sliding layers are
kept) and paired differences of the KVzip-style headline against the others on the same samples.

    PYTHONPATH=. python scripts/issue11/gemma4k_table.py > reports/issue11/gemma4k/table.md
"""

import glob
import json

from permkv.experiments.compression_quality import paired_difference, summarize_cells

MODE = "query_agnostic"
HEADLINE = "permkv_kvzip_global"


def main() -> None:
    runs = [json.load(open(p)) for p in sorted(glob.glob("reports/issue11/gemma4k/grid_*.json"))]
    rows = [r for run in runs for r in run["rows"]]
    seconds = sum(run["wall_s"] for run in runs)
    cells = summarize_cells(rows)
    full = next(c for c in cells if c["method"] == "full")
    ratios = sorted({c["ratio"] for c in cells if c["method"] != "full"})
    print(f"Gemma-3-270m, niah_single, 4,096 tokens, {MODE}, seeded samples 0-29 (seed 0); full cache "
          f"{full['score']:.2f} [{full['ci_low']:.2f}, {full['ci_high']:.2f}] (n={full['n']}); "
          f"{seconds / 60:.0f} min of one-thread processes in all, {seconds / full['n']:.0f} s per sample.\n")
    print("| method | " + " | ".join(f"{r:g}x (whole cache)" for r in ratios) + " |\n|---|" + "---|" * len(ratios))
    for m in sorted({c["method"] for c in cells} - {"full"}):
        cell = {c["ratio"]: c for c in cells if c["method"] == m}
        print(f"| {m} | " + " | ".join(f"{cell[r]['score']:.2f} [{cell[r]['ci_low']:.2f}, {cell[r]['ci_high']:.2f}] "
                                       f"({cell[r]['achieved_ratio']:.2f}x, n={cell[r]['n']})" for r in ratios) + " |")
    print()
    for r in ratios:
        for other in sorted({c["method"] for c in cells} - {"full", HEADLINE}):
            d = paired_difference(rows, HEADLINE, other, r, MODE)
            print(f"- {r:g}x: {HEADLINE} - {other} = {d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] (n={d['n']})")


if __name__ == "__main__":
    main()
