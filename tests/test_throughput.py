"""Experiment 03's pieces: config checks, claim metrics on a small input, the HF peers' tokens."""

import math

import pytest

from permkv.baselines.hf import continuous_batching, hf_blocks, sequential_generate
from permkv.cache import BlockPool
from permkv.engine import Engine, Request
from permkv.eval import stop_ids
from permkv.eval.stats import retention_ci
from permkv.experiments.throughput import ThroughputConfig, claim_metrics, fit_cost, summarize
from permkv.models import encode_prompt


def test_config_is_checked():
    with pytest.raises(ValueError, match="ratios"):
        ThroughputConfig(ratios=[2, 8])
    with pytest.raises(ValueError, match="prompt_range"):
        ThroughputConfig(prompt_range=[64, 512])
    with pytest.raises(ValueError, match="output_tokens"):
        ThroughputConfig(output_tokens=0)
    with pytest.raises(ValueError, match="dtype"):
        ThroughputConfig(dtype="int8")
    with pytest.raises(ValueError, match="scorer"):
        ThroughputConfig(scorers=["nonsense"])


def _row(system, scorer, ratio, repeat, out, total, batch, prefill=0.5):
    return dict(system=system, scorer=scorer, ratio=ratio, repeat=repeat, output_tps=out, total_tps=total, wall=1.0,
                mean_batch=batch, max_batch=batch, preemptions=0, prefill_share=prefill, compressions=0,
                mean_occupancy=0.5, blocks_per_sequence=900 / ratio, pool_blocks=1800, mean_ttft=0.1, mean_latency=1.0)


def test_summary_and_claim_metrics_use_same_repeat_ratios():
    rows = [_row("engine 1x", "none", 1, 0, 10, 100, 2), _row("engine kvzip 8x", "kvzip", 8, 0, 30, 200, 8),
            _row("engine 1x", "none", 1, 1, 5, 50, 2), _row("engine kvzip 8x", "kvzip", 8, 1, 10, 150, 16),
            _row("engine kvzip 64x", "kvzip", 64, 0, 20, 300, 16), _row("engine kvzip 64x", "kvzip", 64, 1, 20, 300, 16),
            dict(system="hf_sequential", ratio=1, repeat=0, output_tps=5, total_tps=50, wall=2.0, error=None),
            dict(system="hf_sequential", ratio=1, repeat=1, output_tps=5, total_tps=50, wall=2.0, error=None)]
    summary = summarize(rows)
    by = {r["system"]: r for r in summary}
    assert by["engine kvzip 8x"]["total_gain"] == pytest.approx(2.5)  # median of 200/100 and 150/50
    assert by["engine kvzip 8x"]["output_gain"] == pytest.approx(2.5)  # median of 3 and 2
    quality_rows = [dict(system="engine 1x", score=1.0, retention=1.0, retention_low=1.0),
                    dict(system="engine kvzip 8x", score=0.5, retention=0.5, retention_low=0.2)]
    m = claim_metrics(summary, quality_rows)
    assert m["claim.throughput_gain_8x"] == pytest.approx(2.5)
    assert m["claim.throughput_retention_8x"] == 0.5 and m["quality.retention_low_kvzip_8x"] == 0.2
    assert m["claim.throughput_gain_64x"] == pytest.approx(median := (3 + 6) / 2) and median == 4.5
    assert math.isnan(m["claim.throughput_retention_64x"])  # not measured: no number
    assert m["throughput.batch_gain_kvzip_8x"] == pytest.approx(6.0)  # median max batch 12 vs 2
    assert m["claim.engine_concurrency_gain_8x"] == pytest.approx(8.0)  # 900 blocks per sequence vs 112.5
    assert m["throughput.concurrent_1x"] == pytest.approx(2.0)
    assert m["throughput.amdahl_bound"] == pytest.approx(2.0)
    assert m["throughput.engine_1x_vs_hf_sequential"] == pytest.approx(1 / 0.75)  # median of 5/10 and 5/5
    assert math.isnan(claim_metrics(summarize(rows[:4]), quality_rows)["claim.throughput_gain_64x"])
    # free batching and free attention: the gain is bounded by prefill alone (Amdahl, here 2x)
    free = claim_metrics(summary, quality_rows, dict(fixed_s=1.0, per_seq_s=0.0, per_token_s=0.0), heads=90, block_size=16)
    assert free["throughput.cost_model_gain_1x"] == pytest.approx(1.0)
    assert 1 < free["throughput.cost_model_gain_kvzip_8x"] < free["throughput.amdahl_bound"] == pytest.approx(2.0)


def test_retention_ci_is_paired():
    base = [1, 1, 0, 1, 1, 1, 0, 1, 1, 1]
    kept, low, high = retention_ci(base, base)
    assert kept == low == high == 1.0  # the same answers: no spread at all
    kept, low, high = retention_ci([1, 0, 0, 1, 1, 1, 0, 1, 0, 1], base)
    assert kept == pytest.approx(0.75) and low < kept < high <= 1.0


def test_cost_fit_recovers_a_linear_model():
    rows = [dict(batch=b, cached_tokens=n, step_s=0.1 + 0.02 * b + 1e-5 * b * n) for b in (1, 2, 4, 8) for n in (64, 512)]
    fit = fit_cost(rows)
    assert fit["fixed_s"] == pytest.approx(0.1) and fit["per_seq_s"] == pytest.approx(0.02)
    assert fit["per_token_s"] == pytest.approx(1e-5)


def test_hf_peers_give_the_engines_greedy_tokens(smol):
    model, tok, spec = smol
    prompts = [encode_prompt(tok, spec, t) for t in ("The capital of France is", "List three prime numbers:")]
    stop = stop_ids(model, tok)
    engine = Engine(model, BlockPool(2000, 16, spec.head_dim), stop=stop)
    want = [r.tokens for r in engine.generate([Request(p, 8) for p in prompts], progress=False)]
    assert sequential_generate(model, prompts, 8, stop).tokens == want
    cb = continuous_batching(model, prompts, 8, stop, 2000)
    assert cb.error is None and cb.tokens == want
    assert hf_blocks(model, 2000) == 2000 // (30 * 3)
    fixed = sequential_generate(model, prompts, 8, set())  # EOS ignored: exactly 8 tokens each
    assert [len(t) for t in fixed.tokens] == [8, 8]
