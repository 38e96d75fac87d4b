"""Benchmarks: `python -m permkv.bench <name>` runs `permkv.bench.<name>.main(argv)`.

Each writes its JSON to reports/bench/<name>.json. Speeds are ratios measured side by side in one
run, as medians of repeats, since this machine is shared and noisy.
"""

import json
import subprocess
import sys
from pathlib import Path

from permkv.harness.tracking import ROOT


def write_result(name: str, result: dict) -> Path:
    """Write a benchmark's result JSON under reports/bench/ and return its path."""
    path = ROOT / "reports" / "bench" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def peak_rss(setup: str, work: str) -> int:
    """Peak resident bytes of a fresh Python process while it runs `work` (after `setup`): the peak is
    reset between the two (Linux `clear_refs`), so loading a model in `setup` does not hide `work`'s."""
    code = (f"{setup}\nopen('/proc/self/clear_refs', 'w').write('5')\n{work}\n"
            "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024  # VmHWM is in KiB
