"""permkv_kvzip_global at 4K tokens on this CPU (`gpu_grid.py --device cpu ... --methods permkv_kvzip_global`,
reports/issue11/cpu4k/) beside the cpu profile run of 02 on the same seeded samples
(reports/cpu/02_compression_quality/samples.json): scores with CI and paired differences on the shared samples.

    PYTHONPATH=. python scripts/issue11/cpu4k_table.py > reports/issue11/cpu4k/table.md
"""

import glob
import json

from permkv.experiments.compression_quality import paired_difference, summarize_cells

MODE = "query_agnostic"


def main() -> None:
    ours = [r for p in sorted(glob.glob("reports/issue11/cpu4k/grid_*.json")) for r in json.load(open(p))["rows"]]
    profile = [r for r in json.load(open("reports/cpu/02_compression_quality/samples.json"))
               if r["context_tokens"] == 4096 and r["mode"] == MODE and r["model"] == "smollm2-135m"]
    shared = {r["sample"] for r in ours}
    full_02 = {r["sample"]: r["output"] for r in profile if r["method"] == "full"}
    same = [r["sample"] for r in ours if r["method"] == "full" and full_02.get(r["sample"]) == r["output"]]
    print(f"{len(shared)} samples; the full-cache answer is identical to 02's cpu run on {len(same)} of them "
          "(same seeded samples, 02 answered from its own prefill then).\n")
    rows = [r for r in ours if r["method"] != "full"] + [r for r in profile if r["sample"] in shared]
    cells = summarize_cells([dict(r, model="smollm2-135m") for r in rows])
    ratios = sorted({c["ratio"] for c in cells if c["method"] != "full"})
    full = next(c for c in cells if c["method"] == "full")
    print(f"Full cache (02's cpu run): {full['score']:.2f} (n={full['n']}); {MODE}, niah_single, SmolLM2, 4,096 tokens.\n")
    print("| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |\n|---|" + "---|" * len(ratios))
    for m in sorted({c["method"] for c in cells} - {"full"}):
        cell = {c["ratio"]: c for c in cells if c["method"] == m}
        print(f"| {m} | " + " | ".join(f"{cell[r]['score']:.2f} [{cell[r]['ci_low']:.2f}, {cell[r]['ci_high']:.2f}] (n={cell[r]['n']})"
                                       if r in cell else "" for r in ratios) + " |")
    print()
    for r in ratios:
        for other in ("kvpress_streaming", "kvpress_snapkv", "permkv"):
            d = paired_difference(rows, "permkv_kvzip_global", other, r, MODE)
            print(f"- {r:g}x: permkv_kvzip_global - {other} = {d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] (n={d['n']})")


if __name__ == "__main__":
    main()
