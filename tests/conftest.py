"""Shared fixtures: the real models, loaded once per test session (once per worker under `-n 2`)."""

import os
import shutil

import pytest
import torch

from permkv.models import load_model

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer, spec) of SmolLM2-135M-Instruct, fp32 on the CPU."""
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma():
    """(model, tokenizer, spec) of Gemma-3-270m, fp32 on the CPU."""
    return load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="session")
def tiny(smol):
    """(model, tokenizer, spec) of a tiny random-init Llama with SmolLM2's tokenizer and chat template: for
    tests whose behaviour does not depend on trained weights (scheduling, serving, caches), ~50x faster."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from permkv.models import spec_of

    _, tok, spec = smol
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=spec.max_positions, initializer_range=0.2,  # wide weights: no
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id)  # near-ties in greedy choices
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, tok, spec_of(config, "tiny-llama", spec.chat)


@pytest.fixture(scope="session")
def fresh_store(tmp_path_factory):
    """`fresh_store(folder, name)`: the URI of a new, empty MLflow sqlite store `folder / name`, a copy of one
    whose schema migrations ran once per worker (a migration takes several seconds)."""
    from mlflow.tracking import MlflowClient

    migrated = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{migrated}").search_experiments()

    def make(folder, name: str = "mlflow.db") -> str:
        shutil.copy(migrated, folder / name)
        return f"sqlite:///{folder / name}"
    return make


@pytest.fixture
def store(tmp_path, fresh_store):
    """`store(name)`: the URI of a new, empty MLflow sqlite store `tmp_path / name`."""
    return lambda name="mlflow.db": fresh_store(tmp_path, name)


def pytest_collection_modifyitems(items):
    """Tests that need Gemma-3 or the quick notebook runs are slow (`make test-fast` leaves them out).
    The notebook runs are one xdist group, scheduled first: they are the longest piece of `make test`."""
    notebooks, rest = [], []
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if {"gemma", "quick_store"} & names:
            item.add_marker(pytest.mark.slow)
        if "quick_store" in names:
            item.add_marker(pytest.mark.xdist_group("notebooks"))
        (notebooks if "quick_store" in names else rest).append(item)
    items[:] = notebooks + rest
