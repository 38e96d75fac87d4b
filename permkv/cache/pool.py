"""A pool of fixed-size KV blocks over one preallocated store, with reference counts.

Each block holds `block_size` tokens of ONE (sequence, layer, KV head): a key row and a value row of
`head_dim` numbers per token (KV-Compress's layout, ANCHORS.md sections 1 and 3). Because heads do
not share blocks, one head can give blocks back after eviction while the others keep theirs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


class CacheFull(RuntimeError):
    """The pool has fewer free blocks than a request needs; nothing was allocated."""

    def __init__(self, needed: int, free: int, capacity: int):
        self.needed, self.free, self.capacity = needed, free, capacity
        super().__init__(
            f"KV block pool full: needed {needed} blocks, {free} free of {capacity} "
            f"(free blocks by evicting or finishing sequences, or use a larger pool)"
        )


@dataclass(frozen=True)
class PoolStats:
    """Occupancy of a pool. `used_tokens` is what callers say they stored in the allocated blocks."""

    capacity_blocks: int
    allocated_blocks: int
    free_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def allocated_bytes(self) -> int:
        return self.allocated_blocks * self.bytes_per_block

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_blocks * self.bytes_per_block


class BlockPool:
    """Fixed-size blocks of one preallocated K store and one V store, handed out by id.

    Store shapes: `keys`, `values`: `(num_blocks, block_size, head_dim)`.
    Reuse order: free blocks form a FIFO queue that starts as 0, 1, 2, ...; `allocate` takes from
    the front and a block whose reference count drops to 0 goes to the back, so the block freed
    longest ago is reused first (as vLLM's free queue does). `fork` shares blocks by raising their
    reference counts; `writable` gives copy-on-write: a shared block is copied before a write.
    The store is made with `torch.empty`, so on CPU untouched blocks cost no resident memory; a
    block is zeroed when handed out (and block 0, the padding index of gathers, at creation), so
    attention never reads uninitialised memory: a NaN there survives a zero attention weight.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        head_dim: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_blocks, self.block_size, self.head_dim = num_blocks, block_size, head_dim
        self.keys = torch.empty(num_blocks, block_size, head_dim, dtype=dtype, device=device)
        self.values = torch.empty(num_blocks, block_size, head_dim, dtype=dtype, device=device)
        self.keys[0].zero_()
        self.values[0].zero_()
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @classmethod
    def from_bytes(
        cls,
        capacity_bytes: int,
        block_size: int = 16,
        head_dim: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "BlockPool":
        """A pool holding as many whole blocks (K and V) as fit in `capacity_bytes`."""
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        per_block = 2 * block_size * head_dim * torch.empty(0, dtype=dtype).element_size()
        if capacity_bytes < per_block:
            raise ValueError(
                f"capacity_bytes={capacity_bytes} is below one block ({per_block} bytes for "
                f"block_size={block_size}, head_dim={head_dim}, {dtype})"
            )
        return cls(capacity_bytes // per_block, block_size, head_dim, dtype, device)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block's keys plus values."""
        return 2 * self.block_size * self.head_dim * self.keys.element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks one block table needs for `n_tokens` tokens."""
        return -(-n_tokens // self.block_size)

    def can_admit(self, n_tokens: int, tables: int = 1) -> bool:
        """Whether `tables` block tables of `n_tokens` tokens each fit in the free blocks now."""
        if n_tokens < 0 or tables < 0:
            raise ValueError(f"n_tokens and tables must be >= 0, got {n_tokens} and {tables}")
        return tables * self.blocks_for(n_tokens) <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (reference count 1 each); raises CacheFull and takes none if short."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            raise CacheFull(n, len(self._free), self.num_blocks)
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self.ref_counts[i] = 1
        if ids:
            index = torch.tensor(ids, device=self.keys.device)
            self.keys.index_fill_(0, index, 0.0)
            self.values.index_fill_(0, index, 0.0)
        return ids

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < self.num_blocks:
                raise ValueError(f"block id must be in [0, {self.num_blocks}), got {i}")
            if self.ref_counts[i] == 0:
                raise ValueError(f"block {i} is free; it cannot be freed, forked or written")

    def free(self, ids: list[int]) -> None:
        """Drop one reference to each block; blocks nobody references go to the back of the queue."""
        self._check_ids(ids)
        for i in ids:
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self._free.append(i)

    def fork(self, ids: list[int]) -> list[int]:
        """Share `ids` with one more owner (no copy); returns the same ids."""
        self._check_ids(ids)
        for i in ids:
            self.ref_counts[i] += 1
        return list(ids)

    def writable(self, block_id: int) -> int:
        """A block the caller may write: itself if unshared, else a fresh copy (copy-on-write).

        The caller's reference moves from the shared block to the copy.
        """
        self._check_ids([block_id])
        if self.ref_counts[block_id] == 1:
            return block_id
        (copy,) = self.allocate(1)
        self.keys[copy].copy_(self.keys[block_id])
        self.values[copy].copy_(self.values[block_id])
        self.ref_counts[block_id] -= 1
        return copy

    def stats(self) -> PoolStats:
        return PoolStats(
            capacity_blocks=self.num_blocks,
            allocated_blocks=self.num_blocks - len(self._free),
            free_blocks=len(self._free),
            block_size=self.block_size,
            bytes_per_block=self.bytes_per_block,
        )
