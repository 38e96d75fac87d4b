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
# # 03 · Throughput at a fixed KV memory: continuous batching with compression
# KV-Compress (ANCHORS.md s1) reports total throughput against vanilla vLLM of 3.44x at 8x and 5.18x at
# 64x compression (Llama-3.1-8B, one L4, 256 prompts of 500-6000 tokens, 500 output tokens): compressed
# caches free blocks, the freed blocks admit more requests, and larger decode batches make more tokens
# per second. The cache is compressed again as outputs grow.
#
# Here `permkv.engine` does the same on the paged pool: a waiting queue, admission by free blocks,
# chunked prefill compressed to the request's ratio, one batched decode forward per step over all
# running sequences (each layer and KV head with its own length), compression again every
# `COMPRESS_EVERY` generated tokens, and recompute preemption when the pool runs dry. The same SQuAD
# requests (answers scored) run at every ratio and through the peers, on one pool sized so that ratio 1
# is memory-bound. Output lengths are fixed (EOS ignored), as in vLLM's benchmark_throughput.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from permkv.eval import stop_ids
from permkv.experiments.throughput import (
    ThroughputConfig,
    claim_metrics,
    decode_cost,
    fit_cost,
    make_requests,
    pool_blocks,
    quality,
    run_grid,
    summarize,
)
from permkv.harness import tracking
from permkv.harness.config import from_params
from permkv.models import load_model

# %% tags=["parameters"]
PROFILE = "quick"
MODEL = "smollm2-135m"  # a bundled name, a saved Hugging Face folder or a .gguf file (permkv.models.load_model)
DTYPE = "float32"  # "bfloat16" on a GPU
N_REQUESTS = 3  # SQuAD questions among distractors (anchor: 256)
PROMPT_RANGE = [128, 256]  # prompt tokens, uniform per request (anchor: 500-6000)
OUTPUT_TOKENS = 8  # generated per request, EOS ignored (anchor: 500)
POOL_REQUESTS = 2.0  # KV pool size in average requests, uncompressed (ratio 1 is memory-bound)
RATIOS = [1, 8]  # x times smaller
REPEATS = 1
PEERS = True  # transformers' continuous batching (same blocks) and sequential generate
BLOCK_SIZE = 16
CHUNK_TOKENS = 128
COMPRESS_EVERY = 16
COST_BATCHES = [1, 4]
COST_TOKENS = [64]
COST_MAX_TOKENS = 16384
SEED = 0

# %%
cfg = from_params(ThroughputConfig, globals())
model, tokenizer, spec = load_model(cfg.model, dtype=getattr(torch, cfg.dtype))
requests = make_requests(tokenizer, spec, cfg)
blocks = pool_blocks(model, requests, cfg)
lengths = pd.Series([len(r.prompt_ids) for r in requests], name="prompt tokens")
print(f"{len(requests)} requests, prompts {lengths.min()}-{lengths.max()} tokens (mean {lengths.mean():.0f}), "
      f"{cfg.output_tokens} output tokens each; pool {blocks} blocks = {cfg.pool_requests:g} average requests")

# %% [markdown]
# ## Every ratio and the peers on the same requests
# Gains are ratios to the ratio-1 engine measured in the same repeat (medians over repeats).
# "total" counts prompt and output tokens per second, the anchor's measure.

# %%
rows, tokens = run_grid(model, tokenizer, requests, cfg)
summary = pd.DataFrame(summarize(rows))
quality_rows = quality(tokenizer, requests, tokens, stop_ids(model, tokenizer))
summary = summary.merge(pd.DataFrame(quality_rows).drop(columns="n"), on="system", how="left")
summary.drop(columns=["error"]).round(3)

# %%
errors = summary[summary.error.notna()]
for _, r in errors.iterrows():
    print(f"{r.system} could not run here: {r.error}")

# %%
engine = summary[summary.system.str.startswith("engine")]
anchor = pd.DataFrame(dict(ratio=[1, 2, 4, 8, 16, 32, 64], gain=[1.38, 2.00, 2.54, 3.44, 3.90, 4.93, 5.18]))
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
axes[0].plot(engine.ratio, engine.total_gain, "o-", label="total tok/s (measured)")
axes[0].plot(engine.ratio, engine.output_gain, "s--", label="output tok/s (measured)")
axes[0].plot(anchor.ratio, anchor.gain / 1.38, "k:", label="KV-Compress / its 1x (anchor)")
axes[0].axhline(1 / engine.prefill_share.iloc[0], c="tab:red", lw=1, label="Amdahl bound (1 / prefill share at 1x)")
for _, r in summary[~summary.system.str.startswith("engine") & summary.error.isna()].iterrows():
    axes[0].axhline(r.total_gain, c="gray", lw=0.8, ls="-.")
    axes[0].text(1, r.total_gain, r.system, fontsize=7, va="bottom")
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg.ratios, [f"{r:g}" for r in cfg.ratios])
axes[0].set(xlabel="compression ratio (x smaller)", ylabel="throughput vs engine at 1x", title="Throughput")
axes[0].legend(fontsize=7)
axes[1].plot(engine.ratio, engine.mean_batch, "o-", label="mean")
axes[1].plot(engine.ratio, engine.max_batch, "s--", label="max")
axes[1].set(xlabel="compression ratio", ylabel="running sequences", title="Decode batch")
axes[1].legend(fontsize=8)
axes[2].errorbar(engine.ratio, engine.score, yerr=[engine.score - engine.ci_low, engine.ci_high - engine.score], fmt="o-")
axes[2].set(xlabel="compression ratio", ylabel="SQuAD score", title=f"Answer quality (n={len(requests)})")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Batch size over time

# %%
fig_batch, ax = plt.subplots(figsize=(7, 3.5))
for r in rows:
    if r["system"].startswith("engine") and r["repeat"] == 0:
        ax.plot(r["batch_sizes"], label=r["system"], lw=1)
ax.set(xlabel="decode step", ylabel="running sequences", title="Batch size per decode step")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The decode-step cost model on this machine
# One batched decode step over `batch` sequences of `cached_tokens` tokens each (real K/V). On a GPU a
# step costs about the same for 1 or 64 sequences (weights are read once, compute is idle); on a CPU
# each extra sequence adds its own matrix work, so a larger batch stops being free early. With prefill
# untouched by compression, the gain is bounded by 1 / (prefill share of the ratio-1 run).

# %%
cost = pd.DataFrame(decode_cost(model, requests, cfg))
fit = fit_cost(cost.to_dict("records"))
print({k: f"{v * 1e3:.3f} ms" for k, v in fit.items()})
fig_cost, ax = plt.subplots(figsize=(6, 4))
for n, g in cost.groupby("cached_tokens"):
    ax.plot(g.batch, g.step_s / g.batch * 1e3, "o-", label=f"{n} cached tokens / seq")
ax.set(xscale="log", xlabel="batch", ylabel="ms per generated token", title="Decode step cost per sequence")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Log to MLflow
# Ledger rows (permkv/harness/claims.py): `claim.throughput_gain_8x` / `_64x` (total tokens/s vs the
# ratio-1 engine; KV-Compress: 3.44x / 5.18x) and `claim.engine_concurrency_gain_8x` / `_64x`: pool
# blocks one decoding sequence holds at 1x over those at the ratio (generated tokens included), i.e.
# how many more sequences the pool holds at once (seed: 10 -> 80 -> 640 requests).
# `throughput.batch_gain_*` is the largest batch reached, capped by the number of requests.

# %%
metrics = claim_metrics(summary.to_dict("records"), quality_rows, fit, spec.n_layers * spec.n_kv_heads, cfg.block_size)
metrics |= {f"cost.{k}": v for k, v in fit.items()}
predicted = [metrics[f"throughput.cost_model_gain_{r:g}x"] for r in engine.ratio]
fig_cost_gain, ax = plt.subplots(figsize=(6, 4))
ax.plot(engine.ratio, engine.total_gain, "o-", label="measured")
ax.plot(engine.ratio, predicted, "s--", label="cost model at the measured batch and cache size")
ax.axhline(metrics["throughput.amdahl_bound"], c="tab:red", lw=1, label="Amdahl bound (prefill share at 1x)")
ax.set_xscale("log", base=2)
ax.set_xticks(cfg.ratios, [f"{r:g}" for r in cfg.ratios])
ax.set(xlabel="compression ratio", ylabel="throughput vs engine at 1x", title="Measured gain vs what this CPU allows")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
tracking.publish("03_throughput", cfg, PROFILE, metrics,
                 figures={"throughput.png": fig, "batch.png": fig_batch, "cost.png": fig_cost, "cost_gain.png": fig_cost_gain},
                 tables={"summary": summary, "cost": cost, "rows": pd.DataFrame(rows).drop(columns="batch_sizes", errors="ignore")})
{k: round(float(v), 3) for k, v in metrics.items() if k.startswith("claim.")}
