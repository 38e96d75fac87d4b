"""Markdown tables of issue 11's evidence from reports/issue11/*.json (six needles, KVzip needles, long
slice) and the heatmap of kept tokens per (layer, head) under the old global allocator.

    PYTHONPATH=. python scripts/issue11/tables.py > reports/issue11/tables.md
"""

import glob
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from permkv.experiments.compression_quality import paired_difference, pooled_retention, summarize_cells


def load(pattern: str) -> list[dict]:
    """Rows of every file matching `pattern`, one per (length, sample, mode, method, ratio)."""
    rows = {}
    for path in sorted(glob.glob(pattern)):
        for r in json.load(open(path))["rows"]:
            rows[r.get("context_tokens"), r["sample"], r["mode"], r["method"], r["ratio"]] = r
    return list(rows.values())


def cell_text(cell: dict) -> str:
    """One `summarize_cells` cell as "score [CI] (n=...)"."""
    return f"{cell['score']:.2f} [{cell['ci_low']:.2f}, {cell['ci_high']:.2f}] (n={cell['n']})"


def needle_table(rows: list[dict], title: str) -> None:
    cells = defaultdict(list)
    for r in rows:
        cells[r["mode"], r["method"], r["ratio"]].append(r["score"])
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "full"})
    print(f"\n### {title}\n\n| method | mode | " + " | ".join(f"{x:g}x" for x in ratios) + " |")
    print("|---|---|" + "---|" * len(ratios))
    for (mode, method) in sorted({(m, me) for m, me, _ in cells}, key=lambda k: (k[0], k[1] != "full", k[1])):
        if method == "full":
            s = cells[mode, method, 1.0]
            print(f"| full cache | {mode} | {int(sum(s))}/{len(s)} (all ratios) |" + " |" * (len(ratios) - 1))
            continue
        print(f"| {method} | {mode} | " + " | ".join(
            f"{int(sum(cells[mode, method, x]))}/{len(cells[mode, method, x])}" if cells[mode, method, x] else "-"
            for x in ratios) + " |")


def heatmap(rows: list[dict], method: str, out: str) -> None:
    ratios = sorted({r["ratio"] for r in rows if r["method"] == method and "kept" in r})
    fig, axes = plt.subplots(1, len(ratios), figsize=(2.6 * len(ratios), 6), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        kept = [np.array(r["kept"]) / (r["n_tokens"]) for r in rows
                if r["method"] == method and r["ratio"] == ratio and r["mode"] == "query_aware" and "kept" in r]
        im = ax.imshow(np.mean(kept, axis=0), aspect="auto", cmap="viridis", vmin=0)
        ax.set(title=f"{ratio:g}x", xlabel="KV head", ylabel="layer")
    fig.colorbar(im, ax=axes[0].tolist())
    fig.suptitle(f"{method}: kept fraction per (layer, KV head), 6 needles")
    fig.savefig(out, bbox_inches="tight", dpi=110)


def long_table(rows: list[dict]) -> None:
    print("\n### Long slice (niah_single, SmolLM2)\n")
    print("| tokens | mode | method | ratio | score [95% CI] | n | full | retention [95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    for c in sorted(summarize_cells(rows), key=lambda c: (c["context_tokens"], c["mode"], c["method"] != "full", c["method"], c["ratio"])):
        picked = [r for r in rows if r["context_tokens"] == c["context_tokens"]]
        ret = pooled_retention(picked, c["method"], c["ratio"], c["mode"])
        print(f"| {c['context_tokens']} | {c['mode']} | {c['method']} | {c['ratio']:g}x | {c['score']:.2f} "
              f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}] | {c['n']} | {c['full_score']:.2f} | "
              f"{ret['retention']:.2f} [{ret['ci_low']:.2f}, {ret['ci_high']:.2f}] |")
    print("\n| tokens | mode | ratio | headline - other | diff [95% CI] | n |\n|---|---|---|---|---|---|")
    for length in sorted({r["context_tokens"] for r in rows}):
        picked = [r for r in rows if r["context_tokens"] == length]
        for mode in sorted({r["mode"] for r in picked}):
            for ratio in sorted({r["ratio"] for r in picked if r["method"] != "full"}):
                for other in sorted({r["method"] for r in picked if r["mode"] == mode} - {"full", "permkv"}):
                    try:
                        d = paired_difference(picked, "permkv", other, ratio, mode)
                    except ValueError:
                        continue
                    print(f"| {length} | {mode} | {ratio:g}x | {other} | {d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] | {d['n']} |")


if __name__ == "__main__":
    six = load("reports/issue11/six_needles_[0-9]*.json")
    if six:
        needle_table(six, "6 needles (niah_single, SmolLM2, 1,024 tokens, seed 1)")
        heatmap(six, "permkv_adaptive", "reports/issue11/heatmap_global_allocator.png")
    kz = load("reports/issue11/six_needles_kvzip*.json") + load("reports/issue11/six_needles_mix*.json")
    if kz:
        needle_table(kz, "Scorer variants on the same needles (KVzip-style, pooling, recency mix)")
    long = load("reports/issue11/long_*.json")
    if long:
        long_table(long)
