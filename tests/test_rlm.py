"""permkv.rlm: call counting, budgets, depth limit, chunk boundaries, bad input (on a deterministic
reader LM whose calls can be counted exactly), then the real SmolLM2, locally and through `permkv serve`."""

import math
import re

import openai
import pytest

from permkv.rlm import (
    ClientLM,
    RecursiveLanguageModel,
    Reply,
    RLMBudgetExceeded,
    evidence,
    sentences,
    split_pieces,
)
from permkv.rlm import Generation, SequentialBackend
from permkv.serve import create_app, running

QUESTION = "What is the special magic number for amber-delta mentioned in the provided text?"


class ReaderLM:
    """A deterministic LM: one token per word; it reports the first magic number it sees in the prompt
    (for any key, as a confused small model would) and invents 1234567 when it sees none."""

    name = "reader"

    def __init__(self, max_positions: int = 100_000):
        self.max_positions = max_positions
        self.prompts: list[tuple[str, float]] = []

    def count(self, text: str) -> int:
        return len(text.split())

    def prompt_tokens(self, prompt) -> int:
        return self.count(prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt))

    def complete(self, prompt, max_new_tokens, ratio=1.0, speculate=False) -> Reply:
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        self.prompts.append((text, ratio))
        asked = re.search(r"number for ([\w-]+) mentioned", text).group(1)
        own = re.search(rf"numbers for {asked} is: (\d+)", text)
        found = own or re.search(r"numbers for [\w-]+ is: (\d+)", text)
        answer = f"The number is {found.group(1) if found else '1234567'}."
        n = self.prompt_tokens(prompt)
        gen = Generation([0] * 5, n, ratio, n / ratio, 0, 0, 0.0, "stop")
        return Reply(answer, gen)


def document(n_sentences: int = 100, needles: dict[int, str] | None = None) -> str:
    """`n_sentences` sentences of exactly 10 words; needles (10 words each too) replace some of them."""
    out = []
    for i in range(n_sentences):
        if needles and i in needles:
            out.append(needles[i])
        else:
            out.append(f"Sentence {i} has exactly ten words in it, no more.")
    return " ".join(out)


def needle(key: str, value: str) -> str:
    """A needle sentence of 10 words."""
    return f"One of the special magic numbers for {key} is: {value}."


def rlm(lm, **kw) -> RecursiveLanguageModel:
    return RecursiveLanguageModel(lm, **{"context_chunk_size": 100, "max_new_tokens": 8, **kw})


# ----- call counting ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, pieces", [(1, 10), (2, 5), (4, 3), (8, 2), (16, 1)])
def test_read_calls_are_ceil_of_document_over_chunk_times_ratio(ratio, pieces):
    lm = ReaderLM()
    doc = document(100, {42: needle("amber-delta", "7654321")})  # 1,000 tokens, 100 per call at 1x
    result = rlm(lm, kv_cache_compression_ratio=ratio).completion(QUESTION, doc)
    assert result.read_calls == pieces == math.ceil(1000 / (100 * ratio))
    assert "7654321" in result.answer
    assert result.n_calls == len(lm.prompts) == pieces  # one grounded answer: no aggregation call
    assert result.depth_reached == 1
    assert result.tokens_read == sum(lm.count(p) for p, _ in lm.prompts)
    # compressed only where a call reads more than its budget
    assert all(r == (ratio if ratio > 1 else 1.0) for _, r in lm.prompts[:-1])
    if ratio > 1:
        assert result.achieved_ratio == pytest.approx(ratio)


def test_invented_answers_are_dropped_and_real_candidates_aggregated():
    lm = ReaderLM()
    doc = document(100, {10: needle("onyx-raven", "1111111"), 80: needle("amber-delta", "2222222")})
    result = rlm(lm).completion(QUESTION, doc)
    assert result.read_calls == 10 and result.n_calls == 11  # two grounded candidates -> one aggregation
    aggregate = lm.prompts[-1][0]
    assert "1111111" in aggregate and "2222222" in aggregate and "1234567" not in aggregate
    assert result.calls[-1].role == "aggregate" and result.depth_reached == 2
    assert "2222222" in result.answer


def test_nothing_found_answers_none_without_an_aggregation_call():
    lm = ReaderLM()
    result = rlm(lm).completion(QUESTION, document(30))
    assert result.answer == "NONE" and result.n_calls == 3


def test_concurrent_sub_calls_give_the_same_result():
    doc = document(100, {10: needle("onyx-raven", "1111111"), 80: needle("amber-delta", "2222222")})
    one = rlm(ReaderLM()).completion(QUESTION, doc)
    four = rlm(ReaderLM(), concurrency=4).completion(QUESTION, doc)
    assert (four.answer, four.n_calls, [c.answer for c in four.calls]) == (one.answer, one.n_calls, [c.answer for c in one.calls])


# ----- budgets and depth ---------------------------------------------------------------------------------

def test_depth_limit_raises_before_reading():
    lm = ReaderLM()
    with pytest.raises(RLMBudgetExceeded, match="max_depth=1"):
        rlm(lm, max_depth=1).completion(QUESTION, document(100))
    assert lm.prompts == []
    assert rlm(ReaderLM(), max_depth=1).completion(QUESTION, document(5)).n_calls == 1  # fits one call


def test_call_budget_is_checked_per_level():
    lm = ReaderLM()
    with pytest.raises(RLMBudgetExceeded, match="needs 10 calls"):
        rlm(lm, max_calls=9).completion(QUESTION, document(100))
    assert lm.prompts == []


def test_positions_cap_a_piece_even_when_the_kv_budget_would_allow_more():
    lm = ReaderLM(max_positions=300)
    r = rlm(lm, kv_cache_compression_ratio=16)
    limit, limited = r.piece_tokens(QUESTION)
    assert limited and limit < 300 < 100 * 16
    result = r.completion(QUESTION, document(100, {42: needle("amber-delta", "7654321")}))
    assert result.position_limited and result.read_calls == math.ceil(1000 / (limit // 10 * 10))  # whole sentences


# ----- chunk boundaries ----------------------------------------------------------------------------------

def test_pieces_rebuild_the_text_keep_sentences_whole_and_fit():
    doc = document(57, {13: needle("amber-delta", "7654321"), 40: needle("onyx-raven", "1111111")})
    count = lambda t: len(t.split())  # noqa: E731
    for limit in (10, 25, 33, 100, 1000):
        pieces = split_pieces(doc, limit, count)
        assert "".join(pieces) == doc
        assert all(count(p) <= limit for p in pieces)
        assert sum("7654321" in p for p in pieces) == 1
        assert any("magic numbers for amber-delta is: 7654321" in p for p in pieces)
    long = "word " * 50 + "end."
    parts = split_pieces(long, 20, count)
    assert "".join(parts) == long and all(count(p) <= 20 for p in parts)
    assert split_pieces("", 10, count) == []
    assert "".join(sentences("A b. C d!\n\nE f")) == "A b. C d!\n\nE f"


def test_evidence_is_the_sentence_holding_the_answer():
    piece = "Some words here. One of the special magic numbers for amber-delta is: 7654321. More words."
    assert evidence("The special magic number for amber-delta is 7654321.", piece, QUESTION).startswith("One of the special")
    assert evidence("The special magic number for amber-delta is 11.", piece, QUESTION) is None
    assert evidence("NONE", piece, QUESTION) is None


# ----- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(kv_cache_compression_ratio=0.5), "kv_cache_compression_ratio must be a finite number >= 1"),
    (dict(kv_cache_compression_ratio=True), "kv_cache_compression_ratio"),
    (dict(kv_cache_compression_ratio=float("inf")), "kv_cache_compression_ratio"),
    (dict(context_chunk_size=0), "context_chunk_size must be an int >= 1"),
    (dict(max_depth=0), "max_depth must be an int >= 1"),
    (dict(policy="magic"), "policy must be one of"),
    (dict(max_calls=0), "max_calls must be an int >= 1"),
])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        rlm(ReaderLM(), **kw)


def test_bad_inputs_are_named():
    r = rlm(ReaderLM())
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        r.completion("  ", "text")
    with pytest.raises(ValueError, match="context must be a str"):
        r.completion(QUESTION, ["a", "list"])
    with pytest.raises(ValueError, match="model_or_client must be"):
        RecursiveLanguageModel(42)
    with pytest.raises(ValueError, match="limit must be an int >= 1"):
        split_pieces("text", 0, len)


# ----- repl policy -----------------------------------------------------------------------------------------

class CoderLM(ReaderLM):
    """Root turns come from a script (the code a capable model would write); sub-calls read as ReaderLM."""

    def __init__(self, turns: list[str]):
        super().__init__()
        self.turns = list(turns)

    def complete(self, prompt, max_new_tokens, ratio=1.0, speculate=False) -> Reply:
        if isinstance(prompt, list):  # a root turn
            self.prompts.append(("root", ratio))
            text = self.turns.pop(0) if self.turns else "I am not sure."
            return Reply(text, Generation([0] * 5, self.prompt_tokens(prompt), 1.0, 0.0, 0, 0, 0.0, "stop"))
        return super().complete(prompt, max_new_tokens, ratio, speculate)


SCAN = """```repl
step = 300
found = [llm_query("What is the special magic number for amber-delta mentioned in the provided text? " + context[i:i + step])
         for i in range(0, len(context), step)]
print([f for f in found if "1234567" not in f])
```"""


def test_repl_runs_the_models_code_and_counts_every_call():
    doc = document(20, {7: needle("amber-delta", "7654321")})
    lm = CoderLM([SCAN, '```repl\nFINAL("7654321")\n```'])
    result = rlm(lm, policy="repl").completion(QUESTION, doc)
    subs = math.ceil(len(doc) / 300)
    assert result.answer == "7654321" and result.error is None
    assert result.n_calls == 2 + subs and [c.role for c in result.calls].count("root") == 2
    assert {c.level for c in result.calls} == {0, 1}


def test_repl_budgets_end_the_run_with_the_reason():
    doc = document(20, {7: needle("amber-delta", "7654321")})
    result = rlm(CoderLM([SCAN]), policy="repl", max_calls=3).completion(QUESTION, doc)
    assert result.answer == "" and "max_calls=3" in result.error
    result = rlm(CoderLM(["no code here"] * 5), policy="repl", max_iterations=2).completion(QUESTION, doc)
    assert "max_iterations=2" in result.error and result.n_calls == 2
    result = rlm(CoderLM([SCAN, SCAN]), policy="repl", max_total_tokens=50).completion(QUESTION, doc)
    assert "max_total_tokens=50" in result.error


def test_repl_shows_the_models_errors_to_it():
    lm = CoderLM(["```repl\nprint(undefined_name)\n```", '```repl\nFINAL("done")\n```'])
    result = rlm(lm, policy="repl").completion(QUESTION, "short context.")
    assert result.answer == "done"


# ----- the real model ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backend(smol):
    return SequentialBackend(*smol, chunk_tokens=64)


def _needle_doc(tok, n_tokens: int = 700) -> str:
    from permkv.data import load_essays

    text = tok.decode(tok(load_essays()[:20000], add_special_tokens=False).input_ids[:n_tokens])
    cut = text.index(". ", len(text) // 2) + 2
    return text[:cut] + "One of the special magic numbers for amber-delta is: 4829173. " + text[cut:]


@pytest.mark.slow
def test_real_model_reads_more_per_call_when_compressed(backend, smol):
    doc = _needle_doc(smol[1])
    one = RecursiveLanguageModel(backend, context_chunk_size=200, max_new_tokens=24).completion(QUESTION, doc)
    four = RecursiveLanguageModel(backend, context_chunk_size=200, kv_cache_compression_ratio=4,
                                  max_new_tokens=24).completion(QUESTION, doc)
    assert one.read_calls >= 4 and four.read_calls == 1
    assert "4829173" in one.answer  # the full-cache RLM finds the needle
    assert 3.5 < four.achieved_ratio < 4.5 and four.max_kv_tokens < 0.3 * four.tokens_read
    assert all(c.context_tokens <= 200 and c.kv_tokens == c.prompt_tokens for c in one.calls)  # the budget, uncompressed


@pytest.mark.slow
def test_speculative_calls_equal_greedy_and_report_a_measured_speedup(backend, smol):
    doc = _needle_doc(smol[1], 400)
    result = RecursiveLanguageModel(backend, context_chunk_size=200, max_new_tokens=24,
                                    enable_speculative_decoding=True).completion(QUESTION, doc)
    assert result.speculative_speedup is not None and result.speculative_speedup > 0
    assert all(c.greedy_decode_s is not None for c in result.calls)


@pytest.mark.slow
def test_backend_speculates_losslessly_and_drafts_from_earlier_outputs(smol):
    """`generate(..., speculate=True)`: greedy's tokens; a second request for the same text drafts from the
    first one's output (the backend's history) and needs fewer forward passes."""
    from permkv.models import encode_prompt
    from permkv.speculate import VerifyCost

    model, tok, spec = smol
    cheap = VerifyCost.linear(step_s=1.0, per_token_s=0.02)  # a hand-made cost: no measurement in the test
    fast = SequentialBackend(model, tok, spec, verify_cost=cheap)
    ids = encode_prompt(tok, spec, "Write a short poem about winter birds.")
    plain = fast.generate(ids, 32)
    first = fast.generate(ids, 32, speculate=True)
    second = fast.generate(ids, 32, speculate=True)
    assert first.tokens == second.tokens == plain.tokens and plain.forward_passes is None
    assert second.forward_passes < first.forward_passes <= 32
    assert len(fast._outputs) == 2
    small = SequentialBackend(model, tok, spec, verify_cost=cheap, history_tokens=40)
    for _ in range(3):
        small.generate(ids, 32, speculate=True)
    assert len(small._outputs) == 1  # the oldest outputs make room: at most 40 tokens kept
    with pytest.raises(ValueError, match="ratio 1"):
        fast.generate(ids, 8, ratio=4, speculate=True)
    with pytest.raises(ValueError, match="history_tokens"):
        SequentialBackend(model, tok, spec, history_tokens=-1)


@pytest.mark.slow
def test_rlm_through_permkv_serve_with_the_openai_client(backend, smol):
    doc = _needle_doc(smol[1], 400)
    with running(create_app(backend)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        lm = ClientLM(client, backend.name, smol[1], backend.spec.max_positions)
        result = RecursiveLanguageModel(lm, context_chunk_size=150, kv_cache_compression_ratio=4,
                                        max_new_tokens=24).completion(QUESTION, doc)
    assert result.read_calls == 1 and result.calls[0].ratio == 4
    assert 3.5 < result.calls[0].prompt_tokens / result.calls[0].kv_tokens < 4.5  # measured by the server
