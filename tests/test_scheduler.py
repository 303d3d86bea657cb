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
def bundle(bundles):
    return load_bundle(bundles["transformer"])


def engine_with(bundle, run_observer) -> Engine:
    """An engine whose onnxruntime runs are watched (the observer is a constructor argument)."""
    return Engine(bundle, "fp32", device="cpu", run_observer=run_observer)


def forced_length(steps: int) -> TranslationOptions:
    """Exactly `steps` decoder steps: no EOS before, the length limit right after."""
    return TranslationOptions(beam_size=2, min_length=steps, max_len_a=0, max_len_b=steps)


def test_short_sentences_overtake_a_long_one(bundle) -> None:
    metrics = Metrics()
    observe = metrics.run_observer("toy")
    engine = engine_with(bundle, lambda graph, seconds: (observe(graph, seconds), time.sleep(0.003)))  # a slower model
    scheduler = Scheduler(engine, "toy", BatchingConfig(max_wait_ms=0), metrics)
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
        engine.close()


def test_batch_limits_are_respected(bundle) -> None:
    seen = []
    engine = engine_with(bundle, lambda graph, _: seen.append(max(len(b) for b in scheduler._batches.values())
                                                                if scheduler._batches else 0))
    scheduler = Scheduler(engine, "toy", BatchingConfig(max_batch_sentences=3, max_batch_tokens=10_000, max_wait_ms=50))
    try:
        ids = engine.encode_texts(["the red cat"])[0]
        jobs = [Job([ids], forced_length(4)) for _ in range(7)]
        for job in jobs:
            scheduler.submit(job)
        assert all(job.wait(30) for job in jobs)
        assert max(seen) == 3
    finally:
        scheduler.close(10)
        engine.close()


def test_queue_full_deadline_and_cancel(bundle) -> None:
    engine = engine_with(bundle, lambda graph, seconds: time.sleep(0.003))  # a slower model: 200 steps take > 0.5 s
    scheduler = Scheduler(engine, "toy", BatchingConfig(max_queue=4, max_batch_sentences=1, max_wait_ms=0))
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
        assert scheduler.close(10)
        engine.close()
    with pytest.raises(SchedulerError) as error:
        scheduler.submit(Job([ids], forced_length(2)))
    assert error.value.reason == SchedulerError.CLOSED


def test_a_job_completes_once_through_its_public_api() -> None:
    delivered, failed = [], []
    job = Job([[5, 3], [6, 3]], TranslationOptions(), on_result=lambda i, h: delivered.append(i), on_error=failed.append)
    job.deliver(1, [])
    assert not job.done and job.remaining == 1
    job.deliver(0, [])
    assert job.done and job.wait(0) and delivered == [1, 0]
    assert not job.fail(SchedulerError(SchedulerError.CANCELLED, "too late")) and job.error is None and not failed
    other = Job([[5, 3]], TranslationOptions(), on_error=failed.append)
    error = SchedulerError(SchedulerError.EXPIRED, "deadline exceeded")
    assert other.fail(error) and other.error is error and failed == [error]
    assert not other.fail(SchedulerError(SchedulerError.FAILED, "again"))
    other.deliver(0, [])  # a result after the failure is dropped
    assert other.results == [None] and other.error is error


def test_load_counts_waiting_and_decoding_sentences_and_the_observer_stays(bundle) -> None:
    def observer(graph: str, seconds: float) -> None:
        time.sleep(0.003)  # a slower model

    engine = engine_with(bundle, observer)
    scheduler = Scheduler(engine, "toy", BatchingConfig(max_batch_sentences=1, max_wait_ms=0), Metrics())
    try:
        assert engine.runtime.run_observer is observer  # the scheduler installs nothing of its own
        ids = engine.encode_texts(["the red cat"])[0]
        running = Job([ids], forced_length(engine.max_len - 1))
        scheduler.submit(running)
        deadline = time.monotonic() + 10
        while not scheduler._active and time.monotonic() < deadline:
            time.sleep(0.001)
        waiting = Job([ids] * 2, forced_length(2))
        scheduler.submit(waiting)  # a batch of one: these wait for the running one
        assert scheduler.load == 3 and scheduler.queued == 2
        scheduler.cancel(running)
        assert waiting.wait(10) and waiting.error is None
        while scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.load == 0
    finally:
        assert scheduler.close(10)
        engine.close()
