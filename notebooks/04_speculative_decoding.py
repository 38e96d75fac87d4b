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
# # 04 · Prompt-lookup speculative decoding
# Prompt lookup drafts the next tokens by matching the last few tokens against the prompt and the text
# generated so far; the model verifies all drafts in one forward pass and keeps the longest prefix that
# agrees with its own greedy choices (plus its next token), so the output is exactly greedy's. We time
# plain greedy, Hugging Face's built-in (`model.generate(..., prompt_lookup_num_tokens=k)`) and
# permkv's speculator (`PromptLookup` + `Backoff`) side by side on the same prompts, check every
# output against greedy, and test two claims: the seed's "40-70% speedup" and prompt lookup's own
# "~2.4x on input-grounded tasks" (ANCHORS.md s4; measured there on Mistral-7B on an A100).

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from permkv.experiments.speculative_decoding import (
    SpeculationConfig,
    claim_metrics,
    compare,
    pooled,
    summarize,
    sweep_curves,
    sweep_methods,
    workload_texts,
)
from permkv.harness import tracking
from permkv.harness.config import from_params
from permkv.models import load_model
from permkv.speculate import SpeculativeDecodingEngine

# %% tags=["parameters"]
PROFILE = "quick"
MODEL = "smollm2-135m"  # a bundled name, a saved Hugging Face folder or a .gguf file (permkv.models.load_model)
WORKLOADS = ["code_edit", "quote", "squad_qa", "open_ended"]
N_PROMPTS = 1  # prompts per workload
MAX_NEW_TOKENS = 16
REPEATS = 1  # timing repeats per (prompt, method); the median is kept
K = 10  # draft length, the same for HF's built-in and permkv
MAX_NGRAM = 3  # longest suffix matched, the same for both
SWEEP_WORKLOADS = ["quote"]
SWEEP_NGRAMS = [1, 3]
SWEEP_KS = [4, 10]
SWEEP_PROMPTS = 1
SWEEP_MAX_NEW_TOKENS = 16
THREADS = 1  # torch CPU threads (the machine is shared; 0 keeps torch's default)
SEED = 0

# %%
cfg = from_params(SpeculationConfig, globals())
if cfg.threads:
    torch.set_num_threads(cfg.threads)
model, tokenizer, spec = load_model(cfg.model)

# %% [markdown]
# ## Worked example: the seed's knock-knock joke
# The seed's picture: after "Knock, knock!" the drafts "Who's there?" come from the lookup corpus and
# are verified in one pass. `generate_with_speculation` also runs plain greedy and reports the
# measured speedup (it raises if the outputs differ).

# %%
engine = SpeculativeDecodingEngine(model, tokenizer, spec, k=cfg.k, max_ngram=cfg.max_ngram, max_new_tokens=32)
joke = "Knock, knock! Who's there? Lettuce. Lettuce who? Lettuce in, it's cold out here!"
knock = engine.generate_with_speculation(
    "Tell me the lettuce knock-knock joke.", "Knock, knock!", lookup_corpus=joke, measure_speedup=True
)
print("accepted:", repr(knock.accepted))
print("drafts (tokens):", knock.candidates[:4])
print(f"speedup {knock.speedup:.2f}x, acceptance {knock.stats.acceptance_rate:.2f}, "
      f"tokens per pass {knock.stats.tokens_per_pass:.2f}")

# %% [markdown]
# ## Methods side by side
# `permkv_raw` is the same lookup without `Backoff`, to show what backing off buys on open-ended text.
# `speedup` is end to end (prefill included, as a user sees it); `decode_speedup` leaves the prefill
# out and exists only for permkv's own loop, which times its prefill (HF's `generate` does not).

# %%
prompts = {w: workload_texts(w, cfg.n_prompts, cfg.seed) for w in cfg.workloads}
timings = compare(model, tokenizer, spec, prompts, cfg.methods, cfg.max_new_tokens, cfg.repeats)
table = pd.DataFrame(summarize(timings) + pooled(timings))
table.round(3)

# %%
fig_methods, ax = plt.subplots(figsize=(9, 4))
wide = table.pivot(index="workload", columns="method", values="speedup")
wide.plot.bar(ax=ax)
ax.axhline(1.0, color="k", lw=0.8)
ax.set(ylabel="speedup over plain greedy (x)", title=f"{cfg.model}, {cfg.max_new_tokens} new tokens, k={cfg.k}")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
plt.xticks(rotation=0)
plt.tight_layout()
plt.show()
assert table.all_identical.all(), "a method's output differs from plain greedy"

# %% [markdown]
# ## Sweeps: max n-gram and draft length
# Every (max n-gram, k) pair against plain greedy on the same prompts, in one interleaved run.

# %%
sweep_prompts = {w: workload_texts(w, cfg.sweep_prompts, cfg.seed) for w in cfg.sweep_workloads}
sweep_timings = compare(model, tokenizer, spec, sweep_prompts, sweep_methods(list(cfg.sweep_ngrams), list(cfg.sweep_ks)),
                        cfg.sweep_max_new_tokens, cfg.repeats)
sweep = pd.DataFrame(summarize(sweep_timings) + pooled(sweep_timings, cfg.sweep_workloads, "all"))
sweep = sweep[sweep.method != "greedy"].copy()
sweep["k"] = sweep.method.str.extract(r"k=(\d+)").astype(int)
sweep["max_ngram"] = sweep.method.str.extract(r"n=(\d+)").astype(int)
sweep.round(3)

# %%
fig_sweep, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for n, rows in sweep[sweep.workload == "all"].groupby("max_ngram"):
    axes[0].plot(rows.k, rows.speedup, "o-", label=f"max n-gram {n}")
axes[0].axhline(1.0, color="k", lw=0.8)
axes[0].set(xlabel="draft length k", ylabel="speedup over greedy (x)", title="Speedup vs draft length")
axes[0].legend()
per_workload = sweep[sweep.workload != "all"]
for w, rows in per_workload.groupby("workload"):
    axes[1].scatter(rows.acceptance_rate, rows.speedup, label=w)
axes[1].axhline(1.0, color="k", lw=0.8)
axes[1].set(xlabel="acceptance rate (accepted / drafted)", ylabel="speedup over greedy (x)",
            title="Acceptance vs speedup")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Where it loses
# Open-ended text has little to copy: drafts mostly fail and each failed draft makes a forward pass
# wider. `Backoff` pauses drafting after repeated misses; the rows below show the cost that remains,
# and what the raw lookup would cost without it.

# %%
table[table.workload == "open_ended"].round(3)

# %% [markdown]
# ## Log to MLflow
# `claim.speculative_speedup_grounded`: permkv's tokens/s over plain greedy, pooled over the
# input-grounded workloads (code edit, quote, SQuAD), prefill included, outputs identical to greedy.

# %%
metrics = claim_metrics(table.to_dict("records"), cfg, knock.speedup)
tracking.publish("04_speculative_decoding", cfg, PROFILE, metrics,
                 figures={"methods.png": fig_methods, "sweep.png": fig_sweep}, tables={"methods": table, "sweep": sweep},
                 curves=sweep_curves(sweep.to_dict("records")))
{k: round(v, 3) for k, v in metrics.items()}
