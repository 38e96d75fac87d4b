"""A user's own model: a tiny random-init Llama saved with save_pretrained (+ SmolLM2's tokenizer) is loaded
by path, its spec read from its files, served to the official openai client in-process and by the real
`permkv serve --model PATH` command; a GGUF file loads like a folder."""

import dataclasses
import subprocess
import sys
import time

import openai
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from permkv.eval import generate
from permkv.models import ModelSpec, encode_prompt, get_spec, load_model
from permkv.serve import SequentialBackend, create_app, free_port, running


@pytest.fixture(scope="module")
def folder(smol, tmp_path_factory):
    """A saved tiny Llama (2 layers, 4 heads, 2 KV heads, SmolLM2's vocabulary) with SmolLM2's tokenizer."""
    _, tok, _ = smol
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                  max_position_embeddings=2048, initializer_range=0.2,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_spec_is_read_from_the_folder(folder):
    want = ModelSpec(str(folder), 2, 4, 2, 16, 2048, None, True, "llama")
    assert get_spec(folder) == want  # from config.json and the saved chat template, no weights read
    model, tok, spec = load_model(folder, device="cpu")
    assert spec == want and model.config.num_hidden_layers == 2 and tok.chat_template is not None


def test_served_folder_answers_the_openai_client(folder):
    """The saved model behind the OpenAI-compatible server: the full-cache greedy answer, and a 4x
    compressed request that holds a quarter of the prompt."""
    model, tok, spec = load_model(folder, device="cpu")
    backend = SequentialBackend(model, tok, spec, chunk_tokens=128)
    with running(create_app(backend)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(folder)]
        question = "What is the capital of France?"
        out = client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": question}],
                                             max_tokens=6)
        assert out.choices[0].message.content == generate(model, tok, encode_prompt(tok, spec, question), 6)
        text = "The quick brown fox jumps over the lazy dog. " * 30
        small = client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": text}],
                                               max_tokens=4, extra_body={"kv_cache_compression_ratio": 4})
        assert 3 < small.model_extra["permkv"]["achieved_ratio"] < 5


@pytest.mark.slow
def test_permkv_serve_model_path_answers(folder):
    """`python -m permkv.serve --model FOLDER` (the real command, in a subprocess) answers a chat completion."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "permkv.serve", "--model", str(folder), "--port", str(port),
                             "--threads", "1", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        deadline = time.time() + 120
        while True:
            try:
                out = client.chat.completions.create(model=str(folder), max_tokens=4,
                                                     messages=[{"role": "user", "content": "Hi"}])
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not come up: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.5)
        assert out.model == str(folder) and out.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_wrong_model_path_clearly(tmp_path):
    from permkv.serve.cli import main

    with pytest.raises(SystemExit, match="--model: model must be a bundled name .* got .*nowhere"):
        main(["serve", "--model", str(tmp_path / "nowhere")])


@pytest.mark.slow
def test_gguf_file_loads_as_the_bundled_model_it_is(smol, tmp_path, monkeypatch):
    """SmolLM2's GGUF given by path: converted once into the cache folder, then the same weights and spec
    (up to its name) as the bundled model; the second load reuses the conversion."""
    from permkv import models

    monkeypatch.setenv("PERMKV_CACHE", str(tmp_path))
    path = models.gguf_path("smollm2-135m")
    model, tok, spec = load_model(path, device="cpu")
    assert spec == dataclasses.replace(smol[2], name=str(path))
    ids = torch.tensor([smol[1]("The capital of France is").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smol[0](ids).logits)
    converted = list((tmp_path / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    start = time.perf_counter()
    load_model(path, device="cpu")
    assert time.perf_counter() - start < 20  # no second conversion
