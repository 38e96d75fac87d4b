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
# # 02 · Per-head KV-cache compression: quality at 2x-64x against kvpress
# permkv evicts per (layer, KV head) from a paged cache and gives the blocks back to the pool
# (KV-Compress, ANCHORS.md s1). Every method answers the same samples as the full cache (notebook
# 00's answer), in both modes: **query-aware** (question inside the protected window, KV-Compress's
# setting) and **query-agnostic** (context compressed before the question is seen). Each sample is
# prefilled once: the context for the query-agnostic answers, then the question read on top of it for
# the query-aware ones. permkv methods compress a copy-on-write fork of it, kvpress presses are
# applied post hoc to the saved layer inputs (same kept tokens as inside prefill, tested). Retention
# = mean score / full-cache mean score on the same samples; the full-cache score is shown beside it,
# since a retention means little where the full cache already fails (ANCHORS.md s8).
#
# Methods are named by what they are (`permkv.experiments.compression_methods`): `<scorer>/<allocator>/w<N>`
# for permkv's compressor with a scorer that reads the last N queries, `<scorer>/<allocator>` for one that
# reads none, `kvpress/<press>` for a kvpress press. The headline is the `HEADLINE` parameter.
# `kvcompress/uniform/w64` (quick profile) is KV-Compress's L2-sum attention score read from the last 64
# queries with the same budget for every head; `kvzip/global` (cpu profile, the library's default) scores
# each token by the attention it gets while the model re-reads the context after "repeat the previous
# context" (KVzip-style, query-agnostic) and keeps one global top-k: the best measured method in both modes.
# KV-Compress's own setting (one global top-k over all heads from 8 queries, `kvcompress/global/w8`) loses
# needles that random eviction keeps: the heatmap below shows the heads it drains.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from permkv.experiments.compression_quality import (
    CompressionQualityConfig,
    best_permkv,
    best_press,
    claim_metrics,
    method_difference,
    quality_grid,
    write_quality_table,
)
from permkv.harness import tracking
from permkv.harness.config import from_params
from permkv.models import load_model

DEFAULTS = CompressionQualityConfig()  # the parameters' defaults; params/<profile>/02_compression_quality.yaml overrides them

# %% tags=["parameters"]
PROFILE = "quick"
MODEL = DEFAULTS.model  # a bundled name, a saved Hugging Face folder or a .gguf file (permkv.models.load_model)
TASKS = DEFAULTS.tasks  # question-answering tasks of permkv.data.TASKS
LENGTHS = DEFAULTS.lengths  # context tokens
N_SAMPLES = DEFAULTS.n_samples  # samples per (task, length); every method and ratio answers the same ones
RATIOS = DEFAULTS.ratios  # x times smaller: tokens seen / tokens kept
METHODS = DEFAULTS.methods  # names of permkv.experiments.compression_methods.METHODS
MODES = DEFAULTS.modes  # query_aware, query_agnostic
HEADLINE = DEFAULTS.headline  # the method the claim metrics measure
MAX_NEW_TOKENS = DEFAULTS.max_new_tokens
HEATMAP_METHOD = DEFAULTS.heatmap_method  # whose kept tokens per (layer, KV head) the heatmap shows
CLAIM_TOKENS = DEFAULTS.claim_tokens  # claim metrics pool samples of at least this many context tokens
LONG_MODEL = DEFAULTS.long_model  # a second model at long context (permkv methods only: kvpress cannot run Gemma-3)
LONG_TASKS = DEFAULTS.long_tasks
LONG_LENGTHS = DEFAULTS.long_lengths  # past Gemma-3's 512-token sliding window
LONG_N = DEFAULTS.long_n
LONG_RATIOS = DEFAULTS.long_ratios
LONG_METHODS = DEFAULTS.long_methods
LONG_MODES = DEFAULTS.long_modes
SEED = DEFAULTS.seed
WORKERS = DEFAULTS.workers  # processes answering samples (both modes each), one torch thread each

# %%
cfg = from_params(CompressionQualityConfig, globals())
model, tokenizer, spec = load_model(cfg.model)

# %% [markdown]
# ## Scores
# One row per (task, length, mode, method, ratio): mean score, 95% bootstrap CI, sample count n,
# full-cache score on the same samples, retention, measured cache bytes and achieved ratio.

# %%
rows, per_sample = quality_grid(model, tokenizer, spec, cfg.tasks, cfg.lengths, cfg.n_samples, cfg.ratios, cfg.methods,
                                cfg.modes, cfg.seed, cfg.max_new_tokens, cfg.workers)
table = pd.DataFrame(rows)
table.drop(columns=["original_bytes", "compressed_bytes"]).round(3)

# %% [markdown]
# ## Score against ratio, per task, length and mode (dashed: full cache)

# %%
compressed = table[table.method != "full"]
grid = sns.relplot(data=compressed, x="ratio", y="score", hue="method", row="mode", col="context_tokens", style="task",
                   kind="line", marker="o", height=3, aspect=1.3, facet_kws=dict(sharey=True))
for (mode, length), ax in grid.axes_dict.items():
    full = table[(table.method == "full") & (table["mode"] == mode) & (table.context_tokens == length)].score.mean()
    ax.axhline(full, ls="--", color="k", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
fig_scores = grid.fig
fig_scores.suptitle(f"{cfg.model}, n={cfg.n_samples} per point", y=1.02)
plt.show()

# %% [markdown]
# ## Which heads a global top-k drains
# Fraction of its tokens each (layer, KV head) kept under `HEATMAP_METHOD` (KV-Compress's own global
# top-k in the quick profile) and under the headline, mean over samples, query-aware mode. Rows
# that go dark are heads emptied down to their protected tokens.

# %%
shown = [m for m in dict.fromkeys([cfg.heatmap_method, cfg.headline]) if m in cfg.methods]
fig_heat, axes = plt.subplots(len(shown), len(cfg.ratios), figsize=(3 * len(cfg.ratios), 5 * len(shown)), squeeze=False)
for row_axes, method in zip(axes, shown):
    for ax, ratio in zip(row_axes, cfg.ratios):
        kept = [np.array(s["kept"]) / s["n_tokens"] for s in per_sample
                if s["method"] == method and s["ratio"] == float(ratio) and s["mode"] == cfg.modes[0]]
        if kept:
            sns.heatmap(np.mean(kept, axis=0), ax=ax, cmap="viridis", vmin=0, cbar=True)
        ax.set(title=f"{method} {ratio}x", xlabel="KV head", ylabel="layer")
fig_heat.suptitle("kept fraction per (layer, KV head)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Measured cache bytes against ratio
# permkv: blocks the paged cache still holds; kvpress: bytes of its DynamicCache tensors (AdaKV and
# KVzip mask evicted keys, so their bytes do not shrink). Dotted: original / ratio.

# %%
fig_bytes, ax = plt.subplots(figsize=(5, 3.5))
for method, rows_m in compressed.groupby("method"):
    mean = rows_m.groupby("ratio").compressed_bytes.mean()
    ax.plot(mean.index, mean.values / 2**20, "o-", label=method)
orig = compressed.original_bytes.mean()
ax.plot(cfg.ratios, [orig / r / 2**20 for r in cfg.ratios], "k:", label="original / ratio")
ax.set(xscale="log", yscale="log", xlabel="ratio", ylabel="KV cache (MiB)", title="Measured cache size")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Long setting on a second model
# Gemma-3-270m keeps 5 of every 6 layers in a 512-token sliding window; those layers are already
# bounded, so permkv compresses only the global layers and the achieved ratio of the whole cache is
# far below the target (`achieved_ratio`). kvpress 0.5.5 does not run on this model.

# %%
long_model, long_tokenizer, long_spec = load_model(cfg.long_model)
long_rows, long_per_sample = quality_grid(long_model, long_tokenizer, long_spec, cfg.long_tasks, cfg.long_lengths,
                                          cfg.long_n, cfg.long_ratios, cfg.long_methods, cfg.long_modes, cfg.seed,
                                          cfg.max_new_tokens, cfg.workers)
del long_model
long_table = pd.DataFrame(long_rows)
long_table[["model", "task", "context_tokens", "mode", "method", "ratio", "score", "ci_low", "ci_high", "n",
            "full_score", "retention", "achieved_ratio"]].round(3)

# %% [markdown]
# ## Claims: retention, against the best kvpress press, against random
# `claim.retention_<r>x_<mode>`: the headline's retention over all tasks pooled (samples of at least
# `CLAIM_TOKENS` context tokens); `long.claim.*` the same on the second model, where the headline ran.
# `claim.beats_kvpress_<r>x_<mode>`: the lower end of the paired bootstrap 95% CI of (headline - best
# kvpress press of that ratio and mode); > 0 means it beats it.
# `claim.vs_random_<r>x_<mode>`: the same against random eviction. `claim.best_beats_kvpress_<r>x_<mode>`
# and `claim.best_retention_<r>x_<mode>`: the same for permkv's best method at that ratio and mode (chosen
# on these samples), the rows below whose `a` is not the headline.

# %%
long_enough = [s for s in per_sample if s["context_tokens"] >= cfg.claim_tokens]
metrics = claim_metrics(long_enough, cfg.headline, cfg.ratios, cfg.modes)
versus = [method_difference(long_enough, ours, best, ratio, mode) for mode in cfg.modes for ratio in cfg.ratios
          if (best := best_press(long_enough, ratio, mode))
          for ours in dict.fromkeys([cfg.headline, best_permkv(long_enough, ratio, mode)])]
for row in table.itertuples():
    key = f"{row.task}.{row.context_tokens}.{row.mode}.{row.method}.{row.ratio:g}x"
    metrics[f"score.{key}"] = row.score
    metrics[f"retention.{key}"] = row.retention
for row in long_table.itertuples():
    key = f"{row.model}.{row.task}.{row.context_tokens}.{row.mode}.{row.method}.{row.ratio:g}x"
    metrics[f"long.score.{key}"] = row.score
    metrics[f"long.achieved_ratio.{key}"] = row.achieved_ratio
if cfg.headline in cfg.long_methods:  # the second model's retention and headline - random, for the ledger
    long_claims = claim_metrics(long_per_sample, cfg.headline, cfg.long_ratios, cfg.long_modes)
    metrics.update({f"long.{k}": v for k, v in long_claims.items()})
pd.DataFrame(versus).round(3)

# %% [markdown]
# ## The measured-quality table
# A user loads this file once, `QualityTable.load(path).measured(model, mode)`, and hands it to
# `InferenceKVCacheCompression(quality=...)`: its reports carry the retention measured here (n, CI, tasks)
# for their setting and ratio, or None, and `compress_auto` picks the largest measured ratio for a quality
# floor (both models' permkv methods are in it).

# %%
folder = tracking.out_dir(PROFILE, "02_compression_quality")
quality_path = write_quality_table(per_sample + long_per_sample, folder / "quality_table.json")
pd.read_json(quality_path)[["model", "mode", "method", "ratio", "retention", "ci_low", "ci_high", "n"]].round(3)

# %%
tracking.publish("02_compression_quality", cfg, PROFILE, metrics,
                 figures={"scores.png": fig_scores, "budgets.png": fig_heat, "bytes.png": fig_bytes},
                 tables={"rows": table, "long_rows": long_table, "versus_kvpress": versus,
                         "samples": [{k: v for k, v in s.items() if k != "kept"} for s in per_sample],
                         "long_samples": [{k: v for k, v in s.items() if k != "kept"} for s in long_per_sample]})
