"""The 6 needles of six_needles.py (niah_single, SmolLM2, 1,024 tokens, seed 1), query-agnostic, with the
KVzip-style scorers: permkv's on the paged cache (uniform and global budgets) against kvpress's KVzipPress.
Writes reports/issue11/six_needles_kvzip.json.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/issue11/six_needles_kvzip.py
"""

import json
import time
from pathlib import Path

import torch

from permkv.data import build_task
from permkv.experiments.compression_quality import answer_sample
from permkv.models import load_model

METHODS = ["permkv_kvzip", "permkv_kvzip_global", "kvpress_kvzip"]
RATIOS = [2, 8]

if __name__ == "__main__":
    torch.set_num_threads(1)
    model, tok, spec = load_model("smollm2-135m", device="cpu")
    out, rows, start = Path("reports/issue11/six_needles_kvzip.json"), [], time.perf_counter()
    for i, sample in enumerate(build_task("niah_single", tok, spec, 6, 1024, seed=1)):
        rows += [dict(sample=i, **{k: v for k, v in r.items() if k != "kept"})
                 for r in answer_sample(model, tok, sample, spec, "query_agnostic", METHODS, RATIOS, 32)]
        out.write_text(json.dumps(dict(wall_s=time.perf_counter() - start, rows=rows)))
        print(f"sample {i} done at {time.perf_counter() - start:.0f} s", flush=True)
