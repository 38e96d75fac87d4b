"""Decode and prefill time of SmolLM2 with the paged cache vs transformers' DynamicCache.

`python -m permkv.bench paged [--contexts 1024 4096 8192] [--steps 16] [--repeats 3]`
For each context length: prefill a prompt of that many tokens into both caches (timed, alternating
which goes first), then time single-token decode steps alternately on the two caches, so both see
the same machine load. Ratios are paged / dynamic of the medians (1.10 = paged 10% slower).
Peak RSS of each cache type is measured in a fresh subprocess at the largest context.
The prompt is a fixed random token sequence: step time does not depend on the token values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from permkv.cache import BlockPool, PagedCache, paged_attention
from permkv.cache import forward as cache_forward
from permkv.bench import peak_rss as bench_peak_rss
from permkv.models import load_model


def make_cache(kind: str, model, spec, n_tokens: int):
    """An empty cache of `kind` ("dynamic" or "paged") sized for `n_tokens` tokens."""
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    probe = PagedCache(BlockPool(1, 16, spec.head_dim), model.config)
    pool = BlockPool(probe.blocks_needed(n_tokens), 16, spec.head_dim, device=model.device)
    return PagedCache(pool, model.config)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward(kind: str, model, ids: torch.Tensor, cache) -> tuple[float, torch.Tensor]:
    """One timed forward pass; returns seconds and the last position's logits.

    Switching the model's attention implementation (~3 ms) happens outside the timed region: a
    server switches once, not per step. Only the last position's logits are computed (as generation
    does), so prefill time and peak memory are not dominated by the (context, vocab) logits.
    """
    switch = paged_attention(model) if kind == "paged" else contextlib.nullcontext()
    with switch:
        sync(model.device)
        start = time.perf_counter()
        logits = cache_forward(model, cache, ids)[:, -1]
        sync(model.device)
        seconds = time.perf_counter() - start
    return seconds, logits


def bench_context(model, spec, context: int, steps: int, repeats: int) -> dict:
    """Prefill and decode timings at one context length, both caches side by side."""
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(context)).to(model.device)
    prefill = {"dynamic": [], "paged": []}
    decode = {"dynamic": [], "paged": []}
    for r in range(repeats):
        order = ["dynamic", "paged"] if r % 2 == 0 else ["paged", "dynamic"]
        caches, nxt = {}, {}
        for kind in order:
            caches[kind] = make_cache(kind, model, spec, context + steps + 1)
            seconds, logits = forward(kind, model, ids, caches[kind])
            prefill[kind].append(seconds)
            nxt[kind] = logits.argmax(-1, keepdim=True)
        assert torch.equal(nxt["dynamic"], nxt["paged"]), "paged and dynamic disagree after prefill"
        for _ in range(steps):
            for kind in order:
                seconds, logits = forward(kind, model, nxt[kind], caches[kind])
                decode[kind].append(seconds)
                nxt[kind] = logits.argmax(-1, keepdim=True)
        del caches
    med = {f"{phase}_{kind}_s": statistics.median(times[kind])
           for phase, times in (("prefill", prefill), ("decode", decode)) for kind in times}
    return {
        "context": context,
        **med,
        "decode_time_paged_over_dynamic": med["decode_paged_s"] / med["decode_dynamic_s"],
        "prefill_time_paged_over_dynamic": med["prefill_paged_s"] / med["prefill_dynamic_s"],
        "decode_samples": len(decode["paged"]),
        "prefill_samples": repeats,
    }


def peak_rss(kind: str, context: int, steps: int) -> int:
    """Peak resident bytes of a fresh CPU process while it prefills `context` tokens and decodes `steps`."""
    setup = ("import torch; from permkv.bench.paged import make_cache, forward; "
             "from permkv.models import load_model; m, t, s = load_model(device='cpu'); torch.set_num_threads(1); "
             f"ids = torch.randint(100, 40000, (1, {context})); c = make_cache('{kind}', m, s, {context + steps + 1})")
    work = (f"_, l = forward('{kind}', m, ids, c)\n"
            f"for _ in range({steps}): _, l = forward('{kind}', m, l.argmax(-1, keepdim=True), c)")
    return bench_peak_rss(setup, work)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m permkv.bench paged")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="prefills per context (and decode runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared machine oversubscribes)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _, spec = load_model("smollm2-135m", device=args.device)
    rows = []
    for context in args.contexts:
        row = bench_context(model, spec, context, args.steps, args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "model": spec.name,
        "dtype": "float32",
        "device": str(model.device),
        "threads": args.threads,
        "block_size": 16,
        "contexts": rows,
        "command": "python -m permkv.bench paged " + " ".join(argv),
    }
    if not args.no_rss:
        top = max(args.contexts)
        result["peak_rss_bytes"] = {kind: peak_rss(kind, top, args.steps) for kind in ("dynamic", "paged")}
        result["peak_rss_context"] = top
    from permkv.bench import write_result

    print(f"wrote {write_result('paged', result)}")


if __name__ == "__main__":
    main(sys.argv[1:])
