"""Issue 11: the observation window of attention scorers, per model. niah_single at 4K, one prefill per sample
(`prefill_once`), permkv's `Permkv(scorer, "uniform", window)` at each window and ratio; the full cache beside.
notebook 02's default window (64, kvpress SnapKV's) was measured on SmolLM2; this checks it on each model.
One JSON line per sample in <out>/window_<model>_<mode>_<start>.jsonl; `--table` summarises with paired CIs.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/issue11/window_sweep.py --model gemma3-270m --out reports/issue11/window --start 0 --stop 15
    PYTHONPATH=. python scripts/issue11/window_sweep.py --out reports/issue11/window --table
"""

import argparse
import json
from pathlib import Path

import numpy as np

from permkv.data import build_task, encode_sample
from permkv.eval import bootstrap_ci
from permkv.experiments.compression_quality import Full, Permkv, prefill_once, score_text
from permkv.models import load_model
from scripts.issue11.sample_log import append, pending, run_or_table


def run(args) -> None:
    model, tok, spec = load_model(args.model)
    samples = build_task("niah_single", tok, spec, args.n, args.length, seed=0)
    path = Path(args.out) / f"window_{args.model}_{args.mode}_{args.start}.jsonl"
    for i, s in pending(path, samples, args.start, args.stop):
        prefix, suffix = encode_sample(tok, spec, s, args.mode)
        pre = prefill_once(model, prefix, suffix, 32, max(args.windows))
        try:
            row = dict(model=args.model, mode=args.mode, sample=i, context_tokens=len(prefix) + len(suffix),
                       full=score_text(s, Full().answer(model, tok, pre, 1.0, 32)[0]))
            for scorer in args.scorers:
                for w in args.windows:
                    for r in args.ratios:
                        text, _ = Permkv(scorer, "uniform", w).answer(model, tok, pre, float(r), 32)
                        row[f"{scorer}_w{w}_{r:g}x"] = score_text(s, text)
        finally:
            pre.release()
        append(path, row)


def table(out: Path) -> str:
    rows = [json.loads(line) for p in sorted(out.glob("window_*.jsonl")) for line in p.open()]
    lines = []
    for model, mode in sorted({(r["model"], r["mode"]) for r in rows}):
        picked = sorted((r for r in rows if (r["model"], r["mode"]) == (model, mode)), key=lambda r: r["sample"])
        cells = [k for k in picked[0] if "_w" in k]
        ratios = sorted({k.rsplit("_", 1)[1] for k in cells}, key=lambda x: float(x[:-1]))
        methods = list(dict.fromkeys(k.rsplit("_", 1)[0] for k in cells))
        tokens = [r["context_tokens"] for r in picked]
        lines += [f"{model}, niah_single, {min(tokens):,}-{max(tokens):,} tokens, {mode}, n={len(picked)}; full cache "
                  f"{np.mean([r['full'] for r in picked]):.2f}; uniform budgets per head.", "",
                  "| scorer, window | " + " | ".join(ratios) + " |", "|---|" + "---|" * len(ratios)]
        for m in methods:
            cols = []
            for x in ratios:
                v = [r[f"{m}_{x}"] for r in picked]
                low, high = bootstrap_ci(v)
                cols.append(f"{np.mean(v):.2f} [{low:.2f}, {high:.2f}]")
            lines.append(f"| {m} | " + " | ".join(cols) + " |")
        lines.append("")
        for m in methods:  # paired against the same scorer at notebook 02's window
            base = f"{m.split('_w')[0]}_w64"
            if m == base or base not in methods:
                continue
            for x in ratios:
                d = [r[f"{m}_{x}"] - r[f"{base}_{x}"] for r in picked]
                low, high = bootstrap_ci(d)
                lines.append(f"- {x}: {m} - {base} = {np.mean(d):+.2f} [{low:+.2f}, {high:+.2f}]")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--mode", default="query_aware")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=30)
    ap.add_argument("--scorers", nargs="+", default=["snapkv"])
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--ratios", type=float, nargs="+", default=[8, 16, 32])
    run_or_table(ap, run, table)


if __name__ == "__main__":
    main()
