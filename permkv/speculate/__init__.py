"""Lossless speculative decoding: greedy output, fewer forward passes, drafts taken from the input.

- `drafts`: `DraftTree` (a chain or tree of draft tokens), `PromptLookup`, `Backoff` (draft sources);
- `suffix`: `SuffixIndex`, `SuffixDraft` (SuffixDecoding's frequency-scored draft trees);
- `cost`: `VerifyCost`, the measured cost of a verification pass vs tokens fed (sizes the drafts);
- `verify`: `speculative_generate` (the verification loop, chains and trees), `greedy_generate_ids`, `replay` (the
  same loop driven by a known greedy output: exact pass counts without the model);
- `engine`: `SpeculativeDecodingEngine`, the seed's call shape with a measured speedup.
"""

from permkv.speculate.cost import VerifyCost
from permkv.speculate.drafts import Backoff, DraftSource, DraftTree, PromptLookup
from permkv.speculate.engine import SpeculationOutcome, SpeculativeDecodingEngine
from permkv.speculate.suffix import SuffixDraft, SuffixIndex
from permkv.speculate.verify import (
    RollbackCache,
    SpecResult,
    SpecStats,
    greedy_generate_ids,
    new_cache,
    replay,
    speculative_generate,
    tree_mask,
    tree_ready,
)

__all__ = [
    "Backoff", "DraftSource", "DraftTree", "PromptLookup", "RollbackCache", "SpecResult", "SpecStats",
    "SpeculationOutcome", "SpeculativeDecodingEngine", "SuffixDraft", "SuffixIndex", "VerifyCost",
    "greedy_generate_ids", "new_cache", "replay", "speculative_generate", "tree_mask", "tree_ready",
]
