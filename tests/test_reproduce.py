"""The reproduce runner: parameter files are checked before compute; quick notebooks run end to end."""

import os

import pytest
from mlflow.tracking import MlflowClient

from permkv.harness import reproduce, tracking

BASELINE = tracking.ROOT / "notebooks" / "00_baseline.ipynb"


def _params(tmp_path, monkeypatch, text):
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "00_baseline.yaml").write_text(text)
    monkeypatch.setattr(reproduce, "PARAMS", tmp_path)


def test_unknown_parameter_is_named(tmp_path, monkeypatch):
    _params(tmp_path, monkeypatch, "N_SAMPLE: 3\n")
    with pytest.raises(reproduce.ParameterError, match="unknown parameter 'N_SAMPLE'"):
        reproduce.load_params(BASELINE, "quick")


def test_wrong_type_is_named(tmp_path, monkeypatch):
    _params(tmp_path, monkeypatch, "N_SAMPLES: many\n")
    with pytest.raises(reproduce.ParameterError, match="parameter 'N_SAMPLES' must be int"):
        reproduce.load_params(BASELINE, "quick")


def test_missing_parameter_file(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "PARAMS", tmp_path)
    with pytest.raises(reproduce.ParameterError, match="missing parameter file"):
        reproduce.load_params(BASELINE, "quick")
    with pytest.raises(ValueError, match="unknown notebook"):
        reproduce.notebooks(["99_nothing"])


def test_every_profile_has_valid_parameters():
    for profile in reproduce.PROFILES:
        for nb in reproduce.notebooks():
            params = reproduce.load_params(nb, profile)
            assert params.get("PROFILE", profile) == profile


@pytest.fixture(scope="module")
def quick_store(tmp_path_factory):
    """Run every notebook's quick profile once, into a throwaway MLflow store."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        status = reproduce.main(["--profile", "quick"])
    finally:
        if old is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return status, MlflowClient(uri)


@pytest.mark.parametrize("notebook", [p.stem for p in reproduce.notebooks()])
def test_quick_notebook_runs_and_logs(quick_store, notebook):
    status, client = quick_store
    exp = client.get_experiment_by_name(notebook)
    assert exp is not None, f"{notebook} logged no MLflow experiment"
    (run,) = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    assert run.data.tags["profile"] == "quick" and run.data.metrics
    assert f"{notebook}.ipynb" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert (tracking.ROOT / "reports" / "quick" / f"{notebook}.ipynb").exists()
    assert status == 0


def test_baseline_quick_metrics(quick_store):
    _, client = quick_store
    exp = client.get_experiment_by_name("00_baseline")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert 0.0 <= m["score.smollm2-135m.niah_single.512"] <= 1.0
    assert 1 < m["score.gemma3-270m.perplexity.512"] < 100
    assert m["prefill_s.smollm2-135m.512"] > 0 and "claim.niah_single_full_cache" in m
    assert (tracking.ROOT / "reports" / "claims.md").read_text().count("|") > 50


def test_paged_attention_quick_metrics(quick_store):
    _, client = quick_store
    exp = client.get_experiment_by_name("01_paged_attention")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert 0 <= m["claim.paged_waste_pct"] < m["claim.reservation_waste_pct"] <= 100
    assert m["concurrent_requests.reserve_max_context"] <= m["claim.concurrent_requests_1x"]
    assert 0 <= m["demo_paged_waste_pct"] < 100


def test_recursive_verification_quick_metrics(quick_store):
    _, client = quick_store
    exp = client.get_experiment_by_name("06_recursive_verification")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert m["claim.rvs_tokens_reasoned_ratio_8x"] >= 1  # 8x never reasons fewer tokens than 1x
    assert 0 <= m["rvs_full_accuracy"] <= 1 and 0 <= m["rvs_accuracy_8x"] <= 1 and m["rvs_budget"] >= 3
    assert "claim.rvs_verification_gain_ci_low" in m and m["n.6.verify.8x"] == 1
