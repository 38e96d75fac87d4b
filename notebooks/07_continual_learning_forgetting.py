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
# # 07 · Continual learning: sparse memory finetuning vs full finetuning vs LoRA
#
# Claim (ANCHORS.md section 7, Lin et al. 2025, arXiv 2510.15103): after learning new facts, a held-out
# QA score drops 89% with full finetuning, 71% with LoRA and 11% with sparse memory finetuning, at equal
# new-knowledge acquisition. Here: SmolLM2-135M with a product-key memory at one decoder layer,
# pretrained briefly on essays + SQuAD paragraphs; fictional facts learned as statements and tested with
# questions worded differently; forgetting = relative drop of SQuAD-with-passage F1 (plus held-out essay
# perplexity and world facts the starting model knew). Each method sweeps its learning rate; forgetting is
# compared at the checkpoint whose fact accuracy is closest to the level every method reaches.
#
# What differs from the paper: its memory (1M slots) is trained with the model from scratch, so the
# model relies on it; here a small memory is bolted onto a finished 135M model at an early layer (the
# subject's tokens read subject-specific slots there), its inputs standardised with background
# statistics, and only its values pretrained briefly with the model frozen. A background "document"
# for TF-IDF is one token (batch-level counts saturate on a memory this small). Each fact is trained
# as three statements and three questions (paraphrases, as the paper's document setting augments) and
# tested with a fourth question wording never trained; every method gets the same texts and steps.
# Facts are invented (names from random syllables, ordinary-word answers), forgetting is
# SQuAD-with-passage F1 rather than NaturalQuestions, and all sizes are far smaller. Fact EM is
# "greedy decoding gives the answer as a whole word", computed by teacher forcing.

# %%
import math

import matplotlib.pyplot as plt
import pandas as pd

from permkv.data import make_facts
from permkv.experiments.continual_learning import (
    FORGET_PROBES, ExperimentConfig, claim_metrics, format_test, format_test_metrics, matched_comparison, prepare,
    run_method,
)
from permkv.harness import tracking
from permkv.knowledge import KnowledgeCache, MemoryConfig, domain_retention

# %% tags=["parameters"]
PROFILE = "quick"
N_KEYS = 64  # sub-keys per half; the memory has N_KEYS squared slots
MEMORY_HEADS = 4
TOP_K = 32
LAYER = 4
PRETRAIN_STEPS = 10
BACKGROUND_BATCHES = 8
N_FACTS = 8
BATCH_SIZE = 8
STEPS = 6
EVAL_EVERY = 6
N_SQUAD = 4
WORLD_MAX = 8
ESSAY_TOKENS = 128
SPARSE_TS = [500]
SPARSE_LRS = [30000.0]
FULL_LRS = [1e-4]
LORA_LRS = [1e-3]
DOMAIN_FACTS = 8
DOMAIN_STEPS = 4
FORMAT_TEST = True  # also run each sparse (t, lr) with the QA scaffolding's reads left out of the slot counts
FORGET_PROBE = "world_acc"  # the claim's forgetting probe: world_acc (closed-book facts, like the paper's NQ), squad_f1, essay_ppl
SEED = 0

# %%
cfg = ExperimentConfig(
    memory=MemoryConfig(n_keys=N_KEYS, heads=MEMORY_HEADS, top_k=TOP_K), layer=LAYER,
    pretrain_steps=PRETRAIN_STEPS, background_batches=BACKGROUND_BATCHES, n_facts=N_FACTS,
    batch_size=BATCH_SIZE, steps=STEPS, eval_every=EVAL_EVERY, n_squad=N_SQUAD, world_max=WORLD_MAX,
    essay_tokens=ESSAY_TOKENS, seed=SEED,
)

# %% [markdown]
# ## The shared starting model
# Memory inserted (values zero, so outputs unchanged), its inputs calibrated and its values pretrained
# on background text; slot usage and the "before" scores every method starts from.

# %%
start = prepare(cfg)
quarter = max(1, len(start.pretrain_losses) // 4)
first, last = start.pretrain_losses[:quarter], start.pretrain_losses[-quarter:]
print(f"memory pretraining loss, first vs last quarter of steps: {sum(first) / len(first):.3f} -> "
      f"{sum(last) / len(last):.3f} (different batches; only the memory's values train)")
print(f"slots read in the background set: {start.background.used_fraction:.1%} of {cfg.memory.n_slots}")
print(f"essay perplexity with the pretrained memory {start.before['essay_ppl']:.2f}, "
      f"without it (the plain model) {start.plain_essay_ppl:.2f}")
print("probe sizes:", start.probes.sizes())
print("before:", start.before, "| fictional facts before:", start.facts_before)

# %% [markdown]
# ## Learning-rate sweeps, same facts and step budget for every method

# %%
records = []
for t in SPARSE_TS:
    for lr in SPARSE_LRS:
        records += run_method(start, "sparse", lr, t)
for lr in FULL_LRS:
    records += run_method(start, "full", lr)
for lr in LORA_LRS:
    records += run_method(start, "lora", lr)
pd.DataFrame(records).round(3)  # NaN: a relative drop from a score of 0 before (undefined)

# %% [markdown]
# ## Forgetting at matched acquisition
# Read all three probes, not only the claim's. SmolLM2-135M answers few SQuAD questions even with the
# passage (F1 around 0.1-0.2 before training, a few dozen questions), so the relative SQuAD drop is
# noisy and can be negative; the world-fact probe (questions in the same "Q: ... A:" format as the
# training questions, all answered right before) and essay perplexity show interference directly.

# %%
if FORGET_PROBE not in FORGET_PROBES:
    raise ValueError(f"FORGET_PROBE must be one of {FORGET_PROBES}, got {FORGET_PROBE!r}")
claim_key = f"forget_{FORGET_PROBE}"
matched = matched_comparison(records, key=claim_key)
print(f"matched fact EM target: {matched['target_em']:.3f}")
if matched["target_em"] == 0:
    print("Some method learned no fact at all: there is no common acquisition level, so the forgetting "
          "below is at zero acquisition and the claim metrics are not logged.")
print(f"{'method':8} {'lr':>8} {'t':>6} {'step':>5} {'fact EM':>8} {'SQuAD F1':>9} {'forget F1':>10} "
      f"{'forget world':>13} {'ppl rise':>9}")
def pct(x: float) -> str:
    return f"{x:.1%}" if math.isfinite(x) else "undefined"  # a relative drop from a score of 0 before


for m in ("sparse", "full", "lora"):
    r = matched[m]
    print(f"{m:8} {r['lr']:8.0e} {str(r['t']):>6} {r['step']:5d} {r['fact_em']:8.3f} {r['squad_f1']:9.3f} "
          f"{pct(r['forget_squad_f1']):>10} {pct(r['forget_world_acc']):>13} {pct(r['forget_essay_ppl']):>9}")
if start.before["squad_f1"] == 0:
    print("SQuAD F1 was 0 before training: its relative drop is undefined and not logged.")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
colors = {"sparse": "tab:green", "full": "tab:red", "lora": "tab:blue"}
for ax, key, label in ((axes[0], claim_key, FORGET_PROBE.replace("_", " ") + " drop"), (axes[1], "forget_essay_ppl", "essay ppl rise")):
    for r in records:
        ax.scatter(r["fact_em"], 100 * r[key], color=colors[r["method"]], alpha=0.7,
                   label=r["method"])
    ax.axvline(matched["target_em"], color="gray", ls=":")
    ax.set_xlabel("fictional fact EM (held-out wording)")
    ax.set_ylabel(f"forgetting: {label} (%)")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys())
fig.suptitle(f"Acquisition vs forgetting, SmolLM2-135M ({PROFILE})")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Sparse method: sweep of t (slots updated per step)

# %%
sparse_last = [r for r in records if r["method"] == "sparse" and r["step"] == cfg.steps]
for r in sorted(sparse_last, key=lambda r: (r["t"], r["lr"])):
    print(f"t={r['t']:6d} lr={r['lr']:g}: fact EM {r['fact_em']:.3f}, SQuAD F1 drop {pct(r['forget_squad_f1'])}, "
          f"ppl rise {pct(r['forget_essay_ppl'])}")

# %% [markdown]
# ## The format-slot test (issue 16)
# Hypothesis: sparse finetuning forgets because TF-IDF picks slots read by the QA scaffolding ("Q", ":",
# "?", newline, "A"): the answer of every training question is predicted at the ":" after "A", so the
# gradient is largest on the slots that token reads, and writing a fact there reaches every question,
# the world-fact probe's included. Test: the same runs with the scaffolding's reads left out of the
# counts (slots are then chosen among those the question and statement words read). Below, both at the
# checkpoint closest to the matched acquisition level, and which tokens read the slots that were written.

# %%
format_rows = []
if FORMAT_TEST:
    skip_records = [r for t in SPARSE_TS for lr in SPARSE_LRS
                    for r in run_method(start, "sparse", lr, t, skip_format=True)]
    format_rows = format_test(records, skip_records, matched["target_em"])  # it keeps the sparse runs
    for r in format_rows:
        print(f"t={r['t']:5d} {r['counts']:11} step {r['step']:3d}: fact EM {r['fact_em']:.3f}, "
              f"world drop {pct(r['forget_world_acc'])}, SQuAD drop {pct(r['forget_squad_f1'])}, "
              f"ppl rise {pct(r['forget_essay_ppl'])}; scaffolding's share of the written slots' reads "
              f"{r['format_read_share']:.1%}; top readers {r['top_readers'][:5]}")
    fig_format, ax = plt.subplots(figsize=(8, 3.5))
    labels = [f"t={r['t']}\n{r['counts']}" for r in format_rows]
    for i, probe in enumerate(FORGET_PROBES):
        ax.bar([x + 0.27 * (i - 1) for x in range(len(format_rows))],
               [100 * r[f"forget_{probe}"] if math.isfinite(r[f"forget_{probe}"]) else 0 for r in format_rows],
               width=0.27, label=probe.replace("_", " "))
    ax.set_xticks(range(len(format_rows)), labels)
    ax.set_ylabel("forgetting (%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Sparse finetuning with and without the scaffolding's reads in the slot counts")
    fig_format.tight_layout()
    plt.show()

# %% [markdown]
# ## Domain A -> B: learn one fact set, then another; how much of A is kept

# %%
model, tokenizer, memory = start.fresh_model()
best_sparse = matched["sparse"]
cache = KnowledgeCache(model, tokenizer, memory, start.background, t=best_sparse["t"], lr=best_sparse["lr"],
                       batch_size=BATCH_SIZE, max_tokens=cfg.seq_len, seed=SEED)
facts_a, facts_b = make_facts(DOMAIN_FACTS, seed=SEED + 100), make_facts(DOMAIN_FACTS, seed=SEED + 200)
ret = domain_retention(cache, facts_a, facts_b, DOMAIN_STEPS)
retention = f"{ret.retention:.3f}" if ret.a_after_a > 0 else "undefined (A was not learned)"
print(f"A after A {ret.a_after_a:.3f}, A after B {ret.a_after_b:.3f}, B after B {ret.b_after_b:.3f}, "
      f"retention {retention}; {ret.slot_overlap:.1%} of A's slots also written by B")
top_a = cache.importance("A").topk(5)
print("most important slots for A:", top_a.indices.tolist())

# %% [markdown]
# ## Log to MLflow

# %%
metrics = claim_metrics(matched, start, ret, FORGET_PROBE) | format_test_metrics(format_rows)
figures = {"acquisition_vs_forgetting.png": fig} | ({"format_test.png": fig_format} if FORMAT_TEST else {})
tracking.publish("07_continual_learning_forgetting", cfg.to_params() | {"format_test": FORMAT_TEST}, PROFILE, metrics,
                 figures=figures, tables={"records": records, "matched": matched, "format_test": format_rows})
metrics
