"""BlockPool and PagedCache bookkeeping without a model: exact reuse order, invariants, errors."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from permkv.cache import BlockPool, CacheFull, PagedCache


def tiny_config(layers=2, kv_heads=2, head_dim=4):
    """A real transformers config of a tiny Llama: only its shapes matter to the cache."""
    return LlamaConfig(
        num_hidden_layers=layers,
        num_attention_heads=kv_heads,
        num_key_value_heads=kv_heads,
        hidden_size=kv_heads * head_dim,
        head_dim=head_dim,
    )


def check_pool(pool: BlockPool, owners: dict[int, int]) -> None:
    """No leak, no double free: free + allocated = capacity and ref counts match the owners."""
    free = list(pool._free)
    assert len(free) == len(set(free)), "a block is twice in the free queue"
    assert pool.num_free + pool.stats().allocated_blocks == pool.num_blocks
    for block in range(pool.num_blocks):
        assert pool.ref_counts[block] == owners.get(block, 0), f"block {block}"
        assert (pool.ref_counts[block] == 0) == (block in free)


def test_reuse_order_is_fifo():
    pool = BlockPool(4, block_size=2, head_dim=1)
    a = pool.allocate(2)
    b = pool.allocate(1)
    assert (a, b) == ([0, 1], [2])
    pool.free([1])
    pool.free([0])
    assert pool.allocate(3) == [3, 1, 0]  # never-used block first, then freed longest ago first
    assert pool.num_free == 0


def test_fork_and_copy_on_write():
    pool = BlockPool(3, block_size=2, head_dim=1)
    (a,) = pool.allocate(1)
    pool.keys[a] = 7.0
    assert pool.fork([a]) == [a] and pool.ref_counts[a] == 2
    copy = pool.writable(a)
    assert copy != a and pool.ref_counts[a] == 1 and pool.ref_counts[copy] == 1
    assert torch.equal(pool.keys[copy], pool.keys[a])
    pool.keys[copy] = 1.0
    assert float(pool.keys[a, 0, 0]) == 7.0
    assert pool.writable(a) == a  # unshared: written in place


def test_cache_full_has_numbers_and_takes_nothing():
    pool = BlockPool(3, block_size=4, head_dim=2)
    pool.allocate(2)
    with pytest.raises(CacheFull, match="needed 2 blocks, 1 free of 3") as err:
        pool.allocate(2)
    assert (err.value.needed, err.value.free, err.value.capacity) == (2, 1, 3)
    assert pool.num_free == 1
    assert pool.can_admit(4) and not pool.can_admit(5) and not pool.can_admit(4, tables=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_blocks": 4, "block_size": 0}, "block_size must be a positive int, got 0"),
        ({"num_blocks": -1}, "num_blocks must be a positive int, got -1"),
        ({"num_blocks": 4, "head_dim": 2.5}, "head_dim must be a positive int"),
    ],
)
def test_bad_pool_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockPool(**kwargs)


def test_bad_capacity_and_ids():
    with pytest.raises(ValueError, match="capacity_bytes must be a positive int, got -5"):
        BlockPool.from_bytes(-5)
    with pytest.raises(ValueError, match="below one block"):
        BlockPool.from_bytes(100, block_size=16, head_dim=64)
    assert BlockPool.from_bytes(2**20, block_size=16, head_dim=64).num_blocks == 2**20 // 8192
    pool = BlockPool(2, block_size=2, head_dim=1)
    with pytest.raises(ValueError, match="block 0 is free"):
        pool.free([0])
    with pytest.raises(ValueError, match=r"block id must be in \[0, 2\), got 9"):
        pool.fork([9])


def test_cache_bad_arguments():
    cache = PagedCache(BlockPool(8, block_size=2, head_dim=4), tiny_config())
    with pytest.raises(TypeError, match="not a transformers past_key_values"):
        cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 0)
    with pytest.raises(ValueError, match="pool.head_dim must equal the model's head_dim 4, got 8"):
        PagedCache(BlockPool(8, head_dim=8), tiny_config())
    cache.ensure_batch(1)
    with pytest.raises(ValueError, match=r"seq must be an int in \[0, 1\), got 3"):
        cache.evict(3, 0, 0, [0])
    with pytest.raises(ValueError, match=r"layer_idx must be an int in \[0, 2\), got 5"):
        cache.append(5, 0, torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="keys must be"):
        cache.append(0, 0, torch.zeros(3, 1, 4), torch.zeros(3, 1, 4))


def test_cache_full_leaves_sequences_intact():
    cache = PagedCache(BlockPool(6, block_size=2, head_dim=4), tiny_config())
    cache.ensure_batch(1)
    for layer in range(2):
        cache.append(layer, 0, torch.ones(2, 2, 4), torch.ones(2, 2, 4))  # 4 blocks used
    assert not cache.can_admit(1) and cache.blocks_needed(1) == 4
    with pytest.raises(CacheFull, match="needed 4 blocks, 2 free of 6"):
        cache.append(0, 0, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(CacheFull):
        cache.reserve(1)
    keys, _, starts, lengths = cache.gather(0)
    assert lengths.tolist() == [[2, 2]] and bool((keys[0, :, :2] == 1).all())
    assert cache.num_sequences == 1 and cache.pool.num_free == 2


def owners_of(cache: PagedCache) -> dict[int, int]:
    counts: dict[int, int] = {}
    for layer in cache.layers:
        for row in layer.tables:
            for t in row:
                for b in t.blocks:
                    counts[b] = counts.get(b, 0) + 1
    return counts


op = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 5)),
    st.tuples(st.just("add"), st.integers(0, 0)),
    st.tuples(st.just("fork"), st.integers(0, 9)),
    st.tuples(st.just("release"), st.integers(0, 9)),
    st.tuples(st.just("evict"), st.integers(0, 10**6)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=25), seed=st.integers(0, 2**16))
def test_random_operations_keep_invariants(ops, seed):
    """Random append / add / fork / release / evict against a plain-list model of every head."""
    gen = torch.Generator().manual_seed(seed)
    cache = PagedCache(BlockPool(40, block_size=3, head_dim=4), tiny_config())
    shadow: list[list[list[list[torch.Tensor]]]] = []  # [seq][layer][head] -> key rows
    for name, arg in ops:
        if name == "add":
            cache.reserve(0)
            shadow.append([[[] for _ in range(2)] for _ in range(2)])
        elif name == "append" and shadow:
            layer = arg % 2
            keys = torch.randn(len(shadow), 2, arg, 4, generator=gen)
            for s, rows in enumerate(shadow):  # each sequence's append is all or nothing
                try:
                    cache.append(layer, s, keys[s], -keys[s])
                except CacheFull:
                    continue
                for h in range(2):
                    rows[layer][h].extend(keys[s, h])
        elif name == "fork" and shadow:
            s = arg % len(shadow)
            try:
                cache.fork(s)
            except CacheFull:
                continue
            shadow.append([[list(h) for h in layer] for layer in shadow[s]])
        elif name == "release" and shadow:
            s = arg % len(shadow)
            cache.release(s)
            shadow.pop(s)
        elif name == "evict" and shadow:
            s, layer, h = arg % len(shadow), (arg // 7) % 2, (arg // 11) % 2
            rows = shadow[s][layer][h]
            keep = [i for i in range(len(rows)) if (arg >> (i % 17)) & 1]
            before = len(cache.layers[layer].tables[s][h].blocks)
            freed = cache.evict(s, layer, h, keep)
            assert freed == before - cache.pool.blocks_for(len(keep))
            shadow[s][layer][h] = [rows[i] for i in keep]
        check_pool(cache.pool, owners_of(cache))
        for layer in range(2):
            if not shadow:
                continue
            keys, values, starts, lengths = cache.gather(layer)
            for s in range(len(shadow)):
                for h in range(2):
                    want = shadow[s][layer][h]
                    assert int(lengths[s, h]) == len(want)
                    got = keys[s, h, int(starts[s, h]) : int(starts[s, h]) + len(want)]
                    if want:  # copy-on-write: each sequence sees exactly its own writes
                        assert torch.equal(got, torch.stack(want))
                        assert torch.equal(values[s, h, int(starts[s, h]) : int(starts[s, h]) + len(want)], -got)
    for s in range(len(shadow)):
        cache.release(0)
    assert cache.pool.num_free == cache.pool.num_blocks


def test_handed_out_blocks_are_zeroed_so_stale_nan_never_reaches_attention():
    pool = BlockPool(4, block_size=2, head_dim=3)
    (b,) = pool.allocate(1)
    pool.keys[b] = float("nan")
    pool.values[b] = float("nan")
    pool.free([b])
    ids = pool.allocate(4)  # every block, the NaN one included
    assert torch.isfinite(pool.keys[ids]).all() and torch.isfinite(pool.values[ids]).all()
