"""Draft trees, the suffix index and drafter, the verify-cost model and tree verification.

Model-free tests pin the data structures exactly; the real SmolLM2 model checks that tree verification
keeps greedy's tokens and leaves the cache as greedy decoding would."""

import pytest
import torch

from permkv.models import encode_prompt
from permkv.speculate import (
    DraftTree,
    SuffixDraft,
    SuffixIndex,
    VerifyCost,
    greedy_generate_ids,
    new_cache,
    replay,
    speculative_generate,
    tree_mask,
)

# --- DraftTree ---------------------------------------------------------------------------------------


def test_tree_depths_children_and_pruning():
    #   root -> 5 (0) -> 6 (1) -> 7 (3)
    #        -> 8 (2) -> 9 (4)
    t = DraftTree((5, 6, 8, 7, 9), (-1, 0, -1, 1, 2))
    assert t.depths() == [1, 2, 1, 3, 2]
    assert t.children() == {-1: [0, 2], 0: [1], 1: [3], 2: [4]}
    assert not t.is_chain and DraftTree.chain([1, 2, 3]).is_chain
    assert t.pruned(2) == DraftTree((5, 6, 8, 9), (-1, 0, -1, 2))


def test_tree_accept_follows_the_models_choices():
    t = DraftTree((5, 6, 8, 7, 9), (-1, 0, -1, 1, 2))
    # preds[0]: after the root; preds[1 + i]: after node i.
    assert t.accept([8, 0, 0, 9, 0, 4]) == [2, 4]  # the second branch, to its end
    assert t.accept([5, 6, 0, 0, 0, 0]) == [0, 1]  # 7 was drafted after 6, the model wanted 0
    assert t.accept([3, 0, 0, 0, 0, 0]) == []
    assert t.accept([5, 6, 0, 0, 0, 0], stop={6}) == [0]  # a stop token is never accepted as a draft


@pytest.mark.parametrize("tokens, parents, word", [
    ((1, 2), (-1,), "same length"), ((1, 2), (-1, 1), "parents"), ((1, 1), (-1, -1), "siblings"),
])
def test_bad_trees_raise(tokens, parents, word):
    with pytest.raises(ValueError, match=word):
        DraftTree(tokens, parents)


def test_tree_mask_sees_cache_root_and_ancestors_only():
    t = DraftTree((5, 6, 8), (-1, 0, -1))
    m = tree_mask(t, past=2)
    assert m.shape == (1, 1, 4, 6)  # (batch, heads, root + 3 nodes, 2 cached + root + 3 nodes)
    assert m[0, 0].int().tolist() == [
        [1, 1, 1, 0, 0, 0],  # root
        [1, 1, 1, 1, 0, 0],  # 5: root, itself
        [1, 1, 1, 1, 1, 0],  # 6: root, 5, itself
        [1, 1, 1, 0, 0, 1],  # 8: root, itself (not its sibling's branch)
    ]


# --- SuffixIndex and SuffixDraft ------------------------------------------------------------------


def test_suffix_index_finds_every_occurrence_most_recent_first():
    idx = SuffixIndex(max_pattern=3)
    idx.extend([1, 2, 3, 1, 2, 4, 1, 2])
    assert idx.continuations([1, 2], depth=2, limit=5) == [[4, 1], [3, 1]]  # the last "1 2" has no continuation
    assert idx.continuations([1, 2], depth=2, limit=1) == [[4, 1]]
    assert idx.continuations([2, 3, 1, 2], depth=2, limit=5) == []  # longer than max_pattern: not indexed
    assert idx.continuations([9], depth=2, limit=5) == []


def test_suffix_index_keeps_documents_apart():
    idx = SuffixIndex(max_pattern=2)
    idx.add_document([1, 2, 3])
    idx.add_document([3, 4])
    assert idx.continuations([2], depth=5, limit=5) == [[3]]  # stops at the document's end
    assert idx.continuations([3, 3], depth=5, limit=5) == []  # no pattern across two documents
    assert idx.continuations([3], depth=5, limit=5) == [[4]]


def test_suffix_draft_builds_a_frequency_ordered_tree():
    # "1 2" was followed by 3 (twice) and by 4 (once, most recently).
    ids = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2]
    d = SuffixDraft(max_pattern=2, max_depth=2, min_prob=0.0, prior=(3.0, 1.0))
    d.start(ids)
    tree = d.get_candidates(ids)
    # p(3) = 0.75 * 2/3 = 0.5, p(4) = 0.75 * 1/3 = 0.25; below them 8 and 9 (0.5 * 0.75 / 2) and 7
    # (0.25 * 0.75) tie at 0.1875 and go most recent first: 7, then 8, then 9.
    assert tree == DraftTree((3, 4, 7, 8, 9), (-1, -1, 1, 0, 0))


def test_suffix_draft_prefers_the_longest_match_and_the_history():
    d = SuffixDraft(max_pattern=3, max_depth=3, min_prob=0.0, history=SuffixIndex(3))
    d.history.add_document([7, 8, 9, 10])
    d.start([5, 8, 6])
    assert d.get_candidates([5, 8, 6, 7, 8]) == DraftTree.chain([9, 10])  # "7 8" only in the history
    d.start([7, 8, 1, 2, 8])
    assert d.get_candidates([7, 8, 1, 2, 8]).tokens[:1] == (1,)  # "8": the request's own "8 1" ranks first


def test_suffix_draft_stops_drafting_when_drafts_keep_failing():
    """Replayed on an output that never continues as the prompt did, drafting stops after a few misses."""
    cost = VerifyCost.linear(step_s=1.0, per_token_s=0.1)
    prompt = list(range(1, 61))
    output = prompt[::-1]  # every token occurred, always followed by another one
    got = replay(SuffixDraft(cost=cost), prompt, output)
    assert got.tokens == output and got.stats.accepted == 0
    assert 0 < len(got.drafts) <= 10  # rate 1 / (2 + misses): no draft pays once it is under 0.1
    assert got.widths[-40:] == [1] * 40  # plain decoding from then on
    spent = sum(cost(w) for w in got.widths)
    assert spent <= 1.05 * (len(output) - 1) * cost(1)


def test_suffix_draft_copies_long_stretches():
    cost = VerifyCost.linear(step_s=1.0, per_token_s=0.05)
    prompt = [7, 3, 9, 4, 1, 8, 2, 6, 5, 0] * 3 + list(range(100, 140))
    output = list(range(100, 140)) + [7, 3, 9, 4]
    got = replay(SuffixDraft(cost=cost), prompt + [99], output)
    assert got.tokens == output
    assert got.stats.forward_passes < len(output) / 4  # whole stretches accepted per pass


def test_verify_cost_interpolates_and_picks_the_best_size():
    cost = VerifyCost((1, 2, 8), (1.0, 1.5, 2.0))
    assert cost(1) == 1.0 and cost(2) == 1.5 and cost(5) == pytest.approx(1.75) and cost(14) == pytest.approx(2.5)
    assert VerifyCost((1, 2, 4), (1.0, 0.9, 2.0)).seconds == (1.0, 1.0, 2.0)  # a dip is noise
    gains = [0.9, 0.8, 0.7, 0.6, 0.1, 0.1, 0.1]
    best = cost.best_size(gains)
    rates = [(1 + sum(gains[:d])) / cost(1 + d) for d in range(len(gains) + 1)]
    assert best == max(range(len(rates)), key=rates.__getitem__) and best > 0
    assert cost.best_size([0.2, 0.1]) == 0  # a token at 1.5 steps for 0.2 expected: plain decoding
    with pytest.raises(ValueError, match="sizes"):
        VerifyCost((2, 4), (1.0, 2.0))
