"""Hugging Face peers: plain `model.generate` and its built-in prompt lookup, timed."""

from __future__ import annotations

import time

import torch

from permkv.speculate import SpecResult, SpecStats

@torch.inference_mode()
def hf_generate(
    model, input_ids: list[int], max_new_tokens: int, prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int | None = None, eos_token_id=None,
) -> SpecResult:
    """`model.generate(do_sample=False)`, optionally with HF's built-in prompt lookup, timed.

    Only `tokens`, `new_tokens` and `wall_s` of the stats are filled (HF does not report the rest).
    transformers 5.2's prompt lookup can return one token more than `max_new_tokens`; the output is
    cut to `max_new_tokens` (its time still includes the extra token).
    """
    inp = torch.tensor([input_ids], device=model.device)
    kwargs = {}
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
        if max_matching_ngram_size is not None:
            kwargs["max_matching_ngram_size"] = max_matching_ngram_size
    t0 = time.perf_counter()
    out = model.generate(
        inp,
        attention_mask=torch.ones_like(inp),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
        **kwargs,
    )
    wall = time.perf_counter() - t0
    tokens = out[0, len(input_ids) :].tolist()[:max_new_tokens]
    return SpecResult(tokens, SpecStats(new_tokens=len(tokens), wall_s=wall))
