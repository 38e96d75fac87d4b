"""`permkv serve` over the continuous-batching engine: concurrent requests decode as one batch and give
the same greedy answers as one at a time; an RLM level's sub-calls batch the same way."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from permkv.models import encode_prompt
from permkv.rlm import EngineBackend, RecursiveLanguageModel, SequentialBackend
from permkv.serve import create_app, running

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is two plus two?",
             "Which animal barks?"]


@pytest.fixture(scope="module")
def engine_backend(smol):
    return EngineBackend(*smol, pool_bytes=256 * 2**20, chunk_tokens=64, window_s=0.05)


def test_concurrent_requests_batch_and_match_sequential(engine_backend, smol):
    model, tok, spec = smol
    sequential = SequentialBackend(model, tok, spec)
    expected = [tok.decode(sequential.generate(encode_prompt(tok, spec, q), 12).tokens, skip_special_tokens=True)
                for q in QUESTIONS]
    with running(create_app(engine_backend)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

        def ask(q):
            out = client.chat.completions.create(model=spec.name, messages=[{"role": "user", "content": q}], max_tokens=12)
            return out.choices[0].message.content

        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            answers = list(pool.map(ask, QUESTIONS))
        with pytest.raises(openai.BadRequestError, match="ratio must be a finite number >= 1"):
            client.chat.completions.create(model=spec.name, messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"kv_cache_compression_ratio": 0})
    assert answers == expected
    assert max(engine_backend.batches) > 1  # requests that arrived together ran as one batch


def test_rlm_level_runs_as_one_engine_batch(engine_backend, smol):
    context = " ".join(f"Sentence {i} is here to fill the page with plain words." for i in range(60))
    context += " One of the special magic numbers for amber-delta is: 4829173."
    query = "What is the special magic number for amber-delta mentioned in the provided text?"
    before = len(engine_backend.batches)
    batched = RecursiveLanguageModel(engine_backend, context_chunk_size=200, max_new_tokens=24,
                                     concurrency=8).completion(query, context)
    alone = RecursiveLanguageModel(SequentialBackend(*smol), context_chunk_size=200,
                                   max_new_tokens=24).completion(query, context)
    assert batched.read_calls == alone.read_calls >= 4
    assert [c.answer for c in batched.calls] == [c.answer for c in alone.calls]
    assert max(engine_backend.batches[before:]) > 1
