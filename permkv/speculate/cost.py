"""What a verification pass costs on this machine: seconds of one forward pass vs tokens fed.

A decode step feeds 1 token; verifying a draft of d tokens feeds 1 + d (the last accepted token and the
drafts). On a CPU the weights are read once per pass whatever the width, so a wide pass costs far less
than d + 1 steps but not nothing: `VerifyCost.measure` times it on the real model once, at start, and
`best_size` turns a draft's expected accepted tokens into "how many drafts to verify, if any".
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from permkv.checks import positive_int


@dataclass(frozen=True)
class VerifyCost:
    """Median seconds of a forward pass feeding `sizes[i]` tokens on a cached context: `seconds[i]`.

    Between the measured sizes the cost is interpolated linearly, past the last one extrapolated with
    the last slope; seconds never decrease with size (a measured dip is noise).
    """

    sizes: tuple[int, ...]  # tokens fed per pass, ascending, the first one 1 (a plain decode step)
    seconds: tuple[float, ...]  # median seconds at each size
    context: int = 0  # cached tokens the points were measured on (0: not measured, e.g. a hand-made model)

    def __post_init__(self):
        if not self.sizes or self.sizes[0] != 1 or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must be ascending distinct token counts starting at 1, got {self.sizes}")
        if len(self.seconds) != len(self.sizes) or min(self.seconds) <= 0:
            raise ValueError(f"seconds must be one positive time per size ({len(self.sizes)}), got {self.seconds}")
        monotone, top = [], 0.0
        for s in self.seconds:
            top = max(top, s)
            monotone.append(top)
        object.__setattr__(self, "seconds", tuple(monotone))

    @classmethod
    def linear(cls, step_s: float, per_token_s: float, max_size: int = 64) -> "VerifyCost":
        """A hand-made model: step_s for one token, per_token_s more for each extra token."""
        return cls((1, max_size), (step_s, step_s + per_token_s * (max_size - 1)))

    def __call__(self, n: int) -> float:
        """Seconds of a pass feeding `n` >= 1 tokens."""
        sizes, secs = self.sizes, self.seconds
        if n <= 1 or len(sizes) == 1:
            return secs[0]
        i = next((j for j, s in enumerate(sizes) if s >= n), len(sizes) - 1)  # >= 1, as sizes[0] = 1 < n
        lo, hi = sizes[i - 1], sizes[i]
        slope = (secs[i] - secs[i - 1]) / (hi - lo)
        return secs[i - 1] + slope * (n - lo)

    def relative(self, n: int) -> float:
        """Cost of feeding `n` tokens in units of one plain decode step."""
        return self(n) / self(1)

    def best_size(self, gains: list[float]) -> int:
        """How many of the drafts to verify: the d maximising (1 + gains[0] + ... + gains[d-1]) / cost(1 + d).

        `gains[i]` is the chance that draft i is accepted (best first, each draft's parent earlier); the
        1 is the model's own token, which every pass yields. 0 means plain decoding pays best.
        """
        best, best_rate, expected = 0, 1.0 / self(1), 1.0
        for d, g in enumerate(gains, start=1):
            expected += g
            rate = expected / self(1 + d)
            if rate > best_rate:
                best, best_rate = d, rate
        return best

    @classmethod
    @torch.inference_mode()
    def measure(cls, model, context: int = 512, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                repeats: int = 5, batch: int = 1) -> "VerifyCost":
        """Time forward passes of each size on a `context`-token DynamicCache of the real model.

        Sizes are interleaved within each repeat (load on a shared machine hits them alike) and the
        cache is cropped back after each pass; the median of `repeats` is kept per size. `batch` > 1
        times `batch` sequences at once, each fed `size` tokens (speculation inside a batched step).
        """
        from transformers import DynamicCache

        positive_int("context", context)
        positive_int("repeats", repeats)
        positive_int("batch", batch)
        vocab = model.config.get_text_config(decoder=True).vocab_size
        ids = torch.arange(context + max(sizes), device=model.device).remainder(vocab - 1).add(1)[None].repeat(batch, 1)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for rep in range(repeats + 1):  # the first pass warms the kernels up and is not kept
            for n in sizes:
                t0 = time.perf_counter()
                model(input_ids=ids[:, context : context + n], past_key_values=cache, use_cache=True, logits_to_keep=n)
                if rep:
                    times[n].append(time.perf_counter() - t0)
                cache.crop(context)
        return cls(tuple(sizes), tuple(statistics.median(times[n]) for n in sizes), context)

    def as_dict(self) -> dict:
        return {"context": self.context, **{f"verify_s.{n}": s for n, s in zip(self.sizes, self.seconds)}}
