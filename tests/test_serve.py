"""`permkv serve`: the real uvicorn server on a loopback port, driven by the official openai client. In process
it serves the `tiny` random-init model (the protocol does not depend on trained weights); `python -m permkv
serve` loads SmolLM2."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from permkv.eval import generate
from permkv.models import encode_prompt
from permkv.serve import SequentialBackend, check_request, create_app, free_port, running


MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tiny):
    """(base_url, backend): the tiny model served with a 2K-token KV budget per request, default ratio 1."""
    model, tok, spec = tiny
    backend = SequentialBackend(model, tok, spec, max_kv_tokens=2048, chunk_tokens=128)
    with running(create_app(backend, ratio=1.0)) as url:
        yield url, backend


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_is_the_full_cache_greedy_answer(client, tiny):
    model, tok, spec = tiny
    question = "What is the capital of France? Answer in one word."
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                         max_tokens=8)
    expected = generate(model, tok, encode_prompt(tok, spec, question), 8)
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(encode_prompt(tok, spec, question))
    assert out.usage.completion_tokens <= 8 and out.choices[0].finish_reason in ("stop", "length")


def test_per_request_ratio_compresses_the_cache(client):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    messages = [{"role": "user", "content": f"{text}\nWhat animal jumps? One word."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    small = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                           extra_body={"kv_cache_compression_ratio": 4})
    assert full.model_extra["permkv"]["ratio"] == 1 and small.model_extra["permkv"]["ratio"] == 4
    assert small.model_extra["permkv"]["kv_bytes"] < full.model_extra["permkv"]["kv_bytes"] / 3
    assert 3 < small.model_extra["permkv"]["achieved_ratio"] < 5


def test_text_completion(client):
    out = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4)
    assert out.choices[0].text and out.usage.completion_tokens <= 4


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])


def test_ratio_below_one_is_400(client):
    with pytest.raises(openai.BadRequestError, match="ratio must be a finite number >= 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"kv_cache_compression_ratio": 0.5})


def test_context_too_long_even_compressed_is_400(client):
    long = "word " * 3000  # ~3K tokens into a 2K-token budget
    with pytest.raises(openai.BadRequestError, match="KV budget of 2048 tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's 8192 positions"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long * 3}],
                                       max_tokens=4, extra_body={"kv_cache_compression_ratio": 16})


def test_malformed_json_and_missing_fields_are_400(server, client):
    url = server[0] + "/chat/completions"
    status, body = _post(url, b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = _post(url, json.dumps({"model": MODEL}).encode())
    assert status == 400 and "messages" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    # the server is still up
    assert client.models.list().data


def test_check_request_names_the_problem():
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        check_request(10, 0, 1, 128, 100, 100)
    assert check_request(800, 10, 8, 128, 300, 8192) == 8.0  # 100 + 128 + 10 <= 300
    with pytest.raises(ValueError, match="each head keeps at least one token"):
        check_request(6, 10, 8, 128, 300, 8192)  # 8x of a 6-token prompt leaves a head nothing


@pytest.mark.slow
def test_python_m_permkv_serve_binds_loopback(tmp_path):
    """The real command in a subprocess: it binds 127.0.0.1 by default and answers /v1/models."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "permkv.serve", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
                    assert json.loads(r.read())["data"][0]["id"] == "smollm2-135m"
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not come up: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_refuses_an_unknown_scorer_before_loading_a_model():
    from permkv.serve.cli import main

    with pytest.raises(SystemExit, match="unknown scorer 'nonsense'"):
        main(["serve", "--scorer", "nonsense"])


def test_streaming_sends_the_same_text_as_one_response(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    want = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True))
    assert len(chunks) > 3 and "".join(c.choices[0].delta.content or "" for c in chunks) == want
    parts = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="One, two, three,",
                                                                    max_tokens=4, stream=True)]
    assert "".join(parts) == client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4).choices[0].text


def test_a_stop_string_ends_the_answer(client):
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a piece from the middle of the answer
    want = full[: full.index(stop)]
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == want and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want


def test_unknown_roles_and_sampling_on_the_sequential_backend_are_400(client):
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].role must be one of"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"},
                                                                       {"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature > 0 needs the engine backend"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0.7)
