"""Execute every notebook with Papermill: `python -m permkv.harness.reproduce --profile quick|cpu|gpu|full
[--only NAME ...] [--force] [--jobs N]`.

Each notebook `notebooks/NAME.ipynb` runs with `params/<profile>/NAME.yaml`; the executed copy goes to
`reports/<profile>/NAME.ipynb` and is attached to the notebook's newest MLflow run. Parameter files
are checked against every notebook's `parameters` cell before anything runs, and the plan prints an
estimate from the last measured durations (`reports/durations.json`).

Resume: a notebook whose fingerprint (its code, its parameter file and the permkv sources it imports) matches
its newest finished run of the profile is skipped (`--force` runs it anyway). A failing notebook does
not stop the others: it is recorded as a FAILED run, so the ledger shows it failed instead of older
numbers; the summary names it and the exit status is non-zero. The claims ledger is regenerated last.

Jobs: `--jobs N` runs N notebooks at a time, each in its own process with cores / N torch threads,
longest (by last measured duration) first; their Papermill output goes to `reports/<profile>/logs/`.
On 2 cores two one-thread notebooks finish sooner than one after the other with two threads, because
batch-1 decoding does not get faster with a second thread (SmolLM2, 2K context: 92 vs 87 ms per token).
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from permkv.harness import claims, tracking

PROFILES = ("quick", "cpu", "gpu", "full")
NOTEBOOKS = tracking.ROOT / "notebooks"
PARAMS = tracking.ROOT / "params"
# measured seconds per profile and notebook ($PERMKV_DURATIONS elsewhere: the parallel runs' children inherit it)
DURATIONS = Path(os.environ.get("PERMKV_DURATIONS", tracking.ROOT / "reports" / "durations.json"))


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


def _permkv_imports(code: str) -> set[str]:
    """The permkv modules `code` imports (function-level imports too): `from permkv.x import y` names
    both permkv.x and permkv.x.y, which is a module when y is one."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "permkv" or n.startswith("permkv.")}


def permkv_sources(code: str) -> list[Path]:
    """The permkv source files that importing what `code` imports runs: those modules, every package
    `__init__` on their way, and what they import in turn."""
    seen: set[Path] = set()
    todo = list(_permkv_imports(code))
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            base = tracking.ROOT.joinpath(*parts[:i])
            path = next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.exists()), None)
            if path is not None and path not in seen:
                seen.add(path)
                todo += _permkv_imports(path.read_text())
    return sorted(seen)


def notebook_code(notebook: Path) -> str:
    """The Python of a notebook's code cells (IPython magics and shell lines left out)."""
    cells = json.loads(notebook.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def fingerprint(notebook: Path, profile: str) -> str:
    """sha256 over the notebook, its parameter file and the permkv sources it runs (`permkv_sources`):
    a change to a system the notebook does not use leaves it up to date."""
    files = [notebook, PARAMS / profile / f"{notebook.stem}.yaml"]
    files += permkv_sources(notebook_code(notebook))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def up_to_date(notebook: Path, profile: str, print_: str) -> bool:
    """Whether the newest run of `notebook` in `profile` finished with this fingerprint."""
    run = tracking.latest_run(notebook.stem, prefer=(profile,), finished_only=False)
    return (run is not None and run.data.tags.get("profile") == profile and run.info.status == "FINISHED"
            and run.data.tags.get("permkv.fingerprint") == print_)


def durations() -> dict[str, dict[str, float]]:
    return json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}


def _record_duration(profile: str, name: str, seconds: float) -> None:
    """Read-modify-write under a file lock: with --jobs several notebooks finish at once."""
    DURATIONS.parent.mkdir(parents=True, exist_ok=True)
    with open(DURATIONS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = durations()
        table.setdefault(profile, {})[name] = round(seconds)
        DURATIONS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def _finish(notebook: Path, executed: Path, print_: str, seconds: float) -> None:
    """Attach the executed notebook to the run it logged and tag the run with its fingerprint."""
    run = tracking.latest_run(notebook.stem, prefer=None)
    if run is not None:
        client = tracking._mlflow().tracking.MlflowClient()
        client.log_artifact(run.info.run_id, str(executed))
        client.set_tag(run.info.run_id, "permkv.fingerprint", print_)
        client.set_tag(run.info.run_id, "permkv.seconds", f"{seconds:.0f}")


def _run_one(nb: Path, params: dict, print_: str, profile: str, out_dir: Path) -> tuple[str, str, float, str]:
    """Execute one notebook in this process; returns (name, "ok" | "FAILED", seconds, why)."""
    import papermill

    out = out_dir / nb.name
    t0 = time.time()
    try:
        papermill.execute_notebook(str(nb), str(out), parameters=params, cwd=str(tracking.ROOT),
                                   kernel_name="python3", progress_bar=True)
        _finish(nb, out, print_, time.time() - t0)
        _record_duration(profile, nb.stem, time.time() - t0)
        return nb.stem, "ok", time.time() - t0, ""
    except Exception as err:  # keep going past a failing notebook
        why = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"
        tracking.mark_failed(nb.stem, profile, why)
        return nb.stem, "FAILED", time.time() - t0, why[:200]


def _run_parallel(books: list[Path], profile: str, jobs: int, out_dir: Path) -> list[tuple[str, str, float, str]]:
    """Run `books` `jobs` at a time, each as `reproduce --only NAME --force --no-claims` in a child process
    with its share of the cores; a child's Papermill output goes to reports/<profile>/logs/NAME.log."""
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, PERMKV_ROOT=str(tracking.ROOT), PERMKV_DURATIONS=str(DURATIONS),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)), OMP_WAIT_POLICY="PASSIVE")
    waiting, running, results = list(books), {}, []
    while waiting or running:
        while waiting and len(running) < jobs:
            nb = waiting.pop(0)
            cmd = [sys.executable, "-m", "permkv.harness.reproduce", "--profile", profile,
                   "--only", nb.stem, "--force", "--no-claims"]
            log = open(logs / f"{nb.stem}.log", "w")
            running[nb.stem] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.time(), log)
            print(f"started {nb.stem} (log: {logs / nb.stem}.log)", flush=True)
        time.sleep(1)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            status = "ok" if proc.returncode == 0 else "FAILED"
            why = "" if status == "ok" else f"see {logs / name}.log"
            results.append((name, status, time.time() - t0, why))
            print(f"finished {name}: {status} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return results


def makespan(seconds: list[float], jobs: int) -> float:
    """Wall time of running tasks of these durations, longest first, each on the least busy of `jobs` workers."""
    workers = [0.0] * jobs
    for s in sorted(seconds, reverse=True):
        workers[workers.index(min(workers))] += s
    return max(workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--only", nargs="*", help="notebook names (stems) to run")
    parser.add_argument("--force", action="store_true", help="run notebooks that are up to date too")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run at a time (cores are split among them)")
    parser.add_argument("--no-claims", dest="claims", action="store_false", help="do not rewrite the claims ledger")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    books = notebooks(args.only)
    plan = [(nb, load_params(nb, args.profile), fingerprint(nb, args.profile)) for nb in books]  # fail fast
    out_dir = tracking.ROOT / "reports" / args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    known = durations().get(args.profile, {})
    todo = [(nb, params, fp) for nb, params, fp in plan if args.force or not up_to_date(nb, args.profile, fp)]
    print(f"profile {args.profile}: {len(todo)} of {len(plan)} notebooks to run "
          f"({len(plan) - len(todo)} up to date; --force reruns them)")
    for nb, _, _ in todo:
        last = known.get(nb.stem)
        print(f"  {nb.stem:<36} last measured: " + (f"{last / 60:.1f} min" if last else "never run"))
    if todo and all(nb.stem in known for nb, _, _ in todo):
        seconds = [known[nb.stem] for nb, _, _ in todo]
        print(f"  estimate: {sum(seconds) / 60:.0f} min one after the other"
              + (f", ~{makespan(seconds, args.jobs) / 60:.0f} min with {args.jobs} jobs" if args.jobs > 1 else ""))
    running = {nb for nb, _, _ in todo}
    results = [(nb.stem, "skipped", 0.0, "up to date") for nb, _, _ in plan if nb not in running]
    # Progress bars of the notebooks' loops would land in the saved notebooks as stderr output: the
    # kernels run without them; Papermill's per-cell bar shows progress here instead.
    os.environ["TQDM_DISABLE"] = "1"
    if args.jobs > 1:
        todo.sort(key=lambda item: -known.get(item[0].stem, 0))  # longest first
        results += _run_parallel([nb for nb, _, _ in todo], args.profile, args.jobs, out_dir)
    else:
        for i, (nb, params, fp) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {nb.stem} ({args.profile})", flush=True)
            results.append(_run_one(nb, params, fp, args.profile, out_dir))
    if args.claims:
        claims.write(readme=args.profile != "quick")  # the README shows full-profile results only
    print("\nnotebook                              status     minutes")
    for name, status, seconds, why in results:
        print(f"{name:<38}{status:<11}{seconds / 60:7.1f}  {why}")
    print(f"claims ledger: {tracking.ROOT / 'reports' / 'claims.md'}")
    return 1 if any(s == "FAILED" for _, s, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
