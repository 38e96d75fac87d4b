"""A bounded load test of the real server over the engine (`python -m permkv.bench load`, smaller):
concurrent clients, some streaming, some hanging up mid-stream, a pool small enough to preempt."""

import pytest

from permkv.bench import load


@pytest.mark.slow
def test_under_load_nothing_is_lost_duplicated_or_wrong(smol):
    r = load.run(*smol, n=48, concurrency=16, max_tokens=10, pool_blocks=1200, stream_every=3, abort_every=4,
                 long_requests=4)
    assert r["errors"] == [] and r["duplicated"] == 0 and r["lost"] == 0
    assert r["completed"] + r["aborted"] == 48 and r["aborted"] >= 3
    assert r["not_alone_answer"] == []  # every greedy answer is its prompt's answer alone
    assert r["preemptions"] > 0  # the pool was small enough to force them
    assert r["blocks_free_at_end"] == r["blocks_total"]
    assert r["server_requests_counted"] >= 48
    # a request arriving mid-batch starts within a few steps, not after the batch
    assert r["arrival_ttft_s"] < r["arrival_batch_finished_after_s"]
    assert r["arrival_long_still_running"] > 0
