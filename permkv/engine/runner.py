"""The model side of a step: pack every item into one input, run one forward, sample.

Positions are explicit everywhere: a compressed cache holds fewer tokens than it has seen.
The caller holds `paged_attention(model)` around every call.
"""

from __future__ import annotations

import torch

from permkv.cache import PagedBatch, Segment, run
from permkv.engine.scheduler import Item, Work
from permkv.engine.sequence import Sequence


class ModelRunner:
    """Runs `model` over the items of a step; `reread` is KVzip's repeat prompt (token ids)."""

    def __init__(self, model, reread: list[int] | None):
        self.model = model
        self.device = model.device
        self.reread = list(reread or [])

    @torch.no_grad()
    def run(self, items: list[Item], observe: dict[int, int]) -> tuple[dict[int, torch.Tensor], list[Segment]]:
        """One forward over `items` (in order); `observe[seq id]` queries kept per layer for that item's
        segment. Returns the next-token logits `(vocab,)` of every item that needs them (decodes and the
        last chunk of a context), by request id, and the segments (their `queries`; a re-read's fork row)."""
        ids, positions, segments, wants = [], [], [], []
        for item in items:
            seq = item.seq
            if item.work is Work.DECODE:
                tokens, start, row = [seq.tokens[-1]], seq.position, 0
                wants.append(True)
            elif item.work is Work.PREFILL:
                tokens, start, row = seq.context[seq.read : seq.read + item.count], seq.base + seq.read, 0
                wants.append(seq.read + item.count == len(seq.context))
            else:  # the fork re-reads one chunk after the repeat prompt, right after the context
                c = item.count - len(self.reread)
                tokens, start = self.reread + seq.context[seq.scored : seq.scored + c], len(seq.context)
                row = seq.cache.fork(0)
                wants.append(False)
            assert len(tokens) == item.count, f"item of {item.count} tokens holds {len(tokens)}"
            ids += tokens
            positions += range(start, start + len(tokens))
            segments.append(Segment(seq.cache, row, item.count, observe.get(seq.id, 0)))
        batch = PagedBatch(segments)
        last = batch.last_positions()
        at = last[torch.tensor(wants)]
        logits = run(self.model, batch, torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                     at) if ids else None
        out, k = {}, 0
        for item, want in zip(items, wants):
            if want:
                out[item.seq.id] = logits[k]
                k += 1
        return out, segments


def sample(logits: torch.Tensor, seq: Sequence) -> int:
    """The next token of `seq` from `logits` `(vocab,)`: greedy at temperature 0, else nucleus
    sampling with the sequence's own seeded generator."""
    r = seq.request
    if r.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / r.temperature, dim=-1)
    if r.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        cut = (sorted_p.cumsum(0) - sorted_p) >= r.top_p  # tokens after the nucleus
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
