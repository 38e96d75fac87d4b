"""The engine's scheduler against a simple model of what must happen: requests arriving at random
steps, random aborts, pools from tight to roomy. On a tiny random-init Llama (the scheduling does not
depend on trained weights): every request not aborted finishes exactly once with the tokens it gets
alone, nothing is streamed twice, the pool is never overdrawn and every block comes back."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from permkv.cache import BlockPool
from permkv.engine import Engine, EngineConfig, Request

CONFIG = EngineConfig(step_tokens=48, chunk_tokens=16, compress_every=8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def alone(model, request: Request) -> list[int]:
    return Engine(model, BlockPool(400, 16, 16), CONFIG, stop={0}).generate([request], progress=False)[0].tokens


requests = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 6), st.booleans()),  # prompt, new, arrival, abort
    min_size=1, max_size=8)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=requests, blocks=st.integers(24, 120), seed=st.integers(0, 1000))
def test_random_arrivals_aborts_and_pools(tiny, spec, blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    reqs = [Request(torch.randint(1, 256, (n,), generator=gen).tolist(), new) for n, new, _, _ in spec]
    e = Engine(tiny, BlockPool(blocks, 16, 16), CONFIG, stop={0})
    fits = []
    for r in reqs:
        try:
            e.check(r)
            fits.append(True)
        except ValueError:  # the whole pool could never hold it: refused up front
            fits.append(False)
    ids, streamed, finished, step = {}, {}, {}, 0
    while step <= 6 or e.has_unfinished():
        for k, ((_, _, arrival, abort), r) in enumerate(zip(spec, reqs)):
            if arrival == step and fits[k]:
                ids[k] = e.add_request(r)
                streamed[ids[k]] = []
            if abort and arrival + 2 == step and k in ids:
                e.abort(ids[k])
        for out in e.step():
            assert out.id not in finished  # finishes once
            streamed[out.id] += out.new_tokens
            if out.finished:
                finished[out.id] = out.result
        assert 0 <= e.pool.num_free <= e.pool.num_blocks
        step += 1
        assert step < 2000, "the engine made no progress"
    for k, rid in ids.items():
        if rid in finished:
            assert finished[rid].tokens == streamed[rid] == alone(tiny, reqs[k])
        else:
            assert spec[k][3], f"request {k} was neither finished nor aborted"
    assert e.pool.num_free == e.pool.num_blocks and not e.sequences


def test_a_tight_pool_preempts_and_still_gives_every_request_its_tokens(tiny):
    gen = torch.Generator().manual_seed(1)
    reqs = [Request(torch.randint(1, 256, (30,), generator=gen).tolist(), 12) for _ in range(4)]
    e = Engine(tiny, BlockPool(36, 16, 16), CONFIG, stop={0})  # two prompts fit; their growth does not
    results = e.generate(reqs, progress=False)
    assert e.stats.preemptions > 0 and e.stats.recomputed_tokens > 0
    assert [r.tokens for r in results] == [alone(tiny, r) for r in reqs]
    assert e.pool.num_free == e.pool.num_blocks
