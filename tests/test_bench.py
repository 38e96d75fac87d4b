"""Benchmark helpers."""

from permkv.bench import peak_rss


def test_bench_peak_rss_sees_the_work_not_the_setup():
    small = peak_rss("x = bytearray(300_000_000); del x", "y = 1")
    big = peak_rss("", "y = bytearray(300_000_000)")
    assert big - small > 250_000_000, (small, big)
