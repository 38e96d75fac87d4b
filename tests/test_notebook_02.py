"""Notebook 02's quick profile runs and logs the ledger's compression metrics."""

import os

import pytest
from mlflow.tracking import MlflowClient

from permkv.harness import reproduce


@pytest.mark.slow
def test_quick_02_logs_the_claim_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        assert reproduce.main(["--profile", "quick", "--only", "02_compression_quality"]) == 0
    finally:
        if old is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("02_compression_quality").experiment_id])
    m = run.data.metrics
    for mode in ("query_aware", "query_agnostic"):
        assert f"full_score_8x_{mode}" in m and f"n_8x_{mode}" in m
        assert f"diff_vs_kvpress_8x_{mode}" in m and f"diff_vs_random_8x_{mode}" in m
        assert 0 <= m[f"score.niah_single.512.{mode}.permkv.8x"] <= 1
    assert "long.achieved_ratio.gemma3-270m.niah_single.640.query_aware.permkv.8x" in m
    assert {"scores.png", "budgets.png", "bytes.png", "rows.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
