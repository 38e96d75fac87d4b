"""The language model an RLM calls: a local backend or any OpenAI-compatible endpoint, behind one shape.

`LM.complete(prompt, max_new_tokens, ratio, speculate) -> Reply`: `prompt` is a user message (str) or a
list of chat messages; `Reply` carries the text and the call's measured `Generation` (KV tokens and
bytes, seconds). `LM.count(text)` counts tokens, so that the RLM can size pieces to a KV budget.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from permkv.models import encode_prompt
from permkv.rlm.backend import Generation, SequentialBackend


@dataclass
class Reply:
    text: str
    gen: Generation


class LM(Protocol):
    name: str
    max_positions: int  # longest prompt + answer the model takes

    def count(self, text: str) -> int:
        """Tokens of `text` (no template)."""

    def prompt_tokens(self, prompt: str | list[dict]) -> int:
        """Tokens of the whole prompt as the model reads it (chat template included)."""

    def complete(self, prompt: str | list[dict], max_new_tokens: int, ratio: float = 1.0,
                 speculate: bool = False) -> Reply:
        """Greedy answer to `prompt` with the KV cache compressed `ratio` times."""


def _messages(prompt: str | list[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise ValueError(f"prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}")
    return prompt


@dataclass
class LocalLM:
    """A backend in this process (e.g. `SequentialBackend`); prompts go through the chat template."""

    backend: object

    def __post_init__(self):
        self.name = self.backend.name
        self.max_positions = self.backend.spec.max_positions
        self.tokenizer = self.backend.tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def ids(self, prompt: str | list[dict]) -> list[int]:
        messages = _messages(prompt)
        spec = self.backend.spec
        if len(messages) == 1 and messages[0]["role"] == "user":
            return encode_prompt(self.tokenizer, spec, messages[0]["content"])
        if spec.chat:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return encode_prompt(self.tokenizer, spec, text, chat=False)

    def prompt_tokens(self, prompt: str | list[dict]) -> int:
        return len(self.ids(prompt))

    def complete(self, prompt, max_new_tokens: int, ratio: float = 1.0, speculate: bool = False) -> Reply:
        gen = self.backend.generate(self.ids(prompt), max_new_tokens, ratio, speculate=speculate)
        return Reply(self.tokenizer.decode(gen.tokens, skip_special_tokens=True), gen)


@dataclass
class ClientLM:
    """An OpenAI-compatible endpoint through the official `openai` client.

    `tokenizer` counts tokens (needed to size pieces; `permkv serve` reports the server's own counts).
    The compression ratio travels as the extra field `kv_cache_compression_ratio`, which `permkv serve`
    understands; other servers get no extra field at ratio 1. Measured KV numbers come from the
    response's `permkv` object when the server is `permkv serve`, else they are unknown (None / 0).
    """

    client: object  # openai.OpenAI
    model: str
    tokenizer: object = None
    max_positions: int = 8192

    def __post_init__(self):
        self.name = self.model

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            raise ValueError("ClientLM needs tokenizer= to count tokens (sizing pieces to a KV budget)")
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def prompt_tokens(self, prompt) -> int:
        return sum(self.count(str(m.get("content") or "")) + 4 for m in _messages(prompt))

    def complete(self, prompt, max_new_tokens: int, ratio: float = 1.0, speculate: bool = False) -> Reply:
        if speculate:
            raise ValueError("speculate is not available through a client: the server decodes")
        extra = {} if ratio == 1 else {"kv_cache_compression_ratio": ratio}
        t0 = time.perf_counter()
        out = self.client.chat.completions.create(model=self.model, messages=_messages(prompt),
                                                  max_tokens=max_new_tokens, extra_body=extra or None)
        seconds = time.perf_counter() - t0
        stats = (out.model_extra or {}).get("permkv") or {}
        n = out.usage.prompt_tokens if out.usage else 0
        # token ids do not travel over HTTP, only their count
        gen = Generation([0] * (out.usage.completion_tokens if out.usage else 0), n, float(ratio),
                         stats.get("kv_tokens"), int(stats.get("kv_bytes", 0)),
                         int(stats.get("kv_pool_bytes", 0)), seconds, out.choices[0].finish_reason or "stop")
        return Reply(out.choices[0].message.content or "", gen)


def as_lm(model_or_client, model: str | None = None, tokenizer=None) -> LM:
    """An LM from: an LM, a Backend, a `(model, tokenizer, spec)` tuple from `load_model`, or an
    `openai.OpenAI` client (then `model` names the served model)."""
    if hasattr(model_or_client, "complete") and hasattr(model_or_client, "count"):
        return model_or_client
    if hasattr(model_or_client, "generate") and hasattr(model_or_client, "spec"):
        return LocalLM(model_or_client)
    if isinstance(model_or_client, Sequence) and len(model_or_client) == 3:
        return LocalLM(SequentialBackend(*model_or_client))
    if hasattr(model_or_client, "chat") and hasattr(model_or_client, "base_url"):
        if not model:
            raise ValueError("model must name the served model when model_or_client is an openai client")
        return ClientLM(model_or_client, model, tokenizer)
    raise ValueError("model_or_client must be an LM, a permkv Backend, a (model, tokenizer, spec) tuple or an "
                     f"openai.OpenAI client, got {type(model_or_client).__name__}")
