"""The quality a compression keeps, as measured by notebook 02 (never a formula).

Notebook 02 writes a JSON table (`permkv.experiments.compression_quality.write_quality_table`): one
row per (model, mode, ratio, compression settings) with the retention measured on the project's own
task samples (mean score / full-cache mean score on the same samples), its paired bootstrap 95% CI,
n and the tasks and lengths. `QualityTable` reads it; a setting that was not measured has no
estimate (None). This module reads a plain file: it imports nothing of the harness or experiments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MODES = ("query_aware", "query_agnostic")
KVZIP_SCORER = "kvzip"  # rows of KVzip-style re-reading (`prefill_and_compress(..., reread=...)`), observe 0


@dataclass(frozen=True)
class QualityEstimate:
    """Retention measured for one (model, mode, ratio, settings): point value, 95% CI, sample count."""

    retention: float
    ci_low: float
    ci_high: float
    n: int
    tasks: tuple[str, ...]
    context_tokens: tuple[int, ...]
    model: str
    mode: str
    ratio: float
    source: str  # the table file it was read from


@dataclass
class QualityTable:
    """Rows of notebook 02's measured-quality table; see the module docstring."""

    rows: list[dict]
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "QualityTable":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path must be notebook 02's quality table (JSON), got {str(path)!r}: no such file")
        rows = json.loads(path.read_text())
        need = {"model", "mode", "ratio", "scorer", "allocator", "observe", "retention", "ci_low", "ci_high", "n", "tasks"}
        if not isinstance(rows, list) or any(not need <= set(r) for r in rows):
            raise ValueError(f"path must hold a JSON list of rows with {sorted(need)}, got {str(path)!r}")
        return cls(rows, str(path))

    def _matching(self, model: str, mode: str, scorer: str, allocator: str, observe: int) -> list[dict]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return [r for r in self.rows if r["model"] == model and r["mode"] == mode and r["scorer"] == scorer
                and r["allocator"] == allocator and r["observe"] == observe and r["n"] > 0 and r["retention"] == r["retention"]]

    def estimate(self, model: str, mode: str, ratio: float, scorer: str, allocator: str, observe: int) -> QualityEstimate | None:
        """The measured retention at exactly this ratio and setting, or None if it was not measured."""
        for r in self._matching(model, mode, scorer, allocator, observe):
            if float(r["ratio"]) == float(ratio):
                return QualityEstimate(float(r["retention"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n"]),
                                       tuple(r["tasks"]), tuple(r.get("context_tokens", ())), model, mode, float(ratio),
                                       self.source)
        return None

    def ratio_for(self, model: str, mode: str, floor: float, scorer: str, allocator: str, observe: int) -> float | None:
        """The largest measured ratio whose retention CI lies at or above `floor` (its lower end >= floor),
        or None if no measured ratio does."""
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be a retention in (0, 1], got {floor!r}")
        ok = [float(r["ratio"]) for r in self._matching(model, mode, scorer, allocator, observe) if r["ci_low"] >= floor]
        return max(ok) if ok else None
