"""Cost of permkv's per-head compression vs kvpress SnapKV, and decode speed on a compressed cache.

`python -m permkv.bench compress [--contexts 1024 2048] [--ratio 8] [--steps 8] [--repeats 3]`
For each context (fixed random tokens; cost does not depend on their values), alternating order
each repeat so both see the same machine load:
- permkv: prefill into a PagedCache while recording queries, then `compress_auto` (timed apart);
- kvpress: SnapKV's prefill with its hooks vs a plain DynamicCache prefill (the difference is
  its scoring + compression time);
- decode: single-token step time on the compressed PagedCache vs the full PagedCache.
Reported as medians, seconds per 1K context tokens, and ratios measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

from permkv.cache import paged_attention
from permkv.compress import InferenceKVCacheCompression, observing
from permkv.compress.answer import make_press, paged_cache_for
from permkv.models import load_model
from permkv.tracking import ROOT


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def bench_context(model, context: int, ratio: float, steps: int, repeats: int) -> dict:
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(context))
    press = make_press("kvpress_snapkv", ratio)
    compression = InferenceKVCacheCompression()
    t = {k: [] for k in ("permkv_prefill", "permkv_compress", "plain_prefill", "kvpress_prefill", "decode_full", "decode_compressed")}
    for r in range(repeats):
        caches = {}
        for kind in (["permkv", "kvpress"] if r % 2 == 0 else ["kvpress", "permkv"]):
            if kind == "permkv":
                full, cache = paged_cache_for(model, context + steps + 16), paged_cache_for(model, context + steps + 16)
                with observing(model, compression.observe) as rec:
                    s, _ = _timed(lambda: model(ids, past_key_values=cache))
                with paged_attention(model):
                    model(ids, past_key_values=full)
                t["permkv_prefill"].append(s)
                s, _ = _timed(lambda: compression.compress_auto(cache, ratio, rec.queries))
                t["permkv_compress"].append(s)
                caches = dict(full=full, compressed=cache)
            else:
                s, _ = _timed(lambda: model(ids, past_key_values=DynamicCache(config=model.config)))
                t["plain_prefill"].append(s)
                with press(model):
                    s, _ = _timed(lambda: model(ids, past_key_values=DynamicCache(config=model.config)))
                t["kvpress_prefill"].append(s)
        with paged_attention(model):
            token = torch.tensor([[13]])
            for step in range(steps):
                for name in (["full", "compressed"] if step % 2 == 0 else ["compressed", "full"]):
                    pos = torch.tensor([[context + step]])
                    s, _ = _timed(lambda: model(token, past_key_values=caches[name], position_ids=pos))
                    t[f"decode_{name}"].append(s)
    med = {k: statistics.median(v) for k, v in t.items()}
    per_k = 1000 / context
    kvpress_overhead = med["kvpress_prefill"] - med["plain_prefill"]
    return dict(
        context=context, ratio=ratio, repeats=repeats, decode_steps=steps * repeats, **{f"{k}_s": v for k, v in med.items()},
        permkv_compress_s_per_1k=med["permkv_compress"] * per_k,
        kvpress_snapkv_overhead_s_per_1k=kvpress_overhead * per_k,
        compress_time_ratio_permkv_over_kvpress=med["permkv_compress"] / kvpress_overhead if kvpress_overhead > 0 else None,
        decode_speedup_compressed=med["decode_full"] / med["decode_compressed"],
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m permkv.bench compress")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--ratio", type=float, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model, _, spec = load_model("smollm2-135m")
    rows = [bench_context(model, c, args.ratio, args.steps, args.repeats) for c in args.contexts]
    out = dict(model=spec.name, device=str(model.device), torch_threads=torch.get_num_threads(), rows=rows,
               not_measured="peak RSS with / without chunked prefill (chunked prefill not built yet)")
    path = ROOT / "reports" / "bench" / "compress.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(rows, indent=1))
