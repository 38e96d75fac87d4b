"""Prompt-lookup speculative decoding: lossless greedy decoding that drafts from the input.

- `drafts`: `PromptLookup`, `Backoff` (draft sources);
- `verify`: `speculative_generate` (the verification loop), `greedy_generate_ids` (same loop, no drafts);
- `engine`: `SpeculativeDecodingEngine`, the seed's call shape with a measured speedup.
"""

from permkv.speculate.drafts import Backoff, DraftSource, PromptLookup
from permkv.speculate.engine import SpeculationOutcome, SpeculativeDecodingEngine
from permkv.speculate.verify import (
    RollbackCache,
    SpecResult,
    SpecStats,
    greedy_generate_ids,
    new_cache,
    speculative_generate,
)

__all__ = [
    "Backoff", "DraftSource", "PromptLookup", "RollbackCache", "SpecResult", "SpecStats",
    "SpeculationOutcome", "SpeculativeDecodingEngine", "greedy_generate_ids", "new_cache", "speculative_generate",
]
