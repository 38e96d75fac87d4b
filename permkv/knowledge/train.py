"""Training loops: memory pretraining on background text, background slot counts, and the three
finetuning methods compared in notebook 07 (sparse memory, full, LoRA) behind one `step(batch)`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from permkv.knowledge.memory import ProductKeyMemory
from permkv.knowledge.sparse import BackgroundCounts, SparseMemoryTrainer, doc_counts

METHODS = ("sparse", "full", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> input_ids and attention_mask `(batch, longest)`, padded right."""
    seq = max(len(r) for r in rows)
    ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def collate(tokenizer, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (batch, seq) and labels (-100 on padding)."""
    ids, mask = right_pad([tokenizer(t).input_ids[:max_tokens] for t in texts], tokenizer.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def text_batches(tokenizer, texts: list[str], batch_size: int, steps: int, max_tokens: int = 64, seed: int = 0):
    """`steps` batches of `batch_size` texts, reshuffling the texts each epoch (deterministic per seed)."""
    if not texts:
        raise ValueError("texts is empty; nothing to train on")
    if batch_size < 1 or steps < 0:
        raise ValueError(f"batch_size must be >= 1 and steps >= 0, got {batch_size} and {steps}")
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            epoch = list(range(len(texts)))
            rng.shuffle(epoch)
            order += epoch
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate(tokenizer, [texts[i] for i in chosen], max_tokens)


def token_windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of `seq_len` tokens (the last partial one dropped)."""
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def window_batches(windows: list[list[int]], batch_size: int, steps: int, seed: int = 0):
    """`steps` batches of equal-length token windows (batch, seq_len), sampled without replacement per epoch."""
    if not windows:
        raise ValueError("windows is empty; nothing to train on")
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            epoch = list(range(len(windows)))
            rng.shuffle(epoch)
            order += epoch
        chosen, order = order[:batch_size], order[batch_size:]
        ids = torch.tensor([windows[i] for i in chosen])
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@dataclass
class PretrainResult:
    """Memory pretraining: loss per step and slot usage afterwards."""

    losses: list[float]


def to_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The batch's tensors on the model's device."""
    return {k: v.to(model.device) for k, v in batch.items()}


@torch.no_grad()
def calibrate_memory(model, memory: ProductKeyMemory, batches, progress: bool = True) -> None:
    """Set the memory's input standardisation from the hidden states it sees on background batches."""
    seen: list[torch.Tensor] = []
    hook = memory.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).cpu()))
    try:
        for batch in tqdm(list(batches), desc="memory calibration", disable=not progress):
            batch = to_device(batch, model)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hook.remove()
    memory.calibrate(torch.cat(seen).to(memory.values.device))


def pretrain_memory(model, memory: ProductKeyMemory, batches, lr: float = 1e-3, progress: bool = True) -> PretrainResult:
    """Train the memory's values alone (Adam) on background batches; the model, keys and queries stay frozen.

    Why: a freshly inserted memory has zero values, so its slots mean nothing; a short stage on
    ordinary text makes the slots carry something. Keys and queries stay as initialised (on
    calibrated inputs): training them too with the host frozen collapsed the reads onto 15% of the
    slots (measured), leaving too few slots for new facts.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = [memory.values]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    model.train()
    for batch in tqdm(list(batches), desc="memory pretraining", disable=not progress):
        opt.zero_grad(set_to_none=True)
        loss = model(**to_device(batch, model)).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return PretrainResult(losses)


@torch.no_grad()
def background_counts(model, memory: ProductKeyMemory, batches, progress: bool = True) -> BackgroundCounts:
    """Document frequency of each slot over background batches (one sequence = one document, see `sparse`)."""
    counts = BackgroundCounts.empty(memory.config.n_slots)
    memory.record = True
    for batch in tqdm(list(batches), desc="background counts", disable=not progress):
        model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device))
        mask = batch["attention_mask"]
        counts.add(doc_counts(memory.last_indices.cpu(), memory.config.n_slots, mask), mask.shape[0])
    return counts


class DenseTrainer:
    """Plain finetuning of whichever parameters require grad (AdamW, no weight decay)."""

    def __init__(self, model, lr: float) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no parameter requires grad; nothing to finetune")
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(**to_device(batch, self.model)).loss
        loss.backward()
        self.opt.step()
        self.model.eval()
        return loss.item()


def full_trainer(model, lr: float) -> DenseTrainer:
    """Full finetuning: every parameter of the model (memory included) trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return DenseTrainer(model, lr)


def lora_model(model, rank: int = 16, alpha: int = 32):
    """`model` wrapped by peft with LoRA adapters on all attention and MLP projections (others frozen)."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, config)


class SparseAdapter:
    """`SparseMemoryTrainer` behind the same `step(batch) -> loss` as the dense trainers."""

    def __init__(self, trainer: SparseMemoryTrainer) -> None:
        self.trainer = trainer
        self.model = trainer.model

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        return self.trainer.step(batch).loss
