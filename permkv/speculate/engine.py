"""The seed's `SpeculativeDecodingEngine`: prompt lookup + Backoff + verification, with a measured speedup."""

from __future__ import annotations

from dataclasses import dataclass

from permkv.models import encode_prompt
from permkv.speculate.drafts import Backoff, PromptLookup
from permkv.speculate.verify import SpecStats, greedy_generate_ids, speculative_generate

@dataclass
class SpeculationOutcome:
    """The seed's result shape: drafts proposed, text accepted, and the measured speedup."""

    candidates: list[list[str]]  # every draft sent for verification, as token strings
    accepted: str  # the generated continuation (identical to greedy decoding's)
    speedup: float | None  # greedy wall time / speculative wall time, measured; None if not asked
    stats: SpecStats
    greedy_stats: SpecStats | None = None


@dataclass
class SpeculativeDecodingEngine:
    """The seed's `SpeculativeDecodingEngine`, on a real model: prompt lookup + Backoff + verification."""

    model: object
    tokenizer: object
    spec: object  # permkv.models.ModelSpec (for the chat template)
    k: int = 10  # draft length (seed: maxCandidates)
    max_ngram: int = 3  # longest suffix matched (seed: lookupWindow plays this role)
    min_ngram: int = 1
    max_new_tokens: int = 128

    def __post_init__(self):
        PromptLookup(self.k, self.max_ngram, self.min_ngram)  # validates the arguments early

    def drafter(self, corpus: list[int] | None = None) -> Backoff:
        return Backoff(PromptLookup(self.k, self.max_ngram, self.min_ngram, list(corpus or [])))

    def generate_with_speculation(
        self,
        prompt: str,
        generated: str = "",
        lookup_corpus: str | list[str] | None = None,
        measure_speedup: bool = False,
    ) -> SpeculationOutcome:
        """Continue `prompt` (+ text already `generated`), drafting from both and `lookup_corpus`.

        With `measure_speedup`, plain greedy runs on the same input too, its output is checked to be
        identical, and the speedup is the ratio of the two wall times.
        """

        tok = self.tokenizer
        ids = encode_prompt(tok, self.spec, prompt)
        if generated:
            ids += tok(generated, add_special_tokens=False).input_ids
        texts = [lookup_corpus] if isinstance(lookup_corpus, str) else list(lookup_corpus or [])
        corpus = [t for text in texts for t in tok(text, add_special_tokens=False).input_ids]
        eos = tok.eos_token_id
        res = speculative_generate(self.model, ids, self.max_new_tokens, self.drafter(corpus), eos)
        speedup, greedy_stats = None, None
        if measure_speedup:
            ref = greedy_generate_ids(self.model, ids, self.max_new_tokens, eos)
            if ref.tokens != res.tokens:
                raise AssertionError("speculative output differs from greedy: the verification is broken")
            greedy_stats = ref.stats
            speedup = ref.stats.wall_s / res.stats.wall_s
        return SpeculationOutcome(
            candidates=[tok.convert_ids_to_tokens(d) for d, _ in res.drafts],
            accepted=tok.decode(res.tokens, skip_special_tokens=True),
            speedup=speedup,
            stats=res.stats,
            greedy_stats=greedy_stats,
        )
