"""Prompt-lookup speculation: the draft source on hand-made sequences, back-off, and losslessness and
cache rollback on the real SmolLM2 model."""

import pytest
import torch

from permkv.models import encode_prompt
from permkv.speculate import (
    Backoff,
    PromptLookup,
    SpeculativeDecodingEngine,
    SuffixDraft,
    SuffixIndex,
    VerifyCost,
    greedy_generate_ids,
    replay,
    speculative_generate,
)
from permkv.baselines.hf import hf_generate


# --- the draft source, no model -------------------------------------------------------------------


def lookup(ids, **kw):
    src = PromptLookup(**kw)
    src.start(ids)
    return src.get_candidates(ids)


def test_lookup_continues_the_most_recent_match():
    # "1 2" occurs twice; the later occurrence is followed by 7 8, the earlier by 3 4.
    ids = [1, 2, 3, 4, 9, 1, 2, 7, 8, 5, 1, 2]
    assert lookup(ids, k=2, max_ngram=2) == [7, 8]


def test_lookup_prefers_the_longest_ngram():
    # The 3-gram "5 1 2" occurred once (-> 6); the 2-gram "1 2" occurred later (-> 9).
    ids = [5, 1, 2, 6, 0, 1, 2, 9, 4, 5, 1, 2]
    assert lookup(ids, k=1, max_ngram=3) == [6]
    assert lookup(ids, k=1, max_ngram=2) == [9]


def test_lookup_k_and_end_of_history():
    ids = [1, 2, 3, 4, 5, 6, 1, 2]
    assert lookup(ids, k=3, max_ngram=2) == [3, 4, 5]
    # The match is near the end: the draft runs into the current suffix (repetition is allowed).
    assert lookup([4, 1, 2, 1], k=5, max_ngram=1) == [2, 1]


def test_lookup_none_without_a_match_and_respects_min_ngram():
    assert lookup([1, 2, 3, 4], k=3) is None
    ids = [1, 2, 8, 9, 3, 2]  # only the 1-gram "2" matches
    assert lookup(ids, k=2, max_ngram=3, min_ngram=1) == [8, 9]
    assert lookup(ids, k=2, max_ngram=3, min_ngram=2) is None


def test_lookup_searches_the_corpus_after_the_history():
    src = PromptLookup(k=2, max_ngram=2, corpus=[7, 1, 2, 42, 43])
    src.start([9, 1, 2])
    assert src.get_candidates([9, 1, 2]) == [42, 43]
    src.start([1, 2, 5, 1, 2])  # the history's own match wins
    assert src.get_candidates([1, 2, 5, 1, 2]) == [5, 1]


def test_lookup_is_incremental():
    src = PromptLookup(k=2, max_ngram=2)
    ids = [1, 2, 3]
    src.start(ids)
    assert src.get_candidates(ids) is None
    ids += [4, 1, 2]
    assert src.get_candidates(ids) == [3, 4]


@pytest.mark.parametrize(
    "kw, word",
    [({"k": 0}, "k"), ({"max_ngram": 1, "min_ngram": 2}, "max_ngram"), ({"min_ngram": 0}, "min_ngram")],
)
def test_bad_arguments_raise(kw, word):
    with pytest.raises(ValueError, match=word):
        PromptLookup(**kw)


def test_backoff_bad_arguments_raise():
    with pytest.raises(ValueError, match="patience"):
        Backoff(PromptLookup(), patience=0)


class Always:
    """A draft source that always proposes the same 4 tokens."""

    def start(self, ids):
        pass

    def get_candidates(self, ids):
        return [1, 2, 3, 4]

    def update(self, num_matches):
        pass


def test_backoff_halves_then_pauses_then_recovers():
    b = Backoff(Always(), patience=2, cooldown=3)
    b.start([0])
    assert b.get_candidates([0]) == [1, 2, 3, 4]
    b.update(1)  # partly accepted: the length stays
    assert b.get_candidates([0]) == [1, 2, 3, 4]
    b.update(0)  # nothing accepted: half the length
    assert b.get_candidates([0]) == [1, 2]
    b.update(0)  # second miss in a row: pause for 3 steps
    assert [b.get_candidates([0]) for _ in range(3)] == [None, None, None]
    assert b.get_candidates([0]) == [1]
    b.update(1)  # something accepted: back to the full length
    assert b.get_candidates([0]) == [1, 2, 3, 4]
    b.update(0)
    b.get_candidates([0])
    b.update(0)  # two misses again: the pause is back at 3 since a draft was accepted
    assert [b.get_candidates([0]) for _ in range(4)] == [None, None, None, [1]]


# --- the decoding loop on the real model ----------------------------------------------------------

TOPICS = ["the moon", "a red bicycle", "rainy Mondays", "Python lists", "the Roman empire",
          "coffee", "a lighthouse", "prime numbers", "winter birds", "a broken clock"]
TEMPLATES = [
    "Write one sentence about {t}.",
    "Repeat exactly, twice: '{t} is here, {t} is there.'",
    "List three facts about {t}, one per line, each starting with '{t}:'.",
]
PROMPTS = [tpl.format(t=t) for tpl in TEMPLATES for t in TOPICS]  # 30 varied prompts


CPU_LIKE = VerifyCost((1, 2, 16, 64), (1.0, 1.5, 2.0, 4.0))  # the shape measured on a 2-core CPU, fixed for tests


def _history() -> SuffixIndex:
    index = SuffixIndex()
    index.add_document(list(range(1000, 1040)))  # an earlier "output" that matches nothing here
    return index


# Every draft source permkv has, as the server, the notebook and the ablations build them.
DRAFT_SOURCES = {
    "lookup": lambda: PromptLookup(k=6, max_ngram=2),
    "lookup_backoff": lambda: Backoff(PromptLookup(k=6)),
    "suffix": lambda: SuffixDraft(cost=CPU_LIKE),
    "suffix_no_cost": lambda: SuffixDraft(),  # drafts every node it finds: the most rejections
    "suffix_chain": lambda: SuffixDraft(cost=CPU_LIKE, max_width=1),
    "suffix_history": lambda: SuffixDraft(cost=CPU_LIKE, history=_history()),
}


@pytest.fixture(scope="module")
def grounded_prompts(smol):
    """A code edit of notebook 04 with its greedy output (20 tokens); the slow lane's 30 prompts cover the rest."""
    from permkv.experiments.speculative_decoding import workload_texts

    model, tok, spec = smol
    texts = [workload_texts("code_edit", 1, seed=5)[0]]
    ids = [encode_prompt(tok, spec, t) for t in texts]
    return [(i, greedy_generate_ids(model, i, 20, tok.eos_token_id).tokens) for i in ids]


@pytest.mark.parametrize("name", sorted(DRAFT_SOURCES))
def test_every_draft_source_is_lossless(name, smol, grounded_prompts):
    model, tok, _ = smol
    accepted = 0
    for ids, ref in grounded_prompts:
        got = speculative_generate(model, ids, 20, DRAFT_SOURCES[name](), tok.eos_token_id)
        assert got.tokens == ref
        accepted += got.stats.accepted
    assert accepted > 0  # drafts were verified and kept, not only plain steps


@pytest.mark.slow
def test_token_identical_to_greedy_on_30_prompts(smol):
    model, tok, spec = smol
    eos = tok.eos_token_id
    drafted = 0
    for i, text in enumerate(PROMPTS):
        ids = encode_prompt(tok, spec, text)
        ref = greedy_generate_ids(model, ids, 16, eos)
        name = sorted(DRAFT_SOURCES)[i % len(DRAFT_SOURCES)]  # every source on 5 prompts
        got = speculative_generate(model, ids, 16, DRAFT_SOURCES[name](), eos)
        assert got.tokens == ref.tokens, (name, text)
        assert got.stats.new_tokens == len(ref.tokens)
        drafted += got.stats.drafted
    assert drafted > 0


def test_plain_loop_matches_hf_generate(smol):
    model, tok, spec = smol
    for text in PROMPTS[::10]:
        ids = encode_prompt(tok, spec, text)
        ref = hf_generate(model, ids, 16, eos_token_id=tok.eos_token_id)
        assert greedy_generate_ids(model, ids, 16, tok.eos_token_id).tokens == ref.tokens


def test_rollback_leaves_the_cache_as_greedy_would(smol):
    model, tok, spec = smol
    ids = encode_prompt(tok, spec, "Repeat exactly: the cat sat on the mat, the cat sat on the hat.")
    ref = greedy_generate_ids(model, ids, 24)
    got = speculative_generate(model, ids, 24, PromptLookup(k=8, max_ngram=1))
    assert got.tokens == ref.tokens
    assert got.stats.drafted > got.stats.accepted  # some drafts were rejected and cropped
    assert got.cache.get_seq_length() == ref.cache.get_seq_length() == len(ids) + 24 - 1
    for a, b in zip(got.cache.layers, ref.cache.layers):
        assert a.keys.shape == b.keys.shape  # (batch, kv_heads, seq, head_dim)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(a.values, b.values, atol=1e-3, rtol=1e-3)


def test_eos_and_max_new_tokens(smol):
    model, tok, spec = smol
    ids = encode_prompt(tok, spec, "Say OK.")
    ref = greedy_generate_ids(model, ids, 40, tok.eos_token_id)
    got = speculative_generate(model, ids, 40, PromptLookup(k=10), tok.eos_token_id)
    assert got.tokens == ref.tokens and got.tokens[-1] == tok.eos_token_id
    short = speculative_generate(model, ids, 3, PromptLookup(k=10), tok.eos_token_id)
    assert short.tokens == ref.tokens[:3]
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, ids, 0)


def test_engine_measures_speedup_on_the_knock_knock_example(smol):
    model, tok, spec = smol
    engine = SpeculativeDecodingEngine(model, tok, spec, k=5, max_new_tokens=16)
    joke = "Knock, knock! Who's there? Lettuce. Lettuce who? Lettuce in, it's cold out here!"
    out = engine.generate_with_speculation(
        "Tell the knock-knock joke again.", "Knock, knock!", lookup_corpus=joke, measure_speedup=True
    )
    assert out.speedup is not None and out.speedup > 0
    assert out.greedy_stats.new_tokens == out.stats.new_tokens
    assert isinstance(out.accepted, str) and out.accepted
    assert all(isinstance(c, list) for c in out.candidates)
    with pytest.raises(ValueError, match="k"):
        SpeculativeDecodingEngine(model, tok, spec, k=0)


# --- the fallback on open-ended text ------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_prompts(smol):
    """Two open-ended prompts of notebook 04 and their greedy outputs (96 tokens)."""
    from permkv.experiments.speculative_decoding import workload_texts

    model, tok, spec = smol
    ids = [encode_prompt(tok, spec, t) for t in workload_texts("open_ended", 2, seed=7)]
    return [(i, greedy_generate_ids(model, i, 96, tok.eos_token_id).tokens) for i in ids]


@pytest.mark.slow
def test_fallback_costs_open_ended_text_almost_nothing(smol, open_prompts):
    """Counted, not timed (robust on a shared CPU): replayed on real open-ended outputs, the suffix
    drafter's passes cost, by the CPU-shaped verify cost, at most 8% more than plain decoding's, and
    most passes are plain steps."""
    _, tok, _ = smol
    for ids, ref in open_prompts:
        got = replay(SuffixDraft(cost=CPU_LIKE), ids, ref, tok.eos_token_id)
        plain = (len(ref) - 1) * CPU_LIKE(1)
        assert sum(CPU_LIKE(w) for w in got.widths) <= 1.08 * plain
        raw = replay(SuffixDraft(), ids, ref, tok.eos_token_id)  # the same drafter without the cost model
        assert sum(CPU_LIKE(w) for w in got.widths) < sum(CPU_LIKE(w) for w in raw.widths)


@pytest.mark.slow
def test_fallback_is_not_slower_than_greedy_beyond_the_noise(smol, open_prompts):
    """Timed: on open-ended prompts the suffix drafter (with this machine's measured verify cost) takes
    at most greedy's time plus the noise measured between greedy's own repeats (at least 10%)."""
    import statistics

    model, tok, _ = smol
    cost = VerifyCost.measure(model, repeats=3)
    ratios, noise = [], []
    for ids, ref in open_prompts:
        plain, fast = [], []
        for _ in range(3):  # interleaved, so load on the machine hits both alike
            plain.append(greedy_generate_ids(model, ids, 96, tok.eos_token_id).stats.wall_s)
            got = speculative_generate(model, ids, 96, SuffixDraft(cost=cost), tok.eos_token_id)
            assert got.tokens == ref
            fast.append(got.stats.wall_s)
        noise.append(max(plain) / min(plain) - 1)
        ratios.append(statistics.median(fast) / statistics.median(plain))
    assert statistics.median(ratios) <= 1 + max(0.10, 2 * statistics.median(noise)), (ratios, noise)


# --- workloads and summaries ------------------------------------------------------------------------


def test_workloads_have_the_asked_number_of_prompts():
    from permkv.experiments.speculative_decoding import WORKLOADS, workload_texts

    for w in WORKLOADS:
        texts = workload_texts(w, 30)
        assert len(set(texts)) == 30 and all(isinstance(t, str) and t for t in texts)  # a verdict's n, all distinct
        assert workload_texts(w, 3, seed=1) != workload_texts(w, 3, seed=2)
    code = workload_texts("code_edit", 1)[0]
    assert code.startswith("Rename the function `") and "```python\ndef " in code
    with pytest.raises(ValueError, match="workload"):
        workload_texts("poetry", 1)
    with pytest.raises(ValueError, match="open-ended prompts"):
        workload_texts("open_ended", 1000)


def _timing(workload, prompt, method, seconds, identical=True, **stats):
    from permkv.experiments.speculative_decoding import Timing

    return Timing(workload, prompt, method, 10, seconds, None, identical, stats)


def test_speedup_table_on_hand_made_timings():
    from permkv.experiments.speculative_decoding import speedup_table

    ts = []
    for p, (g, hf, fast) in enumerate([(2.0, 1.0, 1.0), (4.0, 4.0, 1.0), (3.0, 2.0, 2.0)]):
        ts += [_timing("quote", p, "greedy", g), _timing("quote", p, "hf", hf),
               _timing("quote", p, "fast", fast, drafted=8, accepted=6, forward_passes=4)]
    ts += [_timing("code_edit", 0, "greedy", 1.0), _timing("code_edit", 0, "hf", 1.0), _timing("code_edit", 0, "fast", 1.0)]
    ts += [_timing("open_ended", 0, "greedy", 1.0), _timing("open_ended", 0, "hf", 1.25),
           _timing("open_ended", 0, "fast", 1.0, identical=False)]
    rows = {(r["workload"], r["method"]): r for r in speedup_table(ts, versus="hf")}
    fast = rows["quote", "fast"]
    assert fast["speedup"] == pytest.approx(9 / 4)  # pooled: greedy seconds / method seconds
    assert fast["mean_speedup"] == pytest.approx((2 + 4 + 1.5) / 3) and fast["min_speedup"] == 1.5
    assert fast["speedup_ci_low"] <= fast["speedup"] <= fast["speedup_ci_high"]
    assert fast["over_hf"] == pytest.approx(7 / 4)
    assert fast["minus_hf"] == pytest.approx(((2 - 2) + (4 - 1) + (1.5 - 1.5)) / 3) and fast["faster_than_hf"] == 1
    assert fast["acceptance_rate"] == pytest.approx(0.75) and fast["tokens_per_pass"] == pytest.approx(2.5)
    assert rows["quote", "hf"]["slower_prompts"] == 0 and "minus_hf" not in rows["quote", "hf"]
    assert rows["open_ended", "hf"]["speedup"] == pytest.approx(0.8) and not rows["open_ended", "fast"]["all_identical"]
    grounded = rows["grounded", "fast"]  # quote and code edit, prompt 0 of each kept apart; not open-ended text
    assert grounded["n"] == 4 and grounded["speedup"] == pytest.approx(10 / 5)


def test_claim_metrics_read_the_headline_rows():
    from permkv.experiments.speculative_decoding import SpeculationConfig, claim_metrics, speedup_table

    cfg = SpeculationConfig(workloads=("quote", "open_ended"))
    hf, head = cfg.label("hf_lookup"), cfg.label("suffix")
    ts = []
    for p in range(3):
        ts += [_timing("quote", p, "greedy", 3.0), _timing("quote", p, hf, 2.0), _timing("quote", p, head, 1.0 + p / 10)]
        ts += [_timing("open_ended", p, "greedy", 1.0), _timing("open_ended", p, hf, 1.1), _timing("open_ended", p, head, 1.0)]
    m = claim_metrics(speedup_table(ts, versus=hf), cfg)
    assert m["claim.speculative_speedup_grounded"] == pytest.approx(9 / 3.3)
    assert m["claim.speculative_minus_hf_grounded_ci_low"] > 0
    assert m["claim.speculative_speedup_open_ended"] == pytest.approx(1.0)
    assert m["speedup.quote.hf_lookup"] == pytest.approx(1.5) and m["all_identical"] == 1.0
    with pytest.raises(ValueError, match="methods must include"):
        SpeculationConfig(methods=("greedy", "suffix"))


def test_paged_cache_rolls_back_like_a_fresh_greedy_run(smol):
    """Speculation through the paged cache: greedy tokens, and after rollback exactly the blocks and
    lengths that a plain greedy run through a paged cache holds."""
    from permkv.cache import BlockPool, PagedCache, paged_attention

    model, tok, spec = smol
    ids = encode_prompt(tok, spec, "Repeat exactly: the quick brown fox jumps over the lazy dog. The quick brown fox")

    def paged():
        return PagedCache(BlockPool(2000, block_size=16, head_dim=spec.head_dim), model.config)

    with paged_attention(model):
        plain_cache, spec_cache = paged(), paged()
        plain = speculative_generate(model, ids, 24, None, cache=plain_cache)
        fast = speculative_generate(model, ids, 24, PromptLookup(k=6), cache=spec_cache)
    assert fast.tokens == plain.tokens
    assert fast.stats.forward_passes < plain.stats.forward_passes  # drafts were accepted
    assert fast.stats.drafted > fast.stats.accepted  # and some were rejected, so crop ran
    assert spec_cache.get_seq_length() == plain_cache.get_seq_length()
    assert spec_cache.stats().lengths == plain_cache.stats().lengths
    assert spec_cache.pool.num_free == plain_cache.pool.num_free
