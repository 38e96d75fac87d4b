"""Tests for permkv.knowledge on the real SmolLM2-135M (no mocks of the model)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from permkv.data import load_essays, make_facts, training_texts
from permkv.experiments.continual_learning import (
    ExperimentConfig, Sweep, arm, claim_metrics, forgetting, generate_answers, matched_by_seed, run_seeds, seed_table,
)
from permkv.knowledge import (
    FEW_SHOT, BackgroundCounts, KnowledgeCache, MemoryConfig, ProductKeyMemory, SparseMemoryTrainer, doc_counts,
    Retention, find_memory, greedy_match, insert_memory, memory_inserted, qa_format_tokens, remove_memory, slot_counts,
    tfidf_scores, top_t_slots,
)
from permkv.knowledge.train import (
    DenseTrainer, background_counts, calibrate_memory, collate, full_trainer, lora_model, token_windows, window_batches,
)
from permkv.models import load_model

SMALL = MemoryConfig(dim=576, n_keys=32, heads=2, top_k=8, key_dim=32)  # 1,024 slots: fast


@pytest.fixture()
def smol():
    """A fresh SmolLM2 per test: the tests below change weights."""
    return load_model("smollm2-135m")


def _filled_memory(seed: int = 0) -> ProductKeyMemory:
    memory = ProductKeyMemory(SMALL, seed=seed)
    with torch.no_grad():
        memory.values.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(seed))
    return memory


# --- the memory layer -------------------------------------------------------------------------


def test_insertion_leaves_logits_unchanged_and_removal_restores(smol):
    model, tok, _ = smol
    batch = tok(["The capital of France is", "Paul Graham wrote essays about startups and"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).logits
        with memory_inserted(model, ProductKeyMemory(MemoryConfig(n_keys=64)), layer=15) as memory:
            inserted = model(**batch).logits
            assert find_memory(model) is memory
            assert memory.last_indices.shape == (2, batch.input_ids.shape[1], 4, 32)
        after = model(**batch).logits
    assert (inserted - before).abs().max() <= 1e-5
    assert find_memory(model) is None
    assert torch.equal(after, before)


def test_lookup_shapes_weights_and_slot_range():
    memory = ProductKeyMemory(SMALL)
    x = torch.randn(3, 5, 576)
    indices, weights = memory.lookup(x)
    assert indices.shape == weights.shape == (3, 5, 2, 8)
    assert int(indices.min()) >= 0 and int(indices.max()) < SMALL.n_slots
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5, 2))
    # the 8 slots read per head and token are distinct
    assert all(len(set(row.tolist())) == 8 for row in indices.reshape(-1, 8))
    assert memory(x).shape == (3, 5, 576)


def test_bad_memory_inputs(smol):
    model, _, _ = smol
    with pytest.raises(ValueError, match="layer must be in \\[0, 30\\)"):
        insert_memory(model, ProductKeyMemory(SMALL), layer=30)
    with pytest.raises(ValueError, match="layer must be in"):
        insert_memory(model, ProductKeyMemory(SMALL), layer=-1)
    with pytest.raises(ValueError, match="hidden size 576"):
        insert_memory(model, ProductKeyMemory(MemoryConfig(dim=64, n_keys=8, top_k=4)), layer=3)
    with pytest.raises(ValueError, match="top_k"):
        MemoryConfig(n_keys=8, top_k=16)
    insert_memory(model, ProductKeyMemory(SMALL), layer=3)
    with pytest.raises(ValueError, match="already has a memory"):
        insert_memory(model, ProductKeyMemory(SMALL), layer=3)
    assert remove_memory(model) is not None and remove_memory(model) is None


# --- TF-IDF ranking -----------------------------------------------------------------------------


def test_tfidf_on_a_hand_made_count_table():
    # 4 background documents (sequences) over 6 slots; a slot read twice in one document counts once:
    # per-slot document frequency [4, 1, 1, 0, 4, 0]
    indices = torch.tensor([[[[0, 1, 4]], [[0, 1, 0]]], [[[0, 4, 0]], [[4, 4, 4]]],
                            [[[2, 0, 4]], [[2, 2, 2]]], [[[4, 0, 4]], [[3, 3, 3]]]])  # (4, seq 2, 1, 3)
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])  # the last document's 2nd token is padding
    background = BackgroundCounts.empty(6)
    background.add(doc_counts(indices, 6, mask), n_docs=4)
    assert background.doc_freq.tolist() == [4, 1, 1, 0, 4, 0] and background.n_docs == 4
    with pytest.raises(ValueError, match="n_docs must be >= 1"):
        background.add(torch.tensor([0, 0, 3, 0, 0, 0]), n_docs=2)
    counts = torch.tensor([10, 2, 4, 1, 3, 0])  # this batch's reads (20 in all)
    scores = tfidf_scores(counts, background)
    idf = [math.log(5 / 5), math.log(5 / 2), math.log(5 / 2), math.log(5 / 1), math.log(5 / 5), math.log(5 / 1)]
    expected = [c / 20 * i for c, i in zip(counts.tolist(), idf)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    # slot 2 (4 reads, rare: 0.183) > slot 1 (2 reads, rare: 0.092) > slot 3 (1 read, never seen: 0.080)
    # > slots 0 and 4 (read by every background token: 0), whose tie goes to the larger count
    assert top_t_slots(counts, background, 3).tolist() == [2, 1, 3]
    # only accessed slots are eligible: asking for all 6 returns the 5 read ones
    assert top_t_slots(counts, background, 6).tolist() == [2, 1, 3, 0, 4]


def test_bad_t_and_count_shapes():
    background = BackgroundCounts.empty(6)
    with pytest.raises(ValueError, match=r"t must be in \[1, 6\].*got 7"):
        top_t_slots(torch.ones(6, dtype=torch.long), background, 7)
    with pytest.raises(ValueError, match="one entry per slot"):
        tfidf_scores(torch.ones(5, dtype=torch.long), background)


def test_slot_counts_skip_padding():
    indices = torch.tensor([[[[0, 1]], [[1, 2]]], [[[3, 3]], [[5, 5]]]])  # (batch 2, seq 2, heads 1, k 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    assert slot_counts(indices, 6, mask).tolist() == [1, 2, 1, 2, 0, 0]


# --- sparse memory finetuning -------------------------------------------------------------------


def test_sparse_step_changes_only_the_top_t_value_rows(smol):
    model, tok, _ = smol
    memory = insert_memory(model, _filled_memory(), layer=20)
    background = BackgroundCounts.empty(SMALL.n_slots)
    with torch.no_grad():
        for text in ["Essays about startups and founders.", "The river flows through the old city."]:
            batch = tok([text], return_tensors="pt")
            model(**batch)
            background.add(doc_counts(memory.last_indices, SMALL.n_slots), n_docs=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = SparseMemoryTrainer(model, memory, background, t=10, lr=1.0)
    batch = collate(tok, training_texts(make_facts(4)), max_tokens=32)
    step = trainer.step(batch)
    assert len(step.slots) == 10
    changed = (memory.values.detach() != before["model.layers.20.mlp.memory.values"]).any(dim=1)
    assert changed.any()
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(step.slots.tolist())
    for name, p in model.named_parameters():
        if not name.endswith("memory.values"):
            assert torch.equal(p, before[name]), f"{name} changed"
    with pytest.raises(ValueError, match=r"t must be in \[1, 1024\]"):
        SparseMemoryTrainer(model, memory, background, t=SMALL.n_slots + 1, lr=1.0)


@pytest.mark.slow
def test_skipping_format_tokens_never_writes_slots_only_they_read(smol):
    """The format-slot test: with the QA scaffolding skipped, no chosen slot is read only
    by "Q", ":", "?", newline or "A"; without it the scaffolding does read chosen slots."""
    model, tok, _ = smol
    memory = insert_memory(model, _filled_memory(), layer=4)
    background = BackgroundCounts.empty(SMALL.n_slots)
    batch = collate(tok, training_texts(make_facts(4)), max_tokens=32)
    fmt = torch.tensor(qa_format_tokens(tok))
    assert [tok.decode([i]) for i in fmt.tolist()] == [":", "?", "A", "Q", "\n"]
    plain = SparseMemoryTrainer(model, memory, background, t=400, lr=1e-9)
    plain.step(batch)
    assert plain.reads_by_token[fmt].sum() > 0
    skip = SparseMemoryTrainer(model, memory, background, t=400, lr=1e-9, skip_tokens=fmt.tolist())
    step = skip.step(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    content = mask & ~torch.isin(ids, fmt)
    read_by_content = set(memory.last_indices[content].flatten().tolist())
    assert set(step.slots.tolist()) <= read_by_content
    assert int(skip.reads_by_token.sum()) == int(torch.isin(memory.last_indices[mask], step.slots).sum())


@pytest.mark.slow
def test_sparse_finetuning_fits_the_facts(smol):
    # the failure this guards against: values that receive gradient but never learn (lr scale, idf ~ 0)
    model, tok, _ = smol
    memory = insert_memory(model, ProductKeyMemory(MemoryConfig(n_keys=64)), layer=4)
    windows = token_windows(tok(load_essays()[:20_000]).input_ids, 64)
    calibrate_memory(model, memory, window_batches(windows, 4, 2), progress=False)
    assert memory.input_std.min() > 0 and not torch.equal(memory.input_mean, torch.zeros(576))
    with pytest.raises(ValueError, match=r"x must be \(tokens >= 2, 576\)"):
        memory.calibrate(torch.zeros(3, 10))
    background = background_counts(model, memory, window_batches(windows, 4, 2, seed=1), progress=False)
    assert background.n_docs == 4 * 2 and background.used_fraction > 0.5  # calibrated reads spread out
    trainer = SparseMemoryTrainer(model, memory, background, t=2000, lr=3e4)
    batch = collate(tok, training_texts(make_facts(4, seed=2)), max_tokens=32)
    first = trainer.step(batch).loss
    for _ in range(6):
        last = trainer.step(batch).loss
    assert last < 0.6 * first


# --- facts and the baselines --------------------------------------------------------------------


def test_facts_are_seeded_distinct_and_test_questions_are_unseen():
    facts = make_facts(50, seed=3)
    assert facts == make_facts(50, seed=3) and facts != make_facts(50, seed=4)
    assert len({f.subject for f in facts}) == 50
    texts = "\n".join(training_texts(facts))
    for f in facts:
        assert f.answer in f.train_texts[0] and f.question not in texts
        assert f.question.split("\n")[0] not in texts
    with pytest.raises(ValueError, match="fact set is empty"):
        training_texts([])
    with pytest.raises(ValueError, match="n \\(number of facts\\)"):
        make_facts(0)


def test_greedy_match_agrees_with_generation(smol):
    model, tok, _ = smol
    prompt = FEW_SHOT + "Q: What is the capital of France?\nA:"
    generated = generate_answers(model, tok, [prompt], max_new_tokens=4)[0].rstrip(".").strip()
    assert generated  # whatever the model says, teacher forcing must agree with it
    wrong = "Berlin" if generated != "Berlin" else "Paris"
    assert greedy_match(model, tok, [prompt] * 3, [generated, wrong, generated[:-1]]) == [True, False, False]


def _loss_falls(model, tok, trainer, steps: int = 4) -> tuple[float, float]:
    batch = collate(tok, training_texts(make_facts(4, seed=1)), max_tokens=32)
    with torch.no_grad():
        first = float(model(**batch).loss)
    for _ in range(steps):
        trainer.step(batch)
    with torch.no_grad():
        last = float(model(**batch).loss)
    return first, last


@pytest.mark.slow
def test_full_finetuning_trains(smol):
    model, tok, _ = smol
    first, last = _loss_falls(model, tok, full_trainer(model, lr=1e-4), steps=3)
    assert last < first * 0.8


@pytest.mark.slow
def test_lora_trains_and_only_adapters_change(smol):
    model, tok, _ = smol
    base = model.model.layers[5].self_attn.q_proj.weight.detach().clone()
    model = lora_model(model, rank=8)
    first, last = _loss_falls(model, tok, DenseTrainer(model, lr=1e-3), steps=3)
    assert last < first * 0.8
    assert torch.equal(model.base_model.model.model.layers[5].self_attn.q_proj.base_layer.weight, base)


def test_knowledge_cache_domains(smol):
    model, tok, _ = smol
    memory = insert_memory(model, _filled_memory(), layer=20)
    cache = KnowledgeCache(model, tok, memory, BackgroundCounts.empty(SMALL.n_slots), t=20, lr=1.0, batch_size=4,
                           skip_tokens=qa_format_tokens(tok))
    assert cache.trainer.skip_tokens.tolist() == qa_format_tokens(tok)  # the sparse arm it learns with
    losses = cache.learn("A", make_facts(4, seed=5), steps=2)
    assert len(losses) == 2
    assert 0 < len(cache.slots("A")) <= 40
    assert cache.slot_overlap("A", "A") == 1.0
    with pytest.raises(ValueError, match="fact set is empty"):
        cache.learn("B", [], steps=1)
    with pytest.raises(ValueError, match="unknown domain"):
        cache.importance("C")


def test_forgetting_is_a_relative_drop():
    before = {"squad_f1": 0.5, "world_acc": 1.0, "essay_ppl": 20.0}
    after = {"squad_f1": 0.4, "world_acc": 0.75, "essay_ppl": 22.0}
    out = forgetting(before, after)
    assert out == pytest.approx({"forget_squad_f1": 0.2, "forget_world_acc": 0.25, "forget_essay_ppl": 0.1})


def _rec(seed, method, step, em, world, skip=False, t=None, share=None):
    r = {"seed": seed, "method": method, "lr": 1.0, "t": t, "step": step, "fact_em": em, "forget_world_acc": world,
         "forget_squad_f1": float("nan"), "forget_essay_ppl": 0.1}
    if method == "sparse":
        r |= {"skip_format": skip, "format_read_share": share, "top_readers": [(":", 0.1)]}
    return r


def test_sweep_runs_and_arms():
    sweep = Sweep([500, 2000], [3e4], [1e-4, 3e-5], [1e-3])
    assert sweep.runs()[:2] == [("sparse", 3e4, 500, False), ("sparse", 3e4, 500, True)]
    assert len(sweep.runs()) == 4 + 2 + 1
    assert sweep.arms() == ["sparse", "sparse_skip_format", "full", "lora"]
    assert Sweep([500], [3e4], [], [1e-3], skip_format=False).arms() == ["sparse", "lora"]
    assert arm({"method": "full"}) == "full" and arm(_rec(0, "sparse", 1, 0, 0, skip=True)) == "sparse_skip_format"


@pytest.mark.slow
def test_runs_in_worker_processes_match_one_process():
    cfg = ExperimentConfig(memory=SMALL, pretrain_steps=2, background_batches=2, n_facts=4, steps=2, eval_every=2,
                           n_squad=2, world_max=2, essay_tokens=64)
    sweep = Sweep([100], [3e4], [1e-4], [1e-3], skip_format=False)
    torch.manual_seed(123)  # run_method seeds itself: the global state before it must not matter
    _, serial = run_seeds([cfg], sweep, workers=1, progress=False)
    starts, parallel = run_seeds([cfg], sweep, workers=2, progress=False)
    assert starts[0].cfg == cfg and len(parallel) == len(sweep.runs())
    for a, b in zip(serial, parallel, strict=True):
        assert (a["arm"], a["lr"], a["step"], a["fact_em"]) == (b["arm"], b["lr"], b["step"], b["fact_em"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)  # one thread in the workers: rounding only
    with pytest.raises(ValueError, match="workers"):
        run_seeds([cfg], sweep, workers=0)


def test_matching_is_per_seed_and_per_arm():
    records = [
        _rec(0, "sparse", 15, 0.1, 0.9, t=500, share=0.3), _rec(0, "sparse", 45, 0.3, 1.0, t=500, share=0.3),
        _rec(0, "sparse", 45, 0.4, 0.2, skip=True, t=500, share=0.01),
        _rec(0, "full", 15, 0.3, 0.1), _rec(0, "full", 45, 0.9, 0.1),
        _rec(0, "lora", 45, 0.3, 0.5),
        # seed 1 learns less: its own target
        _rec(1, "sparse", 45, 0.1, 0.8, t=500, share=0.4), _rec(1, "sparse", 45, 0.2, 0.4, skip=True, t=500, share=0.02),
        _rec(1, "full", 45, 0.2, 0.3), _rec(1, "lora", 45, 0.1, 0.7),
    ]
    matched = matched_by_seed(records)
    assert matched[0]["target_em"] == 0.3 and matched[1]["target_em"] == 0.1
    assert matched[0]["sparse_skip_format"]["fact_em"] == 0.4  # the plain sparse arm does not stand in for it
    assert matched[0]["full"]["step"] == 15  # the checkpoint at the target, not the last
    over = matched_by_seed(records, over=("sparse_skip_format", "full", "lora"))
    assert over[1]["target_em"] == 0.1 and over[0]["target_em"] == 0.3  # lora's best sets both here
    assert matched_by_seed(records[:6], over=("full",))[0]["target_em"] == 0.9
    with pytest.raises(ValueError, match="not run"):
        matched_by_seed(records, over=("sparse_t500",))
    rows = seed_table(matched)
    assert {(r["seed"], r["arm"]) for r in rows} == {(s, a) for s in (0, 1) for a in Sweep([1], [1], [1], [1]).arms()}

    def start(ppl: float) -> SimpleNamespace:  # what claim_metrics reads of a Start
        return SimpleNamespace(facts_before={"em": 0.0}, before={"squad_f1": 0.0, "essay_ppl": ppl},
                               plain_essay_ppl=ppl, background=BackgroundCounts.empty(4))

    ret = Retention(0.5, 0.25, 0.5, 0.1)
    m = claim_metrics(matched, [start(30.0), start(32.0)], ret, headline="sparse_skip_format")
    assert m["n_seeds"] == 2 and m["before_essay_ppl"] == 31.0
    assert m["claim.forgetting_sparse_pct"] == pytest.approx(30.0)  # skip arm: 20% and 40%
    assert (m["claim.forgetting_sparse_pct.min"], m["claim.forgetting_sparse_pct.max"]) == pytest.approx((20.0, 40.0))
    assert m["claim.forgetting_baseline_min_pct"] == pytest.approx(20.0)  # full (10, 30) beats lora (50, 70)
    assert m["claim.forgetting_gap_pct"] == pytest.approx(-10.0)
    assert m["seed1.lora_forget_world_acc_pct"] == pytest.approx(70.0)
    assert m["sparse_format_read_share"] == pytest.approx(0.35)
    assert not any("squad_f1_pct" in k for k in m)  # undefined drops are not logged
    assert claim_metrics(matched, [start(30.0)] * 2, ret)["claim.forgetting_sparse_pct"] == pytest.approx(90.0)
    with pytest.raises(ValueError, match="headline must be one of the arms"):
        claim_metrics(matched, [start(30.0)], ret, headline="sparse_t500")
    matched[1]["target_em"] = 0.0  # one seed where some arm learned nothing: no claim rows
    assert not any(k.startswith("claim.") for k in claim_metrics(matched, [start(30.0)] * 2, ret))

