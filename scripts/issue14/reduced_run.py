"""A reduced 05_recursive_lm measurement that saves every document's rows as it goes (JSON lines), then
logs the summary and claim metrics to MLflow as profile `cpu-reduced`.

    python scripts/issue14/reduced_run.py --docs 2 --tasks niah_single --ratios 1 8 --minutes 25
Stops starting new documents after `--minutes`; what finished is logged. The 8x arm of 05's cpu profile
with KVzip-style reads, beside a notebook run (its 1x rows pair with the notebook's, same seeded documents):

    python scripts/issue14/reduced_run.py --docs 30 --ratios 8 --doc-tokens 8000 --chunk 320 --chunk-tokens 256 \
        --official-docs 0 --no-truncated --no-mlflow --scoring kvzip --profile cpu-kvzip --minutes 120
"""

import argparse
import json
import time

import pandas as pd
import torch

from permkv.experiments.recursive_lm import (
    SCORINGS,
    RecursiveLMConfig,
    build_documents,
    claim_metrics,
    run_official,
    run_rlm,
    run_truncated,
    summarize,
)
from permkv.harness import tracking
from permkv.models import load_model
from permkv.rlm import SequentialBackend


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=["niah_single"])
    p.add_argument("--ratios", nargs="+", type=float, default=[1, 8])
    p.add_argument("--doc-tokens", type=int, default=16000)
    p.add_argument("--chunk", type=int, default=640)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--official-docs", type=int, default=1)
    p.add_argument("--minutes", type=float, default=25)
    p.add_argument("--no-truncated", action="store_true")
    p.add_argument("--scoring", choices=list(SCORINGS), default="attention", help="how compressed reads choose what they keep")
    p.add_argument("--no-mlflow", action="store_true", help="keep the rows and summary only (a partial grid must not "
                   "become the ledger's newest run of the experiment)")
    p.add_argument("--profile", default="cpu-reduced", help="MLflow profile tag and reports/<profile>/ folder")
    args = p.parse_args()
    cfg = RecursiveLMConfig(tasks=args.tasks, doc_tokens=args.doc_tokens, context_chunk_size=args.chunk,
                            ratios=args.ratios, n_docs=args.docs, chunk_tokens=args.chunk_tokens,
                            official_docs=args.official_docs, official_iterations=2, official_max_tokens=128,
                            official_timeout_s=300.0)
    torch.set_num_threads(cfg.threads)
    model, tok, spec = load_model(cfg.model)
    backend = SequentialBackend(model, tok, spec, chunk_tokens=cfg.chunk_tokens, **SCORINGS[args.scoring])
    folder = tracking.out_dir(args.profile, "05_recursive_lm")
    log = folder / "rows.jsonl"
    rows, start = [], time.time()

    def keep(new):
        rows.extend(new)
        with log.open("a") as f:
            for r in new:
                f.write(json.dumps({k: v for k, v in r.items() if k != "trace"} | {"trace": r.get("trace")}) + "\n")

    docs = {t: build_documents(tok, t, cfg.n_docs, cfg.doc_tokens, cfg.seed, cfg.n_needles) for t in cfg.tasks}
    for i in range(cfg.n_docs):  # tasks interleaved, so that a time limit leaves every task measured
        for task in cfg.tasks:
            if (time.time() - start) / 60 > args.minutes:
                break
            new = run_rlm(backend, [docs[task][i]], cfg.ratios, cfg)
            if not args.no_truncated:
                new += run_truncated(backend, [docs[task][i]], cfg)
            for r in new:
                r["doc"] = i
            keep(new)
            print(f"{task} doc {i}: {[(r['method'], r['ratio'], r['score'], r.get('read_calls')) for r in new]} "
                  f"at {(time.time() - start) / 60:.1f} min", flush=True)
    for task in cfg.tasks if cfg.official_docs else ():  # the official client last, on each task's first document
        official = run_official(backend, docs[task][: cfg.official_docs], cfg)
        keep(official)
        print(f"{task} official: {[(r['score'], r['calls'], r['error']) for r in official]}", flush=True)
    table = pd.DataFrame(summarize(rows))
    print(table.drop(columns=["achieved_ratio"]).round(3).to_string(), flush=True)
    metrics = claim_metrics(rows)
    if args.no_mlflow:
        table.to_csv(folder / "summary.csv", index=False)
    else:
        tracking.publish("05_recursive_lm", cfg, args.profile, metrics,
                         tables={"summary": table, "rows": pd.DataFrame(rows).drop(columns=["trace"], errors="ignore")})
    print({k: v for k, v in metrics.items() if k.startswith("claim.")}, f"{(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
