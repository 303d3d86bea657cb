"""The scheduler without gRPC: continuous batching lets short sentences overtake a long one,
admission respects the batch limits, deadlines and cancellation drop work, a full queue refuses."""

from __future__ import annotations

import time

import pytest

from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine, TranslationOptions
from attnserve.server.metrics import Metrics
from attnserve.server.scheduler import BatchingConfig, Job, Scheduler, SchedulerError


@pytest.fixture(scope="module")
def engine(bundles) -> Engine:
    return Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")


def forced_length(steps: int) -> TranslationOptions:
    """Exactly `steps` decoder steps: no EOS before, the length limit right after."""
    return TranslationOptions(beam_size=2, min_length=steps, max_len_a=0, max_len_b=steps)


def test_short_sentences_overtake_a_long_one(engine) -> None:
    metrics = Metrics()
    scheduler = Scheduler(engine, "toy", BatchingConfig(max_wait_ms=0), metrics)
    observe = engine.run_observer
    engine.run_observer = lambda graph, seconds: (observe(graph, seconds), time.sleep(0.003))  # a slower model
    try:
        ids = engine.encode_texts(["the red cat sees the dog"])[0]
        steps = engine.max_len - 1
        long = Job([ids], forced_length(steps))
        scheduler.submit(long)
        while not scheduler._active:
            time.sleep(0.001)  # the long one is decoding
        short = Job([ids] * 3, forced_length(3))
        scheduler.submit(short)
        assert short.wait(30) and short.error is None
        assert not long.done  # the short ones joined the running batch and left before it
        assert long.wait(30) and len(long.results[0][0].tokens) == steps
        assert all(len(r[0].tokens) == 3 for r in short.results)
        # Both were decoded in one batch at some step: the batch-size histogram saw 2+ sentences.
        sums = {s.name: s.value for f in metrics.registry.collect() for s in f.samples if s.name == "attnserve_batch_sentences_sum"}
        counts = {s.name: s.value for f in metrics.registry.collect() for s in f.samples if s.name == "attnserve_batch_sentences_count"}
        assert sums["attnserve_batch_sentences_sum"] > counts["attnserve_batch_sentences_count"]
    finally:
        scheduler.close(10)
        engine.run_observer = None


def test_batch_limits_are_respected(engine) -> None:
    scheduler = Scheduler(engine, "toy", BatchingConfig(max_batch_sentences=3, max_batch_tokens=10_000, max_wait_ms=50))
    seen = []
    original = engine.run_observer
    engine.run_observer = lambda graph, _: seen.append(max(len(b) for b in scheduler._batches.values()) if scheduler._batches else 0)
    try:
        ids = engine.encode_texts(["the red cat"])[0]
        jobs = [Job([ids], forced_length(4)) for _ in range(7)]
        for job in jobs:
            scheduler.submit(job)
        assert all(job.wait(30) for job in jobs)
        assert max(seen) == 3
    finally:
        engine.run_observer = original
        scheduler.close(10)


def test_queue_full_deadline_and_cancel(engine) -> None:
    scheduler = Scheduler(engine, "toy", BatchingConfig(max_queue=4, max_batch_sentences=1, max_wait_ms=0))
    engine.run_observer = lambda graph, seconds: time.sleep(0.003)  # a slower model: 200 steps take > 0.5 s
    try:
        ids = engine.encode_texts(["the red cat"])[0]
        with pytest.raises(SchedulerError) as error:
            scheduler.submit(Job([ids] * 5, forced_length(2)))
        assert error.value.reason == SchedulerError.QUEUE_FULL
        running = Job([ids], forced_length(engine.max_len - 1))
        scheduler.submit(running)
        expired = Job([ids] * 2, forced_length(2), deadline=time.monotonic() + 0.05)
        scheduler.submit(expired)
        assert expired.wait(10) and expired.error.reason == SchedulerError.EXPIRED
        scheduler.cancel(running)
        assert running.wait(10) and running.error.reason == SchedulerError.CANCELLED
        deadline = time.monotonic() + 10
        while scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not scheduler.busy
        after = Job([ids], forced_length(2))
        scheduler.submit(after)
        assert after.wait(10) and after.error is None
    finally:
        engine.run_observer = None
        assert scheduler.close(10)
    with pytest.raises(SchedulerError) as error:
        scheduler.submit(Job([ids], forced_length(2)))
    assert error.value.reason == SchedulerError.CLOSED
