"""Notebook 02's experiment module: one prefill per sample serves every method, the full-cache answer
is notebook 00's, statistics and claim metrics on small inputs, the measured-quality table that a user loads once
and hands to InferenceKVCacheCompression."""

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from permkv.baselines.kvpress import PRESSES
from permkv.cache import forward
from permkv.compress import (
    KVZIP_SCORER,
    InferenceKVCacheCompression,
    QualityTable,
    get_scorer,
    observing,
    paged_cache_for,
    prefill_and_compress,
    prefill_shared,
)
from permkv.data import build_task, encode_sample
from permkv.experiments import compression_methods as cm
from permkv.experiments import compression_quality as cq
from permkv.experiments.scoring import evaluate

KVC = "kvcompress/uniform/w64"  # KV-Compress's score from the last 64 queries, the same budget per head


@pytest.mark.slow
def test_full_answer_is_notebook_00s_and_one_prefill_serves_all(smol):
    """02's "full" rows (decoded from the one prefill's uncompressed fork) are exactly 00's answers
    (own prefill, dense cache) on the same samples in both modes; a permkv method at 1x answers the same."""
    model, tok, spec = smol
    samples = build_task("niah_single", tok, spec, 2, 1000, seed=1)
    for mode in ("query_agnostic", "query_aware"):
        want = [r.output for r in evaluate(model, tok, spec, samples, mode, max_new_tokens=12)]
        for sample, text in zip(samples, want):
            rows = cq.answer_sample(model, tok, sample, spec, mode, [KVC, "kvpress/knorm"], [1, 4], 12)
            by = {(r["method"], r["ratio"]): r for r in rows}
            assert by["full", 1.0]["output"] == text and text
            assert by[KVC, 1.0]["output"] == text
            assert by[KVC, 4.0]["achieved_ratio"] == pytest.approx(4, rel=0.1)
            assert by["kvpress/knorm", 4.0]["achieved_ratio"] == pytest.approx(4, rel=0.05)
            assert all(r["full_score"] == by["full", 1.0]["score"] for r in rows)


@pytest.mark.slow
def test_one_prefill_serves_both_modes(smol):
    """The question read on top of the query-agnostic prefill (`Prefilled.extend`) gives what one prefill of
    the query-aware prefix gives (logits, observed queries, kvpress inputs, keys, up to rounding), and
    answer_sample over both modes answers as one call per mode (the query-agnostic rows exactly)."""
    model, tok, spec = smol
    sample = build_task("niah_single", tok, spec, 1, 600, seed=2)[0]
    (pa, sa), (pw, sw) = (encode_sample(tok, spec, sample, m) for m in ("query_agnostic", "query_aware"))
    assert pw[: len(pa)] == pa and len(pw) > len(pa)
    one = prefill_shared(model, pw, sw, 8, observe=64, keep_inputs=True)
    ext = prefill_shared(model, pa, sa, 8, observe=64, keep_inputs=True).extend(model, pw[len(pa) :], sw)
    assert ext.prefix == pw and ext.suffix == sw and ext.cache.seen == [len(pw)]
    torch.testing.assert_close(ext.logits, one.logits, atol=1e-3, rtol=1e-3)
    for i in one.queries:
        assert ext.queries[i].shape == one.queries[i].shape == (1, 9, 64, 64)
        torch.testing.assert_close(ext.queries[i], one.queries[i], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(ext.inputs[i].hidden_states, one.inputs[i].hidden_states, atol=1e-3, rtol=1e-3)
        for a, b in zip(ext.inputs[i].kwargs["position_embeddings"], one.inputs[i].kwargs["position_embeddings"]):
            torch.testing.assert_close(a, b)
    for (k1, v1), (k2, v2) in zip(ext.keys_values(), one.keys_values()):
        torch.testing.assert_close(k1, k2, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(v1, v2, atol=1e-3, rtol=1e-3)
    one.release()
    ext.release()
    methods, modes = [KVC, "kvpress/snapkv"], ["query_aware", "query_agnostic"]
    both = cq.answer_sample(model, tok, sample, spec, modes, methods, [4], 12)
    alone = [r for m in modes for r in cq.answer_sample(model, tok, sample, spec, m, methods, [4], 12)]
    keys = ("mode", "method", "ratio", "output", "score", "kept")
    assert [tuple(r.get(k) for k in keys) for r in both] == [tuple(r.get(k) for k in keys) for r in alone]
    assert [r["mode"] for r in both] == ["query_aware"] * 3 + ["query_agnostic"] * 3


def per_sample_rows():
    """Two tasks x 3 samples: full 1 everywhere but one; a beats b on 2 of 6."""
    rows = []
    for t in ("a", "b"):
        for i, (sa, sb, full) in enumerate(((1, 0, 1), (1, 1, 1), (0, 0, 0))):
            for m, s in ((KVC, sa), ("kvpress/snapkv", sb), ("random/uniform", 0)):
                rows.append(dict(model="m", task=t, context_tokens=512, sample=i, mode="query_aware", method=m, ratio=8.0,
                                 score=float(s), full_score=float(full)))
    return rows


def test_paired_difference_and_pooled_retention():
    rows = per_sample_rows()
    d = cq.method_difference(rows, KVC, "kvpress/snapkv", 8, "query_aware")
    assert d["n"] == 6 and d["diff"] == pytest.approx(2 / 6)
    assert 0 <= d["ci_low"] <= d["diff"] <= d["ci_high"]
    r = cq.pooled_retention(rows, KVC, 8, "query_aware")
    assert r["retention"] == pytest.approx(1.0) and r["n"] == 6 and r["tasks"] == ["a", "b"]
    assert r["ci_low"] <= 1.0 <= r["ci_high"]
    assert cq.pooled_retention(rows, KVC, 64, "query_aware")["n"] == 0
    with pytest.raises(ValueError, match="same samples"):
        cq.method_difference(rows, KVC, "nope", 8, "query_aware")


def test_claim_metrics_on_a_small_input():
    m = cq.claim_metrics(per_sample_rows(), KVC, [8], ["query_aware"])
    assert m["claim.retention_8x_query_aware"] == pytest.approx(1.0)
    assert m["diff_vs_kvpress_8x_query_aware"] == pytest.approx(2 / 6)
    assert m["diff_vs_random_8x_query_aware"] == pytest.approx(4 / 6)
    assert m["claim.vs_random_8x_query_aware"] > 0
    assert m["n_8x_query_aware"] == 6
    assert m["claim.best_beats_kvpress_8x_query_aware"] == m["claim.beats_kvpress_8x_query_aware"]  # the headline is permkv's best
    # a second permkv method that finds every needle the full cache finds becomes the best one
    rows = per_sample_rows() + [dict(r, method="kvzip/global", score=r["full_score"])
                                for r in per_sample_rows() if r["method"] == KVC]
    rows = [dict(r, score=0.0) if r["method"] == KVC and r["sample"] == 1 else r for r in rows]
    assert cq.best_permkv(rows, 8, "query_aware") == "kvzip/global"
    m = cq.claim_metrics(rows, KVC, [8], ["query_aware"])
    assert m["claim.best_retention_8x_query_aware"] == pytest.approx(1.0)
    assert m["claim.retention_8x_query_aware"] == pytest.approx(0.5)
    assert m["diff_best_vs_kvpress_8x_query_aware"] == pytest.approx(2 / 6)
    # without any press (Gemma-3: kvpress cannot run it) the best method's retention is still there
    m = cq.claim_metrics([r for r in rows if not r["method"].startswith("kvpress")], KVC, [8], ["query_aware"])
    assert m["claim.best_retention_8x_query_aware"] == pytest.approx(1.0)
    assert "claim.best_beats_kvpress_8x_query_aware" not in m


def test_quality_table_feeds_compress_auto(smol, tmp_path):
    """The table 02 writes, loaded once, gives compress_auto a measured estimate (n, CI, tasks) at a
    measured ratio, None elsewhere, and picks the largest ratio whose CI stays above a floor; nothing is
    read from the file after loading (it is deleted before compressing)."""
    rows = [dict(r, ratio=2.0, score=r["full_score"]) for r in per_sample_rows()]  # 2x: as the full cache
    rows += [dict(r, score=float(r["sample"] == 0)) for r in per_sample_rows()]  # 8x: loses sample 1 of each task
    rows = [dict(r, model="smollm2-135m") for r in rows]
    path = cq.write_quality_table(rows, tmp_path / "quality.json")
    table = QualityTable.load(path)
    measured = table.measured("smollm2-135m", "query_aware")
    est = measured.estimate(8, "kvcompress", "uniform", 64)
    assert est.retention == pytest.approx(0.5) and est.n == 6 and est.tasks == ("a", "b") and est.ci_low < 0.99
    assert est.source == str(path) and est.model == "smollm2-135m" and est.mode == "query_aware"
    assert measured.estimate(4, "kvcompress", "uniform", 64) is None
    with pytest.raises(ValueError, match="'query_agnostic' was not measured"):
        table.measured("smollm2-135m", "query_agnostic")
    model, tok, _ = smol
    path.unlink()  # the loaded rows are plain data: no file is read per call
    compression = InferenceKVCacheCompression("kvcompress", quality=measured)
    assert compression.ratio_for(0.99) == 2.0  # 8x's CI reaches below 0.99, 2x's does not
    cache = paged_cache_for(model, 300)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 25, add_special_tokens=False).input_ids[:256]
    with observing(model) as rec, torch.no_grad():
        forward(model, cache, torch.tensor([ids]))
    report = compression.compress_auto(cache, queries=rec.queries, quality_floor=0.99)
    assert report.ratio == 2.0 and report.quality.retention == pytest.approx(1.0) and report.quality.n == 6
    with pytest.raises(ValueError, match="no measured ratio"):
        InferenceKVCacheCompression("snapkv", quality=measured).compress_auto(cache, queries=rec.queries, quality_floor=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        compression.compress_auto(cache, 2, rec.queries, quality_floor=0.9)
    with pytest.raises(ValueError, match="needs quality="):
        InferenceKVCacheCompression("kvcompress").ratio_for(0.9)
    with pytest.raises(ValueError, match="quality table"):
        QualityTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"model": "x"}]))
    with pytest.raises(ValueError, match="JSON list"):
        QualityTable.load(tmp_path / "bad.json")


def test_quality_table_has_kvzip_rows_for_the_default_compression(smol, tmp_path):
    """KVzip-style methods (02's headline on the cpu profile) get rows keyed scorer "kvzip", global, observe 0:
    the default InferenceKVCacheCompression() is that setting, so its reports carry their measured retention;
    the attention scorer's setting finds none."""
    rows = [dict(r, model="smollm2-135m", mode="query_agnostic", method="kvzip/global") for r in per_sample_rows()
            if r["method"] == KVC]
    path = cq.write_quality_table(rows, tmp_path / "quality.json")
    (row,) = json.loads(path.read_text())
    assert (row["scorer"], row["allocator"], row["observe"], row["n"]) == (KVZIP_SCORER, "global", 0, 6)
    measured = QualityTable.load(path).measured("smollm2-135m", "query_agnostic")
    compression = InferenceKVCacheCompression(quality=measured)
    assert compression.setting() == (KVZIP_SCORER, "global", 0)
    assert compression.estimate(8).retention == pytest.approx(1.0)
    assert InferenceKVCacheCompression("kvcompress", quality=measured).estimate(8) is None
    model, tok, spec = smol
    ids = tok("The quick brown fox jumps over the lazy dog. " * 25, add_special_tokens=False).input_ids[:200]
    _, _, report = prefill_and_compress(model, ids, 8, compression, tokenizer=tok)
    assert report.quality.retention == pytest.approx(1.0) and report.quality.n == 6
    _, _, report = prefill_and_compress(model, ids, 8, InferenceKVCacheCompression("kvcompress", quality=measured))
    assert report.quality is None


def test_method_names_say_what_they_are():
    """`<scorer>/<allocator>/w<observe>` (or `<scorer>/<allocator>` where no queries are read), `kvpress/<press>`."""
    assert set(cm.METHODS) >= {cm.FULL, cm.RANDOM, "kvzip/global", KVC} | {f"kvpress/{p}" for p in PRESSES}
    for name, method in cm.METHODS.items():
        if isinstance(method, (cm.Permkv, cm.PermkvKVzip)):
            s = method.setting()
            parts = [s["scorer"], s["allocator"]] + ([f"w{s['observe']}"] if get_scorer(s["scorer"]).needs_queries else [])
            assert name == "/".join(parts), name
            assert cm.is_permkv(name) and not cm.is_press(name)
        elif isinstance(method, cm.Press):
            assert name == f"kvpress/{method.press}" and cm.is_press(name) and not cm.is_permkv(name)
        else:
            assert name == cm.FULL and not cm.is_permkv(name) and not cm.is_press(name)
    assert cq.METHODS is cm.METHODS


def test_config_defaults_are_the_notebooks():
    """Notebook 02's parameters cell reads the config's defaults (no second list of methods)."""
    import nbformat

    cfg = cq.CompressionQualityConfig()
    assert cfg.headline in cfg.methods and cfg.heatmap_method in cm.METHODS
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "02_compression_quality.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    names = [line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line]
    assert sorted(n.lower() for n in names if n != "PROFILE") == sorted(f.name for f in fields(cfg))
    assert all(f"= DEFAULTS.{n.lower()}" in cell.source for n in names if n != "PROFILE")


def test_config_errors():
    with pytest.raises(ValueError, match="methods must be"):
        cq.CompressionQualityConfig(methods=["nope"])
    with pytest.raises(ValueError, match="headline must be"):
        cq.CompressionQualityConfig(headline="kvzip/global")
    with pytest.raises(ValueError, match="ratios must be"):
        cq.CompressionQualityConfig(ratios=[0.5])
    with pytest.raises(ValueError, match="modes must be"):
        cq.CompressionQualityConfig(modes=["sideways"])


@pytest.mark.slow
def test_headline_at_1_01x_and_1_1x_keeps_the_needles_the_full_cache_finds(smol):
    """6 seeded needles (niah_single, 1,024 tokens, seed 1), query-aware: evicting 1% or 10% of the
    tokens with the headline keeps every needle the full cache finds (KV-Compress's global top-k with 8
    observed queries lost 4 of 6 at 1.01x)."""
    model, tok, spec = smol
    for sample in build_task("niah_single", tok, spec, 6, 1024, seed=1):
        rows = cq.answer_sample(model, tok, sample, spec, "query_aware", [KVC], [1.01, 1.1], 32)
        by = {(r["method"], r["ratio"]): r["score"] for r in rows}
        assert by[KVC, 1.01] >= by["full", 1.0] and by[KVC, 1.1] >= by["full", 1.0], rows


@pytest.mark.slow
def test_grid_in_worker_processes_matches_one_process(smol):
    """quality_grid with 2 workers (one torch thread each) gives the one-process rows, in the same order:
    by mode, then sample (each worker answers both modes of a sample)."""
    model, tok, spec = smol
    modes = ["query_agnostic", "query_aware"]
    args = (model, tok, spec, ["niah_single"], [300], 2, [4], [KVC, "kvpress/streaming"], modes, 1, 8)
    _, serial = cq.quality_grid(*args)
    _, parallel = cq.quality_grid(*args, workers=2)
    keys = ("sample", "mode", "method", "ratio", "output", "score", "kept")
    assert [tuple(r.get(k) for k in keys) for r in parallel] == [tuple(r.get(k) for k in keys) for r in serial]
    assert [(r["mode"], r["sample"]) for r in serial] == [(m, i) for m in modes for i in (0, 1) for _ in range(3)]
    with pytest.raises(ValueError, match="workers"):
        cq.quality_grid(*args, workers=0)
