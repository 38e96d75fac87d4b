"""Hugging Face peers: plain `model.generate` and its built-in prompt lookup, timed; and the engine's
peers on the same requests: sequential `model.generate` per request and transformers' own continuous
batching (`model.generate_batch`, paged attention) under the same KV budget."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from permkv.models import kv_layout
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


@dataclass(frozen=True)
class PeerRun:
    """Tokens per request (input order) and the wall time of one peer run; `error` when it could not run."""

    name: str
    tokens: list[list[int]]
    prompt_tokens: int
    wall: float
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall if self.wall and not self.error else float("nan")

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall if self.wall and not self.error else float("nan")


def _strip(tokens: list[int], stop: set[int]) -> list[int]:
    """Generated ids up to (not including) the first stop id, as `permkv.eval.greedy_decode` returns them."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


def _eos(stop: set[int]) -> int:
    """The one stop id transformers' continuous batching takes; -1 (none) when `stop` is empty."""
    if len(stop) > 1:
        raise ValueError(f"transformers' continuous batching stops on one token id, got stop={sorted(stop)}")
    return next(iter(stop), -1)


@torch.no_grad()
def sequential_generate(model, prompts: list[list[int]], max_new_tokens: int, stop: set[int]) -> PeerRun:
    """One `model.generate` per request, one after the other (what a user does without an engine).
    An empty `stop` generates exactly `max_new_tokens` (vLLM's benchmark_throughput ignores EOS)."""
    pad = model.generation_config.pad_token_id
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0 if stop else max_new_tokens,
                              eos_token_id=sorted(stop) or model.generation_config.eos_token_id,
                              pad_token_id=pad if pad is not None else 0)
    tokens, start = [], time.perf_counter()
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        tokens.append(_strip(out[0, len(ids):].tolist(), stop))
    return PeerRun("hf_sequential", tokens, sum(map(len, prompts)), time.perf_counter() - start)


def hf_blocks(model, blocks: int) -> int:
    """transformers' continuous-batching blocks holding as many tokens as `blocks` permkv blocks of the
    same block size: its block holds every KV head of every layer, ours one (layer, KV head)."""
    layout = kv_layout(model.config)
    return max(blocks // (layout.n_layers * layout.n_kv_heads), 1)


@torch.no_grad()
def continuous_batching(model, prompts: list[list[int]], max_new_tokens: int, stop: set[int], blocks: int,
                        block_size: int = 16, max_batch_tokens: int = 512) -> PeerRun:
    """transformers' `generate_batch` with a KV cache of `blocks` permkv blocks' worth (`hf_blocks`).

    `max_batch_tokens`: tokens per forward pass (its prefill chunk). An empty `stop` generates exactly
    `max_new_tokens`. Any failure is returned as `error` (its
    message), never raised, so that a run records why the peer could not run here.
    """
    previous = model.config._attn_implementation
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=_eos(stop),
                              pad_token_id=0, num_blocks=hf_blocks(model, blocks), block_size=block_size,
                              max_batch_tokens=max_batch_tokens)
    start = time.perf_counter()
    try:
        out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        wall = time.perf_counter() - start
        missing = [i for i in range(len(prompts)) if f"req_{i}" not in out]
        if missing:
            return PeerRun("hf_continuous_batching", [], 0, wall, f"generate_batch returned no result for requests {missing[:5]} "
                           f"({len(missing)} of {len(prompts)}; its log says why)")
        tokens = [_strip(list(out[f"req_{i}"].generated_tokens), stop) for i in range(len(prompts))]
        return PeerRun("hf_continuous_batching", tokens, sum(map(len, prompts)), wall)
    except Exception as e:  # noqa: BLE001 - the peer's own failure is the result
        return PeerRun("hf_continuous_batching", [], 0, time.perf_counter() - start, f"{type(e).__name__}: {e}")
    finally:
        model.set_attn_implementation(previous)
