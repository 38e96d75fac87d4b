"""A bounded load test of `permkv serve --engine` with the official openai client: nothing lost.

`python -m permkv.bench load [--requests 200] [--concurrency 16] [--max-tokens 16] [--pool-blocks 2000]`
starts the server in this process on a loopback port (a pool small enough to force preemptions),
asks each distinct prompt once alone for its reference answer, then sends `--requests` chat requests
from `--concurrency` concurrent asyncio clients: every `--stream-every`-th streams, every
`--abort-every`-th of those hangs up after two chunks. Then a mid-batch arrival: a short request sent
while long ones decode, its time to first token against the engine's step time. It checks that every
request ended once (answer, clear error, or aborted by us), that each greedy answer equals its
prompt's answer alone, and that every pool block is free at the end. JSON in reports/bench/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

QUESTIONS = [
    "What is the capital of France?", "Name a primary colour.", "What is two plus two?", "Which animal barks?",
    "What do bees make?", "Name a planet in the solar system.", "What is the opposite of hot?",
    "How many days are in a week?", "What colour is the sky on a clear day?", "Name a fruit that is yellow.",
    "What is frozen water called?", "Which season comes after winter?",
]


@dataclass
class Outcome:
    """How one request ended."""

    i: int
    question: str
    stream: bool
    aborted: bool  # we hung up on purpose
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    ttft: float | None = None


async def _ask(client, model: str, i: int, question: str, max_tokens: int, stream: bool, abort: bool) -> Outcome:
    import openai

    messages = [{"role": "user", "content": question}]
    start = time.perf_counter()
    try:
        if not stream:
            out = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
            return Outcome(i, question, False, False, out.choices[0].message.content, out.choices[0].finish_reason,
                           ttft=out.model_extra["permkv"].get("ttft"))
        parts, reason, ttft = [], None, None
        response = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True)
        async for chunk in response:
            choice = chunk.choices[0]
            if choice.delta.content:
                ttft = ttft or time.perf_counter() - start
                parts.append(choice.delta.content)
            reason = choice.finish_reason or reason
            if abort and len(parts) >= 2:
                await response.close()
                return Outcome(i, question, True, True, "".join(parts), None, ttft=ttft)
        return Outcome(i, question, True, False, "".join(parts), reason, ttft=ttft)
    except openai.APIError as err:
        return Outcome(i, question, stream, False, error=f"{type(err).__name__}: {err}")


async def _load(url: str, model: str, n: int, concurrency: int, max_tokens: int, stream_every: int,
                abort_every: int) -> list[Outcome]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Outcome:
        stream = i % stream_every == 0
        async with gate:
            return await _ask(client, model, i, QUESTIONS[i % len(QUESTIONS)], max_tokens, stream,
                              stream and (i // stream_every) % abort_every == 0)

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
               line.startswith(name + "{"))


def run(model, tokenizer, spec, n: int = 200, concurrency: int = 16, max_tokens: int = 16, pool_blocks: int = 2000,
        stream_every: int = 3, abort_every: int = 4, long_requests: int = 8) -> dict:
    """The whole load test on a fresh engine server; returns the counts and checks (see the module docstring)."""
    import httpx
    import openai

    from permkv.cache import BlockPool
    from permkv.rlm import EngineBackend
    from permkv.serve import create_app, running

    backend = EngineBackend(model, tokenizer, spec, pool_bytes=pool_blocks * BlockPool(1, 16, spec.head_dim,
                            dtype=model.dtype).bytes_per_block)
    with backend, running(create_app(backend)) as url:
        sync = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        alone = {q: sync.chat.completions.create(model=spec.name, messages=[{"role": "user", "content": q}],
                                                  max_tokens=max_tokens).choices[0].message.content for q in QUESTIONS}
        preempted_before = backend.engine.stats.preemptions
        start = time.perf_counter()
        outcomes = asyncio.run(_load(url, spec.name, n, concurrency, max_tokens, stream_every, abort_every))
        wall = time.perf_counter() - start
        arrival = asyncio.run(_mid_batch(url, spec.name, backend, long_requests))
        deadline = time.time() + 30  # aborted requests are dropped at the loop's next turn
        while backend.engine.has_unfinished() and time.time() < deadline:
            time.sleep(0.1)
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    seen = [o.i for o in outcomes]
    finished = [o for o in outcomes if o.error is None and not o.aborted]
    wrong = [o.i for o in finished if o.text != alone[o.question]]
    return dict(
        requests=n, concurrency=concurrency, max_tokens=max_tokens, pool_blocks=backend.engine.pool.num_blocks,
        wall_s=wall, completed=len(finished), aborted=sum(o.aborted for o in outcomes),
        errors=[o.error for o in outcomes if o.error], streamed=sum(o.stream for o in outcomes),
        duplicated=len(seen) - len(set(seen)), lost=n - len(set(seen)), not_alone_answer=wrong,
        preemptions=backend.engine.stats.preemptions - preempted_before,
        blocks_free_at_end=backend.engine.pool.num_free, blocks_total=backend.engine.pool.num_blocks,
        server_requests_counted=_metric(metrics, "permkv_requests_total"),
        ttft_median_s=statistics.median(o.ttft for o in finished if o.ttft is not None), **arrival)


async def _mid_batch(url: str, model: str, backend, long_requests: int) -> dict:
    """Time to first token of a short request arriving while `long_requests` long ones decode."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    long = [asyncio.create_task(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Tell a long story about a {w}."}], max_tokens=96))
        for w in ("lighthouse", "dragon", "river", "clock", "garden", "ship", "mountain", "library")[:long_requests]]
    engine = backend.engine
    while not engine.scheduler.running or any(s.phase.value != "decode" for s in list(engine.scheduler.running.values())):
        await asyncio.sleep(0.05)
    steps, wall = engine.stats.steps, engine.stats.wall
    await asyncio.sleep(1.0)
    step_s = (engine.stats.wall - wall) / max(engine.stats.steps - steps, 1)  # decode steps of the running batch
    start = time.perf_counter()
    response = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                    max_tokens=8, stream=True)
    ttft = None
    async for chunk in response:
        if chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - start
    running_left = sum(1 for t in long if not t.done())
    await asyncio.gather(*long)
    batch_end = time.perf_counter() - start
    await client.close()
    return dict(arrival_ttft_s=ttft, arrival_step_s=step_s, arrival_long_still_running=running_left,
                arrival_batch_finished_after_s=batch_end)


def main(argv: list[str]) -> None:
    from permkv.bench import write_result
    from permkv.models import load_model

    ap = argparse.ArgumentParser(prog="python -m permkv.bench load")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pool-blocks", type=int, default=2000, help="KV pool in blocks (small: preemptions)")
    args = ap.parse_args(argv)
    model, tok, spec = load_model(args.model)
    result = run(model, tok, spec, args.requests, args.concurrency, args.max_tokens, args.pool_blocks)
    print({k: v for k, v in result.items() if k != "errors"}, f"errors: {len(result['errors'])}")
    print(f"wrote {write_result('load', result)}")


if __name__ == "__main__":
    main(__import__("sys").argv[1:])
