"""Issue 11's long-context slice: niah_single, SmolLM2, one length and mode, samples [start, stop) of a
seeded set of 30, the headline against the best kvpress press of its mode and random, at 8x and 64x.

One prefill per sample (`answer_sample`); the full cache is notebook 00's answer. Appends nothing:
writes reports/issue11/long_<length>_<mode>_<start>_<stop>.json (per-answer rows, wall time).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/issue11/long_slice.py 4096 query_aware 0 15
"""

import json
import sys
import time
from pathlib import Path

import torch

from permkv.data import build_task
from permkv.experiments.compression_quality import answer_sample
from permkv.models import load_model

METHODS = {"query_aware": ["permkv", "kvpress_snapkv", "permkv_random"],
           "query_agnostic": ["permkv", "kvpress_streaming", "permkv_random"]}
RATIOS = [8, 64]


def main(length: str, mode: str, start: str = "0", stop: str = "30") -> None:
    torch.set_num_threads(1)
    length, start, stop = int(length), int(start), int(stop)
    model, tok, spec = load_model("smollm2-135m", device="cpu")
    samples = build_task("niah_single", tok, spec, 30, length, seed=0)
    out = Path(f"reports/issue11/long_{length}_{mode}_{start}_{stop}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for i in range(start, stop):
        for r in answer_sample(model, tok, samples[i], spec, mode, METHODS[mode], RATIOS, 32):
            rows.append(dict(model=spec.name, context_tokens=length, sample=i, **{k: v for k, v in r.items() if k != "kept"}))
        out.write_text(json.dumps(dict(wall_s=time.perf_counter() - t0, done=i + 1 - start, rows=rows)))
        print(f"{length} {mode} sample {i} at {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
