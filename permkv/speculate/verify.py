"""The speculative decoding loop: verify a drafter's tokens in one forward pass per step, lossless.

The longest branch of the draft (a chain or a tree) that agrees with the model's own greedy choices is
kept, plus the model's next token, so the output is the greedy output; the cache is rolled back to the
accepted branch. The cache only needs `crop(n)` and `get_seq_length()` (transformers' `DynamicCache`, the
paged cache). With `drafter=None` the same loop and cache decode plainly, which makes speed
comparisons fair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from permkv.cache import forward
from permkv.speculate.drafts import DraftSource, DraftTree


class RollbackCache(Protocol):
    """What the decoding loop needs from a KV cache to undo rejected drafts."""

    def crop(self, max_length: int) -> None:
        """Keep only the first `max_length` cached tokens."""

    def get_seq_length(self) -> int:
        """Number of cached tokens."""


@dataclass
class SpecStats:
    """What one decoding call did."""

    new_tokens: int = 0  # tokens generated (including a final EOS)
    forward_passes: int = 0  # model calls, prefill included
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the model agreed with
    wall_s: float = 0.0  # time of the whole call
    prefill_s: float | None = None  # time of the prompt's forward pass (None: not measured)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per forward pass (the prefill makes the first); exactly 1.0 for plain greedy."""
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def decode_s(self) -> float | None:
        """Wall time after the prefill (None when the prefill was not timed)."""
        return None if self.prefill_s is None else self.wall_s - self.prefill_s

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "forward_passes": self.forward_passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_pass": self.tokens_per_pass,
            "wall_s": self.wall_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class SpecResult:
    """Generated token ids (prompt excluded), the stats, and the cache (holding all but the last token)."""

    tokens: list[int]
    stats: SpecStats
    cache: object = None
    drafts: list[tuple[list[int], int]] = field(default_factory=list)  # (draft tokens, accepted) per drafting step
    widths: list[int] = field(default_factory=list)  # tokens fed to each decode pass (1: a plain step)


def new_cache(model):
    """An empty `DynamicCache` for `model`."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def tree_ready(model, cache) -> bool:
    """Whether `cache` can verify a branching tree: a `DynamicCache` of full-attention layers under
    sdpa or eager attention (a custom 4D mask and in-place rollback). Other caches verify chains only."""
    from transformers import DynamicCache

    return (
        type(cache) is DynamicCache
        and model.config._attn_implementation in ("sdpa", "eager")
        and not any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    )


def tree_mask(tree: DraftTree, past: int, device=None) -> torch.Tensor:
    """(1, 1, 1 + N, past + 1 + N) bool, True = may attend: every cached token, the root, and each
    node's own ancestors and itself. Row / column 0 of the new part is the root (the last accepted token)."""
    n = len(tree) + 1
    own = torch.zeros(n, n, dtype=torch.bool)
    own[:, 0] = True
    for i, parent in enumerate(tree.parents, start=1):
        own[i] = own[parent + 1]
        own[i, i] = True
    return torch.cat([torch.ones(n, past, dtype=torch.bool), own], dim=1)[None, None].to(device)


def _keep_branch(cache, start: int, path: list[int]) -> None:
    """Keep the cache's first `start` tokens and the accepted nodes (`start + path[j]`, moved to `start + j`)."""
    if path != list(range(len(path))):  # not already in place (a branch other than the first)
        src = torch.tensor([start + i for i in path], device=cache.layers[0].keys.device)
        dst = slice(start, start + len(path))
        for layer in cache.layers:  # keys, values: (batch, kv_heads, seq, head_dim)
            layer.keys[:, :, dst] = layer.keys[:, :, src]
            layer.values[:, :, dst] = layer.values[:, :, src]
    cache.crop(start + len(path))


def _main_branch(tree: DraftTree) -> DraftTree:
    """The chain through each node's first child (the best one of a best-first tree)."""
    kids, cur, out = tree.children(), -1, []
    while cur in kids:
        cur = kids[cur][0]
        out.append(tree.tokens[cur])
    return DraftTree.chain(out)


@torch.inference_mode()
def speculative_generate(
    model,
    input_ids: list[int],
    max_new_tokens: int,
    drafter: DraftSource | None = None,
    eos_token_id: int | list[int] | None = None,
    cache: RollbackCache | None = None,
) -> SpecResult:
    """Greedy decoding of `input_ids` (batch 1), verifying the drafter's tokens in one pass per step.

    A draft is a chain or a `DraftTree`: a tree is verified in one forward pass with a tree attention
    mask (each node sees the cache and its own ancestors, at position past + depth) and the cache keeps
    only the accepted branch. With `drafter=None` this is plain greedy decoding, one token per forward
    pass, with the same code and cache, so that the two can be timed against each other. Stops after
    `max_new_tokens` or at an EOS (which is kept). `cache` defaults to a fresh `DynamicCache`; any cache
    with `crop(n)` and `get_seq_length()` verifies chains (a tree is cut to its main branch there, see
    `tree_ready`). On return the cache holds the prompt and every generated token but the last.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not input_ids:
        raise ValueError("input_ids must hold at least one token")
    eos = set() if eos_token_id is None else (
        {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    )
    cache = new_cache(model) if cache is None else cache
    trees = tree_ready(model, cache)
    dev = model.device
    stats = SpecStats()
    t0 = time.perf_counter()
    seq = list(input_ids)
    trace: list[tuple[list[int], int]] = []
    widths: list[int] = []
    if drafter is not None:
        drafter.start(seq)

    # Prefill: the prompt's K/V go into the cache; the last logit gives the first new token.
    logits = forward(model, cache, torch.tensor([seq], device=dev))  # (1, 1, vocab)
    stats.forward_passes = 1
    tok = int(logits[0, -1].argmax())
    stats.prefill_s = time.perf_counter() - t0
    seq.append(tok)
    new = [tok]

    while len(new) < max_new_tokens and tok not in eos:
        room = max_new_tokens - len(new) - 1  # drafts beyond this could never be kept
        drafts = drafter.get_candidates(seq) if (drafter is not None and room > 0) else None
        tree = None
        if drafts:
            tree = drafts if isinstance(drafts, DraftTree) else DraftTree.chain(drafts)
            tree = tree.pruned(room) if tree.is_chain or trees else _main_branch(tree).pruned(room)
        chunk = [tok] + (list(tree.tokens) if tree else [])  # the last accepted token is not cached yet
        if tree and not tree.is_chain:  # a tree: its own positions and mask (a DynamicCache)
            past = len(seq) - 1
            logits = model(input_ids=torch.tensor([chunk], device=dev), past_key_values=cache, use_cache=True,
                           logits_to_keep=len(chunk), attention_mask=tree_mask(tree, past, dev),
                           position_ids=torch.tensor([[past + d for d in [0] + tree.depths()]], device=dev)).logits
        else:
            logits = forward(model, cache, torch.tensor([chunk], device=dev), logits_to_keep=len(chunk))  # (1, len(chunk), vocab)
        stats.forward_passes += 1
        widths.append(len(chunk))
        preds = logits[0].argmax(-1).tolist()  # the model's greedy choice after each chunk position
        path = []
        if tree:
            path = tree.accept(preds, eos)
            stats.drafted += len(tree)
            stats.accepted += len(path)
            drafter.update(len(path))
            trace.append((list(tree.tokens), len(path)))
            if len(path) < len(tree):
                _keep_branch(cache, len(seq), path)  # drop K/V of the rejected drafts
        step = [tree.tokens[i] for i in path] + [preds[path[-1] + 1 if path else 0]]
        seq.extend(step)
        new.extend(step)
        tok = step[-1]

    stats.new_tokens = len(new)
    stats.wall_s = time.perf_counter() - t0
    return SpecResult(new, stats, cache, trace, widths)


def replay(drafter: DraftSource, input_ids: list[int], greedy: list[int], eos_token_id=None,
           tree_capable: bool = True) -> SpecResult:
    """What `speculative_generate(model, input_ids, len(greedy), drafter)` does, without the model.

    `greedy` is the model's greedy output for `input_ids`; it stands in for every pass's predictions,
    which is exact (floating-point near-ties aside) because only predictions along the accepted branch
    are ever read. Gives the same drafts, acceptances, forward passes and widths; no times
    (`wall_s` stays 0). `tree_capable=False` replays a cache that verifies chains only.
    """
    if not greedy:
        raise ValueError("greedy must hold at least one token")
    eos = set() if eos_token_id is None else (
        {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    )
    stats, trace, widths = SpecStats(forward_passes=1), [], []
    seq, new = list(input_ids) + greedy[:1], greedy[:1]
    if drafter is not None:
        drafter.start(list(input_ids))
    while len(new) < len(greedy) and new[-1] not in eos:
        room = len(greedy) - len(new) - 1
        drafts = drafter.get_candidates(seq) if (drafter is not None and room > 0) else None
        tree = None
        if drafts:
            tree = drafts if isinstance(drafts, DraftTree) else DraftTree.chain(drafts)
            tree = tree.pruned(room) if tree.is_chain or tree_capable else _main_branch(tree).pruned(room)
        i = len(new)  # greedy[i] is the model's token after seq
        preds = [greedy[i]] + ([greedy[i + d] for d in tree.depths()] if tree else [])
        stats.forward_passes += 1
        widths.append(1 + (len(tree) if tree else 0))
        path = []
        if tree:
            path = tree.accept(preds, eos)
            stats.drafted += len(tree)
            stats.accepted += len(path)
            drafter.update(len(path))
            trace.append((list(tree.tokens), len(path)))
        step = greedy[i : i + len(path) + 1]
        seq.extend(step)
        new.extend(step)
    stats.new_tokens = len(new)
    return SpecResult(new, stats, None, trace, widths)


def greedy_generate_ids(model, input_ids: list[int], max_new_tokens: int, eos_token_id=None) -> SpecResult:
    """Plain greedy decoding with the same loop and cache as `speculative_generate`."""
    return speculative_generate(model, input_ids, max_new_tokens, None, eos_token_id)
