"""Attention that reads and writes a `PagedCache`, with the step's layout handed to it explicitly.

One forward pass runs over a *packed* input `(1, N)`: runs of consecutive tokens (`Segment`s), each
extending one sequence of a `PagedCache` (a prefill chunk, a KVzip-style re-read, or the one new
token of a decode). The `PagedBatch` that lists them is built once per forward and travels to every
layer's attention as the forward kwarg `paged=` (as transformers' own paged path passes its cache);
the model is called with `use_cache=False`, so transformers keeps no cache of its own.

    with paged_attention(model):                                   # once, around many calls
        logits = forward(model, cache, ids)                        # (batch, 1, vocab); row b extends sequence b
        logits = run(model, PagedBatch([Segment(c1, 0, 5), Segment(c2, 0, 1)]), ids, positions, logits_at)

Under the "permkv_paged" attention each layer stores its segments' new K/V in their heads' blocks and
attends over each head's own cached tokens (causal, sliding window). Decode segments (one token) are
gathered into one padded view and attend in one call; longer segments attend one at a time. Padding
exists only in that compute view, never in the pool. Grouped-query heads are folded into the query
axis, so K/V are never repeated. Called without `paged=` (e.g. `use_cache=False` training) the same
attention is plain causal attention over the given tokens. A PagedCache passed as `past_key_values`
is refused, and `run` checks that every layer stored its tokens: nothing falls back silently.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from permkv.cache.paged import PagedCache
from permkv.cache.pool import CacheFull

NAME = "permkv_paged"
RECORDER = "_permkv_recorder"  # attribute a model carries inside `permkv.compress.observing`


def _padding_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The model's mask for this implementation: just the `(batch, columns)` bool padding mask."""
    return attention_mask


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    window: int | None,
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention of the last T of L tokens over all L (L = T without a past).

    query `(batch, q_heads, T, head_dim)`, key/value `(batch, kv_heads, L, head_dim)`, valid
    `(batch, L)` bool (False = padding) or None. Returns `(batch, q_heads, T, head_dim)`.
    A padding query attends to itself only, so no row is empty (empty rows give NaN).
    """
    T, L = query.shape[2], key.shape[2]
    if T == L and (valid is None or bool(valid.all())) and (window is None or T <= window):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    rows = torch.arange(L - T, L, device=query.device)[:, None]  # each query's position among the L
    cols = torch.arange(L, device=query.device)[None, :]
    mask = (cols <= rows)[None]  # (1, T, L): query row, key column
    if window is not None:
        mask = mask & (cols > rows - window)[None]
    if valid is not None:
        mask = (mask & valid[:, None, :]) | (cols == rows)[None]
    return masked_attention(query, key, value, mask[:, None], scaling)


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """sdpa over grouped-query heads with a bool mask (True = attend), K/V never repeated.

    query `(batch, q_heads, T, head_dim)`, key/value `(batch, kv_heads, L, head_dim)`, mask
    `(batch or 1, 1 or kv_heads, T or 1, L)`. Returns `(batch, q_heads, T, head_dim)`.
    A mask shared by all heads goes to sdpa's grouped-query mode (on a CPU 2x faster than a mask per
    head); a mask per KV head, or one KV head, folds the group into the query axis (head h*G + g
    reads KV head h). One KV head keeps the folded path: it is its model's reference numerics.
    """
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    if mask.shape[1] == 1 and Hkv > 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    if mask.shape[2] > 1:  # one mask row per query: repeat it for each query head of the group
        n, h, _, L = mask.shape
        mask = mask[:, :, None].expand(n, h, G, T, L).reshape(n, h, G * T, L)
    q = query.reshape(B, Hkv, G * T, D)
    return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling).view(B, Hq, T, D)


def _causal_mask(starts: torch.Tensor, lengths: torch.Tensor, L: int, T: int, window: int | None) -> torch.Tensor:
    """`(B, H, T, L)` bool: query t of a head holding `lengths` tokens from view row `starts` (its last T
    tokens are the queries' own) sees its head's tokens up to itself, within `window`."""
    u = torch.arange(L, device=starts.device) - starts[:, :, None, None]  # (B, H, 1, L): token index in the head
    if T == 1 and window is None:  # decode: the one query sees all of its head's tokens
        return (u >= 0) & (u < lengths[:, :, None, None])
    last = (lengths - T)[:, :, None, None] + torch.arange(T, device=starts.device)[:, None]  # (B, H, T, 1)
    mask = (u >= 0) & (u <= last)
    return mask & (u > last - window) if window is not None else mask


@dataclass
class Segment:
    """`count` consecutive tokens of a packed input that extend sequence `row` of `cache`.

    `observe` > 0 keeps the last `observe` queries of every layer in `queries[layer]`
    `(1, q_heads, w, head_dim)` (post-RoPE, unscaled): what attention scorers and KVzip-style
    re-reading score the cache with.
    """

    cache: PagedCache
    row: int
    count: int
    observe: int = 0
    queries: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)


class PagedBatch:
    """The attention metadata of one forward pass: the segments, in the packed input's order.

    All segments live on one `BlockPool`; two segments never extend the same sequence.
    """

    def __init__(self, segments: list[Segment]):
        if not segments:
            raise ValueError("a PagedBatch needs at least one segment")
        pools = {id(s.cache.pool) for s in segments}
        if len(pools) != 1:
            raise ValueError(f"all segments must live on one BlockPool, got {len(pools)} pools")
        keys = [(id(s.cache), s.row) for s in segments]
        if len(set(keys)) != len(keys):
            raise ValueError("two segments extend the same sequence")
        for s in segments:
            s.cache._seq(s.row)
            if s.count < 1:
                raise ValueError(f"a segment holds at least one token, got count={s.count}")
        self.segments = segments
        self.offsets = [0]
        for s in segments:
            self.offsets.append(self.offsets[-1] + s.count)
        self.pool = segments[0].cache.pool
        self._decode = [i for i, s in enumerate(segments) if s.count == 1]
        self._whole_cache = self._decode == list(range(len(segments))) and len({id(s.cache) for s in segments}) == 1 \
            and [s.row for s in segments] == list(range(segments[0].cache.num_sequences))
        self.attended: list[int] = []  # layer indices in the order they stored their tokens
        self.scaling: dict[int, float] = {}  # layer -> the attention scale the model used

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def last_positions(self) -> torch.Tensor:
        """Index of each segment's last token in the packed input `(n_segments,)`."""
        return torch.tensor(self.offsets[1:]) - 1

    def check_room(self) -> None:
        """Raise CacheFull, before anything is written, unless the pool can take every segment's tokens."""
        need = 0
        by_cache: dict[int, tuple[PagedCache, list[int]]] = {}
        for s in self.segments:
            cache, counts = by_cache.setdefault(id(s.cache), (s.cache, [0] * s.cache.num_sequences))
            counts[s.row] = s.count
        for cache, counts in by_cache.values():
            need += cache.blocks_to_grow(counts)
        if need > self.pool.num_free:
            raise CacheFull(need, self.pool.num_free, self.pool.num_blocks)

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Store one layer's new K/V and attend. query `(1, q_heads, N, head_dim)`, key/value
        `(1, kv_heads, N, head_dim)`, N = `tokens`. Returns `(1, q_heads, N, head_dim)`."""
        if query.shape[0] != 1 or query.shape[2] != self.tokens:
            raise ValueError(f"a PagedBatch of {self.tokens} tokens needs packed inputs (1, heads, {self.tokens}, "
                             f"head_dim), got {tuple(query.shape)}")
        self.attended.append(layer_idx)
        if scaling is not None:
            self.scaling[layer_idx] = float(scaling)
        out = torch.empty_like(query)
        decode = []
        for i, s in enumerate(self.segments):
            a, b = self.offsets[i], self.offsets[i + 1]
            if s.observe:
                s.queries[layer_idx] = query[:, :, max(a, b - s.observe) : b].clone()
            layer = s.cache.layers[layer_idx]
            if s.count == 1 and any(t.length for t in layer.tables[s.row]):
                decode.append(i)
                continue
            out[:, :, a:b] = self._extend(s, layer_idx, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scaling)
        if decode:
            at = torch.tensor([self.offsets[i] for i in decode], device=query.device)
            out[:, :, at] = self._decode_step(layer_idx, [self.segments[i] for i in decode], query[0, :, at],
                                              key[0, :, at], value[0, :, at], scaling)
        return out

    def _extend(self, s: Segment, layer_idx: int, q, k, v, scaling) -> torch.Tensor:
        """Several tokens of one sequence (or its first): q `(1, q_heads, T, D)`, k/v `(1, kv_heads, T, D)`."""
        cache, T = s.cache, s.count
        layer = cache.layers[layer_idx]
        window = layer.sliding_window
        if not any(t.length for t in layer.tables[s.row]):  # nothing cached yet: attend over the new tokens
            out = dense_attention(q, k, v, None, window, scaling)
            cache.append(layer_idx, s.row, k[0], v[0])
        else:
            cache.append(layer_idx, s.row, k[0], v[0])
            keys, values, starts, lengths = cache.gather(layer_idx, [s.row])
            # Every head holds the same tokens (an uncompressed sequence, e.g. a prefill chunk or KVzip's
            # re-reading): one (1, 1, T, L) mask serves all heads (`masked_attention`'s fast path).
            if bool((starts == starts[:, :1]).all()) and bool((lengths == lengths[:, :1]).all()):
                starts, lengths = starts[:, :1], lengths[:, :1]
            out = masked_attention(q, keys, values, _causal_mask(starts, lengths, keys.shape[2], T, window), scaling)
        cache.trim(layer_idx, s.row)
        return out

    def _decode_step(self, layer_idx: int, segs: list[Segment], q, k, v, scaling) -> torch.Tensor:
        """One new token for each of `segs`, attended in one padded view: q `(q_heads, B, D)`,
        k/v `(kv_heads, B, D)`. Returns `(q_heads, B, D)`."""
        PagedCache.append_decode(layer_idx, [(s.cache, s.row) for s in segs], k.transpose(0, 1), v.transpose(0, 1))
        if self._whole_cache:
            keys, values, starts, lengths = segs[0].cache.gather(layer_idx)
        else:
            keys, values, starts, lengths = gather_rows(layer_idx, [(s.cache, s.row) for s in segs])
        window = segs[0].cache.layers[layer_idx].sliding_window
        mask = _causal_mask(starts, lengths, keys.shape[2], 1, window)  # (B, H, 1, L)
        out = masked_attention(q.transpose(0, 1)[:, :, None], keys, values, mask, scaling)  # (B, q_heads, 1, D)
        if window is not None:
            for s in segs:
                s.cache.trim(layer_idx, s.row)
        return out[:, :, 0].transpose(0, 1)

    def finish(self, n_layers: int) -> None:
        """After the forward: every layer must have stored its tokens once; then each sequence has seen them."""
        if sorted(self.attended) != list(range(n_layers)):
            raise RuntimeError(
                f"the model attended through the paged cache in layers {self.attended} of {n_layers}: run it "
                "inside `with permkv.cache.paged_attention(model):` (its attention stores the tokens)")
        for s in self.segments:
            s.cache.seen[s.row] += s.count


def gather_rows(layer_idx: int, rows: list[tuple[PagedCache, int]]):
    """`PagedCache.gather` over sequences of several caches on one pool: keys, values
    `(B, kv_heads, view_len, head_dim)`, starts, lengths `(B, kv_heads)`."""
    pool = rows[0][0].pool
    tables = [t for cache, row in rows for t in cache.layers[layer_idx].tables[row]]
    width = max(len(t.blocks) for t in tables)
    device = pool.keys.device
    index = torch.tensor([t.blocks + [0] * (width - len(t.blocks)) for t in tables], dtype=torch.long, device=device)
    B, H, bs, D = len(rows), len(tables) // len(rows), pool.block_size, pool.head_dim
    flat = index.view(-1)
    keys = pool.keys.index_select(0, flat).view(B, H, width * bs, D)
    values = pool.values.index_select(0, flat).view(B, H, width * bs, D)
    starts = torch.tensor([t.start for t in tables], dtype=torch.long, device=device).view(B, H)
    lengths = torch.tensor([t.length for t in tables], dtype=torch.long, device=device).view(B, H)
    return keys, values, starts, lengths


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    paged: PagedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: returns `(batch, T, q_heads, head_dim)` and no weights."""
    if paged is None:  # no cache, or a transformers Cache (another caller of a model the engine serves)
        L = key.shape[2]
        valid = None if attention_mask is None else attention_mask[:, -L:].bool()
        window = sliding_window or getattr(module, "sliding_window", None)
        out = dense_attention(query, key, value, valid, window, scaling)
    else:
        out = paged.attend(module.layer_idx, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, paged_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _padding_mask)


@contextmanager
def paged_attention(model):
    """Run `model` with the paged attention inside the block, restoring its implementation after (a
    no-op inside another such block: switching walks every module, ~10 ms for SmolLM2)."""
    previous = model.config._attn_implementation
    if previous == NAME:
        yield model
        return
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def run(model, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
        logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of `model` over the packed `input_ids` `(N,)` at `position_ids` `(N,)`, reading and
    writing the caches of `batch` (inside `paged_attention(model)`). Returns the logits at the packed
    indices `logits_at` `(k,)` (default: each segment's last token) as `(k, vocab)`.

    Raises CacheFull, with nothing written, when the pool cannot take the new tokens.
    """
    if model.config._attn_implementation != NAME:
        raise RuntimeError(f"run the model inside `with permkv.cache.paged_attention(model):` (its attention "
                           f"implementation is {model.config._attn_implementation!r})")
    if input_ids.shape != (batch.tokens,) or position_ids.shape != (batch.tokens,):
        raise ValueError(f"input_ids and position_ids must be ({batch.tokens},), got {tuple(input_ids.shape)} "
                         f"and {tuple(position_ids.shape)}")
    batch.check_room()
    at = batch.last_positions() if logits_at is None else logits_at
    recorder = getattr(model, RECORDER, None)
    if recorder is not None:
        for s in batch.segments:
            s.observe = max(s.observe, recorder.window)
    out = model(input_ids[None], position_ids=position_ids[None], use_cache=False, paged=batch,
                logits_to_keep=at.to(input_ids.device))
    batch.finish(len(batch.segments[0].cache.layers))
    if recorder is not None:
        recorder.record_batch(batch)
    return out.logits[0]


def forward(model, cache, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
            logits_to_keep: int = 1) -> torch.Tensor:
    """One forward of `model` over `input_ids` `(batch, T)` that reads and writes `cache`; returns the
    logits of the last `logits_to_keep` positions of each row, `(batch, logits_to_keep, vocab)`.

    `cache`: a `PagedCache` (row b extends sequence b; positions default to each sequence's `seen`;
    call it inside `paged_attention(model)`), or any transformers Cache (passed as `past_key_values`).
    """
    if not isinstance(cache, PagedCache):
        return model(input_ids, past_key_values=cache, position_ids=position_ids, logits_to_keep=logits_to_keep).logits
    B, T = input_ids.shape
    if not 1 <= logits_to_keep <= T:
        raise ValueError(f"logits_to_keep must be in [1, {T}], got {logits_to_keep}")
    cache.ensure_batch(B)
    if position_ids is None:
        position_ids = torch.tensor(cache.seen, device=input_ids.device)[:, None] + torch.arange(T, device=input_ids.device)
    batch = PagedBatch([Segment(cache, b, T) for b in range(B)])
    at = (torch.arange(B)[:, None] * T + torch.arange(T - logits_to_keep, T)).reshape(-1)
    return run(model, batch, input_ids.reshape(-1), position_ids.reshape(-1), at).view(B, logits_to_keep, -1)
