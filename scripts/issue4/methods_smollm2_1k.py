"""Every method, query-agnostic, on the same needles: SmolLM2, 1K tokens, 2x and 8x, n=6 per cell.

kvpress's PyramidKV is left out: with transformers 5.2 its per-layer cache lengths break the attention
mask of a multi-token continuation (a first run crashed on it at 2x).
Run from the repo root: `python scripts/issue4/methods_smollm2_1k.py` (about 15 min on 2 shared cores).
Writes reports/issue4/methods_smollm2_1k.json (rows as permkv.compress.quality.quality_grid returns them).
"""
import json
import time

import torch

from permkv.compress.answer import KVPRESS_METHODS
from permkv.compress.quality import quality_grid
from permkv.models import load_model

torch.set_num_threads(1)
t0 = time.time()
model, tok, spec = load_model("smollm2-135m")
methods = ["permkv_adaptive", "permkv_layer_adaptive", "permkv_uniform", *(m for m in KVPRESS_METHODS if m != "kvpress_pyramidkv")]
rows, _ = quality_grid(model, tok, spec, ["niah_single"], [1024], 6, [2, 8], methods, ("query_agnostic",),
                       seed=1, max_new_tokens=32)
out = dict(command="python scripts/issue4/methods_smollm2_1k.py", seconds=time.time() - t0, rows=rows)
with open("reports/issue4/methods_smollm2_1k.json", "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps([(r["mode"], r["method"], r["ratio"], r["score"], r["n"]) for r in rows]))
