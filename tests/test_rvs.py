"""permkv.rvs on the real SmolLM2: the KV budget holds at every decode step, compression keeps the
input and the recent window, verification sub-calls run end to end (with a recursive split), clear
errors; the experiment's scoring and claim metrics on small hand-made rows."""

import math

import pytest
import torch

from permkv.compress import RecentScore
from permkv.eval import stop_ids
from permkv.experiments.recursive_verification import (
    RVSConfig, claim_metrics, in_order_recall, pick_budget, pick_sizes, vote,
)
from permkv.models import encode_prompt
from permkv.rvs import BudgetedDecoder, RecursiveVerificationSystem, RKVScore, list_prompt, parse_items, redundancy

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "rocket"]


@pytest.fixture(scope="module")
def prompt(smol):
    _, tok, spec = smol
    return encode_prompt(tok, spec, list_prompt(WORDS))


def heads(cache):
    return [(i, h) for i, layer in enumerate(cache.layers) if not layer.is_sliding for h in range(cache.n_kv_heads)]


def test_budget_never_exceeded_during_decoding(smol, prompt):
    model, tok, _ = smol
    n, budget = len(prompt), 12
    decoder = BudgetedDecoder(model, budget=budget, ratio=4, buffer=4, window=4)
    worst = []

    def check(cache, position):
        worst.append(max(cache.cached_tokens(0, i, h) for i, h in heads(cache)))
        assert cache.seen[0] == position  # positions are explicit: seen counts every token

    out, stats = decoder.generate(prompt, stop_ids(model, tok), on_step=check)
    assert max(worst) <= n + budget and stats.max_held <= n + budget
    assert stats.generated > budget  # more tokens reasoned than held
    assert stats.compressions >= 1 and stats.evicted >= 4 * stats.compressions


def test_ratio_one_truncates_at_the_budget(smol, prompt):
    model, tok, _ = smol
    out, stats = BudgetedDecoder(model, budget=8, ratio=1).generate(prompt, stop_ids(model, tok))
    assert len(out) == 8 and stats.truncated and stats.compressions == 0
    assert stats.max_held == len(prompt) + 7  # the last token is never written


@pytest.mark.parametrize("scorer", [RKVScore(), RecentScore()])
def test_eviction_keeps_input_and_recent_window(smol, prompt, scorer):
    model, tok, _ = smol
    n, window, layer, head = len(prompt), 4, 7, 1
    decoder = BudgetedDecoder(model, budget=12, ratio=3, buffer=4, window=window, scorer=scorer)
    state = {"prev": None, "input": None, "compressed": 0}

    def check(cache, position):
        keys, _, _, lengths = cache.gather(layer)
        k = keys[0, head, : int(lengths[0, head])].clone()  # (cached, head_dim)
        if state["input"] is None:
            state["input"] = k[:n]
        assert torch.equal(k[:n], state["input"])  # the input (sinks) is never evicted
        prev = state["prev"]
        if prev is not None and len(k) <= len(prev):  # a compression ran on this step
            state["compressed"] += 1
            assert torch.equal(k[-window:-1], prev[-(window - 1):])  # the recent window survived
        state["prev"] = k

    decoder.generate(prompt, stop_ids(model, tok), on_step=check)
    assert state["compressed"] >= 1


def test_rkv_redundancy_and_score():
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 6, 16)
    keys[0, 0, 3] = keys[0, 0, 5] = keys[0, 0, 1]  # three copies of one token
    red = redundancy(keys)[0, 0]
    assert red.shape == (6,) and math.isclose(float(red.sum()), 1.0, rel_tol=1e-5)
    assert red[1] > red[3] > red[5]  # older copies are the redundant ones, the newest is kept
    assert red[1] > red[[0, 2, 4]].max()
    score = RKVScore().score(keys, keys, torch.randn(1, 3, 2, 16))
    assert score.shape == (1, 1, 6) and score[0, 0, 5] > score[0, 0, 1]


def test_verification_end_to_end_with_split(smol):
    model, tok, _ = smol
    rvs = RecursiveVerificationSystem(model, tok, kv_budget_tokens=16, compression_ratio=2, buffer=4, window=4,
                                      subcall_tokens=16, memo={})
    result = rvs.run(WORDS[:8])
    st = result.stats
    assert result.draft and st.trace.max_held <= st.trace.input_tokens + 16
    assert st.sub_calls >= len(result.claims) >= 1 and st.sub_call_tokens > 0
    assert st.max_depth_used >= 1  # 16 tokens cannot hold the 8-word cloze: the input was split
    assert st.answer_flipped == (result.answer != result.draft)
    assert st.failed_claims == sum(c.failed for c in result.claims)
    assert len(result.answer) == len(result.draft)
    again = rvs.run(WORDS[:8])  # the memo answers identical sub-calls the same way, still counted
    assert again.answer == result.answer and again.stats.sub_calls == st.sub_calls
    plain = rvs.run(WORDS[:8], verify=False)
    assert plain.answer == plain.draft and plain.stats.sub_calls == 0


def test_pieces_split_in_halves_sharing_an_item(smol):
    model, tok, _ = smol
    rvs = RecursiveVerificationSystem(model, tok, kv_budget_tokens=16, max_depth=3, buffer=4, window=4)
    limit = 24
    found = rvs.pieces(WORDS, "piano", limit)
    assert found and all(len(rvs.encode(f"{list_prompt(p)}")) > 0 for p, _ in found)
    for piece, depth in found:
        assert "piano" in piece[:-1] and depth >= 1
        assert piece[piece.index("piano") + 1] == "candle"  # the successor stays in the piece
    assert rvs.pieces(WORDS, "rocket", limit) == []  # the last item has no successor
    assert rvs.pieces(WORDS, "zebra", limit) == []
    with pytest.raises(ValueError, match="max_depth"):
        RecursiveVerificationSystem(model, tok, 16, max_depth=0, buffer=4, window=4).pieces(WORDS, "piano", limit)


def test_parse_items():
    assert parse_items("The words are: Apple, river\n- stone.\n3. cloud") == ["apple", "river", "stone", "cloud"]
    assert parse_items("The words are:\n\n* cloud\n* zebra\n\nIn order:\n* cloud") == ["cloud", "zebra"]
    assert parse_items("") == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0), "budget"), (dict(ratio=0.5), "ratio"), (dict(ratio=float("inf")), "ratio"),
    (dict(budget=8, ratio=2, window=8, buffer=4), "window \\+ buffer"), (dict(buffer=0), "buffer"),
])
def test_decoder_bad_input(smol, kwargs, match):
    model, _, _ = smol
    with pytest.raises(ValueError, match=match):
        BudgetedDecoder(model, **{"budget": 16, **kwargs})


def test_rvs_bad_input(smol):
    model, tok, _ = smol
    with pytest.raises(ValueError, match="max_depth"):
        RecursiveVerificationSystem(model, tok, 16, max_depth=-1)
    with pytest.raises(ValueError, match="subcall_tokens"):
        RecursiveVerificationSystem(model, tok, 16, subcall_tokens=0)
    rvs = RecursiveVerificationSystem(model, tok, 16, compression_ratio=1)
    for items in ([], ["Apple"], ["two words"]):
        with pytest.raises(ValueError, match="items"):
            rvs.run(items)
    with pytest.raises(ValueError, match="ids"):
        BudgetedDecoder(model, 16).generate([], set())


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=[1]), "sizes"), (dict(ratios=[2, 8]), "ratios"), (dict(sc_ratios=[16]), "sc_ratios"),
    (dict(scorer="nope"), "scorer"), (dict(metric="f1"), "metric"), (dict(n_samples=0), "n_samples"), (dict(budget=2), "budget"), (dict(budget=-1), "budget"),
])
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RVSConfig(**kwargs)


def test_scoring_helpers():
    assert in_order_recall(["a", "c", "b"], ["a", "b", "c"]) == pytest.approx(2 / 3)
    assert in_order_recall([], ["a"]) == 0.0
    assert vote([["a", "b"], ["a", "c"], ["x", "c", "d"]]) == ["a", "c"]
    probe = [dict(size=4, exact=1.0, tokens=10), dict(size=8, exact=1.0, tokens=20), dict(size=8, exact=0.0, tokens=24),
             dict(size=16, exact=0.0, tokens=40)]
    assert pick_sizes(probe, 0.5, "exact") == [4, 8]
    assert pick_sizes(probe, 1.1, "exact") == [4]  # none reaches it: the smallest, reported as failing
    assert pick_budget(probe, [4, 8], 8, 5) == 5 and pick_budget(probe, [4, 8], 2, 5) == 11


def test_claim_metrics_on_hand_rows():
    rows = []
    for s in range(4):
        rows.append(dict(size=8, sample=s, method="full", ratio=0.0, exact=1.0, tokens_generated=40))
        rows.append(dict(size=8, sample=s, method="no_verify", ratio=1.0, exact=0.0, tokens_generated=10))
        rows.append(dict(size=8, sample=s, method="no_verify", ratio=8.0, exact=float(s < 2), tokens_generated=40))
        rows.append(dict(size=8, sample=s, method="verify", ratio=8.0, exact=float(s < 3), tokens_generated=40))
        rows.append(dict(size=8, sample=s, method="verify", ratio=1.0, exact=0.0, tokens_generated=10))
        rows.append(dict(size=4, sample=s, method="full", ratio=0.0, exact=0.0, tokens_generated=20))
    m = claim_metrics(rows, "exact")
    assert m["claim.rvs_tokens_reasoned_ratio_8x"] == 4.0
    assert m["claim.rvs_quality_retention_8x"] == 0.5 and m["claim.rvs_accuracy_gap_8x"] == 0.5
    assert m["rvs_verification_gain_best"] == 0.25 and m["claim.rvs_verification_gain_ci_low"] <= 0.25
    assert math.isnan(m["rvs_accuracy_8x_self_consistency"]) and m["rvs_largest_size"] == 8
    with pytest.raises(ValueError, match="rows"):
        claim_metrics([])
