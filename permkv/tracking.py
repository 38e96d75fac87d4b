"""One small wrapper over MLflow: one experiment per notebook, params, metrics, figures, artifacts.

The store is `sqlite:///mlflow.db` at the project root (MLflow's embedded default since 3.7; the file
store is deprecated) unless `MLFLOW_TRACKING_URI` points at a shared tracking server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

ROOT = Path(os.environ.get("PERMKV_ROOT", Path(__file__).resolve().parents[1]))


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


def latest_run(experiment: str, prefer: tuple[str, ...] | None = ("gpu", "cpu")):
    """The newest finished run of `experiment`: a `prefer`red profile first, then any other full
    profile (e.g. a reduced cpu run), then a quick smoke run; with `prefer=None` simply the newest.
    None if there is none."""
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])

    if prefer is None:
        return runs[0] if runs else None

    def rank(run) -> int:
        profile = run.data.tags.get("profile")
        return prefer.index(profile) if profile in prefer else len(prefer) + (profile == "quick")

    return min(runs, key=rank) if runs else None
