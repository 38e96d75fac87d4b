"""A product-key memory layer (Lample et al. 2019, arXiv 1907.05242) and its insertion into a model.

A memory holds `n_keys**2` value slots. Each head turns a token's hidden state into a query, splits it
in two halves and scores each half against its own `n_keys` sub-keys; the best `top_k` of each half
give `top_k**2` candidate slots (score = sum of the two half scores), of which the best `top_k` are
read and mixed by a softmax over their scores. The heads' reads are summed.

Before the query projection the input is standardised per feature with fixed background statistics
(`calibrate`; the role of the query batch-norm in Berges et al. 2024's memory layers): a pretrained
host's hidden states share a large common component, and raw queries from them cluster, so tokens of
different subjects read the same slots.

The value table starts at zero, so a freshly inserted memory adds exactly nothing and the model's
outputs are unchanged; training the values (and keys, queries) is what makes it do something.
The memory records which slots it read in its last forward (`last_indices`), which is what sparse
memory finetuning counts (`permkv.knowledge.sparse`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MemoryConfig:
    """Shape of a product-key memory; slots = n_keys**2."""

    dim: int = 576  # hidden size of the host model (SmolLM2-135M: 576); also the value size
    n_keys: int = 256  # sub-keys per half; 256 -> 65,536 slots
    heads: int = 4  # independent lookups whose reads are summed
    top_k: int = 32  # slots read per head and token
    key_dim: int = 128  # query / full key size per head (each half is key_dim // 2)

    def __post_init__(self) -> None:
        for name in ("dim", "n_keys", "heads", "top_k", "key_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MemoryConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.key_dim % 2:
            raise ValueError(f"MemoryConfig.key_dim must be even, got {self.key_dim}")
        if self.top_k > self.n_keys:
            raise ValueError(f"MemoryConfig.top_k must be <= n_keys ({self.n_keys}), got {self.top_k}")

    @property
    def n_slots(self) -> int:
        return self.n_keys**2

    def to_params(self) -> dict:
        """Flat dict for MLflow."""
        return {f"memory_{k}": v for k, v in asdict(self).items()} | {"memory_slots": self.n_slots}


class ProductKeyMemory(nn.Module):
    """Product-key lookup over `config.n_slots` value rows; forward maps (batch, seq, dim) -> same.

    Parameters: `query` (dim -> heads * key_dim), `sub_keys` (heads, 2, n_keys, key_dim // 2) and
    `values` (n_slots, dim), zero at init.
    """

    def __init__(self, config: MemoryConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        half = config.key_dim // 2
        self.query = nn.Linear(config.dim, config.heads * config.key_dim, bias=False)
        with torch.no_grad():
            self.query.weight.normal_(0.0, 1.0 / math.sqrt(config.dim), generator=gen)
        bound = 1.0 / math.sqrt(half)
        sub_keys = (torch.rand(config.heads, 2, config.n_keys, half, generator=gen) * 2 - 1) * bound
        self.sub_keys = nn.Parameter(sub_keys)
        self.values = nn.Parameter(torch.zeros(config.n_slots, config.dim))
        self.register_buffer("input_mean", torch.zeros(config.dim))  # set by `calibrate`
        self.register_buffer("input_std", torch.ones(config.dim))
        self.record = True  # keep `last_indices` of each forward for access counting
        self.last_indices: torch.Tensor | None = None  # (batch, seq, heads, top_k) slot ids

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Fix the input standardisation from background hidden states x (tokens, dim)."""
        if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"x must be (tokens >= 2, {self.config.dim}), got {tuple(x.shape)}")
        self.input_mean.copy_(x.mean(0))
        self.input_std.copy_(x.std(0) + 1e-5)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids and mixing weights for hidden states x (batch, seq, dim).

        Returns `(indices, weights)`, both (batch, seq, heads, top_k); weights sum to 1 per head.
        """
        B, T, _ = x.shape
        c = self.config
        half = c.key_dim // 2
        x = (x - self.input_mean) / self.input_std
        q = self.query(x).view(B * T, c.heads, 2, half)  # (tokens, heads, 2 halves, half)
        q = F.layer_norm(q, (half,))  # scale-free queries: scores stay O(1) whatever the host's norms
        # scores of each half against its own sub-keys: (tokens, heads, 2, n_keys)
        scores = torch.einsum("nhpd,hpkd->nhpk", q, self.sub_keys)
        best, idx = scores.topk(c.top_k, dim=-1)  # (tokens, heads, 2, top_k)
        # all top_k x top_k pairs of (first-half, second-half) candidates
        pair_scores = best[:, :, 0, :, None] + best[:, :, 1, None, :]  # (tokens, heads, k, k)
        pair_ids = idx[:, :, 0, :, None] * c.n_keys + idx[:, :, 1, None, :]  # (tokens, heads, k, k)
        top_scores, flat = pair_scores.flatten(2).topk(c.top_k, dim=-1)  # (tokens, heads, top_k)
        indices = pair_ids.flatten(2).gather(-1, flat)  # (tokens, heads, top_k)
        weights = top_scores.softmax(dim=-1)
        return indices.view(B, T, c.heads, c.top_k), weights.view(B, T, c.heads, c.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Memory read for x (batch, seq, dim) -> (batch, seq, dim)."""
        B, T, D = x.shape
        indices, weights = self.lookup(x)
        if self.record:
            self.last_indices = indices.detach()
        # one bag per token: heads * top_k rows, each scaled by its softmax weight, summed
        out = F.embedding_bag(
            indices.reshape(B * T, -1),
            self.values,
            per_sample_weights=weights.reshape(B * T, -1).to(self.values.dtype),
            mode="sum",
        )
        return out.view(B, T, D)


class MemoryAugmentedMLP(nn.Module):
    """A decoder layer's MLP plus a memory read of the same (normalised) input: mlp(x) + memory(x)."""

    def __init__(self, mlp: nn.Module, memory: ProductKeyMemory) -> None:
        super().__init__()
        self.mlp = mlp
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.memory(x)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama-style `model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"model {type(model).__name__} has no `model.layers`; only Llama-style models")
    return layers


def insert_memory(model: nn.Module, memory: ProductKeyMemory, layer: int) -> ProductKeyMemory:
    """Add `memory` to decoder layer `layer`'s MLP (in place); returns the memory.

    Raises ValueError for a layer index outside [0, n_layers) or a layer that already has a memory.
    """
    layers = _decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer must be in [0, {len(layers)}) for this model, got {layer}")
    if isinstance(layers[layer].mlp, MemoryAugmentedMLP):
        raise ValueError(f"layer {layer} already has a memory")
    hidden = model.config.hidden_size
    if memory.config.dim != hidden:
        raise ValueError(f"memory dim must equal the model's hidden size {hidden}, got {memory.config.dim}")
    param = next(model.parameters())
    memory.to(device=param.device, dtype=param.dtype)
    layers[layer].mlp = MemoryAugmentedMLP(layers[layer].mlp, memory)
    return memory


def remove_memory(model: nn.Module) -> ProductKeyMemory | None:
    """Take the memory out of whichever layer holds it (restoring the plain MLP); returns it or None."""
    for layer in _decoder_layers(model):
        if isinstance(layer.mlp, MemoryAugmentedMLP):
            memory = layer.mlp.memory
            layer.mlp = layer.mlp.mlp
            return memory
    return None


def find_memory(model: nn.Module) -> ProductKeyMemory | None:
    """The memory inserted in `model`, if any (also through a peft wrapper)."""
    for module in model.modules():
        if isinstance(module, ProductKeyMemory):
            return module
    return None


@contextmanager
def memory_inserted(model: nn.Module, memory: ProductKeyMemory, layer: int):
    """`with memory_inserted(model, memory, layer):` the model reads the memory; removed on exit."""
    insert_memory(model, memory, layer)
    try:
        yield memory
    finally:
        remove_memory(model)
