"""Benchmarks: `python -m permkv.bench <name>` runs `permkv.bench.<name>.main(argv)`.

Each writes its JSON to reports/bench/<name>.json. Speeds are ratios measured side by side in one
run, as medians of repeats, since this machine is shared and noisy.
"""

import json
from pathlib import Path

from permkv.tracking import ROOT


def write_result(name: str, result: dict) -> Path:
    """Write a benchmark's result JSON under reports/bench/ and return its path."""
    path = ROOT / "reports" / "bench" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
