"""The reproduce runner: parameter files are checked before compute; quick notebooks run end to end."""

import json
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


@pytest.mark.slow
def test_resume_skips_up_to_date_notebooks_and_records_failures(tmp_path, monkeypatch, capsys):
    """A second run skips a finished notebook; a changed parameter file or --force reruns it; a failing
    notebook becomes a FAILED run (so the ledger cannot show older numbers as current)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('PROFILE = "quick"\nX = 1\nFAIL = False', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from permkv.harness import tracking\nassert not FAIL, 'asked to fail'\n"
                                  "tracking.publish('98_tiny', {'x': X}, PROFILE, {'x': X})"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "98_tiny.ipynb")
    (tmp_path / "params" / "quick").mkdir(parents=True)
    params = tmp_path / "params" / "quick" / "98_tiny.yaml"
    params.write_text("X: 2\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PERMKV_ROOT", str(tmp_path))  # the kernel writes its reports under tmp_path
    monkeypatch.setattr(tracking, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "NOTEBOOKS", tmp_path / "notebooks")
    monkeypatch.setattr(reproduce, "PARAMS", tmp_path / "params")
    monkeypatch.setattr(reproduce, "DURATIONS", tmp_path / "reports" / "durations.json")
    client = MlflowClient(uri)

    def runs():
        return client.search_runs([client.get_experiment_by_name("98_tiny").experiment_id],
                                  order_by=["attributes.start_time DESC"])

    assert reproduce.main(["--profile", "quick"]) == 0
    assert len(runs()) == 1 and runs()[0].data.metrics == {"x": 2.0}
    assert runs()[0].data.tags["permkv.fingerprint"] == reproduce.fingerprint(tmp_path / "notebooks" / "98_tiny.ipynb", "quick")
    assert "98_tiny" in json.loads((tmp_path / "reports" / "durations.json").read_text())["quick"]
    capsys.readouterr()
    assert reproduce.main(["--profile", "quick"]) == 0
    assert "0 of 1 notebooks to run" in capsys.readouterr().out and len(runs()) == 1
    params.write_text("X: 3\n")
    assert reproduce.main(["--profile", "quick"]) == 0 and len(runs()) == 2
    assert reproduce.main(["--profile", "quick", "--force"]) == 0 and len(runs()) == 3
    params.write_text("FAIL: true\n")
    assert reproduce.main(["--profile", "quick"]) == 1
    assert runs()[0].info.status == "FAILED" and "asked to fail" in runs()[0].data.tags["permkv.error"]


def test_throughput_quick_metrics(quick_store):
    _, client = quick_store
    exp = client.get_experiment_by_name("03_throughput")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert m["throughput.total_gain_1x"] == 1.0 and m["claim.throughput_gain_8x"] > 0
    assert m["throughput.max_batch_8x"] >= m["throughput.max_batch_1x"] >= 1
    assert 0 < m["throughput.prefill_share_1x"] < 1
    assert m["throughput.engine_1x_vs_hf_sequential"] > 0
    assert {"claim.engine_concurrency_gain_8x", "throughput.batch_gain_8x", "cost.per_seq_s", "quality.8x"} <= set(m)
    assert m["claim.engine_concurrency_gain_8x"] > 1  # compressed sequences hold fewer blocks
