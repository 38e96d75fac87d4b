"""05_recursive_lm's experiment module: documents, truncation, config checks and the ledger metrics."""

import math

import pytest

from permkv.experiments.recursive_lm import (
    RecursiveLMConfig,
    build_documents,
    claim_metrics,
    summarize,
    truncate_middle,
)


def test_documents_hold_their_needles_and_are_seeded(smol):
    tok = smol[1]
    docs = build_documents(tok, "niah_multikey", 2, 2000, seed=3, n_needles=4)
    again = build_documents(tok, "niah_multikey", 2, 2000, seed=3, n_needles=4)
    assert [d.context for d in docs] == [d.context for d in again]
    for d in docs:
        assert all(f"magic numbers for {k} is: {v}." in d.context for k, v in zip(d.metadata["keys"], d.metadata["values"]))
        assert d.answers[0] in d.metadata["values"] and len(set(d.metadata["keys"])) == 4
        assert 1900 < len(tok(d.context, add_special_tokens=False).input_ids) < 2200
    with pytest.raises(ValueError, match="task must be one of"):
        build_documents(tok, "squad", 1, 2000)


def test_truncate_middle_keeps_both_ends():
    assert truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert truncate_middle(list(range(3)), 4) == [0, 1, 2]


@pytest.mark.parametrize("kw, match", [
    (dict(model="gpt"), "model must be a bundled name .* got .gpt. \\(no such file or folder\\)"),
    (dict(tasks=["squad"]), "tasks must be"),
    (dict(ratios=[0.5]), "ratios must be"),
    (dict(doc_tokens=1000, context_chunk_size=640), "doc_tokens must be >= 2 x context_chunk_size"),
    (dict(n_docs=0), "n_docs must be an int >= 1"),
    (dict(official_docs=-1), "official_docs must be"),
    (dict(scorings=["h2o"]), "scorings must be"),
    (dict(scorings=[]), "scorings must be"),
    (dict(scorings=["kvzip", "kvzip"]), "scorings must be"),
])
def test_config_names_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        RecursiveLMConfig(**kw)


def _row(method, ratio, doc, score, read_calls, task="niah_single"):
    return dict(method=method, ratio=float(ratio), task=task, doc=doc, score=score, error=None, calls=read_calls + 1,
                read_calls=read_calls, depth_reached=2, tokens_read=100, wall_s=1.0, peak_kv_bytes=10, achieved_ratio=ratio)


def test_claim_metrics_pair_the_same_documents():
    rows = [_row("permkv_rlm", 1, d, s, 25) for d, s in enumerate([1, 1, 0, 1])]
    rows += [_row("permkv_rlm", 8, d, s, 4) for d, s in enumerate([1, 0, 0, 1])]
    rows += [_row("permkv_rlm", 8, 9, 1.0, 5)]  # a document without a 1x run: not in the retention
    m = claim_metrics(rows)
    assert m["claim.rlm_read_calls_1x"] == 25 and m["claim.rlm_read_calls_8x"] == pytest.approx(4.2)
    assert m["claim.rlm_quality_retention_8x"] == pytest.approx((2 / 4) / (3 / 4))
    assert m["permkv_rlm.8x.n"] == 5 and m["permkv_rlm.1x.score"] == 0.75
    table = summarize(rows)
    assert {(t["ratio"], t["task"]) for t in table} == {(1.0, "niah_single"), (1.0, "all"), (8.0, "niah_single"), (8.0, "all")}
    zero = claim_metrics([_row("permkv_rlm", 1, 0, 0.0, 25), _row("permkv_rlm", 8, 0, 0.0, 4)])
    assert math.isnan(zero["claim.rlm_quality_retention_8x"])
