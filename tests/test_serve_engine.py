"""`permkv serve` over the step-driven engine, driven by the official openai client: concurrent requests
decode together and give the answers of one at a time; streaming; a client that hangs up frees its
blocks; seeded sampling; /health and /metrics; an RLM level's sub-calls batch the same way. On the `tiny`
random-init model: none of it depends on trained weights (the answers are gibberish, compared exactly)."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from permkv.engine import EngineConfig
from permkv.models import encode_prompt
from permkv.rlm import EngineBackend, RecursiveLanguageModel, SequentialBackend
from permkv.serve import create_app, running

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is two plus two?",
             "Which animal barks?"]


MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def backend(tiny):
    with EngineBackend(*tiny, pool_bytes=4 * 2**20,  # ~4K tokens of the tiny model's KV
                        config=EngineConfig(step_tokens=1100, chunk_tokens=64)) as b:
        yield b


@pytest.fixture(scope="module")
def server(backend):
    with running(create_app(backend)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


def idle(backend, timeout=30):
    deadline = time.time() + timeout
    while backend.engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.05)
    return not backend.engine.has_unfinished()


def ask(client, q, **kw):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], **kw)
    return out.choices[0].message.content


def test_concurrent_requests_batch_and_match_sequential(backend, client, tiny):
    model, tok, spec = tiny
    sequential = SequentialBackend(model, tok, spec)
    expected = [tok.decode(sequential.generate(encode_prompt(tok, spec, q), 12).tokens, skip_special_tokens=True)
                for q in QUESTIONS]
    before = backend.engine.stats.max_batch
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: ask(client, q, max_tokens=12), QUESTIONS))
    with pytest.raises(openai.BadRequestError, match="ratio must be a finite number >= 1"):
        ask(client, "hi", extra_body={"kv_cache_compression_ratio": 0})
    assert answers == expected
    assert backend.engine.stats.max_batch > max(before, 1)  # requests that arrived together decoded together


def test_streaming_gives_the_same_text_and_usage(client):
    want = ask(client, QUESTIONS[0], max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=12, stream=True,
                                                  messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                  stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens <= 12


def test_a_client_that_hangs_up_mid_stream_frees_its_blocks(backend, client):
    aborted = backend.engine.stats.aborted
    stream = client.chat.completions.create(model=MODEL, max_tokens=200, stream=True,
                                            messages=[{"role": "user", "content": "Tell a long story about a lighthouse."}])
    got = 0
    for chunk in stream:
        got += bool(chunk.choices[0].delta.content)
        if got == 3:
            stream.close()
            break
    assert idle(backend)
    assert backend.engine.stats.aborted == aborted + 1
    assert backend.engine.pool.num_free == backend.engine.pool.num_blocks


def test_sampling_is_seeded(client):
    kw = dict(max_tokens=12, temperature=0.9, top_p=0.95)
    a, b, c = (ask(client, QUESTIONS[1], seed=s, **kw) for s in (3, 3, 4))
    assert a == b and a != c
    assert ask(client, QUESTIONS[1], max_tokens=12, temperature=0) == ask(client, QUESTIONS[1], max_tokens=12)
    with pytest.raises(openai.BadRequestError, match="top_p needs temperature"):
        ask(client, "hi", top_p=0.5)


def test_bad_roles_and_requests_are_400(client):
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="speculate"):
        ask(client, "hi", extra_body={"speculative": True})


def test_health_and_prometheus_metrics(backend, server, client):
    ask(client, QUESTIONS[0], max_tokens=2)
    base = server.removesuffix("/v1")
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    text = httpx.get(base + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("permkv_running", "permkv_waiting", "permkv_kv_blocks_used", "permkv_kv_blocks_free",
                 "permkv_preemptions_total", "permkv_generation_tokens_per_second", "permkv_achieved_ratio",
                 "permkv_time_to_first_token_seconds_count"):
        assert name in values, name
    assert values["permkv_kv_blocks_free"] + values["permkv_kv_blocks_used"] == backend.engine.pool.num_blocks
    assert values['permkv_requests_total{outcome="ok"}'] >= 1


def test_rlm_level_runs_as_one_engine_batch(backend, tiny):
    context = " ".join(f"Sentence {i} is here to fill the page with plain words." for i in range(60))
    context += " One of the special magic numbers for amber-delta is: 4829173."
    query = "What is the special magic number for amber-delta mentioned in the provided text?"
    backend.engine.stats.batch_sizes.clear()
    batched = RecursiveLanguageModel(backend, context_chunk_size=200, max_new_tokens=24,
                                     concurrency=8).completion(query, context)
    alone = RecursiveLanguageModel(SequentialBackend(*tiny), context_chunk_size=200,
                                   max_new_tokens=24).completion(query, context)
    assert batched.read_calls == alone.read_calls >= 4
    assert [c.answer for c in batched.calls] == [c.answer for c in alone.calls]
    assert max(backend.engine.stats.batch_sizes) > 1


def test_one_compressed_context_serves_many_questions_read_once(backend, server, client, tiny):
    """POST /v1/contexts reads a document once (compressed 4x); questions with `context_id` cost only their
    own tokens (the engine's computed-token counter), and answer as the same request on the sequential
    backend's context."""
    model, tok, spec = tiny
    doc = " ".join(f"Line {i} of the report says nothing new." for i in range(40)) + " The vault code is 4829173."
    questions = ["What is the vault code?", "Which code opens the vault?", "Repeat the vault code."]
    ctx = httpx.post(server + "/contexts", json={"text": doc, "ratio": 4}, timeout=600).json()
    assert ctx["achieved_ratio"] == pytest.approx(4, rel=0.05) and ctx["tokens"] > 300
    before = backend.engine.stats.computed_tokens
    outs = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                           max_tokens=16, extra_body={"context_id": ctx["id"]}) for q in questions]
    own = sum(o.usage.prompt_tokens - o.usage.prompt_tokens_details.cached_tokens + o.usage.completion_tokens for o in outs)
    assert backend.engine.stats.computed_tokens - before <= own  # nothing of the context was read again
    assert all(o.usage.prompt_tokens_details.cached_tokens == ctx["tokens"] for o in outs)
    sequential = SequentialBackend(model, tok, spec)
    with running(create_app(sequential)) as url:
        ref = httpx.post(url + "/contexts", json={"text": doc, "ratio": 4}, timeout=600).json()
        alone = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        want = [alone.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                              max_tokens=16, extra_body={"context_id": ref["id"]}).choices[0].message.content
                for q in questions]
    assert [o.choices[0].message.content for o in outs] == want
    assert httpx.get(f"{server}/contexts/{ctx['id']}").json()["tokens"] == ctx["tokens"]
    assert httpx.delete(f"{server}/contexts/{ctx['id']}").json()["deleted"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"context_id": ctx["id"]})
    assert httpx.get(f"{server}/contexts/ctx-999").status_code == 404
    assert httpx.post(server + "/contexts", json={"text": "x " * 5000, "ratio": 4}).status_code == 400  # never fits
    assert idle(backend) and backend.engine.pool.num_free == backend.engine.pool.num_blocks

