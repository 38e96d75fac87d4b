"""A transformers `Cache` whose K/V live in a `BlockPool`, one block table per (sequence, layer, KV head).

Every (sequence, layer, KV head) has its own block table and its own length, so eviction in one head
returns whole blocks to the pool without touching the others. Two counts are kept apart:
`seen[seq]` is how many real tokens the sequence has processed (RoPE positions continue from it) and
`cached_tokens(seq, layer, head)` is how many of them a head still holds. Keys are stored after RoPE,
so keeping any subset of them keeps their positions right.

Use it with the attention function of `permkv.cache.attention` (`with paged_attention(model): ...`):
`update()` hands the new keys and values to that function, which writes only the real (unpadded)
tokens into blocks and reads each head's own tokens back.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from permkv.cache.pool import BlockPool, CacheFull
from permkv.cache.tables import CacheStats, HeadTable, PagedLayer
from permkv.models import kv_layout

# Attribute set on the key tensor that `update()` returns, read by the paged attention function.
# transformers passes attention only the tensors that `Cache.update` returns, so this is the channel
# that tells the attention function which cache and layer the keys belong to.
TAG = "_permkv_paged"


class PagedCache(Cache):
    """Paged KV cache for a decoder-only transformers model (SmolLM2, Gemma-3, other Llama-likes).

    `pool` stores the K/V; its `head_dim` must be the model's. Sequences are the batch rows the model
    is called with; `reserve` and `fork` add rows without a forward pass.
    """

    def __init__(self, pool: BlockPool, config):
        layout = kv_layout(config)
        if pool.head_dim != layout.head_dim:
            raise ValueError(f"pool.head_dim must equal the model's head_dim {layout.head_dim}, got {pool.head_dim}")
        super().__init__(layers=[PagedLayer(i, layout.n_kv_heads, window) for i, window in enumerate(layout.windows)])
        self.pool = pool
        self.config = config
        self.n_kv_heads = layout.n_kv_heads
        self.seen: list[int] = []  # real tokens processed per sequence (positions)
        self._pending: int | None = None

    # ----- sequences -------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return len(self.seen)

    def ensure_batch(self, batch: int) -> None:
        """Start `batch` empty sequences on the first call; later calls must bring the same batch."""
        if self.num_sequences == 0:
            for layer in self.layers:
                layer.tables = [[HeadTable() for _ in range(self.n_kv_heads)] for _ in range(batch)]
                layer.changed()
            self.seen = [0] * batch
        elif batch != self.num_sequences:
            raise ValueError(f"batch must be the cache's {self.num_sequences} sequences, got {batch}")

    def _layer(self, layer_idx: int) -> PagedLayer:
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx must be an int in [0, {len(self.layers)}), got {layer_idx!r}")
        return self.layers[layer_idx]

    def _seq(self, seq: int) -> int:
        if not isinstance(seq, int) or not 0 <= seq < self.num_sequences:
            raise ValueError(f"seq must be an int in [0, {self.num_sequences}), got {seq!r}")
        return seq

    def _head(self, head: int) -> int:
        if not isinstance(head, int) or not 0 <= head < self.n_kv_heads:
            raise ValueError(f"head must be an int in [0, {self.n_kv_heads}), got {head!r}")
        return head

    def cached_tokens(self, seq: int, layer_idx: int, head: int) -> int:
        """Tokens one head of one layer holds for a sequence."""
        return self._layer(layer_idx).tables[self._seq(seq)][self._head(head)].length

    def blocks_needed(self, n_tokens: int) -> int:
        """Blocks a new sequence of `n_tokens` cached tokens takes (sliding layers keep their window)."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        total = 0
        for layer in self.layers:
            limit = layer.keep_limit()
            kept = n_tokens if limit is None else min(n_tokens, limit)
            total += self.n_kv_heads * self.pool.blocks_for(kept)
        return total

    def can_admit(self, n_tokens: int) -> bool:
        """Whether a new sequence of `n_tokens` tokens fits in the pool's free blocks now."""
        return self.blocks_needed(n_tokens) <= self.pool.num_free

    def reserve(self, n_tokens: int) -> int:
        """Add a sequence holding `n_tokens` tokens in every table (contents unset); returns its index.

        For admission and capacity accounting without a model. Raises CacheFull and adds nothing if
        the pool cannot hold it.
        """
        needed = self.blocks_needed(n_tokens)
        if needed > self.pool.num_free:
            raise CacheFull(needed, self.pool.num_free, self.pool.num_blocks)
        for layer in self.layers:
            limit = layer.keep_limit()
            kept = n_tokens if limit is None else min(n_tokens, limit)
            row = [HeadTable(self.pool.allocate(self.pool.blocks_for(kept)), 0, kept) for _ in range(self.n_kv_heads)]
            layer.tables.append(row)
            layer.changed()
        self.seen.append(n_tokens)
        return self.num_sequences - 1

    def fork(self, seq: int) -> int:
        """A new sequence sharing all of `seq`'s blocks (copy-on-write); returns its index."""
        self._seq(seq)
        for layer in self.layers:
            row = [HeadTable(self.pool.fork(t.blocks), t.start, t.length) for t in layer.tables[seq]]
            layer.tables.append(row)
            layer.changed()
        self.seen.append(self.seen[seq])
        return self.num_sequences - 1

    def release(self, seq: int) -> None:
        """Free a sequence's blocks and remove it; later sequences move down one index."""
        self._seq(seq)
        for layer in self.layers:
            for t in layer.tables.pop(seq):
                self.pool.free(t.blocks)
            layer.changed()
        self.seen.pop(seq)

    def adopt(self, other: "PagedCache") -> None:
        """Move every sequence of `other` (same pool) to the end of this cache, blocks and all (no
        copy); `other` is left empty. How a batch engine joins a separately prefilled sequence."""
        if other is self or other.pool is not self.pool or len(other.layers) != len(self.layers):
            raise ValueError("other must be another PagedCache of the same model on the same pool")
        for mine, theirs in zip(self.layers, other.layers):
            mine.tables.extend(theirs.tables)
            mine.columns = max(mine.columns, theirs.columns)
            theirs.tables, theirs.columns = [], 0
            mine.changed()
            theirs.changed()
        self.seen.extend(other.seen)
        other.seen = []

    def detach(self, seq: int) -> "PagedCache":
        """Move sequence `seq` out into a new one-sequence PagedCache on the same pool (no copy);
        later sequences move down one index. `adopt` puts it back (at the end)."""
        self._seq(seq)
        single = PagedCache(self.pool, self.config)
        for mine, theirs in zip(self.layers, single.layers):
            theirs.tables = [mine.tables.pop(seq)]
            theirs.columns = mine.columns
            mine.changed()
        single.seen = [self.seen.pop(seq)]
        return single

    def _select(self, indices: list[int]) -> None:
        """Keep sequences `indices` in that order (repeats allowed), freeing the rest."""
        old = self.num_sequences
        for i in indices:
            self.fork(self._seq(int(i)))
        for _ in range(old):
            self.release(0)

    # ----- eviction --------------------------------------------------------------------------------
    def evict(self, seq: int, layer_idx: int, head: int, keep: list[int] | torch.Tensor) -> int:
        """Keep only the cached tokens at indices `keep` (0 = oldest cached) of one head, compacted in
        order into the fewest blocks; returns the number of blocks given back to the table's owner.

        Kept keys carry their RoPE rotation, so positions stay right; new tokens continue at
        `seen[seq]`. Not allowed on sliding-window layers (their window is counted in tokens).
        """
        layer, seq, head = self._layer(layer_idx), self._seq(seq), self._head(head)
        if layer.is_sliding:
            raise ValueError(f"evict on sliding-window layer {layer_idx} is not supported")
        table = layer.tables[seq][head]
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=self.pool.keys.device).flatten().unique(sorted=True)
        if keep_t.numel() and (keep_t[0] < 0 or keep_t[-1] >= table.length):
            raise ValueError(f"keep must hold indices in [0, {table.length}), got {keep_t.tolist()}")
        kept = keep_t.numel()
        src = self._slots(table, 0, table.length, keep_t.device)[keep_t]
        keys = self.pool.keys.view(-1, self.pool.head_dim)[src].clone()
        values = self.pool.values.view(-1, self.pool.head_dim)[src].clone()
        n_keep = self.pool.blocks_for(kept)
        dropped = table.blocks[n_keep:]
        self.pool.free(dropped)
        table.blocks = [self.pool.writable(b) for b in table.blocks[:n_keep]]
        table.start, table.length = 0, kept
        dst = self._slots(table, 0, kept, keep_t.device)
        self.pool.keys.view(-1, self.pool.head_dim).index_copy_(0, dst, keys)
        self.pool.values.view(-1, self.pool.head_dim).index_copy_(0, dst, values)
        layer.changed()
        return len(dropped)

    # ----- writing and reading ---------------------------------------------------------------------
    def _slots(self, table: HeadTable, first: int, count: int, device) -> torch.Tensor:
        """Flat store rows (block * block_size + offset) of cached tokens `first .. first + count`."""
        bs = self.pool.block_size
        pos = torch.arange(table.start + first, table.start + first + count, device=device)
        blocks = torch.tensor(table.blocks, dtype=torch.long, device=device)
        return blocks[pos // bs] * bs + pos % bs

    def _plan(self, layer: PagedLayer, counts: list[int]) -> tuple[int, list[tuple[HeadTable, int, bool]]]:
        """Blocks needed to add `counts[seq]` tokens to every head of `layer`: new tail blocks, plus a
        private copy of a shared, partly filled last block. Returns (blocks, per-table plan)."""
        bs, need, plan = self.pool.block_size, 0, []
        for seq, row in enumerate(layer.tables):
            n = counts[seq]
            for t in row:
                end = t.start + t.length
                new = self.pool.blocks_for(end + n) - len(t.blocks)
                cow = n > 0 and end % bs != 0 and self.pool.ref_counts[t.blocks[-1]] > 1
                need += new + cow
                plan.append((t, new, cow))
        return need, plan

    def check_room(self, counts: list[int]) -> None:
        """Raise CacheFull unless every layer can take `counts[seq]` more tokens per sequence.

        Called before a forward pass writes anything, so a full pool never leaves some layers a
        token ahead of others.
        """
        need = sum(self._plan(layer, counts)[0] for layer in self.layers)
        if need > self.pool.num_free:
            raise CacheFull(need, self.pool.num_free, self.pool.num_blocks)

    def _grow(self, layer: PagedLayer, counts: list[int]) -> None:
        """Make room for `counts[seq]` more tokens in every head of `layer`, all or nothing."""
        need, plan = self._plan(layer, counts)
        if need > self.pool.num_free:
            raise CacheFull(need, self.pool.num_free, self.pool.num_blocks)
        for t, new, cow in plan:
            if cow:
                t.blocks[-1] = self.pool.writable(t.blocks[-1])
            if new or cow:
                layer.changed()
            if new:
                t.blocks.extend(self.pool.allocate(new))

    def append(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Store new tokens of every sequence in one layer.

        keys, values: `(batch, kv_heads, new, head_dim)`; valid: `(batch, new)` bool, False for
        padding, which takes no slot. Raises CacheFull (nothing written) when the pool is short.
        """
        layer = self._layer(layer_idx)
        B, H, T, D = keys.shape
        if B != self.num_sequences or H != self.n_kv_heads or D != self.pool.head_dim:
            raise ValueError(
                f"keys must be (batch={self.num_sequences}, kv_heads={self.n_kv_heads}, new, "
                f"head_dim={self.pool.head_dim}), got {tuple(keys.shape)}"
            )
        if valid is None or bool(valid.all()):
            n_new, rows = [T] * B, None
        else:
            n_new, rows = valid.sum(1).tolist(), valid
        self._grow(layer, n_new)
        bs = self.pool.block_size
        if T == 1 and rows is None:  # decode: one slot per (seq, head), computed in Python
            slots = []
            for row in layer.tables:
                for t in row:
                    pos = t.start + t.length
                    slots.append(t.blocks[pos // bs] * bs + pos % bs)
                    t.length += 1
            dst = torch.tensor(slots, dtype=torch.long, device=keys.device)
            src_k, src_v = keys.reshape(B * H, D), values.reshape(B * H, D)
            if layer._bounds is not None:  # a new tensor, so callers' earlier views stay as they were
                layer._bounds = (layer._bounds[0], layer._bounds[1] + 1)
        else:
            dst_parts, k_parts, v_parts = [], [], []
            for b, row in enumerate(layer.tables):
                k_b = keys[b] if rows is None else keys[b][:, rows[b]]  # (kv_heads, n_new[b], head_dim)
                v_b = values[b] if rows is None else values[b][:, rows[b]]
                for h, t in enumerate(row):
                    dst_parts.append(self._slots(t, t.length, n_new[b], keys.device))
                    layer._bounds = None
                    t.length += n_new[b]
                    k_parts.append(k_b[h])
                    v_parts.append(v_b[h])
            dst = torch.cat(dst_parts)
            src_k, src_v = torch.cat(k_parts), torch.cat(v_parts)
        self.pool.keys.view(-1, D).index_copy_(0, dst, src_k)
        self.pool.values.view(-1, D).index_copy_(0, dst, src_v)

    def trim(self, layer_idx: int) -> None:
        """On a sliding-window layer, drop tokens older than the window and free blocks left empty."""
        layer = self._layer(layer_idx)
        limit = layer.keep_limit()
        if limit is None:
            return
        bs = self.pool.block_size
        for row in layer.tables:
            for t in row:
                extra = t.length - limit
                if extra <= 0:
                    continue
                t.start += extra
                t.length -= extra
                layer._bounds = None
                n_drop = t.start // bs
                if n_drop:
                    self.pool.free(t.blocks[:n_drop])
                    del t.blocks[:n_drop]
                    t.start -= n_drop * bs
                    layer.changed()

    def advance(self, layer_idx: int, columns: int, counts: list[int]) -> None:
        """After a layer stored its new tokens: drop what slid out of a window, count the input columns
        (padding included) and, once per forward pass (layer 0), the real tokens each sequence has seen."""
        self.trim(layer_idx)
        self.layers[layer_idx].columns += columns
        if layer_idx == 0:
            self.seen = [s + n for s, n in zip(self.seen, counts)]

    def gather(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each head's tokens in a padded compute view (padding exists only here, not in the pool).

        Returns keys, values `(batch, kv_heads, view_len, head_dim)` and `starts`, `lengths`
        `(batch, kv_heads)`: head (b, h) holds view rows `starts[b, h] .. starts[b, h] + lengths[b, h]`.
        """
        layer = self._layer(layer_idx)
        device = self.pool.keys.device
        index = layer.block_index(device)
        B, H, W = index.shape
        bs, D = self.pool.block_size, self.pool.head_dim
        flat = index.reshape(-1)
        keys = self.pool.keys.index_select(0, flat).view(B, H, W * bs, D)
        values = self.pool.values.index_select(0, flat).view(B, H, W * bs, D)
        starts, lengths = layer.bounds(device)
        return keys, values, starts, lengths

    # ----- transformers Cache API ------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        """Hand the new K/V `(batch, kv_heads, new, head_dim)` to the paged attention function, which
        stores them (it alone knows which tokens are padding) and attends over each head's tokens."""
        self._layer(layer_idx)
        if self._pending is not None:
            raise RuntimeError(
                f"PagedCache layer {self._pending} was never stored: the model must use the "
                "'permkv_paged' attention (wrap the call in `with permkv.cache.paged_attention(model):`)"
            )
        self._pending = layer_idx
        setattr(key_states, TAG, (self, layer_idx))
        return key_states, value_states

    def consume(self, layer_idx: int) -> None:
        """Mark the pending update of `layer_idx` as stored by the attention function."""
        self._pending = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns processed, padding included: what transformers' generation expects."""
        return self.layers[layer_idx].columns if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + cache_position.shape[0], 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        window = self.layers[layer_idx].sliding_window
        return -1 if window is None else window

    def reset(self) -> None:
        while self.num_sequences:
            self.release(0)
        for layer in self.layers:
            layer.columns = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([i for i in range(self.num_sequences) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices).tolist())

    def crop(self, max_length: int) -> None:
        """Roll every sequence back to its first `max_length` tokens (speculative decoding's undo),
        dropping each head's newest tokens and giving emptied blocks back to the pool.

        The dropped tokens must have been appended after any eviction of their head (always so when
        rolling back rejected drafts). Refused on a padded batch and on a sliding-window layer whose
        oldest tokens have already slid off (they cannot come back).
        """
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        if any(n != self.layers[0].columns for n in self.seen):
            raise ValueError("crop needs an unpadded batch: every sequence must hold all its columns")
        for layer in self.layers:
            drop = layer.columns - max_length
            if drop <= 0:
                continue
            for seq, row in enumerate(layer.tables):
                for head, t in enumerate(row):
                    if t.length < drop or (layer.is_sliding and t.length < self.seen[seq]):
                        raise ValueError(
                            f"cannot crop layer {layer.index} head {head} of sequence {seq} by {drop} tokens: "
                            f"it holds {t.length} of {self.seen[seq]} (older tokens left the window or were evicted)"
                        )
                    t.length -= drop
                    n_keep = self.pool.blocks_for(t.start + t.length)
                    self.pool.free(t.blocks[n_keep:])
                    del t.blocks[n_keep:]
            layer.columns = max_length
            layer.changed()
        self.seen = [min(n, max_length) for n in self.seen]

    def stats(self) -> CacheStats:
        """Blocks this cache holds, tokens they hold, waste and per-(layer, head) lengths."""
        bs = self.pool.block_size
        occupied: dict[int, int] = {}
        for layer in self.layers:
            for row in layer.tables:
                for t in row:
                    for i, block in enumerate(t.blocks):
                        lo = max(t.start, i * bs)
                        hi = min(t.start + t.length, (i + 1) * bs)
                        occupied[block] = max(occupied.get(block, 0), max(hi - lo, 0))
        lengths = [
            [[t.length for t in layer.tables[s]] for layer in self.layers] for s in range(self.num_sequences)
        ]
        return CacheStats(len(occupied), sum(occupied.values()), bs, self.pool.bytes_per_block, lengths)
