"""Wall-clock timing of prefill and decode on a real model (medians of repeats)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

def sync(model) -> None:
    """Wait for queued GPU work so that wall-clock timings mean something."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_prefill_decode(model, ids: Sequence[int], n_decode: int = 16, repeats: int = 3) -> dict[str, float]:
    """Median seconds of prefilling `ids` and of one greedy decode step after it (DynamicCache)."""
    inp = torch.tensor([list(ids)], device=model.device)
    prefill, decode = [], []
    for _ in range(repeats):
        sync(model)
        t0 = time.perf_counter()
        out = model(inp, use_cache=True)
        sync(model)
        t1 = time.perf_counter()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(n_decode):
            ts = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            sync(model)
            steps.append(time.perf_counter() - ts)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        prefill.append(t1 - t0)
        decode.append(float(np.median(steps)))
    return dict(prefill_s=float(np.median(prefill)), decode_step_s=float(np.median(decode)))
