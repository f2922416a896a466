"""The engine loop thread: submissions in, sample events out, aborts free blocks, failures never wedge it, and it
sleeps when idle."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest
from test_serve_support import reference_tokens, slow_engine, tiny_engine, wait_until

from kvstack.engine import SamplingParams
from kvstack.errors import KVStackError
from kvstack.serve.engine_loop import EngineLoop, EngineLoopStoppedError, QueueFullError, SampleEvent, Submission

PROMPTS = [[10, 11, 12, 13, 14], [20, 21, 22], list(range(30, 43))]


@pytest.fixture
def loop():
    engine_loop = EngineLoop(tiny_engine())
    engine_loop.start()
    yield engine_loop
    engine_loop.stop()


async def collect(events: asyncio.Queue, samples: int) -> dict[tuple[int, int], list[SampleEvent]]:
    """Every event until ``samples`` samples finished, by (tag, sample index)."""
    seen: dict[tuple[int, int], list[SampleEvent]] = {}
    finished = 0
    while finished < samples:
        event = await asyncio.wait_for(events.get(), 20)
        seen.setdefault((event.tag, event.sample_index), []).append(event)
        finished += event.finished
    return seen


def tokens_of(events: list[SampleEvent]) -> list[int]:
    return [token for event in events for token in event.token_ids]


def test_requests_stream_their_tokens_as_the_engine_generates_them(loop):
    async def main():
        events: asyncio.Queue = asyncio.Queue()
        handles = loop.submit([Submission(p, SamplingParams(max_new_tokens=6)) for p in PROMPTS], events)
        ids = await asyncio.gather(*(h.accepted for h in handles))
        return ids, await collect(events, len(PROMPTS))

    ids, seen = asyncio.run(main())
    assert len(set(ids)) == len(PROMPTS)
    expected = reference_tokens(PROMPTS, 6)
    for tag, tokens in enumerate(expected):
        assert tokens_of(seen[(tag, 0)]) == tokens
        assert [e.finished for e in seen[(tag, 0)]] == [False] * 5 + [True]  # one event per step
        assert seen[(tag, 0)][-1].finish_reason == "length"
    assert loop.in_flight == 0


def test_parallel_samples_arrive_under_their_own_index(loop):
    params = SamplingParams(max_new_tokens=5, n=3, temperature=0.9, seed=7)

    async def main():
        events: asyncio.Queue = asyncio.Queue()
        [handle] = loop.submit([Submission(PROMPTS[0], params)], events)
        await handle.accepted
        return await collect(events, 3)

    seen = asyncio.run(main())
    expected = reference_tokens([PROMPTS[0]], 5, n=3, temperature=0.9, seed=7)[0]
    assert [tokens_of(seen[(0, i)]) for i in range(3)] == expected


def test_a_refused_request_raises_the_engine_error_and_the_loop_keeps_serving(loop):
    async def main():
        events: asyncio.Queue = asyncio.Queue()
        bad, good = loop.submit([Submission([10, 500], SamplingParams(max_new_tokens=2)),
                                 Submission(PROMPTS[1], SamplingParams(max_new_tokens=2))], events)
        with pytest.raises(KVStackError, match="outside the vocabulary"):
            await bad.accepted
        await good.accepted
        return await collect(events, 1)

    seen = asyncio.run(main())
    assert list(seen) == [(1, 0)]
    assert tokens_of(seen[(1, 0)]) == reference_tokens([PROMPTS[1]], 2)[0]
    assert loop.in_flight == 0


def test_abort_frees_the_blocks_and_reports_the_samples_aborted(loop):
    async def main():
        events: asyncio.Queue = asyncio.Queue()
        [handle] = loop.submit([Submission(PROMPTS[2], SamplingParams(max_new_tokens=100, n=2, temperature=1.0))],
                               events)
        await handle.accepted
        first = await asyncio.wait_for(events.get(), 20)
        used_while_running = loop.snapshot()["num_used"]
        handle.abort()
        handle.abort()  # idempotent
        rest = await collect(events, 2 - first.finished)
        return first, used_while_running, rest

    first, used_while_running, rest = asyncio.run(main())
    assert used_while_running > 0 and not first.finished
    assert sorted(key for key, events in rest.items() if events[-1].finished) == [(0, 0), (0, 1)]
    assert {events[-1].finish_reason for events in rest.values()} == {"aborted"}
    wait_until(lambda: loop.snapshot()["num_used"] == 0 and loop.in_flight == 0)


def test_a_request_aborted_before_it_reaches_the_engine_is_never_run():
    engine_loop = EngineLoop(slow_engine(0.2))
    engine_loop.start()

    async def main():
        events: asyncio.Queue = asyncio.Queue()
        [running] = engine_loop.submit([Submission(PROMPTS[1], SamplingParams(max_new_tokens=3))], events)
        await running.accepted
        await asyncio.wait_for(events.get(), 20)  # the thread is now in a 0.2 s step: the next one waits
        [dropped] = engine_loop.submit([Submission(PROMPTS[0], SamplingParams(max_new_tokens=50))], events)
        dropped.abort()
        await collect(events, 1)
        return dropped

    try:
        dropped = asyncio.run(main())
        wait_until(lambda: engine_loop.in_flight == 0)
    finally:
        engine_loop.stop()
    assert not dropped.accepted.done()  # neither accepted nor refused: dropped
    # the engine saw the first prompt only
    assert engine_loop.engine.metrics()["prefix_cache_queries_tokens"] == len(PROMPTS[1])


def test_a_failing_step_fails_every_request_in_flight_and_the_loop_keeps_serving(loop):
    engine = loop.engine
    real_step = engine.step
    calls = {"n": 0}

    def step_failing_once():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_step()

    engine.step = step_failing_once

    async def run_one(prompt):
        events: asyncio.Queue = asyncio.Queue()
        [handle] = loop.submit([Submission(prompt, SamplingParams(max_new_tokens=4))], events)
        await handle.accepted
        return await collect(events, 1)

    failed = asyncio.run(run_one(PROMPTS[0]))[(0, 0)]
    assert failed[-1].finish_reason == "error" and "RuntimeError: boom" in failed[-1].error
    ok = asyncio.run(run_one(PROMPTS[1]))[(0, 0)]
    assert tokens_of(ok) == reference_tokens([PROMPTS[1]], 4)[0]
    wait_until(lambda: loop.snapshot()["num_used"] == 0)


def test_the_queue_limit_refuses_all_or_nothing(loop):
    async def main():
        events: asyncio.Queue = asyncio.Queue()
        first = loop.submit([Submission(PROMPTS[2], SamplingParams(max_new_tokens=60))], events, max_in_flight=2)
        with pytest.raises(QueueFullError):
            loop.submit([Submission(p, SamplingParams(max_new_tokens=2)) for p in PROMPTS[:2]], events,
                        max_in_flight=2)
        assert loop.in_flight == 1
        first[0].abort()

    asyncio.run(main())
    wait_until(lambda: loop.in_flight == 0)


def test_the_idle_thread_sleeps_instead_of_spinning(loop):
    thread = loop._thread
    assert thread is not None and thread.native_id is not None
    wait_until(lambda: loop.snapshot() is not None)

    def cpu_seconds() -> float:
        [times] = [t for t in psutil.Process().threads() if t.id == thread.native_id]
        return times.user_time + times.system_time

    before = cpu_seconds()
    time.sleep(0.5)
    assert cpu_seconds() - before < 0.05


def test_the_engine_forgets_each_request_once_reported(loop):
    async def main():
        events: asyncio.Queue = asyncio.Queue()
        handles = loop.submit([Submission(PROMPTS[0], SamplingParams(max_new_tokens=3, n=3, temperature=1.0)),
                               Submission(PROMPTS[1], SamplingParams(max_new_tokens=50))], events)
        ids = await asyncio.gather(*(h.accepted for h in handles))
        await collect(events, 3)  # the first request's samples; the second keeps running
        return ids

    done, running = asyncio.run(main())
    wait_until(lambda: loop.in_flight == 1)
    loop.stop()  # the engine thread is gone: the test may read the engine now
    engine = loop.engine
    assert engine.children(done) == [] and done not in engine.scheduler  # released with its samples
    with pytest.raises(KVStackError, match="unknown request"):
        engine.request_timing(done)
    assert running not in engine.scheduler  # aborted at stop, then released


def test_stop_aborts_what_runs_and_refuses_what_comes_after(loop):
    async def main():
        events: asyncio.Queue = asyncio.Queue()
        [handle] = loop.submit([Submission(PROMPTS[2], SamplingParams(max_new_tokens=100))], events)
        await handle.accepted
        await asyncio.wait_for(events.get(), 20)
        await asyncio.to_thread(loop.stop)
        last = await collect(events, 1)
        with pytest.raises(EngineLoopStoppedError):
            loop.submit([Submission(PROMPTS[0], SamplingParams())], events)
        return last

    last = asyncio.run(main())
    assert last[(0, 0)][-1].finish_reason == "aborted" and "shutting down" in last[(0, 0)][-1].error
    assert not loop.is_running
    assert loop.engine.metrics()["num_used"] == 0
