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
#     display_name: Python 3
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

from permkv.harness import tracking
from permkv.cache import BlockPool, PagedCache, paged_attention
from permkv.cache.capacity import (
    ReservationPool,
    admit_paged,
    admit_reserved,
    model_config,
    natural_prompts,
    request_mix,
)
from permkv.compress.admission import admit_compressed
from permkv.data import Sample, encode_sample, load_squad
from permkv.models import load_model

# %% tags=["parameters"]
PROFILE = "quick"
MODEL = "smollm2-135m"
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
params = dict(model=MODEL, n_prompts=N_PROMPTS, output_range=OUTPUT_RANGE, pool_gib=POOL_GIB,
              block_size=BLOCK_SIZE, demo_prompts=DEMO_PROMPTS, demo_new_tokens=DEMO_NEW_TOKENS,
              compress_ratios=COMPRESS_RATIOS, compress_pool_gib=COMPRESS_POOL_GIB, chunk_tokens=CHUNK_TOKENS, seed=SEED)
out_dir = tracking.ROOT / "reports" / PROFILE
out_dir.mkdir(parents=True, exist_ok=True)
model, tokenizer, spec = load_model(MODEL)
pool_bytes = int(POOL_GIB * 2**30)

# %% [markdown]
# ## The request mix

# %%
prompts = {task: natural_prompts(tokenizer, spec, task, N_PROMPTS, SEED) for task in ("squad", "hotpot")}
requests = request_mix(prompts["squad"] + prompts["hotpot"], tuple(OUTPUT_RANGE), SEED)
mix = pd.DataFrame([dict(prompt=r.prompt_tokens, output=r.output_tokens, total=r.total) for r in requests])
mix.describe().round(1)

# %% [markdown]
# ## Admission into a fixed KV memory
# Reservation sizes: the model's maximum context (what a server must reserve when it does not know
# the output length) and, kinder to reservation, the longest request of this mix.

# %%
longest = int(mix.total.max())
rows = []
for label, reserve in ((f"reserve {spec.max_positions} (max context)", spec.max_positions),
                       (f"reserve {longest} (longest request)", longest)):
    got = admit_reserved(ReservationPool(pool_bytes, spec.kv_bytes_per_token, reserve), requests)
    rows.append(dict(allocator=label, admitted=got.admitted, waste_pct=got.waste_pct,
                     allocated_mib=got.allocated_bytes / 2**20, used_mib=got.used_bytes / 2**20))
cache = PagedCache(BlockPool.from_bytes(pool_bytes, BLOCK_SIZE, spec.head_dim), model_config(MODEL))
paged = admit_paged(cache, requests)
rows.append(dict(allocator=f"paged, blocks of {BLOCK_SIZE}", admitted=paged.admitted, waste_pct=paged.waste_pct,
                 allocated_mib=paged.allocated_bytes / 2**20, used_mib=paged.used_bytes / 2**20))
admission = pd.DataFrame(rows)
admission.round(2)

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
axes[0].hist(mix.total, bins=30)
axes[0].set(xlabel="tokens per request (prompt + output)", ylabel="requests", title="Request mix")
short = ["reserve max ctx", "reserve longest", "paged"]
axes[1].bar(short, admission.waste_pct, color=["tab:red", "tab:orange", "tab:green"])
axes[1].axhline(4, ls="--", c="k", lw=1, label="vLLM: <4%")
axes[1].set(ylabel="KV memory wasted (%)", title="Waste of the admitted requests")
axes[1].legend()
axes[2].bar(short, admission.admitted, color=["tab:red", "tab:orange", "tab:green"])
axes[2].set(ylabel="requests admitted", title=f"Concurrent requests in {POOL_GIB:g} GiB")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Compressed admission: concurrent requests at 8x and 64x
# The seed's table (10 -> 80 -> 640 requests) assumes a request's whole cache shrinks by the ratio.
# Here every admitted prompt is really prefilled (in chunks of `CHUNK_TOKENS`) and compressed by
# permkv's default (KV-Compress score, one global top-k) into one shared pool, and then takes the
# blocks of its output tokens uncompressed, as a server must before decoding them. The 1x row goes
# through the same code, so the gain is a ratio of counts measured on equal terms.

# %%
compressed_pool_bytes = int(COMPRESS_POOL_GIB * 2**30)
compressed_rows = []
for ratio in [1] + list(COMPRESS_RATIOS):
    pool = BlockPool.from_bytes(compressed_pool_bytes, BLOCK_SIZE, spec.head_dim, device=model.device)
    got, caches = admit_compressed(model, pool, requests, ratio, chunk_tokens=CHUNK_TOKENS)
    compressed_rows.append(dict(ratio=ratio, admitted=got.admitted, waste_pct=got.waste_pct,
                                allocated_mib=got.allocated_bytes / 2**20, used_mib=got.used_bytes / 2**20))
    del caches, pool
compressed_admission = pd.DataFrame(compressed_rows)
compressed_admission["gain"] = compressed_admission.admitted / max(compressed_admission.admitted[0], 1)
compressed_admission["seed_claim"] = compressed_admission.ratio.astype(float)
compressed_admission.round(2)

# %%
fig_compressed, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(compressed_admission.ratio, compressed_admission.gain, "o-", label="measured (prompt compressed, output not)")
ax.plot(compressed_admission.ratio, compressed_admission.ratio, "k:", label="seed: gain = ratio")
ax.set(xscale="log", yscale="log", xlabel="compression ratio", ylabel="concurrent requests vs 1x",
       title=f"{COMPRESS_POOL_GIB:g} GiB, {len(requests)} requests cycled")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Real generation through the paged cache
# The first requests' prompts generate greedily in one left-padded batch; padding takes no block.

# %%
first_of_article = {}
for r in load_squad():  # one question per article, so the prompts differ in length
    first_of_article.setdefault(r["title"], r)
ids = [sum(encode_sample(tokenizer, spec, Sample("squad", r["context"], r["question"], r["answers"]), "query_aware"), [])
       for r in list(first_of_article.values())[:DEMO_PROMPTS]]
tokenizer.padding_side = "left"
batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
demo = PagedCache(BlockPool.from_bytes(pool_bytes, BLOCK_SIZE, spec.head_dim, device=model.device), model.config)
with paged_attention(model):
    model.generate(**batch, max_new_tokens=DEMO_NEW_TOKENS, do_sample=False, past_key_values=demo,
                   pad_token_id=tokenizer.pad_token_id)
demo_stats = demo.stats()
slots = batch.input_ids.shape[0] * (batch.input_ids.shape[1] + DEMO_NEW_TOKENS - 1)  # a padded tensor per table
padded_waste_pct = 100 * (slots - sum(demo.seen)) / slots
print(f"tokens seen {demo.seen}: paged {demo_stats.allocated_blocks} blocks, waste {demo_stats.waste_pct:.2f}%; "
      f"a left-padded (batch, length) cache would waste {padded_waste_pct:.2f}%")

# %% [markdown]
# ## Log to MLflow
# Claim rows (permkv/claims.py): `paged.waste` (vLLM: under 4%), `paged.reservation_waste` (vLLM:
# 60-80% with max-length reservation, here reserving the model's maximum context) and
# `paged.concurrent_1x` (the seed's "10 concurrent requests" at 1x), and `compress.concurrent_8x` /
# `_64x`: the gain in admitted requests over 1x with really compressed caches (seed: 8x and 64x).

# %%
metrics = {
    "claim.paged_waste_pct": paged.waste_pct,
    "claim.concurrent_requests_1x": paged.admitted,
    "claim.reservation_waste_pct": admission.waste_pct[0],
    "reservation_waste_pct.max_context": admission.waste_pct[0],
    "reservation_waste_pct.longest": admission.waste_pct[1],
    "concurrent_requests.reserve_max_context": admission.admitted[0],
    "concurrent_requests.reserve_longest": admission.admitted[1],
    "concurrent_requests.paged": paged.admitted,
    "mean_request_tokens": mix.total.mean(),
    "demo_paged_waste_pct": demo_stats.waste_pct,
    "demo_padded_waste_pct": padded_waste_pct,
}
for row in compressed_admission.itertuples():
    metrics[f"concurrent_requests.compressed_{row.ratio:g}x"] = row.admitted
    if row.ratio in (8, 64):
        metrics[f"claim.concurrent_gain_{row.ratio:g}x"] = row.gain
admission.to_csv(out_dir / "01_paged_attention_admission.csv", index=False)
mix.to_csv(out_dir / "01_paged_attention_requests.csv", index=False)
compressed_admission.to_csv(out_dir / "01_paged_attention_compressed.csv", index=False)
fig_compressed.savefig(out_dir / "01_paged_attention_compressed.png", bbox_inches="tight")
fig.savefig(out_dir / "01_paged_attention.png", bbox_inches="tight")
with tracking.run("01_paged_attention", params, PROFILE):
    tracking.log_metrics(metrics)
    tracking.log_figure(fig, "admission.png")
    tracking.log_figure(fig_compressed, "compressed_admission.png")
    tracking.log_dict(compressed_admission.to_dict("records"), "compressed_admission.json")
    tracking.log_dict(admission.to_dict("records"), "admission.json")
{k: round(float(v), 3) for k, v in metrics.items()}
