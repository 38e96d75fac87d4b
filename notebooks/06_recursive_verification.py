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
# # 06 · Recursive verification under a KV budget
# The seed claims that 8x compression "lets RVS keep 64K instead of 8K reasoning tokens". No
# established method carries that name (ANCHORS.md s6), so we build its two established pieces and
# measure the trade-off: a trace **compressed while it is written** (R-KV: every `BUFFER` tokens,
# score = 0.1 importance - 0.9 redundancy, evict per head down to the budget on the paged cache)
# and **factored verification** (Chain-of-Verification: each step of the trace is re-asked of the
# original input by a sub-call that never sees the draft; inputs larger than a sub-call's budget
# are halved recursively; the answer is revised from the checked steps), against the full cache
# and self-consistency. Task: write back a list of k words in order (a walk over the list, one
# lookup per step), the kind of task SmolLM2-135M does at all: it fails running sums, arithmetic
# chains and variable tracking at full cache (0/3 each in our probes).

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from permkv.experiments.recursive_verification import RVSConfig, choose, claim_metrics, paired_table, run_grid, summary
from permkv.harness import tracking
from permkv.harness.config import from_params
from permkv.models import load_model

# %% tags=["parameters"]
PROFILE = "quick"
MODEL = "smollm2-135m"  # a bundled name, a saved Hugging Face folder or a .gguf file (permkv.models.load_model)
SIZES = [6]  # candidate list lengths (words); kept where the full cache reaches MIN_FULL_ACCURACY
N_SIZE_PROBE = 1  # instances per size for that full-cache probe
METRIC = "recall"  # "recall": in-order fraction of the list; "exact": the whole list right
MIN_FULL_ACCURACY = 0.75  # keep sizes whose full-cache METRIC reaches this
N_SAMPLES = 1  # instances per kept size; every cell answers the same ones (paired)
RATIOS = [1, 8]  # tokens reasoned per token held (1: the trace is cut at the budget)
BUDGET = 0  # trace tokens held per (layer, KV head); 0: median full trace of the longest kept size / max(RATIOS)
BUFFER = 1  # tokens between compressions (R-KV: 128, scaled to these short traces)
WINDOW = 2  # recent tokens never evicted
SCORER = "rkv"  # "rkv" or a permkv.compress scorer name
SUBCALL_TOKENS = 24  # KV tokens a verification sub-call may take; larger inputs are halved
MAX_DEPTH = 3
SC_VOTES = 2  # self-consistency traces per instance (one per instruction phrasing)
SC_RATIOS = [8]
SEED = 0

# %%
cfg = from_params(RVSConfig, globals())
model, tokenizer, spec = load_model(cfg.model)

# %% [markdown]
# ## Which sizes does the full-cache model do?
# In-order recall (fraction of the list written back in order), exact accuracy (the whole list
# right) and trace length at each candidate size; sizes whose `METRIC` reaches `MIN_FULL_ACCURACY`
# are kept, and the budget is the longest kept size's median trace divided by
# the largest ratio: at 8x that trace just fits, at 1x it is cut to an eighth.

# %%
probe, sizes, budget = choose(model, tokenizer, cfg)
probe_table = pd.DataFrame(probe).groupby("size")[["exact", "recall", "tokens"]].mean().reset_index()
print(f"kept sizes {sizes}, budget {budget} trace tokens per head")
probe_table.round(3)

# %% [markdown]
# ## Accuracy against tokens reasoned per token held
# Per kept size and ratio: the draft ("no_verify"), the same draft verified and revised ("verify"),
# self-consistency over phrasings at the same ratio; dashed: the full cache on the same instances.
# Mean `METRIC` (recall by default; exact accuracy in `exact_table`), 95% bootstrap CI, n.

# %%
rows = run_grid(model, tokenizer, cfg, sizes, budget)
table = pd.DataFrame(summary(rows, cfg.metric))
exact_table = pd.DataFrame(summary(rows, "exact"))
cells = table[table.method != "full"]
fig_acc, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.5), squeeze=False)
for ax, k in zip(axes[0], sizes):
    sns.lineplot(data=cells[cells["size"] == k], x="ratio", y="mean", hue="method", marker="o", ax=ax)
    ax.axhline(table[(table["size"] == k) & (table.method == "full")]["mean"].mean(), ls="--", color="k", lw=1)
    ax.set(xscale="log", title=f"{k} words, budget {budget}", ylabel=cfg.metric, ylim=(-0.05, 1.05))
    ax.set_xscale("log", base=2)
plt.tight_layout()
plt.show()
table.round(3)

# %% [markdown]
# ## Paired differences
# verify - no_verify (same draft), no_verify - full cache, verify - self-consistency: mean and
# paired 95% bootstrap CI over the same instances.

# %%
paired = pd.DataFrame(paired_table(rows, cfg.metric))
paired.round(3)

# %% [markdown]
# ## Cost: tokens generated and held, compressions, sub-calls, flipped answers, wall time

# %%
grid = pd.DataFrame(rows)
cost = grid[grid.method.isin(["no_verify", "verify"])].groupby(["size", "ratio", "method"])[
    ["tokens_generated", "tokens_held", "trace_held", "compressions", "sub_calls", "sub_call_tokens",
     "max_depth_used", "failed_claims", "answer_flipped", "seconds"]].mean().reset_index()
cost.round(2)

# %% [markdown]
# ## Claims
# `claim.rvs_tokens_reasoned_ratio_8x`: tokens reasoned at 8x / at 1x in the same KV;
# `claim.rvs_quality_retention_8x`: accuracy at 8x / full cache (largest kept size);
# `claim.rvs_verification_gain_ci_low`: lower end of the paired CI of verify - no_verify where the
# gain is largest (above 0: verification helps).

# %%
metrics = claim_metrics(rows, cfg.metric)
metrics.update({f"exact.{k}": v for k, v in claim_metrics(rows, "exact").items() if not k.startswith("claim.")})
metrics["rvs_budget"] = float(budget)
for r in table.itertuples():
    metrics[f"acc.{r.size}.{r.method}.{r.ratio:g}x"] = r.mean
    metrics[f"n.{r.size}.{r.method}.{r.ratio:g}x"] = r.n
tracking.publish("06_recursive_verification", cfg, PROFILE, metrics, figures={"accuracy.png": fig_acc},
                 tables={"summary": table, "summary_exact": exact_table, "paired": paired, "probe": pd.DataFrame(probe),
                         "rows": grid})
pd.Series(metrics).round(3)
