"""Shared fixtures: the real models, loaded once per test session."""

import pytest

from permkv.models import load_model


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer, spec) of SmolLM2-135M-Instruct, fp32 on the CPU."""
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma():
    """(model, tokenizer, spec) of Gemma-3-270m, fp32 on the CPU."""
    return load_model("gemma3-270m", device="cpu")


def pytest_collection_modifyitems(items):
    """Tests that need Gemma-3 or the quick notebook runs are slow (`make test-fast` leaves them out)."""
    for item in items:
        if {"gemma", "quick_store"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
