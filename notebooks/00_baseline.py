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
# # 00 · Full-cache baseline
# The reference that every compression result divides by: each model's score on every task at
# full KV cache (mean, 95% bootstrap CI, sample count), perplexity on held-out essays, and prefill /
# per-token decode time against context length. Everything here is measured on the real models.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from permkv.experiments.baseline import BaselineConfig, claim_metrics, curves, score_grid, timing_grid
from permkv.harness import tracking
from permkv.harness.config import from_params
from permkv.models import load_model

# %% tags=["parameters"]
PROFILE = "quick"
MODELS = ["smollm2-135m"]  # bundled names, saved Hugging Face folders or .gguf files (permkv.models.load_model)
TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "squad", "hotpot", "perplexity"]
LENGTHS = {"smollm2-135m": [512], "gemma3-270m": [512]}  # context tokens per model
N_SAMPLES = 2  # samples per (model, task, length)
MODE = "query_aware"  # or "query_agnostic": same prompts, only the compressor's view differs
MAX_NEW_TOKENS = 24
TIMING_LENGTHS = {"smollm2-135m": [512], "gemma3-270m": [512]}
TIMING_REPEATS = 2
SEED = 0

# %%
cfg = from_params(BaselineConfig, globals())

# %% [markdown]
# ## Scores and timings

# %%
scores, timings = [], []
for name in cfg.models:
    model, tokenizer, spec = load_model(name)
    scores += score_grid(model, tokenizer, spec, cfg.tasks, cfg.lengths[name], cfg.n_samples, cfg.mode, cfg.seed,
                         cfg.max_new_tokens)
    timings += timing_grid(model, tokenizer, spec, cfg.timing_lengths[name], repeats=cfg.timing_repeats)
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
fig_scores.suptitle(f"Full-cache score ({cfg.mode}, n={cfg.n_samples} per point)", y=1.03)
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
metrics = claim_metrics(scores.to_dict("records"), timings.to_dict("records"))
tracking.publish("00_baseline", cfg, PROFILE, metrics, figures={"scores.png": fig_scores, "timings.png": fig_time},
                 tables={"scores": scores, "timings": timings}, curves=curves(scores.to_dict("records")))
{k: round(v, 4) for k, v in metrics.items() if k.startswith("claim.")}
