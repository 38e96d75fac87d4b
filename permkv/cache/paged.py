"""A paged KV cache whose K/V live in a `BlockPool`, one block table per (sequence, layer, KV head).

Every (sequence, layer, KV head) has its own block table and its own length, so eviction in one head
returns whole blocks to the pool without touching the others. Two counts are kept apart:
`seen[seq]` is how many real tokens the sequence has processed (RoPE positions continue from it) and
`cached_tokens(seq, layer, head)` is how many of them a head still holds. Keys are stored after RoPE,
so keeping any subset of them keeps their positions right.

A model reads and writes it through `permkv.cache.forward(model, cache, ids)` (or `run` with a
`PagedBatch`) inside `with paged_attention(model):`: the step's layout travels to the attention
function as a forward kwarg, and that function stores each layer's new tokens here (`append`) and
reads each head's tokens back (`gather`). It is not a transformers `past_key_values`: `update` refuses.
"""

from __future__ import annotations

import torch

from permkv.cache.pool import BlockPool, CacheFull
from permkv.cache.tables import CacheStats, HeadTable, PagedLayer
from permkv.models import kv_layout

NOT_PAST_KEY_VALUES = ("a PagedCache is not a transformers past_key_values: run the model with "
                       "`permkv.cache.forward(model, cache, input_ids)` inside `with permkv.cache.paged_attention(model):`")


class PagedCache:
    """Paged KV cache for a decoder-only transformers model (SmolLM2, Gemma-3, other Llama-likes).

    `pool` stores the K/V; its `head_dim` must be the model's. Sequences are the batch rows the model
    is called with; `reserve` and `fork` add rows without a forward pass.
    """

    def __init__(self, pool: BlockPool, config):
        layout = kv_layout(config)
        if pool.head_dim != layout.head_dim:
            raise ValueError(f"pool.head_dim must equal the model's head_dim {layout.head_dim}, got {pool.head_dim}")
        self.n_kv_heads = layout.n_kv_heads
        self.layers = [PagedLayer(i, layout.n_kv_heads, window) for i, window in enumerate(layout.windows)]
        self.pool = pool
        self.config = config
        self.seen: list[int] = []  # real tokens processed per sequence (positions)

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
            if n == 0:
                continue
            for t in row:
                end = t.start + t.length
                new = self.pool.blocks_for(end + n) - len(t.blocks)
                cow = end % bs != 0 and self.pool.ref_counts[t.blocks[-1]] > 1
                need += new + cow
                plan.append((t, new, cow))
        return need, plan

    def blocks_to_grow(self, counts: list[int]) -> int:
        """Free blocks every layer together needs to take `counts[seq]` more tokens per sequence
        (the sum of `_plan`'s, without building the plan: the scheduler asks every step)."""
        if len(counts) != self.num_sequences:
            raise ValueError(f"counts must have one entry per sequence ({self.num_sequences}), got {len(counts)}")
        bs, refs, need = self.pool.block_size, self.pool.ref_counts, 0
        for layer in self.layers:
            for n, row in zip(counts, layer.tables):
                if n:
                    for t in row:
                        end = t.start + t.length
                        need += (end + n + bs - 1) // bs - len(t.blocks) + (end % bs != 0 and refs[t.blocks[-1]] > 1)
        return need

    def check_room(self, counts: list[int]) -> None:
        """Raise CacheFull unless every layer can take `counts[seq]` more tokens per sequence.

        Called before a forward pass writes anything, so a full pool never leaves some layers a
        token ahead of others.
        """
        need = self.blocks_to_grow(counts)
        if need > self.pool.num_free:
            raise CacheFull(need, self.pool.num_free, self.pool.num_blocks)

    def append(self, layer_idx: int, seq: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store new tokens of one sequence in one layer: keys, values `(kv_heads, new, head_dim)`.
        Raises CacheFull (nothing written) when the pool is short."""
        layer = self._layer(layer_idx)
        H, T, D = keys.shape
        if H != self.n_kv_heads or D != self.pool.head_dim:
            raise ValueError(f"keys must be (kv_heads={self.n_kv_heads}, new, head_dim={self.pool.head_dim}), "
                             f"got {tuple(keys.shape)}")
        counts = [0] * self.num_sequences
        counts[self._seq(seq)] = T
        need, plan = self._plan(layer, counts)
        if need > self.pool.num_free:
            raise CacheFull(need, self.pool.num_free, self.pool.num_blocks)
        for t, new, cow in plan:
            if cow:
                t.blocks[-1] = self.pool.writable(t.blocks[-1])
            if new:
                t.blocks.extend(self.pool.allocate(new))
        if any(new or cow for _, new, cow in plan):
            layer.changed()
        bs = self.pool.block_size
        row = layer.tables[seq]
        if T == 1:  # decode: one slot per head, computed in Python
            slots = []
            for t in row:
                pos = t.start + t.length
                slots.append(t.blocks[pos // bs] * bs + pos % bs)
                t.length += 1
            dst = torch.tensor(slots, dtype=torch.long, device=keys.device)
        else:
            dst = torch.cat([self._slots(t, t.length, T, keys.device) for t in row])
            for t in row:
                t.length += T
        layer.grew(seq, T)
        self.pool.keys.view(-1, D).index_copy_(0, dst, keys.reshape(H * T, D))
        self.pool.values.view(-1, D).index_copy_(0, dst, values.reshape(H * T, D))

    @staticmethod
    def append_decode(layer_idx: int, rows: list[tuple["PagedCache", int]], keys: torch.Tensor,
                      values: torch.Tensor) -> None:
        """Store one new token of each of several sequences (of caches on one pool) in one layer:
        keys, values `(batch, kv_heads, head_dim)`, row b for `rows[b]` = (cache, seq). The caller
        checked the room (`check_room` / `blocks_to_grow`) before the forward pass."""
        pool = rows[0][0].pool
        bs, refs, slots = pool.block_size, pool.ref_counts, []
        for cache, seq in rows:
            layer = cache.layers[layer_idx]
            changed = False
            for t in layer.tables[seq]:
                end = t.start + t.length
                block = end // bs
                if block == len(t.blocks):
                    t.blocks.extend(pool.allocate(1))
                    changed = True
                elif refs[t.blocks[block]] > 1:
                    t.blocks[block] = pool.writable(t.blocks[block])
                    changed = True
                slots.append(t.blocks[block] * bs + end % bs)
                t.length += 1
            if changed:
                layer.changed()
            else:
                layer.grew(seq, 1)
        dst = torch.tensor(slots, dtype=torch.long, device=keys.device)
        D = keys.shape[-1]
        pool.keys.view(-1, D).index_copy_(0, dst, keys.reshape(-1, D))
        pool.values.view(-1, D).index_copy_(0, dst, values.reshape(-1, D))

    def trim(self, layer_idx: int, seq: int) -> None:
        """On a sliding-window layer, drop a sequence's tokens older than the window and free blocks left empty."""
        layer = self._layer(layer_idx)
        limit = layer.keep_limit()
        if limit is None:
            return
        bs = self.pool.block_size
        for t in layer.tables[self._seq(seq)]:
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

    def gather(self, layer_idx: int, seqs: list[int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each head's tokens of sequences `seqs` (default all) in a padded compute view (padding exists
        only here, not in the pool).

        Returns keys, values `(batch, kv_heads, view_len, head_dim)` and `starts`, `lengths`
        `(batch, kv_heads)`: head (b, h) holds view rows `starts[b, h] .. starts[b, h] + lengths[b, h]`.
        """
        layer = self._layer(layer_idx)
        device = self.pool.keys.device
        index = layer.block_index(device)
        starts, lengths = layer.bounds(device)
        if seqs is not None:
            pick = torch.tensor([self._seq(s) for s in seqs], device=device)
            index, starts, lengths = index[pick], starts[pick], lengths[pick]
            width = max(len(t.blocks) for s in seqs for t in layer.tables[s])
            index = index[:, :, :width]
        B, H, W = index.shape
        bs, D = self.pool.block_size, self.pool.head_dim
        flat = index.reshape(-1)
        keys = self.pool.keys.index_select(0, flat).view(B, H, W * bs, D)
        values = self.pool.values.index_select(0, flat).view(B, H, W * bs, D)
        return keys, values, starts, lengths

    # ----- not a transformers Cache ------------------------------------------------------------------
    def update(self, *args, **kwargs):
        raise TypeError(NOT_PAST_KEY_VALUES)

    get_mask_sizes = update  # the first method transformers calls on a past_key_values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by the one sequence (or the longest of several)."""
        return max(self.seen, default=0)

    def reset(self) -> None:
        """Give every sequence's blocks back to the pool."""
        while self.num_sequences:
            self.release(0)

    def crop(self, max_length: int) -> None:
        """Roll every sequence back to its first `max_length` tokens (speculative decoding's undo),
        dropping each head's newest tokens and giving emptied blocks back to the pool.

        The dropped tokens must have been appended after any eviction of their head (always so when
        rolling back rejected drafts). Refused on a sliding-window layer whose oldest tokens have
        already slid off (they cannot come back).
        """
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        for seq, seen in enumerate(self.seen):
            drop = seen - max_length
            if drop <= 0:
                continue
            for layer in self.layers:
                for head, t in enumerate(layer.tables[seq]):
                    if t.length < drop or (layer.is_sliding and t.length < seen):
                        raise ValueError(
                            f"cannot crop layer {layer.index} head {head} of sequence {seq} by {drop} tokens: "
                            f"it holds {t.length} of {seen} (older tokens left the window or were evicted)"
                        )
            for layer in self.layers:
                for t in layer.tables[seq]:
                    t.length -= drop
                    n_keep = self.pool.blocks_for(t.start + t.length)
                    self.pool.free(t.blocks[n_keep:])
                    del t.blocks[n_keep:]
                layer.changed()
            self.seen[seq] = max_length

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
