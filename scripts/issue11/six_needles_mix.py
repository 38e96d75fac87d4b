"""The 6 needles of six_needles.py with the scorer wrappers: SnapKV pooling on KV-Compress's score
(permkv_pooled) and a half-recency mix (permkv_recency), both modes, at 1.1x, 2x and 8x.
Writes reports/issue11/six_needles_mix_<start>_<stop>.json.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/issue11/six_needles_mix.py 0 6
"""

import json
import sys
import time
from pathlib import Path

import torch

from permkv.data import build_task
from permkv.experiments.compression_quality import answer_sample
from permkv.models import load_model

if __name__ == "__main__":
    start, stop = (int(x) for x in (sys.argv[1:] or ["0", "6"]))
    torch.set_num_threads(1)
    model, tok, spec = load_model("smollm2-135m", device="cpu")
    out, rows, t0 = Path(f"reports/issue11/six_needles_mix_{start}_{stop}.json"), [], time.perf_counter()
    for i, sample in list(enumerate(build_task("niah_single", tok, spec, 6, 1024, seed=1)))[start:stop]:
        for mode in ("query_aware", "query_agnostic"):
            rows += [dict(sample=i, **{k: v for k, v in r.items() if k != "kept"})
                     for r in answer_sample(model, tok, sample, spec, mode, ["permkv_pooled", "permkv_recency"], [1.1, 2, 8], 32)]
            out.write_text(json.dumps(dict(wall_s=time.perf_counter() - t0, rows=rows)))
            print(f"sample {i} {mode} done at {time.perf_counter() - t0:.0f} s", flush=True)
