"""Architecture conformance: every architecture of the registry, as a tiny random-init model built from
`AutoConfig.for_model(...)`, runs every permkv system the way SmolLM2 does.

Per architecture: a paged decode equals DynamicCache's token for token (past a sliding window where the
model has one); compression at 8x leaves each compressible head at ~1/8 of its tokens and frees blocks
(attention scorer, uniform budget) and the default (KVzip-style re-reading, one global top-k) keeps ~1/8
in all; the engine's batched answers equal each request decoded alone; speculation is lossless; kvpress
presses run where kvpress supports the architecture (the registry says why not elsewhere). Architectures
permkv cannot run are refused at load with the reason (`REFUSED`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from permkv.baselines import kvpress as kvp
from permkv.cache import BlockPool, PagedCache, forward, paged_attention
from permkv.compress import InferenceKVCacheCompression, paged_cache_for, prefill_and_compress
from permkv.engine import Engine, EngineConfig, Request
from permkv.eval import greedy_decode, prefill
from permkv.models import UnsupportedModel, check_supported, kv_layout
from permkv.speculate import speculative_generate

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=256, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             initializer_range=0.2)  # wide weights: peaked logits, so greedy choices are never near-ties
WINDOW = 32  # sliding window of the tiny Gemma models: every prompt below is longer
SLIDING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2)
NO_SLIDING_PRESS = "kvpress 0.5.5 compresses the sliding-window layers too (permkv.baselines.kvpress.check_model)"

# model_type -> (config overrides, None when kvpress runs it, else why it is skipped)
ARCHITECTURES = {
    "llama": ({}, None),
    "qwen2": ({}, None),
    "qwen3": ({}, None),  # head_dim set apart from hidden_size / heads, q/k norms
    "mistral": (dict(sliding_window=None), None),  # Mistral-7B-v0.2/v0.3 (v0.1's window on every layer: below)
    "gemma2": (SLIDING, NO_SLIDING_PRESS),  # sliding and global layers, logit soft-capping
    "gemma3_text": (SLIDING, NO_SLIDING_PRESS),
    "phi3": ({}, None),  # fused qkv projection
    "olmo2": ({}, None),
    "gpt_neox": ({}, "kvpress 0.5.5 finds attention layers at model.model.layers[i].self_attn; GPT-NeoX has "
                     "model.gpt_neox.layers[i].attention"),  # no grouped-query fields: one KV head per query head
}
REFUSED = {  # model_type -> what the error says
    "bloom": "not through transformers' attention interface",
    "deepseek_v3": "multi-head latent attention",
    "llama4_text": "chunked_attention",
    "gpt_oss": "learned sink logits",
    "jetmoe": "repeats the keys and values",
}


def tiny_config(model_type: str, **overrides):
    base = AutoConfig.for_model(model_type)
    fields = {k: v for k, v in SMALL.items() if hasattr(base, k)}
    return AutoConfig.for_model(model_type, **(fields | overrides))


_MODELS: dict = {}


def tiny_model(arch: str):
    """The registry's tiny random-init model of `arch` (seeded, built once), in eval mode."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch] = AutoModelForCausalLM.from_config(tiny_config(arch, **ARCHITECTURES[arch][0])).eval()
    return _MODELS[arch]


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def dense_greedy(model, ids: list[int], new: int) -> list[int]:
    cache, logits = prefill(model, ids)
    return greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=new, stop=set())


archs = pytest.mark.parametrize("arch", list(ARCHITECTURES))


@archs
def test_config_is_read_correctly(arch):
    model = tiny_model(arch)
    layout = kv_layout(model.config)
    check_supported(model.config)
    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and getattr(m, "is_causal", False)]
    assert layout.n_layers == len(attn) == 4
    assert layout.head_dim == 16 and layout.n_heads == 4
    assert layout.n_kv_heads == (4 if arch == "gpt_neox" else 2)  # GPT-NeoX: no GQA field, every head its own KV
    assert layout.windows == ((WINDOW, None) * 2 if "sliding_window" in ARCHITECTURES[arch][0] and
                              ARCHITECTURES[arch][0]["sliding_window"] else (None,) * 4)


@archs
def test_paged_decode_equals_dynamic_cache(arch):
    """Greedy tokens over a PagedCache (prefill and decode through the paged attention) are DynamicCache's,
    for a prompt past the sliding window; the prefill's logits agree to float rounding."""
    model = tiny_model(arch)
    ids = prompt(3 * WINDOW)
    dense, dense_logits = prefill(model, ids)
    want = greedy_decode(model, dense, dense_logits, start=len(ids), max_new_tokens=24, stop=set())
    cache = paged_cache_for(model, len(ids) + 32)
    with torch.no_grad(), paged_attention(model):
        logits = forward(model, cache, torch.tensor([ids]))[0, -1]
        got = greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=24, stop=set())
    assert torch.allclose(logits, dense_logits, atol=1e-4), float((logits - dense_logits).abs().max())
    assert got == want
    for layer, window in zip(cache.layers, kv_layout(model.config).windows):  # sliding layers keep their window
        held = cache.cached_tokens(0, layer.index, 0)
        assert held == (len(ids) + 23 if window is None else window - 1), (layer.index, held)


@archs
def test_compression_at_8x_frees_blocks(arch):
    """8x with the attention scorer and the same budget per head: each full-attention head holds ~1/8 of
    the prompt, sliding heads their window, and the freed blocks are back in the pool. The default
    (KVzip-style re-reading, one global top-k) keeps ~1/8 over all those heads; both decode on."""
    model = tiny_model(arch)
    ids = prompt(512, seed=1)
    windows = kv_layout(model.config).windows
    full = [i for i, w in enumerate(windows) if w is None]
    for compression, reread in ((InferenceKVCacheCompression("kvcompress"), None),
                                (InferenceKVCacheCompression(), prompt(12, seed=2))):
        cache, logits, report = prefill_and_compress(model, ids, 8, compression, reread=reread)
        heads = len(full) * cache.n_kv_heads
        kept = [report.kept[i][h] for i in full for h in range(cache.n_kv_heads)]
        if compression.allocator_in_use == "uniform":
            assert all(abs(k - len(ids) / 8) <= 1 for k in kept), kept
        assert abs(sum(kept) - heads * len(ids) / 8) <= heads, (sum(kept), heads)
        for i, w in enumerate(windows):
            if w is not None:
                assert report.kept[i] == [min(len(ids), w - 1)] * cache.n_kv_heads
        uncompressed = sum(cache.pool.blocks_for(len(ids) if w is None else w - 1) for w in windows) * cache.n_kv_heads
        assert cache.stats().allocated_blocks < uncompressed
        assert cache.pool.num_blocks - cache.pool.num_free == cache.stats().allocated_blocks
        assert report.bytes_freed == (uncompressed - cache.stats().allocated_blocks) * cache.pool.bytes_per_block
        with torch.no_grad(), paged_attention(model):
            out = greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=4, stop=set())
        assert len(out) == 4


@archs
def test_engine_batched_answers_equal_each_request_alone(arch):
    """Three requests of different lengths batched by the engine get the tokens each gets alone: over a
    DynamicCache at 1x, in an engine of its own at 4x (chunked prefill, KVzip-style re-reading, decode-time
    compression)."""
    model = tiny_model(arch)
    prompts = [prompt(n, seed=n) for n in (70, 100, 150)]
    config = EngineConfig(chunk_tokens=64, compress_every=8)

    def engine():
        # KVzip-style re-reading (the default) with a made-up repeat prompt: the mechanism, not the semantics
        return Engine(model, BlockPool(4000, 16, kv_layout(model.config).head_dim), config, stop=set(), reread=[5, 6, 7])

    batched = engine().generate([Request(p, 12, 1.0) for p in prompts], progress=False)
    assert [r.tokens for r in batched] == [dense_greedy(model, p, 12) for p in prompts]
    batched = engine().generate([Request(p, 12, 4.0) for p in prompts], progress=False)
    alone = [engine().generate([Request(p, 12, 4.0)], progress=False)[0].tokens for p in prompts]
    assert [r.tokens for r in batched] == alone


class Scripted:
    """Drafts the next 4 tokens of a known continuation with the third one wrong: every step accepts 2 drafts
    and rejects 2, so the cache is cropped at every step."""

    def __init__(self, prompt_ids: list[int], continuation: list[int]):
        self.known = list(prompt_ids) + list(continuation)

    def start(self, ids):
        pass

    def get_candidates(self, ids):
        drafts = self.known[len(ids) : len(ids) + 4]
        if len(drafts) < 3:
            return None
        drafts[2] = (drafts[2] + 1) % 250 + 3
        return drafts

    def update(self, num_matches):
        pass


@archs
def test_speculation_is_lossless(arch):
    """Verified drafts never change the greedy output, over a DynamicCache and over a PagedCache (whose
    crop gives rejected drafts' blocks back); sliding models stay inside their window (nothing to roll back past)."""
    model = tiny_model(arch)
    ids = prompt(WINDOW // 2, seed=3)
    new = WINDOW // 2 - 2
    want = dense_greedy(model, ids, new)
    for make in (lambda: DynamicCache(config=model.config), lambda: paged_cache_for(model, 2 * WINDOW)):
        cache = make()
        with paged_attention(model) if isinstance(cache, PagedCache) else torch.no_grad():
            result = speculative_generate(model, ids, new, Scripted(ids, want), cache=cache)
        assert result.tokens == want, type(cache).__name__
        assert result.stats.accepted >= 2 and result.stats.drafted > result.stats.accepted
        assert result.stats.forward_passes < new


@archs
def test_kvpress_presses_run_where_kvpress_supports_the_model(arch):
    """kvpress's SnapKV and StreamingLLM at 4x inside prefill leave 1/4 of the tokens in every layer, and
    greedy decoding continues from them; architectures kvpress cannot run are skipped with the reason."""
    reason = ARCHITECTURES[arch][1]
    if reason is not None:
        pytest.skip(reason)
    model = tiny_model(arch)
    ids = prompt(256, seed=4)
    for press in ("snapkv", "streaming"):
        cache, logits = kvp.prefill_with_press(model, ids, kvp.make_press(press, 4))
        assert [layer.keys.shape[2] for layer in cache.layers] == [64] * 4, press
        assert len(greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=4, stop=set())) == 4


def test_kvpress_refusal_reasons_are_true():
    """The registry's kvpress skips are what kvpress really does with those models."""
    with pytest.raises(ValueError, match="sliding-window"):
        kvp.check_model(tiny_model("gemma2"))
    with pytest.raises(AttributeError, match="model"):
        kvp.prefill_with_press(tiny_model("gpt_neox"), prompt(64), kvp.make_press("streaming", 4))


def test_window_on_every_layer_is_read_as_transformers_reads_it():
    """Mistral-7B-v0.1's config: `sliding_window` and no `layer_types` means every layer slides (as
    DynamicCache builds it); the paged decode past the window still equals DynamicCache's."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mistral", sliding_window=WINDOW)).eval()
    assert kv_layout(model.config).windows == (WINDOW,) * 4
    ids = prompt(3 * WINDOW, seed=5)
    cache = paged_cache_for(model, len(ids) + 16)
    with torch.no_grad(), paged_attention(model):
        logits = forward(model, cache, torch.tensor([ids]))[0, -1]
        got = greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=12, stop=set())
    assert got == dense_greedy(model, ids, 12)


@pytest.mark.parametrize("arch", list(REFUSED))
def test_architectures_permkv_cannot_run_are_refused_at_load(arch, tmp_path):
    """A clear UnsupportedModel before any weights are read, from the config alone and from a saved folder."""
    config = tiny_config(arch)
    with pytest.raises(UnsupportedModel, match=REFUSED[arch]):
        check_supported(config)
    if arch == "bloom":  # through load_model: a saved folder of it
        from permkv.models import load_model

        config.save_pretrained(tmp_path)
        with pytest.raises(UnsupportedModel, match=REFUSED[arch]):
            load_model(tmp_path)
