"""Seeded tasks and the data behind them, all from packages that ship here.

- `sources`: essays (haystack + held-out tail), SQuAD v2, HotpotQA;
- `tasks`: long-context task builders (needles, variable tracking, SQuAD / HotpotQA among
  distractors, perplexity) with a target length in tokens, encodable query-aware or query-agnostic;
- `facts`: fictional facts (and world facts the base model knows) for the continual-learning experiment.
"""

from permkv.data.facts import WORLD_FACTS, Fact, make_facts, training_texts
from permkv.data.sources import heldout_essays, load_essays, load_hotpot, load_squad
from permkv.data.tasks import MODES, TASKS, Sample, build_task, encode_sample, prompt_parts

__all__ = [
    "MODES", "TASKS", "WORLD_FACTS", "Fact", "Sample", "build_task", "encode_sample", "heldout_essays",
    "load_essays", "load_hotpot", "load_squad", "make_facts", "prompt_parts", "training_texts",
]
