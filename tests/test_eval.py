import math

import pytest
import torch

from permkv.eval import (
    bootstrap_ci,
    contains,
    contains_all,
    exact_match,
    first_line,
    normalize,
    paired_difference,
    perplexity,
    retention,
    retention_ci,
    token_f1,
)


def test_metrics_on_hand_made_cases():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert contains("It is 1234567.", ["1234567"]) == 1.0
    assert contains("It is 123456.", ["1234567"]) == 0.0
    assert contains_all("AAA and BBB", ["AAA", "BBB", "CCC"]) == pytest.approx(2 / 3)
    assert exact_match("the Paris", ["Paris"]) == 1.0 and exact_match("Paris France", ["Paris"]) == 0.0
    assert token_f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)
    assert token_f1("London", ["Paris", "london"]) == 1.0
    assert first_line(" Paris.\n\nThe answer is 2") == "Paris."


def test_bootstrap_and_retention():
    low, high = bootstrap_ci([1.0] * 50 + [0.0] * 50)
    assert low < 0.5 < high and high - low < 0.25
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    assert retention([0.5, 0.5], [1.0, 1.0]) == 0.5
    with pytest.raises(ValueError, match="paired"):
        retention([1.0], [1.0, 1.0])
    kept, low, high = retention_ci([1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0])
    assert kept == 1.0 and low <= kept <= high
    assert math.isnan(retention_ci([0.0, 0.0], [0.0, 0.0])[1])  # the full cache never scores: no CI


def test_paired_difference():
    d = paired_difference([1, 1, 0, 1, 0, 1], [0, 1, 0, 0, 0, 1])
    assert d["n"] == 6 and d["diff"] == pytest.approx(2 / 6)
    assert 0 <= d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert (d["ci_low"], d["ci_high"]) == bootstrap_ci([1, 0, 0, 1, 0, 0])  # the bootstrap of the differences
    empty = paired_difference([], [])
    assert empty["n"] == 0 and math.isnan(empty["diff"]) and math.isnan(empty["ci_low"])
    with pytest.raises(ValueError, match="paired"):
        paired_difference([1.0], [1.0, 0.0])


def test_perplexity_matches_manual_computation(smol):
    model, tok, _ = smol
    ids = tok("The quick brown fox jumps over the lazy dog.").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)) / (len(ids) - 1)
    assert perplexity(model, ids) == pytest.approx(math.exp(nll), rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, ids[:1])

