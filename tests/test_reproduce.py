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


def test_fingerprint_covers_the_permkv_sources_a_notebook_runs():
    """A notebook is rerun when code it imports changes, not when an unrelated system does."""
    pk = tracking.ROOT / "permkv"
    got = set(reproduce.permkv_sources("import os\nfrom permkv.compress import check_ratio\n"))
    assert {pk / "__init__.py", pk / "compress" / "__init__.py", pk / "compress" / "compressor.py",
            pk / "cache" / "paged.py", pk / "checks.py"} <= got  # packages on the way and what they import
    assert not any(p.is_relative_to(pk / "rvs") or p.is_relative_to(pk / "knowledge") for p in got)
    books = {nb.stem: set(reproduce.permkv_sources(reproduce.notebook_code(nb)))
             for nb in sorted((tracking.ROOT / "notebooks").glob("*.ipynb"))}
    assert pk / "rvs" / "decode.py" in books["06_recursive_verification"]
    assert pk / "rvs" / "decode.py" not in books["02_compression_quality"]
    assert pk / "knowledge" / "memory.py" in books["07_continual_learning_forgetting"]
    assert all(pk / "harness" / "tracking.py" in sources for sources in books.values())


def test_every_profile_has_valid_parameters():
    for profile in reproduce.PROFILES:
        for nb in reproduce.notebooks():
            params = reproduce.load_params(nb, profile)
            assert params.get("PROFILE", profile) == profile


@pytest.fixture(scope="module")
def quick_store(tmp_path_factory, fresh_store):
    """Run every notebook's quick profile once, into a throwaway MLflow store (and durations file)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = fresh_store(tmp)
    old = os.environ.get("MLFLOW_TRACKING_URI"), reproduce.DURATIONS
    os.environ["MLFLOW_TRACKING_URI"] = uri
    reproduce.DURATIONS = tmp / "durations.json"
    try:
        status = reproduce.main(["--profile", "quick", "--force", "--jobs", "2"])
    finally:
        if old[0] is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old[0]
        reproduce.DURATIONS = old[1]
    return status, MlflowClient(uri), uri


@pytest.mark.parametrize("notebook", [p.stem for p in reproduce.notebooks()])
def test_quick_notebook_runs_and_logs(quick_store, notebook):
    status, client, _ = quick_store
    exp = client.get_experiment_by_name(notebook)
    assert exp is not None, f"{notebook} logged no MLflow experiment"
    (run,) = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    assert run.data.tags["profile"] == "quick" and run.data.metrics
    assert f"{notebook}.ipynb" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert (tracking.ROOT / "reports" / "quick" / f"{notebook}.ipynb").exists()
    assert status == 0


def test_baseline_quick_metrics(quick_store):
    _, client, _ = quick_store
    exp = client.get_experiment_by_name("00_baseline")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert 0.0 <= m["score.smollm2-135m.niah_single.512"] <= 1.0
    assert 1 < m["score.gemma3-270m.perplexity.512"] < 100
    assert m["prefill_s.smollm2-135m.512"] > 0 and "claim.niah_single_full_cache" in m
    assert (tracking.ROOT / "reports" / "claims.md").read_text().count("|") > 50


def test_paged_attention_quick_metrics(quick_store):
    _, client, _ = quick_store
    exp = client.get_experiment_by_name("01_paged_attention")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert 0 <= m["claim.paged_waste_pct"] < m["claim.reservation_waste_pct"] <= 100
    assert m["concurrent_requests.reserve_max_context"] <= m["claim.concurrent_requests_1x"]
    assert 0 <= m["demo_paged_waste_pct"] < 100


def _tiny_notebooks(tmp_path, monkeypatch, uri: str, names: list[str]) -> MlflowClient:
    """Real notebooks that publish one metric X (FAIL: true makes them raise), in a temporary project."""
    import nbformat

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params" / "quick").mkdir(parents=True)
    for name in names:
        nb = nbformat.v4.new_notebook()
        nb.cells = [
            nbformat.v4.new_code_cell('PROFILE = "quick"\nX = 1\nFAIL = False', metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("from permkv.harness import tracking\nassert not FAIL, 'asked to fail'\n"
                                      f"tracking.publish('{name}', {{'x': X}}, PROFILE, {{'x': X}})"),
        ]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / "notebooks" / f"{name}.ipynb")
        (tmp_path / "params" / "quick" / f"{name}.yaml").write_text("X: 2\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PERMKV_ROOT", str(tmp_path))  # the kernel writes its reports under tmp_path
    monkeypatch.setattr(tracking, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "NOTEBOOKS", tmp_path / "notebooks")
    monkeypatch.setattr(reproduce, "PARAMS", tmp_path / "params")
    monkeypatch.setattr(reproduce, "DURATIONS", tmp_path / "reports" / "durations.json")
    return MlflowClient(uri)


@pytest.mark.slow
def test_resume_skips_up_to_date_notebooks_and_records_failures(tmp_path, monkeypatch, store, capsys):
    """A second run skips a finished notebook; a changed parameter file or --force reruns it; a failing
    notebook becomes a FAILED run (so the ledger cannot show older numbers as current)."""
    client = _tiny_notebooks(tmp_path, monkeypatch, store(), ["98_tiny"])
    params = tmp_path / "params" / "quick" / "98_tiny.yaml"

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


@pytest.mark.slow
def test_jobs_run_notebooks_side_by_side(tmp_path, monkeypatch, store, capsys):
    """--jobs 2: every notebook runs in its own process (one torch thread each on 2 cores), logs its
    MLflow run and its duration; a failing one fails the whole command and is recorded as failed."""
    names = ["97_tiny", "98_tiny", "99_tiny"]
    client = _tiny_notebooks(tmp_path, monkeypatch, store(), names)
    (tmp_path / "params" / "quick" / "99_tiny.yaml").write_text("FAIL: true\n")
    assert reproduce.main(["--profile", "quick", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "finished 97_tiny: ok" in out and "finished 99_tiny: FAILED" in out
    for name, status in [("97_tiny", "FINISHED"), ("98_tiny", "FINISHED"), ("99_tiny", "FAILED")]:
        run, = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert run.info.status == status
        assert (tmp_path / "reports" / "quick" / "logs" / f"{name}.log").exists()
    assert set(json.loads((tmp_path / "reports" / "durations.json").read_text())["quick"]) == {"97_tiny", "98_tiny"}
    assert reproduce.main(["--profile", "quick", "--jobs", "2", "--only", "97_tiny", "98_tiny"]) == 0
    assert "0 of 2 notebooks to run" in capsys.readouterr().out


def test_makespan_is_longest_first_on_the_least_busy_worker():
    assert reproduce.makespan([90, 80, 40, 35, 20, 20, 17, 13], 2) == 158
    assert reproduce.makespan([10, 10], 1) == 20 and reproduce.makespan([5], 4) == 5


def test_throughput_quick_metrics(quick_store):
    _, client, _ = quick_store
    exp = client.get_experiment_by_name("03_throughput")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert m["throughput.total_gain_1x"] == 1.0 and m["claim.throughput_gain_8x"] > 0
    # compressed per chunk, more sequences fit at once; KVzip-style reading first holds the whole prompt
    assert m["throughput.max_batch_kvcompress_8x"] >= m["throughput.max_batch_1x"] >= 1
    assert m["throughput.max_batch_kvzip_8x"] >= 1
    assert 0 < m["throughput.prefill_share_1x"] < 1
    assert m["throughput.engine_1x_vs_hf_sequential"] > 0
    assert {"claim.engine_concurrency_gain_8x", "throughput.total_gain_kvcompress_8x", "cost.per_seq_s",
            "quality.score_1x"} <= set(m)
    # retention is undefined (not logged) when the full cache finds none of the smoke run's 3 needles
    assert "claim.throughput_retention_8x" in m or m["quality.score_1x"] == 0
    assert m["claim.engine_concurrency_gain_8x"] > 1  # compressed sequences hold fewer blocks


def test_speculative_decoding_quick_metrics(quick_store):
    _, client, _ = quick_store
    (run,) = client.search_runs([client.get_experiment_by_name("04_speculative_decoding").experiment_id])
    m = run.data.metrics
    assert m["all_identical"] == 1.0  # lossless: every method's output equals plain greedy
    assert m["claim.speculative_speedup_grounded"] > 0 and m["claim.speculative_speedup_open_ended"] > 0
    assert "claim.speculative_minus_hf_grounded_ci_low" in m and m["cost.verify_s.1"] > 0


def test_continual_learning_quick_metrics(quick_store):
    _, client, _ = quick_store
    (run,) = client.search_runs([client.get_experiment_by_name("07_continual_learning_forgetting").experiment_id])
    m = run.data.metrics
    assert 0 <= m["fact_em_target"] <= 1 and 0 < m["memory_used_fraction"] <= 1
    assert all(f"{k}_fact_em" in m for k in ("sparse", "full", "lora"))
    assert all(v == v for v in m.values())  # no NaN reaches MLflow
    assert m["plain_essay_ppl"] > 1 and 0 <= m["sparse_skip_format_format_read_share"] <= 1
    assert m["n_seeds"] == 1
    assert ("claim.forgetting_sparse_pct.min" in m) == (m["fact_em_target"] > 0)  # claim rows need acquisition


def test_compression_quality_quick_metrics(quick_store):
    _, client, _ = quick_store
    (run,) = client.search_runs([client.get_experiment_by_name("02_compression_quality").experiment_id])
    m = run.data.metrics
    for mode in ("query_aware", "query_agnostic"):
        assert f"full_score_8x_{mode}" in m and f"n_8x_{mode}" in m
        assert f"diff_vs_kvpress_8x_{mode}" in m and f"diff_vs_random_8x_{mode}" in m
        assert 0 <= m[f"score.niah_single.512.{mode}.kvcompress/uniform/w64.8x"] <= 1
    assert "long.achieved_ratio.gemma3-270m.niah_single.640.query_aware.kvcompress/uniform/w64.8x" in m
    assert {"scores.png", "budgets.png", "bytes.png", "rows.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_mlflow_server_shows_what_a_person_needs(quick_store):
    """The real MLflow server over the quick store, read through its REST API: every experiment opens on
    its runs table (model-development kind), every run has its figures, no metric is NaN."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    _, _, uri = quick_store
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def get(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        experiments = [e for e in get("/experiments/search", {"max_results": 100})["experiments"] if e["name"] != "Default"]
        assert {e["name"] for e in experiments} == {p.stem for p in reproduce.notebooks()}
        for exp in experiments:
            tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
            assert tags.get("mlflow.experimentKind") == "custom_model_development", exp["name"]
            (run,) = get("/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
            metrics = run["data"]["metrics"]
            assert metrics and not [m["key"] for m in metrics if m["value"] != m["value"]], f"NaN metric in {exp['name']}"
            files = get(f"/artifacts/list?run_id={run['info']['run_id']}").get("files", [])
            assert any(f["path"].endswith(".png") for f in files), f"{exp['name']} logged no figure"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_executed_notebooks_are_clean(quick_store):
    """No error outputs, no progress bars or warnings in stderr, no `nan` printed where a number belongs."""
    import nbformat

    for nb_path in reproduce.notebooks():
        executed = nbformat.read(tracking.ROOT / "reports" / "quick" / nb_path.name, as_version=4)
        for cell in executed.cells:
            for out in cell.get("outputs", []):
                assert out["output_type"] != "error", f"{nb_path.stem}: {out.get('ename')}"
                text = out.get("text", "") if out["output_type"] == "stream" else ""
                if out.get("name") == "stderr":
                    assert "it/s]" not in text and "%|" not in text and "TqdmWarning" not in text, f"{nb_path.stem}: {text[:200]}"
                assert "nan%" not in text and " nan " not in text, f"{nb_path.stem}: {text[:200]}"


def test_generated_files_are_not_tracked():
    """Files every run rewrites (the ledger, the durations lock) must stay untracked, or the quick profile
    run by the tests changes the tree (a `git add -f` of reports/ once tracked reports/claims.md)."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "reports/claims.md", "reports/durations.lock"],
                            cwd=tracking.ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    assert listed.stdout == "", f"generated files are tracked: {listed.stdout}"


def test_tests_leave_the_tree_clean(quick_store):
    """Running the notebooks writes only ignored outputs (reports/<profile>/, the throwaway stores): no
    ./mlruns, no change to tracked files. In CI (a fresh clone) `git status` must be empty."""
    import subprocess

    for folder in (tracking.ROOT, tracking.ROOT / "tests", tracking.ROOT / "notebooks"):
        assert not (folder / "mlruns").exists(), f"an MLflow run wrote artifacts into {folder / 'mlruns'}"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tracking.ROOT, capture_output=True, text=True)
    if status.returncode != 0:
        pytest.skip("not a git checkout")
    if os.environ.get("CI"):
        assert status.stdout == "", f"tests changed the tree:\n{status.stdout}"


def test_recursive_lm_quick_metrics(quick_store):
    _, client, _ = quick_store
    exp = client.get_experiment_by_name("05_recursive_lm")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert m["claim.rlm_read_calls_1x"] >= 4 and m["claim.rlm_read_calls_8x"] == 1  # 800 tokens, 200 per call
    assert m["permkv_rlm.1x.n"] == 1 and m["truncated.1x.n"] == 1 and m["official_rlm.1x.n"] == 1
    assert m["permkv_rlm_attention.8x.n"] == 1 and "permkv_rlm_attention.1x.n" not in m  # 1x keeps all: one run
    assert 0 <= m["official_rlm.1x.score"] <= 1


def test_recursive_verification_quick_metrics(quick_store):
    _, client, _ = quick_store
    exp = client.get_experiment_by_name("06_recursive_verification")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert m["claim.rvs_tokens_reasoned_ratio_8x"] >= 1  # 8x never reasons fewer tokens than 1x
    assert 0 <= m["rvs_full_accuracy"] <= 1 and 0 <= m["rvs_accuracy_8x"] <= 1 and m["rvs_budget"] >= 3
    assert "claim.rvs_verification_gain_ci_low" in m and m["n.6.verify.8x"] == 1
