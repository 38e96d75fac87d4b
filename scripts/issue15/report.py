"""Markdown tables from scripts/issue15/measure.py's JSON: accuracy per (method, ratio) with CI and n,
paired differences, cost. `python scripts/issue15/report.py reports/issue15/measure.json`"""

import json
import sys

import numpy as np

d = json.load(open(sys.argv[1]))
rows = d["rows"]
print(f"budget {d['budget']} trace tokens per head, sizes {d['sizes']}, rounds {d['rounds']}, {d['minutes']:.1f} min\n")
exact = {(r["size"], r["method"], r["ratio"]): r for r in d["summary_exact"]}
print("| size | method | ratio | recall (95% CI) | exact (95% CI) | n | tokens generated | tokens held (max) | sub-calls | flipped |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in d["summary"]:
    e = exact[(r["size"], r["method"], r["ratio"])]
    cell = [x for x in rows if (x["size"], x["method"], x["ratio"]) == (r["size"], r["method"], r["ratio"])]
    held = max((x.get("trace_held", np.nan) for x in cell), default=np.nan)
    flipped = np.mean([x.get("answer_flipped", 0) for x in cell])
    print(f"| {r['size']} | {r['method']} | {r['ratio'] or 'full'} | {r['mean']:.2f} ({r['ci_low']:.2f}-{r['ci_high']:.2f}) | "
          f"{e['mean']:.2f} ({e['ci_low']:.2f}-{e['ci_high']:.2f}) | {r['n']} | {r['tokens_generated']:.1f} | {held} | "
          f"{r['sub_calls']:.1f} | {flipped:.2f} |")
print("\n| size | ratio | comparison | recall diff (95% CI) | exact diff (95% CI) | n |\n|---|---|---|---|---|---|")
pe = {(p["size"], p["ratio"], p["comparison"]): p for p in d["paired_exact"]}
for p in d["paired"]:
    e = pe[(p["size"], p["ratio"], p["comparison"])]
    print(f"| {p['size']} | {p['ratio']} | {p['comparison']} | {p['diff']:+.3f} ({p['ci_low']:+.3f} to {p['ci_high']:+.3f}) | "
          f"{e['diff']:+.3f} ({e['ci_low']:+.3f} to {e['ci_high']:+.3f}) | {p['n']} |")
print("\nmetrics (recall):", {k: round(v, 3) for k, v in d["metrics"].items()})
print("metrics (exact):", {k: round(v, 3) for k, v in d["metrics_exact"].items()})
