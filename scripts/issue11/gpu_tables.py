"""Tables of issue 11's GPU run (scripts/issue11/gpu_stage*.sh -> reports/issue11/gpu/grid_*.json): score per
(length, mode, method, ratio) with bootstrap CI and n, and the headline's paired differences against the best
kvpress press and random eviction on the same samples.

    PYTHONPATH=. python scripts/issue11/gpu_tables.py > reports/issue11/gpu/tables.md
"""

import glob
import json

from permkv.experiments.compression_quality import best_permkv, best_press, paired_difference, summarize_cells


def main() -> None:
    rows, devices = [], {}
    for path in sorted(glob.glob("reports/issue11/gpu/grid_*.json")):
        d = json.load(open(path))
        rows += d["rows"]
        env = d["env"]
        device = f"{env['gpu'] or 'cpu'} (torch {env['torch']}, transformers {env['transformers']})"
        devices.setdefault(device, []).append(f"{path.split('grid_')[1][:-5]}: samples {sorted({r['sample'] for r in d['rows']})}")
    for device, parts in devices.items():
        print(f"- {device}: " + "; ".join(parts))
    print("\nSmolLM2-135M, niah_single, seed 0; score = needle found; one prefill per sample and mode.\n")
    cells = summarize_cells(rows)
    for L in sorted({c["context_tokens"] for c in cells}):
        for mode in ("query_aware", "query_agnostic"):
            mine = [c for c in cells if c["context_tokens"] == L and c["mode"] == mode]
            if not mine:
                continue
            ratios = sorted({c["ratio"] for c in mine if c["method"] != "full"})
            full = next(c for c in mine if c["method"] == "full")
            print(f"### {L} tokens, {mode} (n={full['n']}, full cache {full['score']:.2f})\n")
            print("| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |")
            print("|---|" + "---|" * len(ratios))
            for m in sorted({c["method"] for c in mine} - {"full"}):
                cell = {c["ratio"]: c for c in mine if c["method"] == m}
                print(f"| {m} | " + " | ".join(f"{cell[r]['score']:.2f} [{cell[r]['ci_low']:.2f}, {cell[r]['ci_high']:.2f}]"
                                               if r in cell else "" for r in ratios) + " |")
            at_length = [r for r in rows if r["context_tokens"] == L]
            print()
            for r in ratios:
                best = best_press(at_length, r, mode)
                for ours, other in dict.fromkeys([("permkv", best), ("permkv", "permkv_random"),
                                                  (best_permkv(at_length, r, mode), best)]):
                    d = paired_difference(at_length, ours, other, r, mode)
                    print(f"- {r:g}x: {ours} - {other} = {d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] (n={d['n']})")
            print()


if __name__ == "__main__":
    main()
