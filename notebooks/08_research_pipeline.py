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
# # 08 · A multi-module research pipeline at one KV budget per module
# The seed: a "Deep Research Agent" whose modules 1, 2 and 3 each take 8K tokens of input, so that a
# 64K-token corpus is truncated between modules ("multi-module pipelines lose context across
# modules"); with 8x compression each module holds the whole 64K corpus in the same 8K of KV ("full
# context"). The seed gives no source or measurement for either; this notebook measures the
# comparison on a small model, scaled: a corpus of `CORPUS_TOKENS` tokens and a KV budget per module of
# `CORPUS_TOKENS / RATIO` tokens per head for it.
#
# Each question has its own corpus (Paul Graham essays with a 7-digit needle; `TASK` can also hide
# several needles, one asked, or HotpotQA's gold paragraphs among distractors). Three scripted modules
# answer it, and every one reads the corpus (its prompt is the corpus, then its own text):
# 1. **plan**: name the key terms of the question (what to look for);
# 2. **search**: quote the corpus's sentence that answers the question, given the plan (its notes);
# 3. **answer**: the final short answer, from the question, the notes and the corpus.
#
# The arms hold the same KV for the corpus in every module:
# - `truncated`: the corpus cut in the middle to the budget (the seed's "before");
# - `recompressed`: each module reads the whole corpus and compresses it to the budget itself
#   (KVzip-style re-reading, one global top-k, query-agnostic): one prefill and one re-read per module;
# - `shared`: one `ContextCache` of the corpus at the ratio, forked by every module: one prefill and one
#   re-read for the whole pipeline. It compresses as `recompressed` does, so it must give the same
#   tokens (checked on every question: `same_as_shared`); the two differ in cost only;
# - `full`: the uncompressed corpus (the reference; it holds `RATIO` times the KV).
#
# `truncated` and `full` read their prefix once and fork it too (a prefix cache: the cheapest pipeline of
# each). Compression saves KV, not positions: the corpus must fit the model's window (SmolLM2: 8K),
# so the seed's 64K corpus is out of reach here; the `full` and `gpu` profiles (not run yet) take
# Gemma-3-270m (32K positions) to 16K and 32K-token corpora.
#
# What this measures and what it does not: the answer quality of a scripted pipeline at one KV budget
# per module, and the prompt tokens the model computes; not an agent that chooses what to read.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from permkv.experiments.research_pipeline import PipelineConfig, claim_metrics, run_grid, summarize
from permkv.harness import tracking
from permkv.harness.config import from_params
from permkv.models import load_model

# %% tags=["parameters"]
PROFILE = "quick"
MODEL = "smollm2-135m"  # a bundled name, a saved Hugging Face folder or a .gguf file (permkv.models.load_model)
TASK = "niah_single"
N_QUESTIONS = 1
CORPUS_TOKENS = 300
RATIO = 4.0
N_NEEDLES = 4
MAX_NEW_TOKENS = 4
ARMS = ["truncated", "recompressed", "shared", "full"]
CHUNK_TOKENS = 0
THREADS = 1
SEED = 0

# %%
cfg = from_params(PipelineConfig, globals())
if cfg.threads:
    torch.set_num_threads(cfg.threads)
model, tokenizer, spec = load_model(cfg.model)
print(f"{cfg.n_questions} questions, {cfg.corpus_tokens}-token corpora, {cfg.ratio:g}x: "
      f"a budget of ~{cfg.budget} KV tokens per head for the corpus in every module")

# %% [markdown]
# ## Every arm on the same questions
# `score`: the final answer (module 3) contains the gold answer (first line), with a 95% bootstrap CI
# over questions; `notes_score`: the same for module 2's notes. `prompt_tokens`: tokens the model
# computed before decoding, for the whole pipeline (reading and re-reading the corpus, each module's
# own prompt); `decode_tokens`: the tokens written. `context_kv_bytes`: the KV each module held for the
# corpus (mean); `kv_bytes`: the most any module's sequence held at its end (corpus and its own tokens).

# %%
rows = run_grid(model, tokenizer, spec, cfg)
table = pd.DataFrame(summarize(rows))
table.round(3)

# %% [markdown]
# ## One question, arm by arm
# What each module wrote on the first question (the plan, the notes, the final answer), beside the gold
# answer; `same_as_shared`: the recompressed arm's tokens were the shared arm's in every module.

# %%
example = pd.DataFrame([{k: r.get(k) for k in ("arm", "gold", "score", "plan", "notes", "answer", "same_as_shared")}
                        for r in rows if r["question"] == 0])
example

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
arms = list(table.arm)
err = np.array([table.score - table.ci_low, table.ci_high - table.score])
axes[0].bar(arms, table.score, yerr=err, capsize=4, color="tab:blue")
axes[0].set(ylabel="final-answer accuracy", ylim=(0, 1.05),
            title=f"{cfg.model}: {cfg.corpus_tokens}-token corpus, {cfg.budget}-token KV budget per module "
                  f"(n={int(table.n.min())})")
axes[0].tick_params(axis="x", labelsize=9)
context = table.context_prompt_tokens
axes[1].bar(arms, context, label="reading the corpus (prefill + re-read)")
axes[1].bar(arms, table.prompt_tokens - context, bottom=context, label="modules' own prompts")
axes[1].set(ylabel="prompt tokens computed per pipeline", title="tokens the model computed before decoding")
axes[1].legend(fontsize=8)
axes[1].tick_params(axis="x", labelsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Log to MLflow
# `claim.pipeline_shared_vs_truncated`: shared - truncated final-answer accuracy on the same questions,
# with the lower end of its paired bootstrap 95% CI as `.low` (the ledger's "full context across modules":
# reproduced when `.low` > 0); `claim.pipeline_shared_retention`: shared accuracy / full accuracy (what
# 8x costs against the uncompressed corpus); `claim.pipeline_prefill_saving`: prompt tokens computed by
# recompressed / by shared (the ledger's "one compressed read serves every module": 3 modules give at
# most ~3x, less the modules' own prompts).

# %%
metrics = claim_metrics(rows)
tracking.publish("08_research_pipeline", cfg, PROFILE, metrics, figures={"score_tokens.png": fig},
                 tables={"summary": table, "rows": pd.DataFrame(rows).drop(columns=["tokens"]), "example": example})
{k: round(v, 3) for k, v in metrics.items() if k.startswith(("claim.", "pipeline."))}
