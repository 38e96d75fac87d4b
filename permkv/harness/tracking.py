"""One small wrapper over MLflow: one experiment per notebook, params, metrics, figures, artifacts.

The store is `sqlite:///mlflow.db` at the project root (MLflow's embedded default since 3.7; the file
store is deprecated) unless `MLFLOW_TRACKING_URI` points at a shared tracking server.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

ROOT = Path(os.environ.get("PERMKV_ROOT", Path(__file__).resolve().parents[2]))


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def _mlflow():
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts and dataclasses -> {"a.b": value} for mlflow.log_params."""
    out: dict[str, object] = {}
    for key, value in params.items():
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def artifact_root() -> str | None:
    """Where a new experiment keeps its artifacts: `mlartifacts/` beside a sqlite store (MLflow's default,
    `./mlruns` under the current folder, would litter whatever folder a test or notebook runs in)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def set_experiment(experiment: str) -> str:
    """Create `experiment` if needed (artifacts beside the store) and make it active; tagged as model
    development (MLflow UIs that read the tag open it on its runs table; 3.17 needs `experiment_link`)."""
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_root())
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ui_address() -> str:
    """Where the UI is: a tracking server's own address, else where `make mlflow` serves it."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def experiment_link(experiment_id: str, ui: str | None = None) -> str:
    """The UI page of one experiment, opened on its runs table. MLflow 3.17 shows an experiment in the
    view chosen by its global GenAI / Model training switch (GenAI until a user flips it) and ignores the
    `mlflow.experimentKind` tag; a `workflowType` URL parameter overrides the switch for that page."""
    return f"{ui or ui_address()}/#/experiments/{experiment_id}?workflowType=machine_learning"


def experiment_links(ui: str | None = None) -> dict[str, str]:
    """{experiment name: `experiment_link`} of every experiment in the store, by name."""
    client = _mlflow().tracking.MlflowClient()
    return {e.name: experiment_link(e.experiment_id, ui) for e in sorted(client.search_experiments(), key=lambda e: e.name)
            if e.name != "Default"}


@contextmanager
def run(experiment: str, params: dict, profile: str) -> Iterator[object]:
    """Start an MLflow run in `experiment`, log `params` and tag the profile; ends it on exit."""
    mlflow = _mlflow()
    set_experiment(experiment)
    with mlflow.start_run(tags={"profile": profile}) as active:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield active


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics; names may hold letters, digits, '_', '-', '.', '/' and spaces."""
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_curve(name: str, steps, values) -> None:
    """A sweep as one step-indexed metric (score vs ratio, tokens/s vs batch), drawn as a curve by the UI.
    Steps must be integers (ratios 2, 4, 8, ...; lengths in tokens); undefined values are skipped."""
    mlflow = _mlflow()
    for step, value in zip(steps, values):
        if value is not None and math.isfinite(float(value)):
            mlflow.log_metric(name, float(value), step=int(step))


def log_figure(fig, name: str) -> None:
    _mlflow().log_figure(fig, name)


def log_dict(obj: dict | list, name: str) -> None:
    _mlflow().log_dict(obj, name)


def log_artifact(path: str | Path) -> None:
    _mlflow().log_artifact(str(path))


def latest_run(experiment: str, prefer: tuple[str, ...] | None = ("gpu", "full", "cpu"), finished_only: bool = True):
    """The newest run of `experiment`: a `prefer`red profile first, then any other full profile
    (e.g. a reduced cpu run), then a quick smoke run; with `prefer=None` simply the newest.
    `finished_only=False` also returns FAILED runs, so that a failed rerun hides older numbers.
    None if there is none."""
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    ended = ("FINISHED",) if finished_only else ("FINISHED", "FAILED")
    runs = [r for r in runs if r.info.status in ended]
    if not runs:
        return None
    if prefer is None:
        return runs[0]

    def rank(run) -> int:
        profile = run.data.tags.get("profile")
        return prefer.index(profile) if profile in prefer else len(prefer) + (profile == "quick")

    return min(runs, key=rank)


@dataclass(frozen=True)
class Record:
    """What the ledger reads of a notebook's run: its profile, status, parameters and metrics."""

    experiment: str
    profile: str
    status: str  # FINISHED or FAILED
    params: dict[str, str]
    metrics: dict[str, float]


def write_record(folder: Path, experiment: str, profile: str, params: dict, metrics: Mapping[str, float],
                 error: str | None = None) -> None:
    """`run.json` beside a run's figures and tables: the ledger's source where no MLflow store has the run
    (a fresh clone: the store is not committed, the reports are). With `error`, a FAILED run."""
    record = dict(experiment=experiment, profile=profile, status="FINISHED" if error is None else "FAILED",
                  params={k: str(v)[:500] for k, v in flatten(params).items()},
                  metrics={k: float(v) for k, v in metrics.items()})
    if error is not None:
        record["error"] = error[:2000]
    (folder / "run.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def newest_record(experiment: str, prefer: tuple[str, ...] = ("gpu", "full", "cpu")) -> Record | None:
    """The run the ledger shows for `experiment`: the newest in the MLflow store (a FAILED one too, so
    that a failed rerun hides older numbers), else the committed `reports/<profile>/<experiment>/run.json`
    of the most preferred profile (quick last). None if neither has one."""
    run = latest_run(experiment, prefer, finished_only=False)
    if run is not None:
        return Record(experiment, run.data.tags.get("profile", "?"), run.info.status, dict(run.data.params),
                      dict(run.data.metrics))
    for profile in (*prefer, "quick"):
        path = ROOT / "reports" / profile / experiment / "run.json"
        if path.exists():
            r = json.loads(path.read_text())
            return Record(experiment, r["profile"], r["status"], r["params"], r["metrics"])
    return None


def mark_failed(experiment: str, profile: str, why: str) -> None:
    """Record a failed notebook as a FAILED run of its profile (so the ledger does not show older numbers
    as current)."""
    mlflow = _mlflow()
    set_experiment(experiment)
    mlflow.start_run(tags={"profile": profile, "permkv.error": why[:5000]})
    mlflow.end_run(status="FAILED")
    write_record(out_dir(profile, experiment), experiment, profile, {}, {}, error=why)


def out_dir(profile: str, experiment: str) -> Path:
    """reports/<profile>/<experiment>/: where a notebook writes its figures and tables."""
    path = ROOT / "reports" / profile / experiment
    path.mkdir(parents=True, exist_ok=True)
    return path


def defined(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics that have a value: NaN / inf (e.g. a retention over a zero baseline) are left out."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def publish(experiment: str, config, profile: str, metrics: Mapping[str, float], figures: Mapping[str, object] = {},
            tables: Mapping[str, object] = {}, curves: Mapping[str, tuple] = {}) -> Path:
    """A notebook's last cell: save figures (PNG, tight box) and tables (JSON; CSV too for DataFrames)
    under reports/<profile>/<experiment>/ and log all of it, with `config` as parameters, the defined
    metrics and `curves` ({name: (steps, values)}, see `log_curve`), to one MLflow run; DataFrames are
    also logged as MLflow tables. Returns the output folder."""
    folder = out_dir(profile, experiment)
    params = asdict(config) if is_dataclass(config) else dict(config)
    with run(experiment, params, profile) as active:
        log_metrics(defined(metrics))
        write_record(folder, experiment, profile, params, defined(metrics))
        for name, (steps, values) in curves.items():
            log_curve(name, steps, values)
        for name, fig in figures.items():
            fig.savefig(folder / name, bbox_inches="tight", dpi=120)
            log_artifact(folder / name)
        for name, table in tables.items():
            if hasattr(table, "to_csv"):
                table.to_csv(folder / f"{name}.csv", index=False)
                log_artifact(folder / f"{name}.csv")
                _mlflow().log_table(table, artifact_file=f"tables/{name}.json")
                table = table.to_dict("records")
            (folder / f"{name}.json").write_text(json.dumps(table, indent=1, default=str))
            log_artifact(folder / f"{name}.json")
    print(f"MLflow (`make mlflow`): {experiment_link(active.info.experiment_id)}")
    return folder


if __name__ == "__main__":  # `make mlflow` prints where each notebook's runs are
    for name, link in experiment_links().items():
        print(f"  {name:36s} {link}")
