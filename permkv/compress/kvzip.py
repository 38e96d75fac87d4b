"""KVzip-style query-agnostic scores on a paged cache (Kim 2025, arXiv 2505.23416).

A cached token matters if the model needs it to reproduce the context: after a "repeat the previous
context" prompt, the model re-reads the context chunk by chunk on a copy-on-write fork of the cache,
and each cached token scores the most attention any re-reading query (any head of its group) gives
it. The fork is released after each chunk, so the cache itself never changes. As in kvpress's
KVzipPress, each chunk's queries attend over the sinks, the chunk's own cached tokens and the
re-read tokens (a chunk-local softmax), which bounds memory to O(chunk^2) per layer.

A token's score depends only on its own chunk, so a chunked prefill can score each chunk right after
reading it (`last_chunk_scores`) and keep the scores of the tokens it kept: the same scores whether
the context is read at once or chunk by chunk into a compressed cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from permkv.cache import PagedCache, forward
from permkv.checks import positive_int
from permkv.compress.forks import fork_sequence
from permkv.compress.observe import observing
from permkv.models import encode_prompt

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."  # KVzip's re-reading prompt


def repeat_prompt_ids(tokenizer, spec=None) -> list[int]:
    """KVzip's prompt as it continues a user turn: the request, then (instruct models: `spec.chat`, or
    without a spec the tokenizer has a chat template) the chat template's end of turn and start of the
    assistant's, so that the model really starts repeating."""
    chat = spec.chat if spec is not None else getattr(tokenizer, "chat_template", None) is not None
    empty, asked = encode_prompt(tokenizer, spec, "", chat=chat), encode_prompt(tokenizer, spec, REPEAT_PROMPT, chat=chat)
    head = 0
    while head < min(len(empty), len(asked)) and empty[head] == asked[head]:
        head += 1
    return asked[head:]


@torch.no_grad()
def kvzip_scores(model, cache: PagedCache, ids: list[int], prompt_ids: list[int], chunk_tokens: int = 1024,
                 sinks: int = 4) -> dict[int, torch.Tensor]:
    """Scores `(1, kv_heads, len(ids))` per full-attention layer for the uncompressed sequence 0 of
    `cache`, which holds `ids`; `prompt_ids` ask the model to repeat the context (`repeat_prompt_ids`).
    Higher = keep. The pool must have room for one fork's `len(prompt_ids) + chunk_tokens` extra
    tokens per head.
    """
    if cache.num_sequences != 1 or cache.seen[0] != len(ids):
        raise ValueError(f"cache must hold one sequence of len(ids)={len(ids)} tokens, got seen={cache.seen}")
    if any(cache.cached_tokens(0, i, 0) != len(ids) for i, layer in enumerate(cache.layers) if not layer.is_sliding):
        raise ValueError("cache must be uncompressed: KVzip scores every token the sequence has seen")
    positive_int("chunk_tokens", chunk_tokens)
    n = len(ids)
    scores = {i: torch.zeros(1, cache.n_kv_heads, n) for i, layer in enumerate(cache.layers) if not layer.is_sliding}
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        for i, chunk in _reread(model, cache, ids[start:end], prompt_ids, start, min(sinks, start)).items():
            scores[i][0, :, start:end] = chunk
    return scores


@torch.no_grad()
def last_chunk_scores(model, cache: PagedCache, chunk: Sequence[int], prompt_ids: list[int],
                      sinks: int = 4) -> dict[int, torch.Tensor]:
    """Scores `(1, kv_heads, len(chunk))` per full-attention layer of the last `len(chunk)` tokens every
    head of sequence 0 holds: the chunk a chunked prefill just read, after whatever older tokens the
    compressor kept (its first `sinks` are the attention sinks). Same pool room as `kvzip_scores`.
    """
    if cache.num_sequences != 1:
        raise ValueError(f"cache must hold one sequence, got {cache.num_sequences}")
    positive_int("len(chunk)", len(chunk))
    held = min(cache.cached_tokens(0, i, h) for i, layer in enumerate(cache.layers) if not layer.is_sliding
               for h in range(cache.n_kv_heads))
    if held < len(chunk):
        raise ValueError(f"every head must hold the chunk's {len(chunk)} tokens, one holds {held}")
    scores = _reread(model, cache, chunk, prompt_ids, None, min(sinks, held - len(chunk)))
    return {i: s[None] for i, s in scores.items()}


def _reread(model, cache: PagedCache, chunk: Sequence[int], prompt_ids: Sequence[int], begin: int | None,
            sinks: int) -> dict[int, torch.Tensor]:
    """Re-read `prompt_ids + chunk` on a fork of sequence 0 and score, per full-attention layer, the
    `len(chunk)` cached tokens from index `begin` of every head (None: the last ones before the
    re-read): `(kv_heads, len(chunk))`, softmax over the first `sinks`, those tokens and the re-read."""
    reread = list(prompt_ids) + list(chunk)
    n = cache.seen[0]
    fork = fork_sequence(cache, model.config)
    try:
        pos = torch.arange(n, n + len(reread), device=model.device)[None]
        with observing(model, window=len(reread)) as recorder:
            forward(model, fork, torch.tensor([reread], device=model.device), pos)
        return reread_scores(fork, 0, recorder.queries, len(reread), len(chunk), begin, sinks, recorder.scaling)
    finally:
        fork.reset()


def reread_scores(cache: PagedCache, row: int, queries: dict[int, torch.Tensor], q_len: int, c: int,
                  begin: int | None, sinks: int, scaling: dict[int, float] | None = None) -> dict[int, torch.Tensor]:
    """Scores `(kv_heads, c)` per full-attention layer from a re-read that sequence `row` of `cache` just
    took: its last `q_len` cached tokens are the re-read, whose queries are `queries[layer]`
    `(1, q_heads, q_len, head_dim)`; the scored tokens are the `c` from index `begin` of every head (None:
    the last `c` before the re-read), each query's softmax over the first `sinks`, those and the re-read.
    `scaling[layer]`: that layer's attention scale (default head_dim**-0.5)."""
    out = {}
    for i, layer in enumerate(cache.layers):
        if layer.is_sliding:
            continue
        keys, _, starts, lengths = cache.gather(i, [row])  # (1, H, view, D); (1, H)
        ends = lengths[0, :, None] - q_len  # each head's first re-read row, relative to its start
        first = ends - c if begin is None else torch.full_like(ends, begin)
        rows = torch.cat([torch.arange(sinks, device=keys.device).expand(len(ends), sinks),
                          first + torch.arange(c, device=keys.device), ends + torch.arange(q_len, device=keys.device)],
                         dim=1) + starts[0, :, None]  # (H, sinks + c + q_len)
        picked = keys[0].gather(1, rows[..., None].expand(-1, -1, keys.shape[-1]))[None]
        out[i] = _max_attention(picked, queries[i], q_len, scaling=(scaling or {}).get(i))[:, sinks : sinks + c].float().cpu()
    return out


def _max_attention(keys: torch.Tensor, queries: torch.Tensor, q_len: int, rows: int = 256,
                   scaling: float | None = None) -> torch.Tensor:
    """keys `(1, H, K, D)` whose last q_len are the queries' own; queries `(1, Hq, q_len, D)`; `scaling`:
    the model's attention scale (None: D**-0.5). Returns `(H, K - q_len)`: the most causal softmax attention
    any query of the group gave each key before the queries' own (only those are scored; the rest of the
    row normalises).

    Query rows go `rows` at a time: each row's softmax is its own, so the result is bitwise that of
    one `(H, G * q_len, K)` tensor, whose logits would not stay in a CPU's cache (2.7x slower at 4K).
    """
    _, H, K, D = keys.shape
    G = queries.shape[1] // H
    q = queries[0].reshape(H, G * q_len, D) * (D**-0.5 if scaling is None else scaling)  # query head h*G + g -> KV head h, scaled before the
    keys_t = keys[0].transpose(1, 2)  # matmul (bit-exact when D is a power of 4)
    i = torch.arange(G * q_len, device=keys.device) % q_len  # index of each row within the re-read
    own = torch.arange(q_len, device=keys.device)
    best = []
    for start in range(0, G * q_len, rows):
        logits = q[:, start : start + rows] @ keys_t  # (H, rows, K)
        future = own[None, :] > i[start : start + rows, None]  # the re-read's own keys after each row
        logits[..., K - q_len :].masked_fill_(future, float("-inf"))  # in place, on the re-read's own columns only
        best.append(logits.softmax(-1)[..., : K - q_len].amax(dim=1))
    return torch.stack(best).amax(dim=0)


@dataclass
class RereadScores:
    """The re-reading scores of the tokens each full-attention head of one sequence holds, carried across
    compressions of a chunked read: a token keeps the score its own chunk gave it, so reading a context
    chunk by chunk into a compressed cache ranks tokens as one pass would.

        scores = RereadScores()
        for chunk in chunks:  # after reading `chunk` into the one-sequence `cache`
            report = compressor.compress(cache, ratio, scores=scores.add(last_chunk_scores(model, cache, chunk, ids)))
            scores.keep(report.kept_indices)
    """

    held: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> per KV head `(tokens held,)`

    def add(self, new: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Append a chunk's scores `new[layer]` `(1, kv_heads, chunk)` after each head's held ones; returns
        every held token's score per layer, `(1, kv_heads, longest)` (padded), for `Compressor.compress(scores=)`."""
        self.held = {i: [torch.cat([self.held[i][h], s[0, h]]) if self.held else s[0, h] for h in range(s.shape[1])]
                     for i, s in new.items()}
        return {i: pad_sequence(r, batch_first=True)[None] for i, r in self.held.items()}

    def keep(self, kept_indices: dict[int, list[torch.Tensor]]) -> None:
        """After a compression: keep the scores of the tokens each head kept (`CompressionReport.kept_indices`)."""
        self.held = {i: [r[h][idx] for h, idx in enumerate(kept_indices[i])] for i, r in self.held.items()}
