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
# # 05 · Recursive Language Model over compressed KV caches
# The seed: "a 100K-token document in 4 calls instead of 25 at 96% quality" — one call holds 4K tokens of
# KV; with 8x compression it reads 32K tokens into the same budget. The anchor is the Recursive
# Language Model (Zhang, Kraska, Khattab, arXiv 2512.24601; official client `rlms`), whose root model
# writes REPL code that calls sub-models on pieces of the context.
#
# Here, on the same documents (Paul Graham essays with 7-digit needles; one needle, or four needles of
# which one is asked):
# - permkv's **scripted** RLM (`permkv.rlm.RecursiveLanguageModel`): pieces that fit one call's KV
#   budget, each read through chunked prefill with compression at ratio r, grounded answers passed up,
#   one aggregation call; ratio 1 vs 2-16. What a compressed call keeps is chosen by `SCORINGS`:
#   `kvzip` (the headline `permkv_rlm`: each chunk is re-read after a "repeat the context" prompt on a
#   fork and every token keeps the most attention it got, one global top-k) or `attention` (the last
#   64 queries of each chunk score the cache: `permkv_rlm_attention`);
# - the **plain model truncated** to its window (middle cut, one call);
# - the **official RLM client** (`rlms`) driving the same model through `permkv serve`.
#
# The seed's geometry is scaled to the model: SmolLM2 has 8K positions, so the budget per call is
# `CONTEXT_CHUNK_SIZE` tokens and the document `DOC_TOKENS` (16K / 640 or 8K / 320 = the seed's 100K / 4K = 25).
# Compression saves KV memory, not positions: a call can never read more than the model's window
# (`position_limited` in the rows).

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from permkv.experiments.recursive_lm import RecursiveLMConfig, claim_metrics, run_grid, summarize
from permkv.harness import tracking
from permkv.harness.config import from_params
from permkv.models import load_model

# %% tags=["parameters"]
PROFILE = "quick"
MODEL = "smollm2-135m"  # a bundled name, a saved Hugging Face folder or a .gguf file (permkv.models.load_model)
TASKS = ["niah_single"]
DOC_TOKENS = 800
CONTEXT_CHUNK_SIZE = 200
RATIOS = [1, 8]
SCORINGS = ["kvzip", "attention"]
N_DOCS = 1
N_NEEDLES = 4
MAX_NEW_TOKENS = 24
MAX_DEPTH = 3
CHUNK_TOKENS = 256
TRUNCATED = True
OFFICIAL_DOCS = 1
OFFICIAL_ITERATIONS = 1
OFFICIAL_MAX_TOKENS = 32
OFFICIAL_TIMEOUT_S = 120.0
THREADS = 1
SEED = 0

# %%
cfg = from_params(RecursiveLMConfig, globals())
if cfg.threads:
    torch.set_num_threads(cfg.threads)
model, tokenizer, spec = load_model(cfg.model)

# %% [markdown]
# ## The grid: every method on the same documents
# `read_calls` are the calls that read the document (the seed's 25 / 4); `calls` adds the aggregation.
# Scores are "the gold needle is in the answer's first line", with a 95% bootstrap CI over documents.

# %%
rows = run_grid(model, tokenizer, spec, cfg)
table = pd.DataFrame(summarize(rows))
table.drop(columns=["achieved_ratio"]).round(3)

# %% [markdown]
# ## One document, call by call
# Every call the RLM made on the first document at the smallest and largest ratio: its level (1 =
# reading the document, 2 = aggregating), tokens read, the ratio it used (1 when the prompt fits the
# budget uncompressed), the KV tokens and bytes it held after reading, and its answer.

# %%
first = [r for r in rows if r["method"] == "permkv_rlm" and r["doc"] == 0 and r["task"] == cfg.tasks[0]
         and r["ratio"] in (min(cfg.ratios), max(cfg.ratios))]
example = pd.DataFrame([dict(ratio=r["ratio"], **c) for r in first for c in r.get("trace", [])])
example

# %%
pooled = table[table.task == "all"]
rlm_rows = pooled[pooled.method == "permkv_rlm"].sort_values("ratio")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
labels = [f"{r:g}x" for r in rlm_rows.ratio]
axes[0].bar(labels, rlm_rows.read_calls, label="read calls")
axes[0].bar(labels, rlm_rows.calls - rlm_rows.read_calls, bottom=rlm_rows.read_calls, label="aggregation calls")
axes[0].set(xlabel="KV compression ratio", ylabel="calls per document",
            title=f"{cfg.doc_tokens}-token documents, {cfg.context_chunk_size}-token KV budget per call")
axes[0].legend()
err = [rlm_rows.score - rlm_rows.ci_low, rlm_rows.ci_high - rlm_rows.score]
axes[1].errorbar(labels, rlm_rows.score, yerr=err, fmt="o-", capsize=4, label=f"permkv scripted RLM ({cfg.scorings[0]})")
for name in cfg.scorings[1:]:
    other = pooled[pooled.method == f"permkv_rlm_{name}"].sort_values("ratio")
    axes[1].errorbar([f"{r:g}x" for r in other.ratio], other.score, yerr=[other.score - other.ci_low, other.ci_high - other.score],
                     fmt="s", capsize=4, label=f"permkv scripted RLM ({name})")
for method, style in (("truncated", "--"), ("official_rlm", ":")):
    row = pooled[pooled.method == method]
    if len(row):
        axes[1].axhline(float(row.score.iloc[0]), ls=style, color="gray" if method == "truncated" else "red",
                        label=f"{method} (n={int(row.n.iloc[0])})")
axes[1].set(xlabel="KV compression ratio", ylabel="accuracy", ylim=(-0.05, 1.05), title=f"{cfg.model}, n per point = "
            f"{int(rlm_rows.n.min()) if len(rlm_rows) else 0}")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The official client's runs
# The root model must write ```repl``` code that calls `llm_query` on slices of `context` (the paper:
# small models struggle without coding ability). `calls` counts its root turns and sub-calls as the
# server saw them; the answer and any error are kept as they came.

# %%
official = pd.DataFrame([r for r in rows if r["method"] == "official_rlm"])
official[["task", "doc", "score", "calls", "tokens_read", "wall_s", "answer", "error"]] if len(official) else official

# %% [markdown]
# ## Log to MLflow
# `claim.rlm_read_calls_8x` / `claim.rlm_read_calls_1x`: document-reading calls at 8x and 1x (the
# seed: 4 and 25); `claim.rlm_quality_retention_8x`: the 8x RLM's accuracy over the 1x RLM's on the
# same documents (the seed: 96%).

# %%
metrics = claim_metrics(rows)
tracking.publish("05_recursive_lm", cfg, PROFILE, metrics, figures={"calls_accuracy.png": fig},
                 tables={"summary": table, "rows": pd.DataFrame(rows).drop(columns=["trace"], errors="ignore"),
                         "example": example})
{k: round(v, 3) for k, v in metrics.items() if k.startswith("claim.")}
