"""Measuring acquisition (fictional facts) and forgetting (held-out tasks) on a real model.

Acquisition: exact match / token F1 of greedy answers to the facts' held-out questions.
Forgetting probes, measured before and after finetuning:
- SQuAD with its passage (short passages), token F1;
- perplexity on held-out Paul Graham essays;
- simple world facts, kept only where the starting model answers them right (so its score is 1.0).
Forgetting is the relative drop: (before - after) / before (for perplexity: the relative rise).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from permkv.data import heldout_essays, load_squad
from permkv.eval import exact_match, token_f1
from permkv.knowledge.facts import FEW_SHOT, WORLD_FACTS, Fact

def answer_line(text: str) -> str:
    """The answer part of a Q/A completion: up to the first newline."""
    return text.strip().split("\n")[0].strip()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 16) -> list[str]:
    """Greedy completions of plain-text prompts, batched with left padding; decoded, first line only."""
    outs = []
    pad = tokenizer.pad_token_id
    model.eval()
    for i in range(0, len(prompts), batch_size):
        rows = [tokenizer(p).input_ids for p in prompts[i : i + batch_size]]
        seq = max(len(r) for r in rows)
        ids = torch.full((len(rows), seq), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, seq - len(r) :] = torch.tensor(r)
            mask[j, seq - len(r) :] = 1
        gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        outs += [answer_line(tokenizer.decode(g[seq:], skip_special_tokens=True)) for g in gen]
    return outs


@torch.no_grad()
def greedy_match(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding after each prompt gives " answer" as a whole word.

    Computed in one teacher-forced forward per batch: greedy decoding produces the answer exactly
    when the argmax at every answer position is the answer's token, and the token it predicts next
    does not continue the word (newline, punctuation, space or end of text). A completion that
    spells the answer with other tokens counts as a miss (rare, conservative).
    """
    out = []
    pad = tokenizer.pad_token_id
    model.eval()
    for i in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for prompt, answer in zip(prompts[i : i + batch_size], answers[i : i + batch_size]):
            head = tokenizer(prompt).input_ids
            full = tokenizer(prompt + " " + answer).input_ids
            if full[: len(head)] != head:  # the answer merged into the prompt's last token
                head = head[:-1]
            rows.append(full)
            spans.append((len(head), len(full)))
        seq = max(len(r) for r in rows)
        ids = torch.full((len(rows), seq), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        pred = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.argmax(-1).cpu()
        for j, (start, end) in enumerate(spans):
            following = tokenizer.decode([int(pred[j, end - 1])])
            whole_word = not following or not following[0].isalnum()
            out.append(bool((pred[j, start - 1 : end - 1] == ids[j, start:end]).all()) and whole_word)
    return out


def fact_scores(model, tokenizer, facts: list[Fact]) -> dict[str, float]:
    """Exact match on the facts' held-out questions (few-shot Q/A format, greedy, see `greedy_match`)."""
    if not facts:
        raise ValueError("the fact set is empty; pass at least one Fact")
    hits = greedy_match(model, tokenizer, [FEW_SHOT + f.question for f in facts], [f.answer for f in facts])
    return {"em": sum(hits) / len(hits)}


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


@torch.no_grad()
def essay_perplexity(model, ids: list[int], window: int) -> float:
    """Perplexity over consecutive non-overlapping windows of `ids`."""
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[i : i + window]], device=model.device)
        if chunk.shape[1] < 2:
            break
        loss = model(input_ids=chunk, labels=chunk).loss
        nll += float(loss) * (chunk.shape[1] - 1)
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


def probe_scores(model, tokenizer, probes: ProbeSet) -> dict[str, float]:
    """squad_f1, world_acc and essay_ppl of `model` on `probes`."""
    preds = generate(model, tokenizer, [p for p, _ in probes.squad], max_new_tokens=8, batch_size=8)
    squad_f1 = sum(token_f1(p, a) for p, (_, a) in zip(preds, probes.squad)) / max(len(probes.squad), 1)
    world = sum(world_correct(model, tokenizer, probes.world)) / max(len(probes.world), 1)
    return {"squad_f1": squad_f1, "world_acc": world,
            "essay_ppl": essay_perplexity(model, probes.essay_ids, probes.essay_window)}


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Relative drop per probe (0.1 = 10% worse); perplexity counts its relative rise."""
    out = {}
    for key in ("squad_f1", "world_acc"):
        out[f"forget_{key}"] = (before[key] - after[key]) / before[key] if before[key] > 0 else float("nan")
    out["forget_essay_ppl"] = (after["essay_ppl"] - before["essay_ppl"]) / before["essay_ppl"]
    return out

