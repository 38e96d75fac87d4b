"""Shared fixtures: the real models, loaded once per test session (once per worker under `-n 2`)."""

import os

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
