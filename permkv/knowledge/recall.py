"""Does the model now know a fact? Exact match of greedy answers to held-out questions.

A fact is anything with `answer`, `question` (the held-out wording, ending with "A:") and
`train_texts` (`permkv.data.Fact` is one); the few-shot prefix shows the short-answer format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from permkv.knowledge.train import right_pad

FEW_SHOT = "Q: What color is grass?\nA: green\n\n"


def qa_format_tokens(tokenizer) -> list[int]:
    """Token ids of the QA scaffolding every fact text, probe and few-shot prompt shares ("Q", ":", "?",
    newlines, "A"): the tokens of a Q/A pair that are not its question or answer words."""
    scaffold = set(tokenizer(FEW_SHOT + "Q: x?\nA:").input_ids)
    words = set(tokenizer(" What color is grass green x").input_ids) | set(tokenizer("What x").input_ids)
    return sorted(scaffold - words)


class FactLike(Protocol):
    answer: str
    question: str
    train_texts: tuple[str, ...]


@torch.no_grad()
def greedy_match(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding after each prompt gives " answer" as a whole word.

    Computed in one teacher-forced forward per batch: greedy decoding produces the answer exactly
    when the argmax at every answer position is the answer's token, and the token it predicts next
    does not continue the word (newline, punctuation, space or end of text). A completion that
    spells the answer with other tokens counts as a miss (rare, conservative).
    """
    out = []
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
        ids, mask = right_pad(rows, tokenizer.pad_token_id)
        pred = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.argmax(-1).cpu()
        for j, (start, end) in enumerate(spans):
            following = tokenizer.decode([int(pred[j, end - 1])])
            whole_word = not following or not following[0].isalnum()
            out.append(bool((pred[j, start - 1 : end - 1] == ids[j, start:end]).all()) and whole_word)
    return out


def fact_scores(model, tokenizer, facts: Sequence[FactLike]) -> dict[str, float]:
    """Exact match on the facts' held-out questions (few-shot Q/A format, greedy, see `greedy_match`)."""
    if not facts:
        raise ValueError("the fact set is empty; pass at least one Fact")
    hits = greedy_match(model, tokenizer, [FEW_SHOT + f.question for f in facts], [f.answer for f in facts])
    return {"em": sum(hits) / len(hits)}
