"""The continuous-batching engine on the real SmolLM2: same tokens as decoding each request alone,
admission by free blocks, preemption without loss, continual compression, errors."""

import math

import pytest

from permkv.cache import BlockPool, paged_attention
from permkv.compress import InferenceKVCacheCompression, prefill_and_compress
from permkv.engine import Engine, EngineConfig, Request
from permkv.engine.sequence import Sequence
from permkv.eval import greedy_decode, prefill, stop_ids
from permkv.models import encode_prompt

TEXTS = [
    "The lighthouse keeper on the northern island kept a log of every ship that passed. In the winter of 1893 he "
    "recorded a schooner named Marigold carrying timber, a steamer with a broken mast, and a fishing boat that never "
    "returned. Summarise what the keeper recorded that winter.",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide through small pores "
    "called stomata and water through their roots; chlorophyll absorbs mostly red and blue light. Explain in two "
    "sentences why leaves are green.",
    "Alice has three apples and buys five more. She gives two to Bob and then eats one. Bob already had four apples "
    "and gives half of his apples to Carol. How many apples does each person have at the end? Show the steps.",
]
NEW = 24
CONFIG = EngineConfig(chunk_tokens=64, compress_every=16)


@pytest.fixture(scope="module")
def setup(smol):
    model, tok, spec = smol
    return model, spec, [encode_prompt(tok, spec, t) for t in TEXTS], stop_ids(model, tok)


def engine(setup, blocks, config=CONFIG):
    model, spec, _, stop = setup
    return Engine(model, BlockPool(blocks, block_size=16, head_dim=spec.head_dim), config, stop)


_ALONE: dict = {}


def alone(setup, ratio, new=NEW, config=CONFIG):
    """Each request run by itself in a large pool: its tokens (computed once per setting)."""
    key = (ratio, new, config.chunk_tokens, config.compress_every)
    if key in _ALONE:
        return _ALONE[key]
    out = _ALONE[key] = []
    for ids in setup[2]:
        e = engine(setup, 3000, config)
        (result,) = e.generate([Request(ids, new, ratio)], progress=False)
        out.append(result.tokens)
    return out


def blocks(setup, requests, config, what):
    """Blocks the engine's scheduler counts for each request: "prefill_tokens" (admission) or "peak_tokens"."""
    e = engine(setup, 3000, config)
    return [e.cache.blocks_needed(getattr(e.scheduler, what)(Sequence(0, r, 0.0))) for r in requests]


@pytest.mark.slow
def test_ratio_1_matches_greedy_decoding_alone(setup):
    model, _, prompts, stop = setup
    want = []
    for ids in prompts:
        cache, logits = prefill(model, ids)
        want.append(greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=NEW, stop=stop))
    e = engine(setup, 3000)
    results = e.generate([Request(ids, NEW) for ids in prompts], progress=False)
    assert [r.tokens for r in results] == want
    assert e.stats.max_batch == len(prompts)  # all decoded together, in one batched forward per step
    assert e.stats.preemptions == 0
    assert e.pool.num_free == e.pool.num_blocks  # every block given back
    assert all(0 < r.ttft <= r.latency for r in results)
    assert e.stats.output_tokens == sum(len(t) for t in want)


@pytest.mark.slow
def test_admission_waits_for_free_blocks(setup):
    requests = [Request(ids, NEW) for ids in setup[2]]
    e = engine(setup, max(blocks(setup, requests, CONFIG, "peak_tokens")))  # one request at a time
    results = e.generate(requests, progress=False)
    assert [r.tokens for r in results] == alone(setup, 1)
    assert e.stats.max_batch == 1 and e.stats.preemptions == 0
    assert e.pool.num_free == e.pool.num_blocks


@pytest.mark.parametrize("ratio", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_small_pool_preempts_without_losing_a_request(setup, ratio):
    # at ratio 2 a sequence outgrows its prefill only when it generates more than it read
    new, config = (NEW, CONFIG) if ratio == 1 else (64, EngineConfig(chunk_tokens=64, compress_every=32))
    requests = [Request(ids, new, ratio) for ids in setup[2]]
    admit = blocks(setup, requests, config, "prefill_tokens")
    pool = admit[0] + admit[1] + 2 * math.ceil(config.watermark * 3000)  # two are admitted, then they grow
    e = engine(setup, pool, config)
    results = e.generate(requests, progress=False)
    assert e.stats.preemptions > 0
    assert sorted(r.id for r in results) == list(range(len(requests)))  # each exactly once
    assert [r.tokens for r in results] == alone(setup, ratio, new, config)
    assert sum(r.preemptions for r in results) == e.stats.preemptions
    assert e.pool.num_free == e.pool.num_blocks


@pytest.mark.slow
def test_continual_compression_keeps_generated_tokens_compressed(setup):
    model, spec, prompts, stop = setup
    ids = prompts[0]
    peaks = {}
    for ratio in (1, 4):
        e = engine(setup, 3000)
        (r,) = e.generate([Request(ids, 48, ratio)], progress=False)
        peaks[ratio] = max(e.stats.used_blocks)
        if ratio == 4:
            assert r.compressions >= 2  # after the prompt: every 16 generated tokens
            assert e.stats.compressions == r.compressions
    # uncompressed: prompt + 48 tokens per head; compressed: ~1/4 of that plus up to 16 new tokens
    assert peaks[4] < 0.6 * peaks[1]


def test_bad_input_is_a_clear_error(setup):
    model, spec, prompts, _ = setup
    with pytest.raises(ValueError, match="ratio"):
        Request(prompts[0], 8, ratio=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request(prompts[0], 0)
    with pytest.raises(ValueError, match="prompt_ids"):
        Request([])
    e = engine(setup, 200)
    with pytest.raises(ValueError, match="context"):
        e.add(Request([1] * model.config.max_position_embeddings, 8))
    with pytest.raises(ValueError, match="whole pool"):
        e.add(Request(prompts[0], 8))  # 90 tables x 6 blocks > 200 blocks
    with pytest.raises(ValueError, match="chunk_tokens"):
        EngineConfig(chunk_tokens=8)


@pytest.mark.slow
def test_gemma3_sliding_window_layers(gemma):
    """Gemma-3's sliding-window layers keep their window in the batch; outputs match decoding alone."""
    model, tok, spec = gemma
    stop = stop_ids(model, tok)
    prompts = [encode_prompt(tok, spec, t) for t in TEXTS[:2]]
    want = []
    for ids in prompts:
        cache, logits = prefill(model, ids)
        want.append(greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=12, stop=stop))
    e = Engine(model, BlockPool(4000, 16, spec.head_dim), CONFIG, stop)
    assert [r.tokens for r in e.generate([Request(ids, 12) for ids in prompts], progress=False)] == want
    e = Engine(model, BlockPool(4000, 16, spec.head_dim), CONFIG, stop)
    results = e.generate([Request(ids, 20, 2) for ids in prompts], progress=False)
    assert all(len(r.tokens) > 0 for r in results) and e.pool.num_free == e.pool.num_blocks


@pytest.mark.slow
def test_compressed_request_matches_the_compress_package_alone(setup):
    """Before its first decode-time compression a request's tokens are those of
    `permkv.compress.prefill_and_compress` + the one greedy loop on its own cache."""
    model, spec, prompts, stop = setup
    compression = InferenceKVCacheCompression("kvcompress")  # the engine scores with attention
    want = []
    for ids in prompts:
        cache, logits, _ = prefill_and_compress(model, ids, 2, compression)
        with paged_attention(model):
            want.append(greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=12, stop=stop))
    e = engine(setup, 3000, EngineConfig(chunk_tokens=128, compress_every=16, compression=compression))
    results = e.generate([Request(ids, 12, 2) for ids in prompts], progress=False)
    assert [r.tokens for r in results] == want and e.stats.max_batch == len(prompts)
