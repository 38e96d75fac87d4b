# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Paged attention: padding waste and capacity
# vLLM's PagedAttention (ANCHORS.md s3) stores the KV cache in blocks of 16 tokens, so a request
# wastes at most its last block, where servers that reserve the maximum length for every request
# wasted 60-80%. permkv's `PagedCache` goes one step further (KV-Compress's layout, s1): every
# (sequence, layer, KV head) has its own block table, so per-head eviction can return blocks.
#
# Here requests from a realistic mix (SQuAD and HotpotQA prompts at their natural length, plus
# seeded output lengths) are admitted one by one into a fixed KV memory of SmolLM2's real layout
# (30 layers x 3 KV heads x 64 dims, fp32: 45 KiB per token) until the next one does not fit:
# once with contiguous max-length reservations, once into a real `BlockPool`. Then a batch really
# generates through the paged cache to show the same waste on real K/V.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from permkv.experiments.paged_attention import (
    PagedAttentionConfig,
    claim_metrics,
    compressed_admission,
    paged_demo,
    request_mix_for,
    reservation_vs_paged,
)
from permkv.harness import tracking
from permkv.harness.config import from_params
from permkv.models import load_model

# %% tags=["parameters"]
PROFILE = "quick"
MODEL = "smollm2-135m"  # a bundled name, a saved Hugging Face folder or a .gguf file (permkv.models.load_model)
N_PROMPTS = 20  # prompts per task (SQuAD and HotpotQA)
OUTPUT_RANGE = [16, 512]  # output tokens per request, uniform
POOL_GIB = 1.0  # KV memory for both allocators
BLOCK_SIZE = 16
DEMO_PROMPTS = 2  # requests that really generate through the paged cache
DEMO_NEW_TOKENS = 8
COMPRESS_RATIOS = [8, 64]  # compressed admission: x times smaller (1x is admitted the same way as reference)
COMPRESS_POOL_GIB = 0.1  # KV memory for the compressed admission (each admitted prompt is really prefilled)
CHUNK_TOKENS = 256  # compressed admission prefills in chunks, compressing after each
SEED = 0

# %%
cfg = from_params(PagedAttentionConfig, globals())
model, tokenizer, spec = load_model(cfg.model)

# %% [markdown]
# ## The request mix

# %%
requests = request_mix_for(tokenizer, spec, cfg)
mix = pd.DataFrame([dict(prompt=r.prompt_tokens, output=r.output_tokens, total=r.total) for r in requests])
mix.describe().round(1)

# %% [markdown]
# ## Admission into a fixed KV memory
# Reservation sizes: the model's maximum context (what a server must reserve when it does not know
# the output length) and, kinder to reservation, the longest request of this mix.

# %%
admission = pd.DataFrame(reservation_vs_paged(spec, requests, cfg))
admission.round(2)

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
colors = ["tab:red", "tab:orange", "tab:green"]
axes[0].hist(mix.total, bins=30)
axes[0].set(xlabel="tokens per request (prompt + output)", ylabel="requests", title="Request mix")
axes[1].bar(admission.allocator, admission.waste_pct, color=colors)
axes[1].axhline(4, ls="--", c="k", lw=1, label="vLLM: <4%")
axes[1].set(ylabel="KV memory wasted (%)", title="Waste of the admitted requests")
axes[1].legend()
axes[2].bar(admission.allocator, admission.admitted, color=colors)
axes[2].set(ylabel="requests admitted", title=f"Concurrent requests in {cfg.pool_gib:g} GiB")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Compressed admission: concurrent requests at 8x and 64x
# The seed's table (10 -> 80 -> 640 requests) assumes a request's whole cache shrinks by the ratio.
# Here every admitted prompt is really prefilled (in chunks of `CHUNK_TOKENS`) and compressed by
# permkv's default into one shared pool, and then takes the blocks of its output tokens uncompressed,
# as a server must before decoding them. The 1x row goes through the same code, so the gain is a
# ratio of counts measured on equal terms.

# %%
compressed = pd.DataFrame(compressed_admission(model, spec, requests, cfg))
compressed.round(2)

# %%
fig_compressed, ax = plt.subplots(figsize=(5.5, 4))
ax.plot(compressed.ratio, compressed.gain, "o-", label="measured (prompt compressed, output not)")
ax.plot(compressed.ratio, compressed.ratio, "k:", label="seed: gain = ratio")
ax.set(xscale="log", yscale="log", xlabel="compression ratio (x smaller)", ylabel="concurrent requests vs 1x",
       title=f"{cfg.compress_pool_gib:g} GiB, {len(requests)} requests cycled")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Real generation through the paged cache
# The first requests' prompts generate greedily in one left-padded batch; padding takes no block.

# %%
demo = paged_demo(model, tokenizer, spec, cfg)
print(f"tokens seen {demo['tokens_seen']}: paged {demo['paged_blocks']} blocks, waste {demo['paged_waste_pct']:.2f}%; "
      f"a left-padded (batch, length) cache would waste {demo['padded_waste_pct']:.2f}%")

# %% [markdown]
# ## Log to MLflow
# Claim rows (permkv/harness/claims.py): `paged.waste` (vLLM: under 4%), `paged.reservation_waste`
# (vLLM: 60-80% with max-length reservation, here reserving the model's maximum context),
# `paged.concurrent_1x` (the seed's "10 concurrent requests" at 1x), and the gain in admitted
# requests over 1x with really compressed caches at 8x / 64x (seed: 8x and 64x).

# %%
metrics = claim_metrics(admission.to_dict("records"), compressed.to_dict("records"), demo, mix.total.mean())
tracking.publish("01_paged_attention", cfg, PROFILE, metrics,
                 figures={"admission.png": fig, "compressed_admission.png": fig_compressed},
                 tables={"admission": admission, "requests": mix, "compressed_admission": compressed})
{k: round(float(v), 3) for k, v in metrics.items() if k.startswith("claim.")}
