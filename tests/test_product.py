"""What a user gets is a product, not a work log: a README that fits on a few screens, no tracker numbers in
the package, notebooks, parameters, docs or tests, and no one-off scripts or per-task report folders."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("permkv", "notebooks", "params", "docs", "tests")
# "issue", then an optional space and "#", then a number; built in pieces so that this file does not match it
TRACKER_NUMBER = re.compile("iss" + "ue" + r" ?#?\d+", re.IGNORECASE)


def test_readme_fits_in_300_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it to 300 (details go to docs/)"


def test_no_tracker_numbers():
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in {".pyc", ".png", ".gguf"}:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            found += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
                      for m in TRACKER_NUMBER.finditer(text)]
    assert not found, "say what a thing is, not which ticket changed it:\n" + "\n".join(found)


def test_no_scripts_or_per_task_reports():
    assert not (ROOT / "scripts").exists()
    assert not sorted((ROOT / "reports").glob("issue*"))
