"""What issue 11's per-sample diagnoses share: JSON lines appended one sample at a time (a killed run resumes
where it stopped) and one entry point that either runs or summarises into <out>/table.md."""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch


def pending(path: Path, samples: list, start: int, stop: int) -> list[tuple[int, object]]:
    """(index, sample) of samples[start:stop] not yet in `path`."""
    done = {json.loads(line)["sample"] for line in path.open()} if path.exists() else set()
    return [(i, samples[i]) for i in range(start, stop) if i not in done]


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run_or_table(ap: argparse.ArgumentParser, run: Callable, table: Callable[[Path], str]) -> None:
    """Parse `ap` plus --table: summarise <out> into <out>/table.md, or run on one torch thread."""
    ap.add_argument("--table", action="store_true", help="summarise <out> into <out>/table.md instead of running")
    args = ap.parse_args()
    if args.table:
        text = table(Path(args.out))
        (Path(args.out) / "table.md").write_text(text)
        print(text)
    else:
        torch.set_num_threads(1)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        run(args)
