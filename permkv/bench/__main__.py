"""`python -m permkv.bench <name> [args]`: run one benchmark module of this package."""

import importlib
import pkgutil
import sys

import permkv.bench


def main(argv: list[str]) -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(permkv.bench.__path__) if not m.name.startswith("_"))
    if not argv or argv[0] not in names:
        raise SystemExit(f"usage: python -m permkv.bench {{{','.join(names)}}} [args]")
    importlib.import_module(f"permkv.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
