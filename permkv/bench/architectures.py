"""Every causal-LM architecture of the installed transformers, tried as a tiny random-init text model:
does `permkv.models.check_supported` accept it, and if so does a paged greedy decode equal DynamicCache's?

`python -m permkv.bench architectures [model_type ...]` (default: all of transformers' causal LMs, a
few minutes). Composite configs (multimodal, encoder-decoder) are left out: their default vision towers
are large to build at random, and their text models are listed on their own (e.g. gemma3_text). One row
per architecture; "no tiny config" means transformers itself cannot build the small config (not
permkv). JSON in reports/bench/architectures.json; docs/models.md quotes its counts.
"""

from __future__ import annotations

import collections
import time
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from permkv.cache import forward, paged_attention
from permkv.compress import paged_cache_for
from permkv.eval import greedy_decode, prefill
from permkv.models import UnsupportedModel, check_supported

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             is_decoder=True)


def tiny(model_type: str):
    """A small config of `model_type`: SMALL's sizes where the config has those fields."""
    base = AutoConfig.for_model(model_type)
    return AutoConfig.for_model(model_type, **{k: v for k, v in SMALL.items() if hasattr(base, k)})


def row(model_type: str) -> dict:
    t0 = time.perf_counter()
    try:
        config = tiny(model_type)
    except Exception as err:  # noqa: BLE001 - a census: every failure is a row
        return dict(arch=model_type, result="no tiny config", why=f"{type(err).__name__}: {err}"[:300])
    if config.get_text_config(decoder=True) is not config:
        return dict(arch=model_type, result="composite config (not tried)")
    try:
        check_supported(config)
    except UnsupportedModel as err:
        return dict(arch=model_type, result="refused at load", why=str(err))
    except Exception as err:  # noqa: BLE001 - transformers itself cannot build this small config
        return dict(arch=model_type, result="no tiny config", why=f"{type(err).__name__}: {err}"[:300])
    try:  # the reference: the model over a DynamicCache
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(3, 200, (40,)).tolist()
        with torch.no_grad():
            cache, logits = prefill(model, ids)
            want = greedy_decode(model, cache, logits, start=len(ids), max_new_tokens=12, stop=set())
    except Exception as err:  # noqa: BLE001 - transformers itself cannot run this small config
        return dict(arch=model_type, result="no tiny config", why=f"{type(err).__name__}: {err}"[:300])
    try:
        with torch.no_grad():
            paged = paged_cache_for(model, 80)
            with paged_attention(model):
                logits = forward(model, paged, torch.tensor([ids]))[0, -1]
                got = greedy_decode(model, paged, logits, start=len(ids), max_new_tokens=12, stop=set())
    except Exception as err:  # noqa: BLE001
        return dict(arch=model_type, result="paged decode failed", why=f"{type(err).__name__}: {err}"[:300])
    return dict(arch=model_type, result="paged == DynamicCache" if got == want else "paged differs",
                seconds=round(time.perf_counter() - t0, 2))


def main(argv: list[str]) -> None:
    from permkv.bench import write_result

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    rows = [row(model_type) for model_type in (argv or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]
    counts = collections.Counter(r["result"] for r in rows)
    print(dict(counts))
    print(f"wrote {write_result('architectures', dict(counts=dict(counts), rows=rows))}")


if __name__ == "__main__":
    main(__import__("sys").argv[1:])
