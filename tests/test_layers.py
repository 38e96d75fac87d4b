"""The layers only point down: core systems know no tasks, experiments, harness or MLflow.

Every `import` in every module of the package (function-level ones included) is read with `ast`
and checked against what its system may use.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "permkv"
CORE = {"models", "eval", "cache", "compress", "speculate", "knowledge", "engine", "rlm", "rvs"}

# system -> the permkv systems it may import (besides itself)
ALLOWED = {
    "models": set(),
    "cache": {"models"},
    "eval": {"models", "cache"},
    "compress": {"models", "eval", "cache"},
    "speculate": {"models", "eval", "cache"},
    "knowledge": {"models", "eval", "cache"},
    "engine": {"models", "eval", "cache", "compress", "speculate"},
    "rvs": {"models", "eval", "cache", "compress", "speculate", "engine"},
    "rlm": {"models", "eval", "cache", "compress", "speculate", "engine"},
    "serve": {"models", "eval", "cache", "compress", "speculate", "engine", "rlm"},
    "data": {"models"},
    "baselines": {"models", "eval", "cache", "compress", "speculate", "engine"},
    "experiments": CORE | {"data", "baselines", "serve", "experiments"},
    "bench": CORE | {"data", "baselines", "experiments", "harness", "serve"},
    "harness": CORE | {"data", "baselines", "experiments", "serve"},
}
# permkv/checks.py (argument checks) is the bottom layer: it imports nothing of permkv, everyone may use it
ALLOWED = {"checks": set(), **{name: allowed | {"checks"} for name, allowed in ALLOWED.items()}}


def system(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "permkv"


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


MODULES = [p for p in sorted(PACKAGE.rglob("*.py")) if system(p) != "permkv"]


def test_every_system_has_a_layer():
    unknown = sorted({system(p) for p in MODULES} - set(ALLOWED))
    assert not unknown, f"give {unknown} a place in ALLOWED (tests/test_layers.py)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = system(path)
    for name in imports(path):
        parts = name.split(".")
        if parts[0] == "mlflow":
            assert own == "harness", f"{path.name} imports MLflow; only permkv.harness may"
        if parts[0] == "permkv" and len(parts) > 1 and parts[1] != own:
            assert parts[1] in ALLOWED.get(own, set()), (
                f"{own} ({path.relative_to(PACKAGE)}) imports permkv.{parts[1]}: layers must point down")
