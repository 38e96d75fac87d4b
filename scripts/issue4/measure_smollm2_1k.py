import json, time
from permkv.models import load_model
from permkv.compress.quality import quality_grid, pooled_retention
t0 = time.time()
m, tok, spec = load_model("smollm2-135m", device="cpu")
ROWS, PER = [], []
METHODS, RATIOS = ["permkv_adaptive", "kvpress_snapkv"], [8, 64]
for task in ["niah_single", "squad"]:
    for mode in ["query_aware", "query_agnostic"]:
        rows, per = quality_grid(m, tok, spec, [task], [1024], 6, RATIOS, METHODS, (mode,), seed=0, max_new_tokens=40)
        ROWS += rows; PER += per
        claims = {f"{meth}.{r}x.{mode_}": pooled_retention(PER, meth, r, mode_) for meth in METHODS for r in RATIOS for mode_ in ["query_aware", "query_agnostic"]}
        json.dump(dict(rows=ROWS, claims=claims, samples=[{k: v for k, v in s.items() if k != "kept"} for s in PER], seconds=time.time() - t0),
                  open("reports/issue4/measure_smollm2_1k.json", "w"), indent=1)
        print("cell done", task, mode, time.time() - t0, flush=True)
