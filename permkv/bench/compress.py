"""Cost of permkv's per-head compression vs kvpress SnapKV, and decode speed on a compressed cache.

`python -m permkv.bench compress [--contexts 1024 8192] [--ratio 8] [--chunk 1024] [--steps 8] [--repeats 3]`
For each context (fixed random tokens; cost does not depend on their values), alternating order
each repeat so both see the same machine load:
- permkv: prefill into a PagedCache while recording queries, then `compress_auto` (timed apart),
  and the chunked prefill (compress after every `--chunk` tokens), timed whole;
- kvpress: SnapKV's prefill with its hooks vs a plain DynamicCache prefill (the difference is
  its scoring + compression time);
- decode: single-token step time on the compressed PagedCache vs the full PagedCache.
Reported as medians, seconds per 1K context tokens, and ratios measured in this run.
Peak RSS of prefill + compress at the largest context is measured in a fresh process per method:
permkv one pass, permkv chunked, kvpress SnapKV and a plain uncompressed prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

from permkv.cache import forward, paged_attention
from permkv.baselines.kvpress import make_press
from permkv.compress import InferenceKVCacheCompression, chunked_prefill_and_compress, observing, paged_cache_for
from permkv.bench import peak_rss as bench_peak_rss
from permkv.models import load_model


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def bench_context(model, context: int, ratio: float, chunk: int, steps: int, repeats: int) -> dict:
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(context))
    press = make_press("snapkv", ratio)
    compression = InferenceKVCacheCompression(scorer="kvcompress")  # the attention scorer, timed against kvpress SnapKV
    t = {k: [] for k in ("permkv_prefill", "permkv_compress", "permkv_chunked", "plain_prefill", "kvpress_prefill",
                         "decode_full", "decode_compressed")}
    for r in range(repeats):
        caches = {}
        for kind in (["permkv", "kvpress"] if r % 2 == 0 else ["kvpress", "permkv"]):
            if kind == "permkv":
                full, cache = paged_cache_for(model, context + steps + 16), paged_cache_for(model, context + steps + 16)
                with observing(model, compression.observe) as rec:
                    s, _ = _timed(lambda: forward(model, cache, ids))
                with paged_attention(model):
                    forward(model, full, ids)
                t["permkv_prefill"].append(s)
                s, _ = _timed(lambda: compression.compress_auto(cache, ratio, rec.queries))
                t["permkv_compress"].append(s)
                caches = dict(full=full, compressed=cache)
                s, _ = _timed(lambda: chunked_prefill_and_compress(model, ids[0].tolist(), ratio, compression, chunk, steps + 16))
                t["permkv_chunked"].append(s)
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
                    s, _ = _timed(lambda: forward(model, caches[name], token, pos))
                    t[f"decode_{name}"].append(s)
    med = {k: statistics.median(v) for k, v in t.items()}
    per_k = 1000 / context
    kvpress_overhead = med["kvpress_prefill"] - med["plain_prefill"]
    return dict(
        context=context, ratio=ratio, repeats=repeats, decode_steps=steps * repeats, **{f"{k}_s": v for k, v in med.items()},
        permkv_compress_s_per_1k=med["permkv_compress"] * per_k,
        kvpress_snapkv_overhead_s_per_1k=kvpress_overhead * per_k,
        compress_time_ratio_permkv_over_kvpress=med["permkv_compress"] / kvpress_overhead if kvpress_overhead > 0 else None,
        chunked_over_one_pass=med["permkv_chunked"] / (med["permkv_prefill"] + med["permkv_compress"]),
        decode_speedup_compressed=med["decode_full"] / med["decode_compressed"],
    )


RSS_METHODS = ("plain", "kvpress_snapkv", "permkv", "permkv_chunked")


def peak_rss(method: str, context: int, ratio: float, chunk: int) -> int:
    """Peak resident bytes of a fresh CPU process while it prefills `context` tokens and compresses
    them with `method` (one of RSS_METHODS)."""
    setup = ("import torch; from transformers import DynamicCache; from permkv.models import load_model\n"
             "from permkv.compress import InferenceKVCacheCompression, chunked_prefill_and_compress, prefill_and_compress\n"
             "from permkv.baselines.kvpress import make_press\n"
             "m, _, _ = load_model(device='cpu'); torch.set_num_threads(1)\n"
             f"ids = torch.randint(100, 40000, (1, {context}), generator=torch.Generator().manual_seed({context}))")
    work = ("with torch.no_grad():\n"
            f"    if '{method}' == 'plain': m(ids, past_key_values=DynamicCache(config=m.config), logits_to_keep=1)\n"
            f"    elif '{method}' == 'kvpress_snapkv':\n"
            f"        with make_press('snapkv', {ratio})(m): m(ids, past_key_values=DynamicCache(config=m.config), logits_to_keep=1)\n"
            f"    elif '{method}' == 'permkv': prefill_and_compress(m, ids[0].tolist(), {ratio}, InferenceKVCacheCompression(scorer='kvcompress'), 16)\n"
            f"    else: chunked_prefill_and_compress(m, ids[0].tolist(), {ratio}, InferenceKVCacheCompression(scorer='kvcompress'), {chunk}, 16)")
    return bench_peak_rss(setup, work)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m permkv.bench compress")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--ratio", type=float, default=8)
    parser.add_argument("--chunk", type=int, default=1024, help="chunked prefill: compress after every CHUNK tokens")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared machine oversubscribes)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _, spec = load_model("smollm2-135m")
    rows = []
    for c in args.contexts:
        rows.append(bench_context(model, c, args.ratio, args.chunk, args.steps, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    out = dict(model=spec.name, device=str(model.device), torch_threads=args.threads, rows=rows,
               command="python -m permkv.bench compress " + " ".join(argv))
    if not args.no_rss:
        top = max(args.contexts)
        rss = {m: peak_rss(m, top, args.ratio, args.chunk) for m in RSS_METHODS}
        out |= dict(peak_rss_context=top, peak_rss_bytes=rss,
                    peak_rss_ratio_kvpress_over_permkv_chunked=rss["kvpress_snapkv"] / rss["permkv_chunked"],
                    peak_rss_ratio_permkv_over_permkv_chunked=rss["permkv"] / rss["permkv_chunked"])
        print(json.dumps(rss), flush=True)
    from permkv.bench import write_result

    print(f"wrote {write_result('compress', out)}")
