"""The default compression is the best measured method: `InferenceKVCacheCompression()` and
`prefill_and_compress` without a compression re-read the context KVzip-style with one global top-k, the
re-reading prompt built from the tokenizer; on needles at 8x it keeps every one the full cache finds, more
than kvpress's StreamingLLM and SnapKV on the same samples, in both modes."""

from collections import Counter

import pytest
import torch

from permkv.cache import paged_attention
from permkv.compress import KVZIP_SCORER, InferenceKVCacheCompression, prefill_and_compress, repeat_prompt_ids
from permkv.data import MODES, build_task, encode_sample
from permkv.eval import greedy_decode, stop_ids
from permkv.experiments import compression_quality as cq

N_NEEDLES = 4
RATIO = 8
PRESSES = ("streaming", "snapkv")
NEW = 32  # 02's max_new_tokens


def test_default_is_kvzip_with_one_global_top_k(smol):
    _, tok, spec = smol
    default = InferenceKVCacheCompression()
    assert default.rereads and default.setting() == (KVZIP_SCORER, "global", 0)
    assert default.reread_ids(tok) == repeat_prompt_ids(tok, spec)  # from the tokenizer's chat template
    cheap = InferenceKVCacheCompression("snapkv")
    assert not cheap.rereads and cheap.setting() == ("snapkv", "uniform", 64) and cheap.reread_ids(tok) is None


def default_answer(model, tok, prefix: list[int], suffix: list[int], ratio: float) -> str:
    """`prefill_and_compress` with nothing but the tokenizer, then the suffix and greedy decoding."""
    cache, logits, _ = prefill_and_compress(model, prefix, ratio, tokenizer=tok, extra_tokens=len(suffix) + NEW)
    with paged_attention(model):
        out = greedy_decode(model, cache, logits, start=len(prefix), max_new_tokens=NEW, stop=stop_ids(model, tok),
                            suffix=suffix)
    return tok.decode(out, skip_special_tokens=True)


@pytest.mark.slow
def test_default_keeps_the_needles_streaming_and_snapkv_lose(smol):
    """4 seeded needles at 1,024 tokens (niah_single, seed 1), both modes, 8x: the default finds every needle
    the full cache finds, and more than kvpress StreamingLLM or SnapKV on the same samples (02's protocol:
    presses post hoc on one prefill)."""
    model, tok, spec = smol
    found: Counter = Counter()
    with torch.no_grad():
        for sample in build_task("niah_single", tok, spec, N_NEEDLES, 1024, seed=1):
            for row in cq.answer_sample(model, tok, sample, spec, MODES, [f"kvpress/{p}" for p in PRESSES], [RATIO], NEW):
                found[row["mode"], row["method"]] += row["score"] > 0
            for mode in MODES:
                prefix, suffix = encode_sample(tok, spec, sample, mode)
                found[mode, "default"] += cq.score_text(sample, default_answer(model, tok, prefix, suffix, RATIO)) > 0
    print(sorted(found.items()))
    for mode in MODES:
        assert found[mode, "full"] == found[mode, "default"] == N_NEEDLES, found
        assert found[mode, "default"] > max(found[mode, f"kvpress/{p}"] for p in PRESSES), (mode, found)
