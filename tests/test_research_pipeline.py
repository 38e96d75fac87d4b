"""08_research_pipeline's experiment module: the budget arithmetic, corpora, prompts, ledger metrics, and
one pipeline end to end (one compressed read serves every module, with the answers of a read per module)."""

import math

import pytest

from permkv.compress import repeat_prompt_ids
from permkv.eval import stop_ids
from permkv.experiments.research_pipeline import (
    PipelineConfig,
    build_corpora,
    claim_metrics,
    module_budget,
    module_ids,
    paired,
    prompts_for,
    run_grid,
    summarize,
    truncation_keep,
)


def test_budget_arithmetic():
    assert module_budget(6000, 8) == 750 and module_budget(601, 4) == 150
    assert truncation_keep(6000, 40, 8) == 710  # the truncated prefix takes the compressed one's budget
    assert PipelineConfig(corpus_tokens=6000, ratio=8).budget == 750
    with pytest.raises(ValueError, match="leaves no room"):
        truncation_keep(400, 60, 8)
    with pytest.raises(ValueError, match="ratio must be"):
        module_budget(100, 0.5)


@pytest.mark.parametrize("kw, match", [
    (dict(task="squad"), "task must be one of"),
    (dict(arms=["truncated", "truncated"]), "arms must be"),
    (dict(arms=["cut"]), "arms must be"),
    (dict(arms=[]), "arms must be"),
    (dict(ratio=0.5), "ratio must be"),
    (dict(n_questions=0), "n_questions must be an int >= 1"),
    (dict(corpus_tokens=400, ratio=8), "corpus_tokens must be >= 64 x ratio"),
    (dict(chunk_tokens=-1), "chunk_tokens must be an int >= 0"),
])
def test_config_names_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(**kw)


def test_corpora_are_seeded_and_prompts_share_the_corpus_prefix(smol):
    _, tok, spec = smol
    cfg = PipelineConfig(task="niah_multikey", n_questions=2, corpus_tokens=1200, n_needles=3, seed=5)
    a, b = build_corpora(tok, spec, cfg), build_corpora(tok, spec, cfg)
    assert [s.context for s in a] == [s.context for s in b] and [s.question for s in a] == [s.question for s in b]
    assert a[0].context != a[1].context
    for s in a:
        assert len(s.metadata["keys"]) == 3 and s.answers[0] in s.context
    p = prompts_for(tok, spec, a[0])
    assert p.prefix[: len(p.head)] == p.head and 1050 < len(p.prefix) < 1250
    keep = truncation_keep(len(p.prefix), p.overhead, 8)
    assert len(p.truncated(keep)) == module_budget(len(p.prefix), 8)
    ids = module_ids(tok, p, "search", a[0].question, plan="find it")
    assert ids[-len(p.tail):] == p.tail and "find it" in tok.decode(ids)


def _row(arm, q, score, prompt_tokens, same=None):
    r = dict(arm=arm, question=q, task="niah_single", score=score, notes_score=score, prompt_tokens=prompt_tokens,
             context_prompt_tokens=prompt_tokens - 50, tokens_computed=prompt_tokens + 30, decode_tokens=30,
             kept_tokens=100.0, context_kv_bytes=1000.0, kv_bytes=1200, wall_s=1.0, cpu_s=1.0)
    if same is not None:
        r["same_as_shared"] = same
    return r


def test_claim_metrics_pair_the_same_questions():
    rows = [_row("truncated", q, s, 200) for q, s in enumerate([0, 0, 1, 0])]
    rows += [_row("shared", q, s, 1000) for q, s in enumerate([1, 1, 1, 0])]
    rows += [_row("recompressed", q, s, 3000, same=True) for q, s in enumerate([1, 1, 1, 0])]
    rows += [_row("full", q, s, 700) for q, s in enumerate([1, 1, 1, 1])]
    rows += [_row("shared", 9, 1.0, 1000)]  # a question no other arm answered: in no paired metric
    m = claim_metrics(rows)
    assert m["claim.pipeline_shared_vs_truncated"] == pytest.approx(0.5)
    assert m["claim.pipeline_shared_vs_truncated.n"] == 4
    assert m["claim.pipeline_shared_vs_truncated.low"] <= 0.5 <= m["claim.pipeline_shared_vs_truncated.high"]
    assert m["claim.pipeline_shared_retention"] == pytest.approx(0.75)
    assert m["claim.pipeline_prefill_saving"] == pytest.approx(3.0)
    assert m["claim.pipeline_prefill_saving.low"] == pytest.approx(3.0)
    assert m["pipeline.recompressed_same_as_shared"] == 1.0
    assert m["shared.n"] == 5 and m["shared.score"] == pytest.approx(0.8)
    assert [t["arm"] for t in summarize(rows)] == ["truncated", "recompressed", "shared", "full"]
    assert paired(rows, "full", "truncated")["diff"] == pytest.approx(0.75)
    zero = claim_metrics([_row("shared", 0, 0.0, 10), _row("full", 0, 0.0, 10)])
    assert math.isnan(zero["claim.pipeline_shared_retention"])
    assert "claim.pipeline_prefill_saving" not in zero


@pytest.mark.slow
def test_one_compressed_read_serves_every_module_with_the_answers_of_a_read_per_module(smol):
    model, tok, spec = smol
    cfg = PipelineConfig(n_questions=1, corpus_tokens=300, ratio=4, max_new_tokens=6, arms=["recompressed", "shared"])
    rows = run_grid(model, tok, spec, cfg, progress=False)
    rec, shared = (next(r for r in rows if r["arm"] == arm) for arm in ("recompressed", "shared"))
    assert rec["same_as_shared"] and rec["tokens"] == shared["tokens"]  # forks of one context = a cache built alone
    prefix, reread = rec["prefix_tokens"], len(repeat_prompt_ids(tok, spec))
    assert shared["context_prompt_tokens"] == 2 * prefix + reread  # one read, one re-read
    assert rec["context_prompt_tokens"] == 3 * shared["context_prompt_tokens"]  # one of each per module
    assert shared["module_prompt_tokens"] == rec["module_prompt_tokens"]
    assert shared["prompt_tokens"] < rec["prompt_tokens"]
    assert shared["budget"] == module_budget(prefix, 4)
    assert shared["kept_tokens"] == pytest.approx(shared["budget"], abs=2)
    assert shared["context_kv_bytes"] == rec["context_kv_bytes"]
    assert stop_ids(model, tok)  # the modules stop at the model's end of turn
