"""Compress once, ask many: forks of one compressed context answer exactly as the same compressed cache
built for each question alone, in the engine and on their own; every block comes back at the end. On the
`tiny` random-init model (4 layers x 2 KV heads: 8 block tables): exact token equality needs no trained weights."""

from dataclasses import replace

import pytest
import torch

from permkv.cache import BlockPool, forward, paged_attention
from permkv.compress import ContextCache, InferenceKVCacheCompression, prefill_and_compress, repeat_prompt_ids
from permkv.data import build_task, encode_sample
from permkv.engine import Engine, EngineConfig, Request
from permkv.eval import greedy_decode, stop_ids

NEW = 24
QUESTIONS = ["Which number is hidden in the text?", "Repeat the special magic number from the text."]


@pytest.fixture(scope="module")
def setup(tiny):
    model, tok, spec = tiny
    (sample,) = build_task("niah_single", tok, spec, 1, 600, seed=3)
    context, questions = encode_sample(tok, spec, sample, "query_agnostic")  # the question comes after compression
    questions = [questions]
    for q in QUESTIONS:  # the same context asked other ways: the prefix is the context, the suffix the question
        prefix, suffix = encode_sample(tok, spec, replace(sample, question=q), "query_agnostic")
        assert prefix == context
        questions.append(suffix)
    return model, tok, spec, context, questions, sample.answers, stop_ids(model, tok), repeat_prompt_ids(tok, spec)


def answer_alone(model, context, question, ratio, stop, reread, new=NEW):
    """The reference: the context compressed by itself, the question read after it, greedy decode."""
    cache, _, _ = prefill_and_compress(model, context, ratio, InferenceKVCacheCompression(allocator="global"),
                                       extra_tokens=len(question) + new + 16, reread=reread)
    with paged_attention(model):
        logits = forward(model, cache, torch.tensor([question]))[0, -1]
        return greedy_decode(model, cache, logits, start=len(context) + len(question), max_new_tokens=new, stop=stop)


def test_forks_answer_as_the_compressed_cache_alone_and_give_every_block_back(setup):
    model, _, _, context, questions, _, stop, reread = setup
    want = [answer_alone(model, context, q, 4, stop, reread) for q in questions]
    ctx = ContextCache.build(model, context, 4, reread)
    held = ctx.cache.pool.num_free
    got = []
    for q in questions:
        fork = ctx.fork()
        with paged_attention(model):
            logits = forward(model, fork, torch.tensor([q]))[0, -1]
            got.append(greedy_decode(model, fork, logits, start=ctx.seen + len(q), max_new_tokens=NEW, stop=stop))
        fork.reset()
        assert ctx.cache.pool.num_free == held  # a fork's own blocks go back, the context's stay
    assert got == want
    assert ctx.report.achieved_ratio == pytest.approx(4, rel=0.02) and ctx.report.tokens == len(context)
    ctx.release()
    assert ctx.cache.pool.num_free == ctx.cache.pool.num_blocks
    with pytest.raises(ValueError, match="released"):
        ctx.fork()


def test_engine_context_is_read_once_and_serves_concurrent_questions(setup):
    model, tok, spec, context, questions, answers, stop, reread = setup
    want = [answer_alone(model, context, q, 4, stop, reread) for q in questions]
    e = Engine(model, BlockPool(800, 16, spec.head_dim), EngineConfig(step_tokens=1100, chunk_tokens=256), stop, reread)
    cid = e.add_context(context, 4)  # re-reading holds the context twice for a moment
    while e.has_unfinished():
        e.step()
    computed = e.stats.computed_tokens  # the context and its one re-read
    assert computed == len(context) + len(context) + len(reread)
    results = e.generate([Request(q, NEW, context=cid) for q in questions], progress=False)
    assert [r.tokens for r in results] == want
    fed = sum(len(q) + len(w) - (len(w) == NEW) for q, w in zip(questions, want))  # the last token is never fed
    assert e.stats.computed_tokens - computed == fed  # each question's own tokens only
    assert e.contexts[cid].report.achieved_ratio == pytest.approx(4, rel=0.02)
    e.release_context(cid)
    assert e.pool.num_free == e.pool.num_blocks


def test_contexts_are_released_when_the_pool_needs_blocks_and_refused_while_used(setup):
    model, tok, spec, context, questions, _, stop, reread = setup
    e = Engine(model, BlockPool(116, 16, spec.head_dim), EngineConfig(step_tokens=1100, chunk_tokens=256), stop, reread)
    first = e.add_context(context[:100])  # 56 blocks
    while e.has_unfinished():
        e.step()
    rid = e.add_request(Request(questions[0], 4, context=first))
    with pytest.raises(ValueError, match="in use"):
        e.release_context(first)
    while e.has_unfinished():
        e.step()
    second = e.add_context(context[100:300])  # 104 blocks: not beside the first, so the idle first goes
    while e.has_unfinished():
        e.step()
    assert first not in e.contexts and second in e.contexts and rid not in e.sequences
    with pytest.raises(ValueError, match="does not exist"):
        e.add_request(Request(questions[0], 4, context=first))
