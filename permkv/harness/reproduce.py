"""Execute every notebook with Papermill: `python -m permkv.harness.reproduce --profile quick|cpu|gpu [--only NAME]`.

Each notebook `notebooks/NAME.ipynb` runs with `params/<profile>/NAME.yaml`; the executed copy goes to
`reports/<profile>/NAME.ipynb` and is attached to the notebook's newest MLflow run. Parameter files
are checked against every notebook's `parameters` cell before anything runs. A failing notebook does
not stop the others; the summary names it and the exit status is non-zero. The claims ledger is
regenerated last.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import yaml

from permkv.harness import claims, tracking

PROFILES = ("quick", "cpu", "gpu")
NOTEBOOKS = tracking.ROOT / "notebooks"
PARAMS = tracking.ROOT / "params"


class ParameterError(ValueError):
    """A parameter file that does not fit its notebook."""


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        names = {p.stem for p in found}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"unknown notebook(s) {unknown}; known: {sorted(names)}")
        found = [p for p in found if p.stem in only]
    return found


def _same_type(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if default is None:
        return True
    return isinstance(value, type(default))


def load_params(notebook: Path, profile: str) -> dict:
    """The parameter file's values, checked against the notebook's parameters cell."""
    import papermill

    path = PARAMS / profile / f"{notebook.stem}.yaml"
    if not path.exists():
        raise ParameterError(f"missing parameter file {path} for {notebook.name}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ParameterError(f"{path}: expected a mapping of parameter names to values")
    declared = papermill.inspect_notebook(str(notebook))
    for key, value in values.items():
        if key not in declared:
            raise ParameterError(f"{path}: unknown parameter {key!r}; {notebook.name} declares {sorted(declared)}")
        try:
            default = ast.literal_eval(declared[key]["default"])
        except (ValueError, SyntaxError):
            continue
        if not _same_type(value, default):
            raise ParameterError(
                f"{path}: parameter {key!r} must be {type(default).__name__} like its default "
                f"{declared[key]['default']}, got {type(value).__name__} {value!r}"
            )
    if "PROFILE" in declared:
        values["PROFILE"] = profile
    return values


def _attach(notebook: Path, executed: Path) -> None:
    run = tracking.latest_run(notebook.stem, prefer=None)
    if run is not None:
        tracking._mlflow().tracking.MlflowClient().log_artifact(run.info.run_id, str(executed))


def main(argv: list[str] | None = None) -> int:
    import papermill

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--only", nargs="*", help="notebook names (stems) to run")
    args = parser.parse_args(argv)
    books = notebooks(args.only)
    plan = [(nb, load_params(nb, args.profile)) for nb in books]  # fail fast, before any compute
    out_dir = tracking.ROOT / "reports" / args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (nb, params) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {nb.stem} ({args.profile})", flush=True)
        out = out_dir / nb.name
        t0 = time.time()
        try:
            papermill.execute_notebook(str(nb), str(out), parameters=params, cwd=str(tracking.ROOT),
                                       kernel_name="python3", progress_bar=True)
            _attach(nb, out)
            results.append((nb.stem, "ok", time.time() - t0, ""))
        except Exception as err:  # keep going past a failing notebook
            why = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"
            results.append((nb.stem, "FAILED", time.time() - t0, why[:200]))
    claims.write(readme=args.profile != "quick")  # the README shows full-profile results only
    print("\nnotebook                              status   minutes")
    for name, status, seconds, why in results:
        print(f"{name:<38}{status:<9}{seconds / 60:7.1f}  {why}")
    print(f"claims ledger: {tracking.ROOT / 'reports' / 'claims.md'}")
    return 1 if any(s != "ok" for _, s, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
