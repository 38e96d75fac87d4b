import re

import pytest

from permkv.data import MODES, TASKS, Sample, build_task, encode_sample, prompt_parts


@pytest.mark.parametrize("task", TASKS)
def test_builders_are_deterministic_and_hit_the_length(smol, task):
    _, tok, spec = smol
    a = build_task(task, tok, spec, 2, 1024, seed=3)
    b = build_task(task, tok, spec, 2, 1024, seed=3)
    assert [s.__dict__ for s in a] == [s.__dict__ for s in b]
    assert a[0].__dict__ != build_task(task, tok, spec, 2, 1024, seed=4)[0].__dict__
    for s in a:
        prefix, suffix = encode_sample(tok, spec, s, "query_aware")
        assert abs(len(prefix) + len(suffix) - 1024) <= 0.02 * 1024
        if task != "perplexity":
            assert s.answers and all(isinstance(x, str) and x for x in s.answers)


def test_needle_sits_at_the_requested_depth(smol):
    _, tok, spec = smol
    for depth in (0.0, 0.25, 0.5, 0.9):
        s = build_task("niah_single", tok, spec, 1, 2048, seed=1, depth=depth)[0]
        needle = s.metadata["needle"]
        assert s.answers[0] in needle and s.context.count(needle) == 1
        position = s.context.index(needle) / len(s.context)
        assert abs(position - depth) < 0.03, (depth, position)


def test_multikey_and_multivalue_needles(smol):
    _, tok, spec = smol
    s = build_task("niah_multikey", tok, spec, 1, 1024, seed=0, n_needles=3)[0]
    assert len(set(s.metadata["keys"])) == 3 and all(v in s.context for v in s.metadata["values"])
    s = build_task("niah_multivalue", tok, spec, 1, 1024, seed=0, n_needles=3)[0]
    assert len(set(s.metadata["keys"])) == 1 and len(s.answers) == 3 and all(v in s.context for v in s.answers)


def test_gold_paragraph_is_in_the_context(smol):
    _, tok, spec = smol
    for task in ("squad", "hotpot"):
        for s in build_task(task, tok, spec, 3, 1024, seed=0):
            assert any(a in s.context for a in s.answers) or task == "hotpot"
            assert s.question and s.metadata["n_paragraphs"] >= 2


def test_modes_split_the_same_sequence(smol):
    _, tok, spec = smol
    s = build_task("niah_single", tok, spec, 1, 512, seed=0)[0]
    aware, agnostic = (encode_sample(tok, spec, s, m) for m in MODES)
    assert aware[0] + aware[1] == agnostic[0] + agnostic[1]
    assert len(agnostic[0]) < len(aware[0])
    assert s.question not in tok.decode(agnostic[0])  # the compressor never sees the question
    assert s.question in tok.decode(aware[0])


def test_bad_inputs_raise_clear_errors(smol):
    _, tok, spec = smol
    with pytest.raises(ValueError, match="exceeds smollm2-135m's maximum of 8192"):
        build_task("niah_single", tok, spec, 1, 8192)
    with pytest.raises(ValueError, match="unknown task 'needle'"):
        build_task("needle", tok, spec, 1, 1024)
    with pytest.raises(ValueError, match="depth must be in"):
        build_task("niah_single", tok, spec, 1, 1024, depth=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        prompt_parts(Sample("squad", "c", "q", ["a"]), "query_first")
