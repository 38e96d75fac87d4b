"""Issue 11's 6-needle table, before and after the fix: niah_single, SmolLM2, 1,024 tokens, seed 1.

Every method answers the same 6 needles from one prefill per sample and mode
(`permkv.experiments.compression_quality.answer_sample`); the full cache is notebook 00's answer.
Writes reports/issue11/six_needles_<start>_<stop>.json (per-answer rows incl. kept tokens per
(layer, head)) for needles [start, stop); on the shared machine the needles ran as 0-2, 2-4, 4-5, 5-6.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/issue11/six_needles.py 0 6
"""

import json
import sys
import time
from pathlib import Path

import torch

from permkv.data import build_task
from permkv.experiments.compression_quality import answer_sample
from permkv.models import load_model

AWARE = ["permkv_adaptive", "permkv_snapkv_global_w8", "permkv_random", "kvpress_snapkv", "permkv", "permkv_uniform_w8",
         "permkv_global", "permkv_layer", "permkv_snapkv"]
AGNOSTIC = ["permkv_streaming", "kvpress_streaming", "permkv_adaptive", "permkv", "permkv_random", "kvpress_snapkv"]
RATIOS = [1.01, 1.1, 2, 8]


def main(start: str = "0", stop: str = "6", modes: str = "query_aware,query_agnostic") -> None:
    start, stop, modes = int(start), int(stop), modes.split(",")
    out = f"reports/issue11/six_needles_{start}_{stop}{'' if len(modes) == 2 else '_' + modes[0]}.json"
    torch.set_num_threads(1)
    model, tok, spec = load_model("smollm2-135m", device="cpu")
    samples = build_task("niah_single", tok, spec, 6, 1024, seed=1)
    rows, t0 = [], time.perf_counter()
    for i, sample in list(enumerate(samples))[start:stop]:
        for mode, methods in [(m, AWARE if m == "query_aware" else AGNOSTIC) for m in modes]:
            for r in answer_sample(model, tok, sample, spec, mode, methods, RATIOS, 32):
                rows.append(dict(sample=i, **r))
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(dict(wall_s=time.perf_counter() - t0, rows=rows)))
            print(f"sample {i} {mode} done at {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
