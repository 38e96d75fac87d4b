"""The quality a compression keeps, as measured by notebook 02 (never a formula), loaded by the user.

Notebook 02 writes a JSON table (`permkv.experiments.compression_quality.write_quality_table`): one
row per (model, mode, ratio, compression settings) with the retention measured on the project's own
task samples (mean score / full-cache mean score on the same samples), its paired bootstrap 95% CI,
n and the tasks and lengths. The user loads it once and picks the rows of a model and mode:

    measured = QualityTable.load("reports/cpu/02_compression_quality/quality_table.json").measured(
        "smollm2-135m", "query_aware")
    InferenceKVCacheCompression(quality=measured)  # its reports carry the retention measured for them

A setting that was not measured has no estimate (None). Nothing here is read again per call, and this
module imports nothing of the harness or experiments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MODES = ("query_aware", "query_agnostic")
KVZIP_SCORER = "kvzip"  # KVzip-style re-reading (`KVzipScore`); its rows have observe 0
NEEDED = ("model", "mode", "ratio", "scorer", "allocator", "observe", "retention", "ci_low", "ci_high", "n", "tasks")


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


@dataclass(frozen=True)
class MeasuredQuality:
    """The measured rows of one model in one mode (`QualityTable.measured`), looked up by setting and ratio.
    A setting is (scorer, allocator, observe), as `InferenceKVCacheCompression.setting()` gives it."""

    rows: tuple[dict, ...]
    model: str
    mode: str
    source: str = ""

    def _matching(self, scorer: str, allocator: str, observe: int) -> list[dict]:
        return [r for r in self.rows if r["scorer"] == scorer and r["allocator"] == allocator and r["observe"] == observe
                and r["n"] > 0 and r["retention"] == r["retention"]]

    def estimate(self, ratio: float, scorer: str, allocator: str, observe: int) -> QualityEstimate | None:
        """The measured retention at exactly this ratio and setting, or None if it was not measured."""
        for r in self._matching(scorer, allocator, observe):
            if float(r["ratio"]) == float(ratio):
                return QualityEstimate(float(r["retention"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n"]),
                                       tuple(r["tasks"]), tuple(r.get("context_tokens", ())), self.model, self.mode,
                                       float(ratio), self.source)
        return None

    def ratio_for(self, floor: float, scorer: str, allocator: str, observe: int) -> float | None:
        """The largest measured ratio whose retention CI lies at or above `floor` (its lower end >= floor),
        or None if no measured ratio does."""
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be a retention in (0, 1], got {floor!r}")
        ok = [float(r["ratio"]) for r in self._matching(scorer, allocator, observe) if r["ci_low"] >= floor]
        return max(ok) if ok else None


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
        if not isinstance(rows, list) or any(not set(NEEDED) <= set(r) for r in rows):
            raise ValueError(f"path must hold a JSON list of rows with {sorted(NEEDED)}, got {str(path)!r}")
        return cls(rows, str(path))

    def measured(self, model: str, mode: str) -> MeasuredQuality:
        """The rows of `model` (its permkv.models name) in `mode`; ValueError naming what the table holds."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rows = tuple(r for r in self.rows if r["model"] == model and r["mode"] == mode)
        if not rows:
            held = sorted({(r["model"], r["mode"]) for r in self.rows})
            raise ValueError(f"model {model!r} in mode {mode!r} was not measured in {self.source or 'this table'}; "
                             f"it holds {held}")
        return MeasuredQuality(rows, model, mode, self.source)
