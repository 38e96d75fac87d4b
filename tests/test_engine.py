"""The step-driven engine: the same tokens as each request alone, the step API (ids, streams of new tokens,
abort), admission by free blocks, preemption without loss, compression (KVzip-style and attention-scored)
equal to the compress package's own path, sampling, errors. None of it depends on trained weights, so it runs
on the `tiny` random-init Llama (the real models: Gemma-3 below, tests/test_throughput.py)."""

import math

import pytest
import torch

from permkv.cache import BlockPool, paged_attention
from permkv.compress import InferenceKVCacheCompression, chunked_prefill_and_compress, prefill_and_compress, repeat_prompt_ids
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
CONFIG = EngineConfig(step_tokens=1100, chunk_tokens=64, compress_every=16)
ATTENTION = InferenceKVCacheCompression(scorer="kvcompress", allocator="uniform")


@pytest.fixture(scope="module")
def setup(tiny):
    """(model, spec, prompt ids, stop ids, KVzip's repeat prompt) of the tiny model."""
    model, tok, spec = tiny
    return model, spec, [encode_prompt(tok, spec, t) for t in TEXTS], stop_ids(model, tok), repeat_prompt_ids(tok, spec)


def engine(setup, blocks, config=CONFIG):
    model, spec, _, stop, reread = setup
    return Engine(model, BlockPool(blocks, block_size=16, head_dim=spec.head_dim), config, stop, reread)


_ALONE: dict = {}


def alone(setup, ratio, new=NEW, config=CONFIG):
    """Each request run by itself in a large pool: its tokens (computed once per setting)."""
    key = (ratio, new, config.chunk_tokens, config.compress_every, config.compression.scorer)
    if key not in _ALONE:
        _ALONE[key] = [engine(setup, 3000, config).generate([Request(ids, new, ratio)], progress=False)[0].tokens
                       for ids in setup[2]]
    return _ALONE[key]


def blocks(setup, requests, what, config=CONFIG):
    """Blocks the engine counts for each request: "_peak_tokens" (admission) or "_decode_peak"."""
    e = engine(setup, 3000, config)
    return [e.probe.blocks_needed(getattr(e, what)(Sequence(0, r, 0.0))) for r in requests]


@pytest.mark.slow
def test_batch_matches_greedy_decoding_alone_and_steps_stream_the_tokens(setup):
    model, _, prompts, stop, _ = setup
    want = []
    for ids in prompts:
        cache, logits = prefill(model, ids)
        want.append(greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=NEW, stop=stop))
    e = engine(setup, 3000)
    ids = [e.add_request(Request(p, NEW)) for p in prompts]
    streamed = {i: [] for i in ids}
    results = {}
    while e.has_unfinished():
        for out in e.step():
            streamed[out.id] += out.new_tokens
            if out.finished:
                results[out.id] = out.result
    assert [results[i].tokens for i in ids] == want == [streamed[i] for i in ids]
    assert e.stats.max_batch == len(prompts)  # all decoded together, in one batched forward per step
    assert e.stats.preemptions == 0
    assert e.pool.num_free == e.pool.num_blocks  # every block given back
    assert all(0 < r.ttft <= r.latency for r in results.values())
    assert e.stats.output_tokens == sum(len(t) for t in want)


def test_a_new_request_joins_the_running_batch_in_one_forward(setup):
    """A request added while another decodes: its first prefill chunk and the other's decode token run in
    the same step (one forward), and both get the tokens they get alone."""
    e = engine(setup, 3000)
    first = e.add_request(Request(setup[2][0], 12))
    while e.sequences[first].phase.value != "decode":
        e.step()
    late = e.add_request(Request(setup[2][1], 12))
    out = {o.id: o for o in e.step()}
    assert e.stats.mixed_steps == 1 and out[first].new_tokens and late not in out  # decode + prefill chunk
    while e.has_unfinished():
        out |= {o.id: o for o in e.step() if o.finished}
    assert out[late].result.tokens == alone(setup, 1, 12)[1] and out[first].result.tokens == alone(setup, 1, 12)[0]


@pytest.mark.slow
def test_admission_waits_for_free_blocks(setup):
    requests = [Request(ids, NEW) for ids in setup[2]]
    peak = max(blocks(setup, requests, "_decode_peak"))
    e = engine(setup, peak + blocks(setup, requests[:1], "_peak_tokens")[0] // 2)  # one at a time, and half a prompt
    results = e.generate(requests, progress=False)
    assert [r.tokens for r in results] == alone(setup, 1)
    assert e.stats.max_batch < len(requests)  # the last one waited for blocks
    assert e.pool.num_free == e.pool.num_blocks


@pytest.mark.parametrize("ratio", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_small_pool_preempts_without_losing_or_repeating_a_token(setup, ratio):
    # at ratio 2 a sequence outgrows its prefill only once the compressed part of its output outgrows a
    # chunk (the attention scorer's prefill peak is 1/2 of the prompt + one chunk)
    new, config = (NEW, CONFIG) if ratio == 1 else (
        128, EngineConfig(step_tokens=1100, chunk_tokens=64, compress_every=32, compression=ATTENTION))
    requests = [Request(ids, new, ratio, ignore_eos=ratio > 1) for ids in setup[2]]
    admit = blocks(setup, requests, "_peak_tokens", config)
    e = engine(setup, admit[0] + admit[1] + 2 * math.ceil(config.watermark * 3000), config)  # two fit, then grow
    ids = [e.add_request(r) for r in requests]
    streamed, results = {i: [] for i in ids}, {}
    while e.has_unfinished():
        for out in e.step():
            streamed[out.id] += out.new_tokens
            if out.finished:
                assert out.id not in results  # each finishes exactly once
                results[out.id] = out.result
    assert e.stats.preemptions > 0
    assert sorted(results) == ids
    assert [streamed[i] for i in ids] == [results[i].tokens for i in ids]  # nothing given out twice
    if ratio == 1:  # recompute reads the generated tokens again: greedy continues the same way
        assert [results[i].tokens for i in ids] == alone(setup, ratio, new, config)
    else:  # a recomputed request is compressed again over prompt + output: its cache differs, its length not
        assert all(len(results[i].tokens) == new for i in ids)
    assert sum(r.preemptions for r in results.values()) == e.stats.preemptions
    assert e.pool.num_free == e.pool.num_blocks


@pytest.mark.slow
def test_continual_compression_keeps_generated_tokens_compressed(setup):
    ids = setup[2][0]
    peaks = {}
    config = EngineConfig(step_tokens=1100, chunk_tokens=64, compress_every=16,
                          compression=InferenceKVCacheCompression(scorer="kvzip", allocator="global", window=8))
    for ratio in (1, 4):
        e = engine(setup, 3000, config)
        (r,) = e.generate([Request(ids, 48, ratio)], progress=False)
        peaks[ratio] = max(e.stats.used_blocks)
        if ratio == 4:
            assert r.compressions >= 2  # every 16 generated tokens
            assert e.stats.compressions == r.compressions
            assert r.achieved_ratio == pytest.approx(4, rel=0.05)
    # uncompressed: prompt + 48 tokens per head; compressed: ~1/4 of the prompt, then of the output beyond the
    # 8-token window, plus up to 16 new tokens
    assert peaks[4] < 0.6 * peaks[1]


@pytest.mark.slow
def test_kvzip_request_equals_the_compress_package_alone_and_in_a_batch(setup):
    """Before its first decode-time compression, a KVzip-scored request's tokens are those of
    `prefill_and_compress(reread=...)` with one global top-k + the one greedy loop, batched or alone."""
    model, spec, prompts, stop, reread = setup
    compression = InferenceKVCacheCompression(allocator="global")
    want = []
    for ids in prompts:
        cache, logits, _ = prefill_and_compress(model, ids, 4, compression, reread=reread)
        with paged_attention(model):
            want.append(greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=12, stop=stop))
    e = engine(setup, 3000)
    results = e.generate([Request(ids, 12, 4) for ids in prompts], progress=False)
    assert [r.tokens for r in results] == want and e.stats.max_batch == len(prompts)
    assert e.stats.reread_tokens == sum(len(p) + len(reread) for p in prompts)  # one re-read of every context
    assert all(r.achieved_ratio == pytest.approx(4, rel=0.02) for r in results)


@pytest.mark.slow
def test_attention_scored_request_equals_chunked_prefill_and_compress(setup):
    model, spec, prompts, stop, _ = setup
    config = EngineConfig(step_tokens=1100, chunk_tokens=64, compress_every=16, compression=ATTENTION)
    want = []
    for ids in prompts:
        cache, logits, _ = chunked_prefill_and_compress(model, ids, 2, ATTENTION, 64)
        with paged_attention(model):
            want.append(greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=12, stop=stop))
    e = engine(setup, 3000, config)
    results = e.generate([Request(ids, 12, 2) for ids in prompts], progress=False)
    assert [r.tokens for r in results] == want and e.stats.reread_tokens == 0


def test_abort_gives_the_blocks_back_and_leaves_the_others(setup):
    e = engine(setup, 3000)
    keep, drop, queued = (e.add_request(Request(p, 16)) for p in setup[2])
    for _ in range(4):
        e.step()
    assert e.abort(drop) and e.abort(queued) is not None
    assert not e.abort(drop) and not e.abort(12345)  # already gone, unknown
    out = {}
    while e.has_unfinished():
        out |= {o.id: o.result for o in e.step() if o.finished}
    assert drop not in out and out[keep].tokens == alone(setup, 1, 16)[0]
    assert e.pool.num_free == e.pool.num_blocks and e.stats.aborted >= 1


def test_sampling_is_seeded_and_reproducible(setup):
    prompt = setup[2][1]
    runs = [engine(setup, 3000).generate([Request(prompt, 12, temperature=0.9, top_p=0.95, seed=s)], progress=False)[0].tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    e = engine(setup, 3000)  # the same seed among other requests in a batch: the same tokens
    batch = e.generate([Request(prompt, 12, temperature=0.9, top_p=0.95, seed=7), Request(setup[2][0], 12)], progress=False)
    assert batch[0].tokens == runs[0]


def test_bad_input_is_a_clear_error(setup):
    model, spec, prompts, stop, _ = setup
    with pytest.raises(ValueError, match="ratio"):
        Request(prompts[0], 8, ratio=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request(prompts[0], 0)
    with pytest.raises(ValueError, match="prompt_ids"):
        Request([])
    with pytest.raises(ValueError, match="temperature"):
        Request(prompts[0], temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Request(prompts[0], top_p=0)
    e = engine(setup, 40)
    with pytest.raises(ValueError, match="context"):
        e.add_request(Request([1] * model.config.max_position_embeddings, 8))
    with pytest.raises(ValueError, match="whole pool"):
        e.add_request(Request(prompts[0], 8))  # 8 tables x 6 blocks > 40 blocks
    with pytest.raises(ValueError, match="repeat prompt"):
        Engine(model, BlockPool(3000, 16, spec.head_dim), CONFIG, stop).add_request(Request(prompts[0], 8, 2))
    with pytest.raises(ValueError, match="chunk_tokens"):
        EngineConfig(chunk_tokens=8, compression=ATTENTION)
    with pytest.raises(ValueError, match="step_tokens"):
        EngineConfig(step_tokens=64, chunk_tokens=128)


@pytest.mark.slow
def test_gemma3_sliding_window_layers(gemma):
    """Gemma-3's sliding-window layers keep their window; outputs match decoding alone."""
    model, tok, spec = gemma
    stop = stop_ids(model, tok)
    prompts = [encode_prompt(tok, spec, t) for t in TEXTS[:2]]
    want = []
    for ids in prompts:
        cache, logits = prefill(model, ids)
        want.append(greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=12, stop=stop))
    e = Engine(model, BlockPool(4000, 16, spec.head_dim), CONFIG, stop, repeat_prompt_ids(tok, spec))
    assert [r.tokens for r in e.generate([Request(ids, 12) for ids in prompts], progress=False)] == want
    results = e.generate([Request(ids, 20, 2) for ids in prompts], progress=False)
    assert all(len(r.tokens) > 0 for r in results) and e.pool.num_free == e.pool.num_blocks


def test_closing_the_backend_gives_the_model_its_attention_back(smol):
    model = smol[0]
    before = model.config._attn_implementation
    from permkv.rlm import EngineBackend

    with EngineBackend(*smol, pool_bytes=16 * 2**20) as b:
        b.generate(b.tokenizer("What is the capital of France?").input_ids, 2)
        assert b.loop.alive
    assert not b.loop.alive and model.config._attn_implementation == before
