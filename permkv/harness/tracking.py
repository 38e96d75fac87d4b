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
from dataclasses import asdict, is_dataclass
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


@contextmanager
def run(experiment: str, params: dict, profile: str) -> Iterator[object]:
    """Start an MLflow run in `experiment`, log `params` and tag the profile; ends it on exit."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    with mlflow.start_run(tags={"profile": profile}) as active:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield active


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics; names may hold letters, digits, '_', '-', '.', '/' and spaces."""
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


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


def mark_failed(experiment: str, profile: str, why: str) -> None:
    """Record a failed notebook as a FAILED run of its profile (so the ledger does not show older numbers
    as current)."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    mlflow.start_run(tags={"profile": profile, "permkv.error": why[:5000]})
    mlflow.end_run(status="FAILED")


def out_dir(profile: str, experiment: str) -> Path:
    """reports/<profile>/<experiment>/: where a notebook writes its figures and tables."""
    path = ROOT / "reports" / profile / experiment
    path.mkdir(parents=True, exist_ok=True)
    return path


def defined(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics that have a value: NaN / inf (e.g. a retention over a zero baseline) are left out."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def publish(experiment: str, config, profile: str, metrics: Mapping[str, float], figures: Mapping[str, object] = {},
            tables: Mapping[str, object] = {}) -> Path:
    """A notebook's last cell: save figures (PNG, tight box) and tables (JSON; CSV too for DataFrames)
    under reports/<profile>/<experiment>/ and log all of it, with `config` as parameters and the
    defined metrics, to one MLflow run. Returns the output folder."""
    folder = out_dir(profile, experiment)
    with run(experiment, asdict(config) if is_dataclass(config) else dict(config), profile):
        log_metrics(defined(metrics))
        for name, fig in figures.items():
            fig.savefig(folder / name, bbox_inches="tight", dpi=120)
            log_artifact(folder / name)
        for name, table in tables.items():
            if hasattr(table, "to_csv"):
                table.to_csv(folder / f"{name}.csv", index=False)
                log_artifact(folder / f"{name}.csv")
                table = table.to_dict("records")
            (folder / f"{name}.json").write_text(json.dumps(table, indent=1, default=str))
            log_artifact(folder / f"{name}.json")
    return folder
