"""A grid run with `gpu_grid.py --device cpu` at 4K tokens beside the cpu profile run of 02 on the same seeded
samples (--profile, default reports/cpu/02_compression_quality/samples.json): scores with CI and paired differences
of permkv_kvzip_global against the other methods on the shared samples. Where a method is in both, the grid's rows
count. reports/issue11/cpu4k/table.md was made beside the profile run that had `permkv` as headline:
`git show 17324bf:reports/cpu/02_compression_quality/samples.json > /tmp/s.json` and `--profile /tmp/s.json`.

    PYTHONPATH=. python scripts/issue11/cpu4k_table.py --profile /tmp/s.json > reports/issue11/cpu4k/table.md
    PYTHONPATH=. python scripts/issue11/cpu4k_table.py --grid reports/issue11/kvzip4k --against kvpress_kvzip \
        kvpress_streaming kvpress_tova kvpress_snapkv kvpress_expected_attention permkv_random \
        > reports/issue11/kvzip4k/table.md   # KVzipPress and the other presses at 2x / 4x / 8x (README)
"""

import argparse
import glob
import json

from permkv.experiments.compression_quality import paired_difference, summarize_cells
from scripts.issue11.tables import cell_text

MODE = "query_agnostic"
OURS = "permkv_kvzip_global"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="reports/issue11/cpu4k", help="folder of gpu_grid.py's grid_*.json")
    ap.add_argument("--profile", default="reports/cpu/02_compression_quality/samples.json")
    ap.add_argument("--against", nargs="+", default=["kvpress_streaming", "kvpress_snapkv", "permkv"])
    args = ap.parse_args()
    grid = [r for p in sorted(glob.glob(f"{args.grid}/grid_*.json")) for r in json.load(open(p))["rows"]
            if r["mode"] == MODE]
    profile = [r for r in json.load(open(args.profile))
               if r["context_tokens"] == 4096 and r["mode"] == MODE and r["model"] == "smollm2-135m"]
    shared = {r["sample"] for r in grid}
    full_02 = {r["sample"]: r["output"] for r in profile if r["method"] == "full"}
    same = [r["sample"] for r in grid if r["method"] == "full" and full_02.get(r["sample"]) == r["output"]]
    print(f"{len(shared)} samples; the full-cache answer is identical to 02's cpu run on {len(same)} of them "
          "(same seeded samples).\n")
    in_grid = {r["method"] for r in grid} - {"full"}
    rows = [r for r in grid if r["method"] != "full"] + [r for r in profile if r["sample"] in shared
                                                           and r["method"] not in in_grid]
    cells = summarize_cells([dict(r, model="smollm2-135m") for r in rows])
    ratios = sorted({c["ratio"] for c in cells if c["method"] != "full"})
    full = next(c for c in cells if c["method"] == "full")
    print(f"Full cache (02's cpu run): {full['score']:.2f} (n={full['n']}); {MODE}, niah_single, SmolLM2, 4,096 tokens.\n")
    print("| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |\n|---|" + "---|" * len(ratios))
    for m in sorted({c["method"] for c in cells} - {"full"}):
        cell = {c["ratio"]: c for c in cells if c["method"] == m}
        print(f"| {m} | " + " | ".join(cell_text(cell[r]) if r in cell else "" for r in ratios) + " |")
    print()
    for r in ratios:
        for other in args.against:
            if not any(x["method"] == other and x["ratio"] == r for x in rows):
                continue  # not run at this ratio (paired_difference still fails on samples that differ)
            d = paired_difference(rows, OURS, other, r, MODE)
            print(f"- {r:g}x: {OURS} - {other} = {d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] (n={d['n']})")


if __name__ == "__main__":
    main()
