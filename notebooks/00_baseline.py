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
# # 00 · Full-cache baseline
# The reference that every compression result divides by: each model's score on every task at
# full KV cache (mean, 95% bootstrap CI, sample count), perplexity on held-out essays, and prefill /
# per-token decode time against context length. Everything here is measured on the real models.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from permkv.harness import tracking
from permkv.experiments.baseline import score_grid, timing_grid
from permkv.models import load_model

# %% tags=["parameters"]
PROFILE = "quick"
MODELS = ["smollm2-135m"]  # any of permkv.models.MODELS
TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "squad", "hotpot", "perplexity"]
LENGTHS = {"smollm2-135m": [512], "gemma3-270m": [512]}  # context tokens per model
N_SAMPLES = 2  # samples per (model, task, length)
MODE = "query_aware"  # or "query_agnostic": same prompts, only the compressor's view differs
MAX_NEW_TOKENS = 24
TIMING_LENGTHS = {"smollm2-135m": [512], "gemma3-270m": [512]}
TIMING_REPEATS = 2
SEED = 0

# %%
params = dict(models=MODELS, tasks=TASKS, lengths=LENGTHS, n_samples=N_SAMPLES, mode=MODE,
              max_new_tokens=MAX_NEW_TOKENS, timing_lengths=TIMING_LENGTHS, timing_repeats=TIMING_REPEATS, seed=SEED)
out_dir = tracking.ROOT / "reports" / PROFILE
out_dir.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Scores and timings

# %%
scores, timings = [], []
for name in MODELS:
    model, tokenizer, spec = load_model(name)
    scores += score_grid(model, tokenizer, spec, TASKS, LENGTHS[name], N_SAMPLES, MODE, SEED, MAX_NEW_TOKENS)
    timings += timing_grid(model, tokenizer, spec, TIMING_LENGTHS[name], repeats=TIMING_REPEATS)
    del model
scores = pd.DataFrame(scores)
timings = pd.DataFrame(timings)
scores.round(3)

# %%
timings.round(4)

# %% [markdown]
# ## Score against context length
# Perplexity (lower is better) is drawn apart from the task scores (higher is better).

# %%
tasks = scores[scores.task != "perplexity"]
fig_scores = sns.relplot(data=tasks, x="context_tokens", y="score", hue="task", col="model", kind="line",
                         marker="o", height=3.5, aspect=1.2).fig
for ax in fig_scores.axes:
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
fig_scores.suptitle(f"Full-cache score ({MODE}, n={N_SAMPLES} per point)", y=1.03)
plt.show()

# %%
fig_time, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for name, rows in timings.groupby("model"):
    axes[0].plot(rows.context_tokens, rows.prefill_s, "o-", label=name)
    axes[1].plot(rows.context_tokens, rows.decode_step_s * 1000, "o-", label=name)
axes[0].set(xlabel="context tokens", ylabel="prefill (s)", title="Prefill time")
axes[1].set(xlabel="context tokens", ylabel="decode step (ms)", title="Per-token decode time")
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Log to MLflow
# Claim metrics: the needle score at up to 4K tokens (ANCHORS.md s8 saw 6/6 at 3.5K) and Gemma-3's
# held-out essay perplexity (about 22 with a correct tokenizer).

# %%
metrics = {}
for row in scores.itertuples():
    key = f"{row.model}.{row.task}.{row.context_tokens}"
    metrics[f"score.{key}"] = row.score
    metrics[f"ci_low.{key}"] = row.ci_low
    metrics[f"ci_high.{key}"] = row.ci_high
for row in timings.itertuples():
    metrics[f"prefill_s.{row.model}.{row.context_tokens}"] = row.prefill_s
    metrics[f"decode_step_s.{row.model}.{row.context_tokens}"] = row.decode_step_s
needle = scores[(scores.task == "niah_single") & (scores.context_tokens <= 4096)]
if len(needle):
    metrics["claim.niah_single_full_cache"] = needle.score.mean()
gemma_ppl = scores[(scores.task == "perplexity") & (scores.model == "gemma3-270m")]
if len(gemma_ppl):
    metrics["claim.gemma_perplexity"] = gemma_ppl.score.mean()

scores.to_csv(out_dir / "00_baseline_scores.csv", index=False)
timings.to_csv(out_dir / "00_baseline_timings.csv", index=False)
fig_scores.savefig(out_dir / "00_baseline_scores.png", bbox_inches="tight")
fig_time.savefig(out_dir / "00_baseline_timings.png", bbox_inches="tight")
with tracking.run("00_baseline", params, PROFILE):
    tracking.log_metrics(metrics)
    tracking.log_figure(fig_scores, "scores.png")
    tracking.log_figure(fig_time, "timings.png")
    tracking.log_dict(scores.to_dict("records"), "scores.json")
    tracking.log_dict(timings.to_dict("records"), "timings.json")
{k: round(v, 4) for k, v in metrics.items() if k.startswith("claim.")}
