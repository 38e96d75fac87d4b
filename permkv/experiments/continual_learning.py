"""The forgetting experiment of notebook 07: one memory-augmented starting model, three ways to
teach it fictional facts, and forgetting compared at matched acquisition (Lin et al. 2025's protocol).

Every method starts from the same model: SmolLM2 with a product-key memory inserted at `layer` and
pretrained on background text (essays and SQuAD paragraphs), so the "before" scores are shared.

Measuring acquisition (fictional facts) and forgetting (held-out tasks) on a real model.

Acquisition: exact match / token F1 of greedy answers to the facts' held-out questions.
Forgetting probes, measured before and after finetuning:
- SQuAD with its passage (short passages), token F1;
- perplexity on held-out Paul Graham essays;
- simple world facts, kept only where the starting model answers them right (so its score is 1.0).
Forgetting is the relative drop: (before - after) / before (for perplexity: the relative rise).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from tqdm.auto import tqdm

from permkv.data import WORLD_FACTS, Fact, heldout_essays, load_essays, load_squad, make_facts, training_texts
from permkv.eval import generate, perplexity, token_f1
from permkv.experiments.workers import process_pool
from permkv.knowledge.memory import MemoryConfig, ProductKeyMemory, insert_memory, remove_memory
from permkv.knowledge.recall import FEW_SHOT, fact_scores, greedy_match, qa_format_tokens
from permkv.knowledge.sparse import BackgroundCounts, SparseMemoryTrainer
from permkv.knowledge.train import (
    METHODS, DenseTrainer, SparseAdapter, background_counts, calibrate_memory, full_trainer, lora_model,
    pretrain_memory,
    text_batches, token_windows, window_batches,
)
from permkv.models import cache_dir, load_model, model_source


def answer_line(text: str) -> str:
    """The answer part of a Q/A completion: up to the first newline."""
    return text.strip().split("\n")[0].strip()


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy completions of plain-text prompts (the one decode loop), first line only."""
    model.eval()
    return [answer_line(generate(model, tokenizer, tokenizer(p).input_ids, max_new_tokens)) for p in prompts]


def world_correct(model, tokenizer, world: list[tuple[str, tuple[str, ...]]]) -> list[bool]:
    """Per world fact: does greedy decoding give one of its accepted answers exactly."""
    flat = [(i, p, a) for i, (p, answers) in enumerate(world) for a in answers]
    hits = greedy_match(model, tokenizer, [p for _, p, _ in flat], [a for _, _, a in flat])
    ok = [False] * len(world)
    for (i, _, _), hit in zip(flat, hits):
        ok[i] = ok[i] or hit
    return ok


# SQuAD passages up to this many words are the forgetting probe's pool; background text uses only longer ones.
PROBE_PASSAGE_WORDS = 70

# One worked example that shows the short-answer format (written here, not from SQuAD).
SQUAD_SHOT = (
    "Passage: The bridge over the river was finished in 1932 by the engineer Maria Holt.\n"
    "Question: Who finished the bridge?\nAnswer: Maria Holt\n\n"
)


@dataclass
class ProbeSet:
    """Held-out tasks for forgetting; `world` holds only facts the starting model got right."""

    squad: list[tuple[str, tuple[str, ...]]]  # (prompt, answers)
    world: list[tuple[str, tuple[str, ...]]]  # (prompt, answers)
    essay_ids: list[int]  # held-out essay tokens
    essay_window: int

    def sizes(self) -> dict[str, int]:
        return {"probe_squad_n": len(self.squad), "probe_world_n": len(self.world),
                "probe_essay_tokens": len(self.essay_ids)}


def build_probes(model, tokenizer, n_squad: int = 32, max_passage_words: int = PROBE_PASSAGE_WORDS,
                 essay_tokens: int = 512, essay_window: int = 256, seed: int = 0) -> ProbeSet:
    """Forgetting probes for `model`: short-passage SQuAD, held-out essays, and the world facts it knows."""
    rng = random.Random(seed)
    short = [r for r in load_squad() if len(r["context"].split()) <= max_passage_words]
    rng.shuffle(short)
    squad = [(SQUAD_SHOT + f"Passage: {r['context']}\nQuestion: {r['question']}\nAnswer:", tuple(r["answers"]))
             for r in short[:n_squad]]
    world_all = [(FEW_SHOT + f"Q: {q}\nA:", answers) for q, answers in WORLD_FACTS]
    world = [w for w, ok in zip(world_all, world_correct(model, tokenizer, world_all)) if ok]
    ids = tokenizer(heldout_essays()).input_ids[:essay_tokens]
    return ProbeSet(squad, world, ids, essay_window)


def probe_scores(model, tokenizer, probes: ProbeSet) -> dict[str, float]:
    """squad_f1, world_acc and essay_ppl of `model` on `probes`."""
    preds = generate_answers(model, tokenizer, [p for p, _ in probes.squad], max_new_tokens=8)
    squad_f1 = sum(token_f1(p, a) for p, (_, a) in zip(preds, probes.squad)) / max(len(probes.squad), 1)
    world = sum(world_correct(model, tokenizer, probes.world)) / max(len(probes.world), 1)
    return {"squad_f1": squad_f1, "world_acc": world,
            "essay_ppl": perplexity(model, probes.essay_ids, window=probes.essay_window)}


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Relative drop per probe (0.1 = 10% worse); perplexity counts its relative rise."""
    out = {}
    for key in ("squad_f1", "world_acc"):
        out[f"forget_{key}"] = (before[key] - after[key]) / before[key] if before[key] > 0 else float("nan")
    out["forget_essay_ppl"] = (after["essay_ppl"] - before["essay_ppl"]) / before["essay_ppl"]
    return out



@dataclass
class ExperimentConfig:
    """Everything that defines one forgetting experiment (flattened for MLflow by `to_params`)."""

    model: str = "smollm2-135m"
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    layer: int = 4  # decoder layer whose MLP gets the memory (SmolLM2 has 30); early layers carry the subject
    pretrain_steps: int = 60  # memory pretraining batches of background text
    pretrain_batch: int = 8
    seq_len: int = 64  # tokens per background window (training texts are shorter still)
    pretrain_lr: float = 1e-3  # Adam, memory parameters only
    background_batches: int = 32  # batches counted for slot document frequencies (also used for calibration)
    n_facts: int = 24
    batch_size: int = 8  # fact texts per finetuning step
    steps: int = 30  # finetuning steps per run (same budget for every method)
    eval_every: int = 15  # checkpoints at which acquisition and forgetting are measured
    n_squad: int = 8
    world_max: int = 24
    essay_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        model_source(self.model)

    def to_params(self) -> dict:
        params = {k: v for k, v in asdict(self).items() if k != "memory"}
        return params | self.memory.to_params()


def _background_windows(tokenizer, cfg: ExperimentConfig) -> list[list[int]]:
    """Background text, in windows: training essays, SQuAD paragraphs and SQuAD questions in the
    "Q: ...\nA: ..." format the facts and probes use (so slots that format reads count as common,
    not as new knowledge). Only SQuAD records with passages longer than the probe's are used.
    """
    essays = load_essays()
    records = [r for r in load_squad() if len(r["context"].split()) > PROBE_PASSAGE_WORDS]
    random.Random(cfg.seed).shuffle(records)
    paragraphs = list(dict.fromkeys(r["context"] for r in records))[:400]
    qa = [f"Q: {r['question']}\nA: {r['answers'][0]}" for r in records]  # ~45% of the tokens
    ids = (tokenizer(essays[:400_000]).input_ids + tokenizer("\n\n".join(paragraphs)).input_ids
           + tokenizer("\n\n".join(qa)).input_ids)
    windows = token_windows(ids, cfg.seq_len)
    random.Random(cfg.seed).shuffle(windows)
    return windows


@dataclass
class Start:
    """The shared starting point: pretrained memory state, background counts, probes and 'before' scores."""

    cfg: ExperimentConfig
    memory_state: dict[str, torch.Tensor]
    background: BackgroundCounts
    pretrain_losses: list[float]
    probes: ProbeSet
    before: dict[str, float]  # probe scores of the starting model
    facts: list[Fact]
    facts_before: dict[str, float]
    plain_essay_ppl: float  # the same essays without the memory: what pretraining the memory cost or gained

    def fresh_model(self):
        """A new copy of the starting model (base weights from disk + the pretrained memory)."""
        model, tokenizer, _ = load_model(self.cfg.model)
        memory = insert_memory(model, ProductKeyMemory(self.cfg.memory, seed=self.cfg.seed), self.cfg.layer)
        memory.load_state_dict(self.memory_state)
        return model, tokenizer, memory


def _cache_key(cfg: ExperimentConfig) -> str:
    keys = ("model", "memory", "layer", "pretrain_steps", "pretrain_batch", "seq_len", "pretrain_lr",
            "background_batches", "seed")
    blob = json.dumps({k: str(getattr(cfg, k)) for k in keys} | {"version": 3}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def prepare(cfg: ExperimentConfig, progress: bool = True) -> Start:
    """Build the starting model: insert + pretrain the memory (cached on disk), count, build probes."""
    model, tokenizer, _ = load_model(cfg.model)
    memory = insert_memory(model, ProductKeyMemory(cfg.memory, seed=cfg.seed), cfg.layer)
    path = cache_dir() / "knowledge" / f"memory-{_cache_key(cfg)}.pt"
    windows = _background_windows(tokenizer, cfg)
    if path.exists():
        saved = torch.load(path)
        memory.load_state_dict(saved["state"])
        losses = saved["losses"]
    else:
        calibrate_memory(model, memory, window_batches(windows, cfg.pretrain_batch, cfg.background_batches,
                                                       seed=cfg.seed + 2), progress=progress)
        batches = window_batches(windows, cfg.pretrain_batch, cfg.pretrain_steps, seed=cfg.seed)
        losses = pretrain_memory(model, memory, batches, lr=cfg.pretrain_lr, progress=progress).losses
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": memory.state_dict(), "losses": losses}, path)
    # background counts on windows the pretraining also saw (the paper counts pretraining batches)
    bg = background_counts(model, memory, window_batches(windows, cfg.pretrain_batch, cfg.background_batches,
                                                         seed=cfg.seed + 1), progress=progress)
    probes = build_probes(model, tokenizer, n_squad=cfg.n_squad, essay_tokens=cfg.essay_tokens, seed=cfg.seed)
    probes.world = probes.world[: cfg.world_max]
    facts = make_facts(cfg.n_facts, seed=cfg.seed)
    before, facts_before = probe_scores(model, tokenizer, probes), fact_scores(model, tokenizer, facts)
    remove_memory(model)
    plain_ppl = perplexity(model, probes.essay_ids, window=probes.essay_window)
    return Start(cfg, {k: v.clone() for k, v in memory.state_dict().items()}, bg, losses, probes,
                 before, facts, facts_before, plain_ppl)


def arm(record: dict) -> str:
    """A run's arm: its method, or "sparse_skip_format" for sparse runs that leave the QA scaffolding's
    reads out of the slot counts (records written before arms existed have no "arm" field)."""
    return "sparse_skip_format" if record.get("skip_format") else record["method"]


def run_method(start: Start, method: str, lr: float, t: int | None = None, progress: bool = True,
               skip_format: bool = False) -> list[dict]:
    """Finetune a fresh starting model on the facts with `method`; one record per checkpoint.

    Each record: seed, arm, method, lr, t, step, loss (mean since the last checkpoint), fact_em, the
    probe scores and their forgetting, and seconds of training so far. Sparse runs add `skip_format`
    (True: reads by the QA scaffolding tokens do not count when choosing slots; arm
    "sparse_skip_format"), `format_read_share` (of all reads of the slots written so far, the share made
    by scaffolding tokens) and `top_readers` (the 8 tokens that read the written slots most, with their
    shares).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if skip_format and method != "sparse":
        raise ValueError("skip_format applies to the sparse method only")
    cfg = start.cfg
    torch.manual_seed(cfg.seed)  # LoRA's init: a run gives the same records whichever process runs it, after whatever
    model, tokenizer, memory = start.fresh_model()
    if method == "sparse":
        if t is None:
            raise ValueError("method 'sparse' needs t (slots updated per step)")
        sparse = SparseMemoryTrainer(model, memory, start.background, t, lr,
                                     skip_tokens=qa_format_tokens(tokenizer) if skip_format else None)
        trainer = SparseAdapter(sparse)
    elif method == "full":
        trainer = full_trainer(model, lr)
    else:
        model = lora_model(model)
        trainer = DenseTrainer(model, lr)
    texts = training_texts(start.facts)
    batches = text_batches(tokenizer, texts, cfg.batch_size, cfg.steps, max_tokens=cfg.seq_len, seed=cfg.seed)
    records, losses, seconds = [], [], 0.0
    name = arm({"method": method, "skip_format": skip_format})
    for step, batch in enumerate(tqdm(batches, total=cfg.steps, desc=f"seed {cfg.seed} {name} lr={lr} t={t}",
                                      disable=not progress), start=1):
        tic = time.perf_counter()
        losses.append(trainer.step(batch))
        seconds += time.perf_counter() - tic
        if step % cfg.eval_every == 0 or step == cfg.steps:
            after = probe_scores(model, tokenizer, start.probes)
            records.append({"seed": cfg.seed, "arm": name, "method": method, "lr": lr, "t": t, "step": step,
                            "loss": sum(losses) / len(losses), "fact_em": fact_scores(model, tokenizer, start.facts)["em"],
                            **after, **forgetting(start.before, after), "train_seconds": seconds})
            if method == "sparse":
                records[-1] |= {"skip_format": skip_format, **reader_shares(sparse.reads_by_token, tokenizer)}
            losses = []
            if progress:
                r = records[-1]
                print(f"seed {cfg.seed} {name} lr={lr:g} t={t} step {step}: loss {r['loss']:.3f}, fact EM "
                      f"{r['fact_em']:.3f}, SQuAD F1 {r['squad_f1']:.3f}, world {r['world_acc']:.3f}, "
                      f"ppl {r['essay_ppl']:.2f}", flush=True)
    return records


@dataclass
class Sweep:
    """The runs every seed gets: sparse finetuning at each (t, lr), full finetuning and LoRA at each lr.
    `skip_format` runs each sparse (t, lr) a second time with the QA scaffolding's reads left out of
    the slot counts (arm "sparse_skip_format", the format-slot test)."""

    sparse_ts: list[int]
    sparse_lrs: list[float]
    full_lrs: list[float]
    lora_lrs: list[float]
    skip_format: bool = True

    def runs(self) -> list[tuple[str, float, int | None, bool]]:
        """(method, lr, t, skip_format) per run."""
        skips = (False, True) if self.skip_format else (False,)
        sparse = [("sparse", lr, t, skip) for t in self.sparse_ts for lr in self.sparse_lrs for skip in skips]
        return (sparse + [("full", lr, None, False) for lr in self.full_lrs]
                + [("lora", lr, None, False) for lr in self.lora_lrs])

    def arms(self) -> list[str]:
        """The arms the runs belong to, in run order."""
        return list(dict.fromkeys(arm({"method": m, "skip_format": skip}) for m, _, _, skip in self.runs()))


def run_sweep(start: Start, sweep: Sweep, progress: bool = True) -> list[dict]:
    """Every run of `sweep` from `start`: the records of `run_method`, concatenated."""
    return [r for method, lr, t, skip in sweep.runs()
            for r in run_method(start, method, lr, t, progress=progress, skip_format=skip)]


def run_seeds(configs: list[ExperimentConfig], sweep: Sweep, workers: int = 1,
              progress: bool = True) -> tuple[list[Start], list[dict]]:
    """Every seed's start (`prepare`) and every run of `sweep` from each: (starts, records).

    workers > 1: starts and runs go to that many processes with one torch thread each (a run is the unit,
    so 3 seeds x 8 runs keep 2 cores busy to the end); records come back in the same order as with one
    worker, and the same up to float rounding (one thread instead of several).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        starts = [prepare(cfg, progress=progress) for cfg in configs]
        return starts, [r for start in starts for r in run_sweep(start, sweep, progress=progress)]
    with process_pool(workers) as pool:
        starts = list(pool.map(partial(prepare, progress=False), configs))
        jobs = [pool.submit(run_method, start, method, lr, t, False, skip)
                for start in starts for method, lr, t, skip in sweep.runs()]
        for job in tqdm(jobs, desc=f"{len(jobs)} runs, {workers} workers", disable=not progress):
            last = job.result()[-1]  # waits in submission order; the other runs go on meanwhile
            if progress:
                print(f"seed {last['seed']} {last['arm']} lr={last['lr']:g} t={last['t']} step {last['step']}: fact EM "
                      f"{last['fact_em']:.3f}, world {last['world_acc']:.3f}, ppl {last['essay_ppl']:.2f}, "
                      f"{last['train_seconds'] / 60:.1f} min training", flush=True)
        return starts, [r for job in jobs for r in job.result()]


def reader_shares(reads_by_token: torch.Tensor, tokenizer, top: int = 8) -> dict:
    """From per-token reads of the written slots (vocab,): the scaffolding tokens' share and the top readers."""
    total = max(int(reads_by_token.sum()), 1)
    fmt = int(reads_by_token[qa_format_tokens(tokenizer)].sum())
    best = torch.argsort(reads_by_token, descending=True)[:top].tolist()
    return {"format_read_share": fmt / total,
            "top_readers": [(tokenizer.decode([i]), round(int(reads_by_token[i]) / total, 3)) for i in best]}


def matched_comparison(records: list[dict], target_em: float | None = None, key: str = "forget_squad_f1",
                       over: Sequence[str] | None = None) -> dict:
    """Per arm (`arm(record)`), the checkpoint whose fact EM is closest to `target_em` (ties: least
    forgetting on `key`).

    Default target: the highest EM that every arm in `over` (default: every arm) reaches at some
    checkpoint, i.e. the acquisition level at which they can all be compared (the paper's protocol);
    arms outside `over` are read at that level too. Pass one seed's records.
    Returns {"target_em": x, arm: record}.
    """
    if not records:
        raise ValueError("records is empty; run some methods first")
    arms = sorted({arm(r) for r in records})
    if over is not None and not set(over) <= set(arms):
        raise ValueError(f"over names arms that were not run: {sorted(set(over) - set(arms))}; run: {arms}")
    if target_em is None:
        target_em = min(max(r["fact_em"] for r in records if arm(r) == a) for a in (over or arms))
    out: dict = {"target_em": target_em}
    for a in arms:
        mine = [r for r in records if arm(r) == a]
        out[a] = min(mine, key=lambda r: (abs(r["fact_em"] - target_em),
                                          r[key] if not math.isnan(r[key]) else math.inf))
    return out


def matched_by_seed(records: list[dict], key: str = "forget_world_acc", over: Sequence[str] | None = None) -> dict[int, dict]:
    """`matched_comparison` within each seed: every seed has its own start, facts and acquisition target."""
    seeds = sorted({r["seed"] for r in records})
    return {s: matched_comparison([r for r in records if r["seed"] == s], key=key, over=over) for s in seeds}


FORGET_PROBES = ("world_acc", "squad_f1", "essay_ppl")


def seed_table(matched: dict[int, dict]) -> list[dict]:
    """One row per (seed, arm) at matched acquisition: lr, t, step, fact EM, forgetting on every probe
    and, for sparse arms, the scaffolding's share of the written slots' reads and the top readers."""
    rows = []
    for seed, m in matched.items():
        for name in (a for a in m if a != "target_em"):
            r = m[name]
            rows.append({"seed": seed, "arm": name, "target_em": m["target_em"], "lr": r["lr"], "t": r["t"],
                         "step": r["step"], "fact_em": r["fact_em"],
                         **{f"forget_{p}": r[f"forget_{p}"] for p in FORGET_PROBES},
                         "format_read_share": r.get("format_read_share"), "top_readers": r.get("top_readers")})
    return rows


def claim_metrics(matched: dict[int, dict], starts: list[Start], retention, forget_probe: str = "world_acc",
                  headline: str = "sparse") -> dict[str, float]:
    """Ledger metrics of notebook 07 at matched acquisition, over seeds (`matched_by_seed`).

    Per arm: mean fact EM and mean forgetting on every probe, with `.min` / `.max` over seeds; per
    seed: `seed<s>.<arm>_forget_<probe>_pct`. The claim rows read `forget_probe` (the closed-book
    world facts stand in for the paper's NaturalQuestions): `headline` (the sparse arm the claim is
    read on) against the better of full finetuning and LoRA, each a mean over seeds, with the spread.
    A relative drop over a zero "before" score is undefined and left out; the claim rows are left out
    when in some seed an arm learned nothing (no common acquisition level).
    """
    if forget_probe not in FORGET_PROBES:
        raise ValueError(f"forget_probe must be one of {FORGET_PROBES}, got {forget_probe!r}")
    arms = sorted({a for m in matched.values() for a in m if a != "target_em"})
    if headline not in arms:
        raise ValueError(f"headline must be one of the arms run, {arms}, got {headline!r}")

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    metrics = {
        "n_seeds": len(matched),
        "fact_em_target": mean([m["target_em"] for m in matched.values()]),
        "facts_before_em": mean([s.facts_before["em"] for s in starts]),
        "before_squad_f1": mean([s.before["squad_f1"] for s in starts]),
        "before_essay_ppl": mean([s.before["essay_ppl"] for s in starts]),
        "plain_essay_ppl": mean([s.plain_essay_ppl for s in starts]),
        "memory_used_fraction": mean([s.background.used_fraction for s in starts]),
        "domain_a_after_a": retention.a_after_a,
        "domain_a_after_b": retention.a_after_b,
        "domain_b_after_b": retention.b_after_b,
        "domain_slot_overlap": retention.slot_overlap,
    }
    if retention.a_after_a > 0:
        metrics["domain_retention"] = retention.retention

    def spread(name: str, values: list[float]) -> None:
        values = [v for v in values if math.isfinite(v)]
        if len(values) == len(matched):  # a mean over fewer seeds would not be the same quantity
            metrics.update({name: mean(values), f"{name}.min": min(values), f"{name}.max": max(values)})

    for a in arms:
        spread(f"{a}_fact_em", [m[a]["fact_em"] for m in matched.values()])
        for probe in FORGET_PROBES:
            drops = [100 * m[a][f"forget_{probe}"] for m in matched.values()]
            spread(f"{a}_forget_{probe}_pct", drops)
            for seed, drop in zip(matched, drops):
                if math.isfinite(drop):
                    metrics[f"seed{seed}.{a}_forget_{probe}_pct"] = drop
        if a.startswith("sparse"):
            spread(f"{a}_format_read_share", [m[a]["format_read_share"] for m in matched.values()])
    if all(m["target_em"] > 0 for m in matched.values()):
        per_seed = {a: [100 * m[a][f"forget_{forget_probe}"] for m in matched.values()]
                    for a in (headline, "full", "lora")}
        better = min(("full", "lora"), key=lambda a: mean(per_seed[a]))
        spread("claim.forgetting_sparse_pct", per_seed[headline])
        spread("claim.forgetting_baseline_min_pct", per_seed[better])
        spread("claim.forgetting_gap_pct", [b - s for b, s in zip(per_seed[better], per_seed[headline])])
    return metrics
