"""The per-layer bookkeeping of a paged cache: one `HeadTable` per (sequence, KV head) of a layer,
the `PagedLayer` that holds them with its compute-view tensors, and `CacheStats`.

Plain data, no model: a head table is a list of block ids plus the span of tokens it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class HeadTable:
    """Blocks of one (sequence, layer, KV head): tokens `start .. start + length` of the blocks laid
    end to end. `start` > 0 only on sliding-window layers, whose oldest tokens drop off the front."""

    blocks: list[int] = field(default_factory=list)
    start: int = 0
    length: int = 0


@dataclass(frozen=True)
class CacheStats:
    """Occupancy of a paged cache; shared (forked) blocks count once."""

    allocated_blocks: int
    used_tokens: int  # token slots holding a cached token, over the allocated blocks
    block_size: int
    bytes_per_block: int
    lengths: list[list[list[int]]]  # [seq][layer][kv_head] tokens cached

    @property
    def allocated_bytes(self) -> int:
        return self.allocated_blocks * self.bytes_per_block

    @property
    def used_bytes(self) -> int:
        return self.used_tokens * self.bytes_per_block // self.block_size

    @property
    def waste_pct(self) -> float:
        """Percent of allocated token slots that hold no token (only last blocks are partly empty)."""
        slots = self.allocated_blocks * self.block_size
        return 100.0 * (slots - self.used_tokens) / slots if slots else 0.0


class PagedLayer:
    """Block tables of one model layer: `tables[seq][kv_head]`."""

    is_compileable = False

    def __init__(self, index: int, n_kv_heads: int, sliding_window: int | None):
        self.index = index
        self.n_kv_heads = n_kv_heads
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.tables: list[list[HeadTable]] = []
        self._index: torch.Tensor | None = None  # cached (batch, kv_heads, n_blocks) block ids
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # cached starts, lengths

    def changed(self) -> None:
        """Forget the cached tensors after the tables changed shape or contents."""
        self._index = None
        self._bounds = None

    def grew(self, seq: int, n: int) -> None:
        """Every head of sequence `seq` took `n` more tokens in blocks it already had (a decode step):
        the cached lengths follow without a rebuild (a new tensor: earlier views stay as they were)."""
        if self._bounds is not None:
            starts, lengths = self._bounds
            lengths = lengths.clone()
            lengths[seq] += n
            self._bounds = (starts, lengths)

    def keep_limit(self) -> int | None:
        """Most tokens a head keeps between steps: the window minus the next query (as transformers)."""
        return None if self.sliding_window is None else self.sliding_window - 1

    def block_index(self, device: torch.device) -> torch.Tensor:
        """Block ids as `(batch, kv_heads, n_blocks)`, padded with block 0 (masked out by the caller)."""
        if self._index is None:
            width = max((len(t.blocks) for row in self.tables for t in row), default=0)
            rows = [[t.blocks + [0] * (width - len(t.blocks)) for t in row] for row in self.tables]
            self._index = torch.tensor(rows, dtype=torch.long, device=device).view(
                len(self.tables), self.n_kv_heads, width
            )
        return self._index

    def bounds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`starts`, `lengths` as `(batch, kv_heads)` tensors (cached; decode steps bump lengths)."""
        if self._bounds is None:
            B, H = len(self.tables), self.n_kv_heads
            starts = [t.start for row in self.tables for t in row]
            lengths = [t.length for row in self.tables for t in row]
            self._bounds = (
                torch.tensor(starts, dtype=torch.long, device=device).view(B, H),
                torch.tensor(lengths, dtype=torch.long, device=device).view(B, H),
            )
        return self._bounds
