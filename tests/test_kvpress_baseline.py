"""kvpress as a baseline on the real SmolLM2: post-hoc presses keep exactly the tokens the press keeps
inside prefill, every press runs and shrinks the cache (masking presses keep their bytes), and the
parity of permkv's streaming and SnapKV scorers with kvpress's."""

import pytest
import torch

from permkv.cache import forward
from permkv.baselines.kvpress import (
    PRESSES,
    capture_inputs,
    compress_post_hoc,
    clear_masks,
    dense_report,
    kvpress_answer,
    kvzip_scored,
    make_press,
    mask_kvzip,
    prefill_with_press,
)
from permkv.compress import Compressor, RecentScore, SnapKVScore, UniformAllocator, fork_sequence, observing, paged_cache_for
from permkv.data import heldout_essays
from permkv.eval import prefill


@pytest.fixture(scope="module")
def prefix(smol):
    _, tok, _ = smol
    return tok(heldout_essays()[:4000], add_special_tokens=False).input_ids[:512]


def kept_indices(original: torch.Tensor, kept: torch.Tensor) -> list[set[int]]:
    """Per head, the indices in `original` `(1, H, L, D)` of the rows of `kept` `(1, H, n, D)`."""
    return [set((kept[0, h][:, None] == original[0, h][None]).all(-1).nonzero()[:, 1].tolist())
            for h in range(original.shape[1])]


@pytest.mark.parametrize("press", ["snapkv", "streaming", "knorm", "expected_attention", "tova", "pyramidkv"])
def test_post_hoc_keeps_the_same_tokens_as_in_prefill(smol, prefix, press):
    model, _, _ = smol
    want, _ = prefill_with_press(model, prefix[:256], make_press(press, 4))
    with capture_inputs(model) as inputs:
        full, _ = prefill(model, prefix[:256])
    got = compress_post_hoc(model, make_press(press, 4), inputs, [(layer.keys, layer.values) for layer in full.layers])
    for w, g in zip(want.layers, got.layers):
        assert torch.equal(w.keys, g.keys) and torch.equal(w.values, g.values), press


@pytest.mark.parametrize("press", PRESSES)
def test_every_press_answers_and_only_masking_ones_keep_their_bytes(smol, prefix, press):
    """AdaKV and KVzip mask evicted keys instead of freeing them (the gap permkv fills)."""
    model, tok, _ = smol
    reports = []
    assert isinstance(kvpress_answer(model, tok, press, 4, 4, reports)(prefix[:256], [13]), str)
    achieved = reports[0].achieved_ratio
    if press in ("adakv_snapkv", "kvzip"):
        assert achieved == 1.0
    elif press == "pyramidkv":  # fewer tokens in upper layers, more in lower, 1/4 on average
        assert 3 < achieved < 5, achieved
    else:
        assert achieved == pytest.approx(4, rel=0.02)
    assert all(getattr(m, "masked_key_indices", None) is None for m in model.modules() if hasattr(m, "q_proj"))


def _masks(model) -> list[list[tuple[int, int]]]:
    """Each layer's masked (head, position) pairs, sorted."""
    return [sorted(zip(m.masked_key_indices[1].tolist(), m.masked_key_indices[2].tolist()))
            for m in model.modules() if hasattr(m, "q_proj")]


@pytest.mark.slow
def test_kvzip_scored_once_masks_as_the_press_at_each_ratio(smol, prefix):
    """One KVzipPress prefill and re-reading serve every ratio: the same cache, logits and masked keys
    as running the press at that ratio."""
    model, _, _ = smol
    scored = kvzip_scored(model, prefix[:300])
    assert all(getattr(m, "masked_key_indices", None) is None for m in model.modules() if hasattr(m, "q_proj"))
    for ratio in (2, 8):
        want_cache, want_logits = prefill_with_press(model, prefix[:300], make_press("kvzip", ratio))
        want = _masks(model)
        clear_masks(model)
        mask_kvzip(model, scored, ratio)
        got = _masks(model)
        clear_masks(model)
        assert got == want and len(got[0]) > 0, ratio
        assert torch.equal(scored.logits, want_logits)
        for (k, v), layer in zip(scored.keys_values, want_cache.layers):
            assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    cache = scored.cache(model)
    cache.update(*scored.keys_values[0], 0)  # decoding appends to the fresh cache, not to the scored keys
    assert scored.keys_values[0][0].shape[2] == 300


def _paged(model, prefix):
    cache = paged_cache_for(model, 2 * len(prefix))
    with observing(model) as recorder, capture_inputs(model) as inputs, torch.no_grad():
        forward(model, cache, torch.tensor([prefix]))
    n = len(prefix)
    keys_values = [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v, _, _ in (cache.gather(i) for i in range(len(cache.layers)))]
    return cache, recorder.queries, inputs, keys_values


def test_permkv_streaming_keeps_what_kvpress_streaming_keeps(smol, prefix):
    """4 sinks + the most recent tokens, same count per head (512 tokens at 4x: 128 each): the same
    tokens (kvpress keeps them in top-k order, permkv in position order; attention does not care)."""
    model, _, _ = smol
    cache, queries, inputs, kv = _paged(model, prefix)
    theirs = compress_post_hoc(model, make_press("streaming", 4), inputs, kv)
    fork = fork_sequence(cache, model.config)
    Compressor(RecentScore(), UniformAllocator(), sinks=4, window=32).compress(fork, 4, queries)
    for i, layer in enumerate(theirs.layers):
        keys, _, _, lengths = fork.gather(i)
        assert lengths.tolist() == [[128] * keys.shape[1]]
        want = [set(range(4)) | set(range(512 - 124, 512))] * keys.shape[1]
        assert kept_indices(kv[i][0], keys[:, :, :128]) == kept_indices(kv[i][0], layer.keys) == want, i


def test_permkv_snapkv_with_kvpress_window_and_kernel_nearly_matches(smol, prefix):
    """permkv's SnapKV score with kvpress's window (64, kept whole, no sinks) and kernel (5) keeps >= 95%
    of the tokens kvpress SnapKV keeps on every layer. The difference: kvpress pools the scores of the
    tokens before the window only (zero-padded at the edge), permkv pools over all tokens, so the
    2 tokens just before the window can swap places with others of equal rank."""
    model, _, _ = smol
    cache, queries, inputs, kv = _paged(model, prefix)
    theirs = compress_post_hoc(model, make_press("snapkv", 4), inputs, kv)
    fork = fork_sequence(cache, model.config)
    Compressor(SnapKVScore(kernel=5), UniformAllocator(), sinks=0, window=64, observe=64).compress(fork, 4, queries)
    overlaps = []
    for i, layer in enumerate(theirs.layers):
        keys, _, _, lengths = fork.gather(i)
        n = int(lengths[0, 0])
        mine, their = kept_indices(kv[i][0], keys[:, :, :n]), kept_indices(kv[i][0], layer.keys)
        overlaps += [len(a & b) / len(b) for a, b in zip(mine, their)]
    assert min(overlaps) >= 0.95, min(overlaps)


def test_dense_report_counts_key_and_value_bytes(smol, prefix):
    model, _, _ = smol
    cache, _ = prefill_with_press(model, prefix[:256], make_press("knorm", 2))
    report = dense_report(cache, 256, 2)
    assert report.achieved_ratio == pytest.approx(2) and report.kept[0] == [128] * len(report.kept[0])


def test_clear_errors():
    with pytest.raises(ValueError, match="press must be"):
        make_press("h2o", 4)
    with pytest.raises(ValueError, match="ratio must be"):
        make_press("snapkv", 0.5)
