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
    d = SuffixDraft(max_pattern=2, max_depth=2, min_prob=0.0, prior=(0.75,) * 5)  # rate 0.75 at any match
    d.start(ids)
    tree = d.get_candidates(ids)
    # p(3) = 0.75 * 2/3 = 0.5, p(4) = 0.75 * 1/3 = 0.25; below them 8 and 9 (0.5 * 0.75 / 2) and 7
    # (0.25 * 0.75) tie at 0.1875 and go most recent first: 7, then 8, then 9.
    assert tree == DraftTree((3, 4, 7, 8, 9), (-1, -1, 1, 0, 0))


def test_suffix_draft_searches_the_history_and_picks_the_best_match():
    cost = VerifyCost((1, 2, 16, 64), (1.0, 1.5, 2.0, 4.0))
    d = SuffixDraft(cost=cost, max_pattern=3, max_depth=3, min_prob=0.0, history=SuffixIndex(3))
    d.history.add_document([7, 8, 9, 10, 11, 12])
    d.start([5, 8, 6])
    # "8" was followed by 6 7 8 (request) and 9 10 11 (history): two branches of p 1/3, 2/9, 4/27 each;
    # "7 8" only by 9 10 11: p 2/3, 4/9, 8/27. The sure branch promises more tokens per second.
    assert d.get_candidates([5, 8, 6, 7, 8]) == DraftTree.chain([9, 10, 11])
    every = SuffixDraft(max_pattern=3, max_depth=3, min_prob=0.0, history=d.history)  # no cost: draft all
    every.start([7, 8, 1, 2, 8])
    assert every.get_candidates([7, 8, 1, 2, 8]).tokens[:2] == (1, 9)  # "8": the request's "8 1" first, a tie


def test_suffix_draft_stops_drafting_when_drafts_keep_failing():
    """Replayed on an output that repeats every bigram of the prompt but never the token after it:
    each 2-token match is drafted a few times, fails, and drafting stops; the passes then are plain."""
    cost = VerifyCost((1, 2, 16, 64), (1.0, 1.5, 2.0, 4.0))  # shaped like this CPU's
    prompt = list(range(1, 181))
    output = [t for i in range(0, 180, 3) for t in prompt[i : i + 2]]  # 1 2, 4 5, 7 8, ...
    got = replay(SuffixDraft(cost=cost), prompt, output)
    assert got.tokens == output and got.stats.accepted == 0
    assert 0 < len(got.drafts) <= 6
    assert got.widths[-100:] == [1] * 100
    assert sum(cost(w) for w in got.widths) <= 1.05 * (len(output) - 1) * cost(1)


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


# --- tree verification on the real model ----------------------------------------------------------


class DecoyTree:
    """Drafts, at every step, a tree whose first branch is wrong and whose second is greedy's own
    continuation (known in advance), so that the accepted branch is never already in place in the cache."""

    def __init__(self, prompt_len: int, greedy: list[int], vocab: int):
        self.n0, self.greedy, self.vocab = prompt_len, greedy, vocab

    def start(self, ids):
        pass

    def get_candidates(self, ids):
        truth = self.greedy[len(ids) - self.n0 : len(ids) - self.n0 + 3]
        if len(truth) < 3:
            return None
        decoy = [(t + 1) % self.vocab for t in truth]
        # 0: decoy, 1: truth0, 2: decoy1 under truth0, 3: truth1 under truth0, 4: truth2 under truth1
        return DraftTree((decoy[0], truth[0], decoy[1], truth[1], truth[2]), (-1, -1, 1, 1, 3))

    def update(self, num_matches):
        pass


def test_tree_verification_keeps_greedy_tokens_and_cache(smol):
    model, tok, spec = smol
    ids = encode_prompt(tok, spec, "Write one sentence about the moon.")
    ref = greedy_generate_ids(model, ids, 24)
    got = speculative_generate(model, ids, 24, DecoyTree(len(ids), ref.tokens, model.config.vocab_size))
    assert got.tokens == ref.tokens
    assert got.stats.accepted >= 3 * (len(got.drafts) - 1)  # the whole true branch, off the first position
    assert got.stats.forward_passes < ref.stats.forward_passes / 2
    assert got.cache.get_seq_length() == ref.cache.get_seq_length() == len(ids) + 24 - 1
    for a, b in zip(got.cache.layers, ref.cache.layers):  # keys, values: (batch, kv_heads, seq, head_dim)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(a.values, b.values, atol=1e-3, rtol=1e-3)


def test_replay_counts_what_a_real_run_does(smol):
    """The model-free replay gives the real run's drafts, acceptances and pass widths."""
    from permkv.experiments.speculative_decoding import workload_texts

    model, tok, spec = smol
    cost = VerifyCost.linear(step_s=1.0, per_token_s=0.02)
    ids = encode_prompt(tok, spec, workload_texts("code_edit", 1, seed=3)[0])
    real = speculative_generate(model, ids, 32, SuffixDraft(cost=cost), tok.eos_token_id)
    ref = greedy_generate_ids(model, ids, 32, tok.eos_token_id)
    assert real.tokens == ref.tokens
    again = replay(SuffixDraft(cost=cost), ids, ref.tokens, tok.eos_token_id)
    assert again.drafts == real.drafts and again.widths == real.widths
    assert again.stats.forward_passes == real.stats.forward_passes


def test_tree_falls_back_to_its_main_branch_on_a_paged_cache(smol):
    from permkv.cache import BlockPool, PagedCache, paged_attention

    model, tok, spec = smol
    ids = encode_prompt(tok, spec, "Write one sentence about the moon.")
    ref = greedy_generate_ids(model, ids, 16)
    with paged_attention(model):
        cache = PagedCache(BlockPool(500, block_size=16, head_dim=spec.head_dim), model.config)
        got = speculative_generate(model, ids, 16, DecoyTree(len(ids), ref.tokens, model.config.vocab_size), cache=cache)
    assert got.tokens == ref.tokens
    assert all(len(d) <= 2 for d, _ in got.drafts)  # the decoy branch (decoy, and nothing below it)
