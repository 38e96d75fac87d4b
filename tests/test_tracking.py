import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mlflow.tracking import MlflowClient

from permkv.harness import claims, tracking


def test_run_is_read_back_through_the_client(tmp_path, monkeypatch, store):
    uri = store()
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


def test_claims_ledger_verdicts(tmp_path, monkeypatch, store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store())
    monkeypatch.setattr(tracking, "ROOT", tmp_path)  # no committed run records either
    with tracking.run("00_baseline", {"n_samples": 30}, profile="cpu"):
        tracking.log_metrics({"claim.niah_single_full_cache": 0.5})
    rows = {r["claim"]: r for r in claims.ledger_rows()}
    needle = next(c for c in claims.CLAIMS if c.metric == "claim.niah_single_full_cache")
    assert rows[needle.claim]["verdict"] == "not reproduced"
    assert rows[needle.claim]["measured"] == "0.5 (cpu, n_samples=30)"  # the samples behind the value
    assert all(r["verdict"] == "not yet measured" for r in rows.values() if r["experiment"] == "04_speculative_decoding")
    with tracking.run("07_continual_learning_forgetting", {"n_facts": 24}, profile="cpu"):  # a mean over seeds
        tracking.log_metrics({"claim.forgetting_sparse_pct": 30.0, "claim.forgetting_sparse_pct.min": 20.0,
                              "claim.forgetting_sparse_pct.max": 40.0})
    row = next(r for r in claims.ledger_rows() if r["claim"].startswith("Sparse memory finetuning forgets 11%"))
    assert row["measured"] == "30 (cpu, n_facts=24; seeds' range 20 to 40)" and row["verdict"] == "not reproduced"
    c = claims.Claim("x", "x", "s", "1", "c", "e", "m", target=11.0, higher_is_better=False)
    assert claims.verdict(c, 9.0) == "reproduced" and claims.verdict(c, 12.0) == "not reproduced"
    assert claims.verdict(c, None) == "not yet measured"
    assert claims.verdict(c, 9.0, profile="quick") == "smoke run only"
    with tracking.run("04_speculative_decoding", {"n_prompts": 3}, profile="cpu"):  # speed claims need n >= 30
        tracking.log_metrics({"claim.speculative_speedup_grounded": 2.5, "all_identical": 1.0})
    rows = {r["claim"]: r for r in claims.ledger_rows() if r["experiment"] == "04_speculative_decoding"}
    assert rows["Prompt lookup gives ~2.4x on input-grounded tasks"]["verdict"] == "no verdict (n < 30)"
    assert rows["Speculation is lossless: the output is greedy's"]["verdict"] == "reproduced"  # no minimum n
    with tracking.run("03_throughput", {"n_requests": 30}, profile="cpu"):  # fast, but the answers are gone
        tracking.log_metrics({"claim.throughput_gain_8x": 4.0, "claim.throughput_retention_8x": 0.0,
                              "claim.throughput_gain_64x": 6.0, "claim.throughput_retention_64x": 0.95})
    rows = {r["claim"]: r for r in claims.ledger_rows() if r["experiment"] == "03_throughput"}
    assert rows["3.44x throughput at 8x compression"]["verdict"] == "not reproduced (answers lost)"
    assert "keeps 0.00 of the full cache's score" in rows["3.44x throughput at 8x compression"]["measured"]
    assert rows["5.18x throughput at 64x compression"]["verdict"] == "reproduced"


def test_quality_and_speed_claims_need_30_samples(tmp_path, monkeypatch, store):
    """A quality (02) or speed (03, 04) claim measured on fewer than 30 samples gives no verdict; 30 give one;
    claims that are not measured on samples (paged memory waste) need none."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store())
    with tracking.run("02_compression_quality", {"n_samples": 29}, profile="cpu"):
        tracking.log_metrics({"claim.retention_8x_query_aware": 0.99})
    row = next(r for r in claims.ledger_rows() if r["claim"].startswith("8x KV compression keeps 95%+ task quality (query-aware)"))
    assert row["verdict"] == "no verdict (n < 30)" and row["measured"] == "0.99 (cpu, n_samples=29)"
    with tracking.run("02_compression_quality", {"n_samples": 30}, profile="cpu"):
        tracking.log_metrics({"claim.retention_8x_query_aware": 0.99})
    row = next(r for r in claims.ledger_rows() if r["claim"].startswith("8x KV compression keeps 95%+ task quality (query-aware)"))
    assert row["verdict"] == "reproduced"
    by_id = {c.id: c for c in claims.CLAIMS}
    for cid in ("compress.8x_aware", "compress.best_8x_aware_gemma", "throughput.8x", "speculate.pld", "rvs.quality_8x"):
        assert claims.min_samples(by_id[cid]) == 30, cid
        assert claims.verdict(by_id[cid], 100.0, "cpu", n=3) == "no verdict (n < 30)", cid
        assert claims.verdict(by_id[cid], 100.0, "cpu", n=None) != "no verdict (n < 30)", cid  # n unknown
    assert claims.min_samples(by_id["paged.waste"]) == 0 and claims.verdict(by_id["paged.waste"], 1.0, "cpu", n=3) == "reproduced"
    assert claims.verdict(by_id["paged.concurrent_1x"], 10.0, "cpu", n=3) == "measured"  # no target, no verdict to withhold


def test_failed_rerun_hides_older_numbers(tmp_path, monkeypatch, store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store())
    monkeypatch.setattr(tracking, "ROOT", tmp_path)  # the failed run's record goes there
    with tracking.run("00_baseline", {}, profile="cpu"):
        tracking.log_metrics({"claim.niah_single_full_cache": 0.95})
    tracking.mark_failed("00_baseline", "cpu", "RuntimeError: boom")
    rows = [r for r in claims.ledger_rows() if r["experiment"] == "00_baseline"]
    assert rows and all(r["verdict"] == "failed: rerun the notebook" and "0.95" not in r["measured"] for r in rows)
    assert tracking.latest_run("00_baseline").data.metrics["claim.niah_single_full_cache"] == 0.95  # finished only


def test_publish_saves_logs_and_drops_undefined_metrics(tmp_path, monkeypatch, store, capsys):
    import pandas as pd

    uri = store()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking, "ROOT", tmp_path)
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    folder = tracking.publish("99_test", {"n": 3}, "quick", {"a": 1.0, "b": float("nan"), "c": float("inf")},
                              figures={"f.png": fig}, tables={"rows": pd.DataFrame({"x": [1, 2]}), "raw": [{"y": 1}]},
                              curves={"score_vs_ratio": ([2, 8, 64], [0.9, float("nan"), 0.1])})
    assert folder == tmp_path / "reports" / "quick" / "99_test"
    assert {p.name for p in folder.iterdir()} == {"f.png", "rows.csv", "rows.json", "raw.json", "run.json"}
    run = tracking.latest_run("99_test")
    assert run.data.metrics == {"a": 1.0, "score_vs_ratio": 0.1} and run.data.params == {"n": "3"}
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "score_vs_ratio")] == [(2, 0.9), (64, 0.1)]
    exp = client.get_experiment_by_name("99_test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # MLflow 3.17 ignores that tag; the printed link opens the runs table (checked in Chromium)
    link = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    assert link in capsys.readouterr().out
    assert tracking.experiment_links() == {"99_test": link}
    assert exp.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())  # not ./mlruns of the cwd
    assert {"f.png", "rows.csv", "rows.json", "raw.json"} <= {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}


def test_from_params_maps_upper_case_names_and_names_what_is_missing():
    from dataclasses import dataclass

    import pytest

    from permkv.harness.config import from_params

    @dataclass
    class Cfg:
        n_samples: int
        mode: str = "query_aware"

    assert from_params(Cfg, {"N_SAMPLES": 3, "PROFILE": "quick"}) == Cfg(3)
    with pytest.raises(ValueError, match=r"Cfg needs the parameters \['N_SAMPLES'\]"):
        from_params(Cfg, {"MODE": "x"})


def test_the_ledger_reads_the_committed_run_records_without_a_store(tmp_path, monkeypatch, store):
    """A fresh clone has no MLflow store: the ledger comes from reports/<profile>/<notebook>/run.json."""
    monkeypatch.setattr(tracking, "ROOT", tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store("empty.db"))
    folder = tracking.out_dir("cpu", "00_baseline")
    tracking.write_record(folder, "00_baseline", "cpu", {"n_samples": 30}, {"claim.niah_single_full_cache": 0.95})
    tracking.write_record(tracking.out_dir("quick", "00_baseline"), "00_baseline", "quick", {"n_samples": 2},
                          {"claim.niah_single_full_cache": 0.5})
    row = next(r for r in claims.ledger_rows() if r["experiment"] == "00_baseline")
    assert row["measured"] == "0.95 (cpu, n_samples=30)" and row["verdict"] == "reproduced"
    tracking.mark_failed("00_baseline", "cpu", "a cell raised")  # a failed rerun hides the older numbers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store("other.db"))
    row = next(r for r in claims.ledger_rows() if r["experiment"] == "00_baseline")
    assert row["verdict"] == "failed: rerun the notebook"
