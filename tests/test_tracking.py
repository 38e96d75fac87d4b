import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mlflow.tracking import MlflowClient

from permkv.harness import claims, tracking


def test_run_is_read_back_through_the_client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    with tracking.run("test_exp", {"a": 1, "nested": {"b": "x"}}, profile="quick") as active:
        tracking.log_metrics({"score.x": 0.75})
        tracking.log_figure(fig, "fig.png")
    client = MlflowClient(uri)
    run = client.get_run(active.info.run_id)
    assert run.data.metrics["score.x"] == 0.75
    assert run.data.params == {"a": "1", "nested.b": "x"}
    assert run.data.tags["profile"] == "quick"
    assert "fig.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert tracking.latest_run("test_exp").info.run_id == run.info.run_id


def test_claims_ledger_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.run("00_baseline", {}, profile="cpu"):
        tracking.log_metrics({"claim.niah_single_full_cache": 0.5})
    rows = {r["claim"]: r for r in claims.ledger_rows()}
    needle = next(c for c in claims.CLAIMS if c.metric == "claim.niah_single_full_cache")
    assert rows[needle.claim]["verdict"] == "not reproduced" and rows[needle.claim]["measured"] == "0.5 (cpu)"
    assert all(r["verdict"] == "not yet measured" for r in rows.values() if r["experiment"] == "04_speculative_decoding")
    c = claims.Claim("x", "x", "s", "1", "c", "e", "m", target=11.0, higher_is_better=False)
    assert claims.verdict(c, 9.0) == "reproduced" and claims.verdict(c, 12.0) == "not reproduced"
    assert claims.verdict(c, None) == "not yet measured"
    assert claims.verdict(c, 9.0, profile="quick") == "smoke run only"
