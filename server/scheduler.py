"""Continuous batching of sentences from concurrent requests, at decoder-step granularity.

One Scheduler per loaded model version, with one thread that owns the model's decoding. Requests
(Jobs) put their sentences in a bounded queue; between two decoder steps the thread moves waiting
sentences into a running BeamBatch (one per beam size and alignment setting) and every sentence
leaves its batch the step it is done, so a long sentence never holds short ones back.

    admission   the oldest waiting sentence first (no starvation), then the waiting ones closest
                to the batch's length (grouping by length keeps padding low), while the batch
                stays within max_batch_sentences and max_batch_tokens (padded source tokens
                times beam size).
    waiting     an idle model waits at most max_wait_ms for a batch to fill before starting;
                a running batch takes newcomers between two steps once they are a quarter of
                it, or the oldest has waited max_wait_ms.
    deadlines   a sentence whose request has expired or been cancelled is dropped, waiting or
                decoding; the request is answered once, with the reason.

The model code knows nothing of this: the scheduler drives a BeamBatch through its public
interface (add / step / cancel, len, live_items, longest_source, source_tokens) and completes
Jobs through theirs (deliver / fail). The engine's run observer (metrics) is the engine's
constructor argument (repository.py), not something the scheduler installs.

Threads: submit, cancel and the load/queued/busy readings come from request threads; everything
else runs in the scheduler thread. What both read or change (the queues, the counts) is under
the scheduler's condition.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from attnserve.server.engine import Engine
from attnserve.server.search import BeamBatch, Hypothesis, SearchItem, TranslationOptions
from attnserve.server.metrics import Metrics

log = logging.getLogger(__name__)

# Newcomers join a running batch once they are this fraction of it (or the oldest has waited
# max_wait_ms, or they fill it): each join runs the encoder, whose cost is mostly per call, so
# newcomers are encoded a few at a time rather than one at every step.
JOIN_FRACTION = 0.25
SWEEP_SECONDS = 0.01  # how often waiting sentences are checked for expired or cancelled requests


class SchedulerError(Exception):
    """Work refused or abandoned; `reason` is one of the class attributes below."""

    QUEUE_FULL = "queue_full"
    CLOSED = "closed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    FAILED = "failed"

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class BatchingConfig:
    max_batch_tokens: int = 16384
    max_batch_sentences: int = 64
    max_wait_ms: float = 1.0  # 5 ms cost a lone client 5 ms a request; later arrivals join the running batch anyway
    max_queue: int = 4096


class Job:
    """The sentences of one request (or one stream item). `on_result(index, hypotheses)`, if
    given, is called as each sentence is done and `on_error(error)` if the job fails (both from
    the scheduler thread, or on_error from the cancelling one); `wait()` returns when all are
    done or the job has failed. Identity-hashed: it tags its sentences in a batch.

    Completion (deliver, fail) is public so that whoever decodes a job's sentences completes it;
    a job completes once: after it is done or failed, both do nothing."""

    def __init__(self, sources: list[list[int]], opts: TranslationOptions, deadline: float | None = None,
                 on_result: Callable[[int, list[Hypothesis]], None] | None = None,
                 on_error: Callable[["SchedulerError"], None] | None = None,
                 constraints: list[list[list[int]] | None] | None = None):
        self.sources, self.opts, self.deadline = sources, opts, deadline
        self.constraints = constraints  # per source: target id sequences its hypotheses contain (glossary)
        self.on_result, self.on_error = on_result, on_error
        self.results: list[list[Hypothesis] | None] = [None] * len(sources)
        self.scheduler: Scheduler | None = None  # where it was queued
        self.remaining = len(sources)
        self.error: SchedulerError | None = None
        self.enqueued = time.monotonic()
        self._done = threading.Event()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def deliver(self, index: int, hypotheses: list[Hypothesis]) -> None:
        """Sentence `index` is done with these hypotheses."""
        if self.done:
            return
        self.results[index] = hypotheses
        self.remaining -= 1
        if self.on_result is not None:
            self.on_result(index, hypotheses)
        if self.remaining == 0:
            self._done.set()

    def fail(self, error: SchedulerError) -> bool:
        """Fail the job once; False if it was already done (or failed)."""
        if self.done:
            return False
        self.error = error
        self._done.set()
        if self.on_error is not None:
            self.on_error(error)
        return True


def _check_room(model: str, queued: int, adding: int, max_queue: int) -> None:
    if queued + adding > max_queue:
        raise SchedulerError(SchedulerError.QUEUE_FULL,
                             f"model {model}: {queued} sentences already waiting (at most {max_queue}); retry later")


class Scheduler:
    def __init__(self, engine: Engine, model: str, config: BatchingConfig, metrics: Metrics | None = None):
        self.engine, self.model, self.config, self.metrics = engine, model, config, metrics
        self._cond = threading.Condition()
        self._waiting: dict[tuple[int, bool], collections.deque[tuple[Job, int]]] = {}  # per lane, arrival order
        self._queued = 0  # sentences waiting
        self._batches: dict[tuple[int, bool], BeamBatch] = {}  # scheduler thread only
        # Sentences in the batches (decoding), as of the scheduler thread's last pass under the
        # condition: what `load` reads instead of walking _batches while that thread changes them.
        self._decoding = 0
        self._active: set[Job] = set()  # jobs with sentences in a batch
        self._closing = False
        self._turn = 0
        self._last_sweep = 0.0
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{model}", daemon=True)
        self._thread.start()

    # -- called from request threads ---------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job's sentences; raises SchedulerError(QUEUE_FULL or CLOSED)."""
        lane = (job.opts.beam_size, job.opts.return_alignment)
        with self._cond:
            if self._closing:
                raise SchedulerError(SchedulerError.CLOSED, f"model {self.model} is shutting down")
            _check_room(self.model, self._queued, len(job.sources), self.config.max_queue)
            self._waiting.setdefault(lane, collections.deque()).extend((job, i) for i in range(len(job.sources)))
            self._queued += len(job.sources)
            job.scheduler = self
            self._cond.notify()

    def cancel(self, job: Job, reason: str = SchedulerError.CANCELLED) -> None:
        """Abandon a job (client gone or deadline passed): its sentences stop being decoded."""
        with self._cond:
            if job.fail(SchedulerError(reason, f"request {reason}")):
                self._cond.notify()

    @property
    def queued(self) -> int:
        """Sentences waiting for a batch."""
        return self._queued

    @property
    def load(self) -> int:
        """Sentences waiting or being decoded (as of the scheduler's last pass between steps)."""
        with self._cond:
            return self._queued + self._decoding

    @property
    def busy(self) -> bool:
        """Any work waiting or running (jobs whose sentences are in a batch included)."""
        return bool(self._queued or self._active)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new work, finish what is queued or running, stop the thread. True if it
        finished within the timeout."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                admitted = self._next_admissions()
                if admitted is None:
                    return
            for lane, pairs in admitted.items():
                self._admit(lane, pairs)
            self._drop_abandoned()
            self._step_one_lane()

    def _next_admissions(self) -> dict[tuple[int, bool], list[tuple[Job, int]]] | None:
        """Under the lock: wait for work, then take what may join the batches now. None: stop."""
        while True:
            self._drop_abandoned_waiting()
            self._decoding = sum(len(batch) for batch in self._batches.values())
            running = self._decoding > 0
            if running or self._queued:
                break
            if self._closing:
                return None
            self._cond.wait()
        if not running and self._queued:
            # Idle: let a batch fill for up to max_wait_ms after the oldest sentence arrived.
            oldest = min(queue[0][0].enqueued for queue in self._waiting.values() if queue)
            while not self._closing and self._queued < self.config.max_batch_sentences:
                remaining = oldest + self.config.max_wait_ms / 1000 - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        admitted = {}
        for lane, queue in self._waiting.items():
            pairs = self._select(lane, queue)
            if pairs:
                admitted[lane] = pairs
                self._decoding += len(pairs)  # they leave the queue for a batch, not the load
        return admitted

    def _select(self, lane: tuple[int, bool], queue: collections.deque) -> list[tuple[Job, int]]:
        batch = self._batches.get(lane)
        sentences = len(batch) if batch is not None else 0
        beam = lane[0]
        room = self.config.max_batch_sentences - sentences
        if room <= 0 or not queue:
            return []
        waited = time.monotonic() - queue[0][0].enqueued
        if (sentences and len(queue) < min(room, sentences * JOIN_FRACTION)
                and waited < self.config.max_wait_ms / 1000):
            return []  # wait (bounded by max_wait_ms) for a few more to encode together
        longest = batch.longest_source if batch is not None else 0
        reference = longest or len(queue[0][0].sources[queue[0][1]])
        window = list(queue)[: 4 * self.config.max_batch_sentences]
        # The oldest first, then the closest in length to the batch, older first among equals.
        order = [0] + sorted(range(1, len(window)), key=lambda i: abs(len(window[i][0].sources[window[i][1]]) - reference))
        chosen: list[int] = []
        for i in order:
            if len(chosen) == room:
                break
            length = len(window[i][0].sources[window[i][1]])
            tokens = beam * max(longest, length) * (sentences + len(chosen) + 1)
            if tokens > self.config.max_batch_tokens and (sentences or chosen):
                continue
            chosen.append(i)
            longest = max(longest, length)
        picked = set(chosen)
        pairs = [window[i] for i in sorted(chosen)]
        rest = [pair for i, pair in enumerate(window) if i not in picked] + list(queue)[len(window):]
        queue.clear()
        queue.extend(rest)
        self._queued -= len(pairs)
        return pairs

    def _admit(self, lane: tuple[int, bool], pairs: list[tuple[Job, int]]) -> None:
        batch = self._batches.get(lane)
        if batch is None:
            batch = self._batches[lane] = BeamBatch(self.engine, lane[0], lane[1])
        now = time.monotonic()
        items = []
        for job, index in pairs:
            if job.done:
                continue
            items.append(SearchItem(job.sources[index], job.opts, None, (job, index),
                                    job.constraints[index] if job.constraints is not None else None))
            self._active.add(job)
            if self.metrics is not None:
                self.metrics.queue_time.labels(self.model).observe(now - job.enqueued)
        try:
            batch.add(items)
        except Exception as exc:  # a failing model must not take the server down
            self._fail_lane(lane, exc, [item.tag[0] for item in items])

    def _step_one_lane(self) -> None:
        lanes = [lane for lane, batch in self._batches.items() if len(batch)]
        if not lanes:
            return
        self._turn += 1
        lane = lanes[self._turn % len(lanes)]
        batch = self._batches[lane]
        if self.metrics is not None:
            self.metrics.batch_sentences.labels(self.model).observe(len(batch))
            self.metrics.batch_tokens.labels(self.model).observe(batch.source_tokens)
        try:
            done = batch.step()
        except Exception as exc:
            # Every sentence the batch holds, those it closed in the failed step included (their
            # results were never delivered).
            self._fail_lane(lane, exc, [item.tag[0] for item in batch.items])
            return
        for item, hypotheses in done:
            job, index = item.tag
            job.deliver(index, hypotheses)
            if self.metrics is not None and hypotheses:
                self.metrics.sentences.labels(self.model).inc()
                self.metrics.generated_tokens.labels(self.model).inc(len(hypotheses[0].tokens) + 1)
            if job.done:
                self._active.discard(job)

    def _fail_lane(self, lane: tuple[int, bool], exc: Exception, jobs: list[Job]) -> None:
        log.exception("model %s: decoding failed; failing %d requests", self.model, len(set(jobs)), exc_info=exc)
        for job in set(jobs):
            job.fail(SchedulerError(SchedulerError.FAILED, f"model {self.model} failed to decode: {exc}"))
            self._active.discard(job)
        self._batches.pop(lane, None)

    def _drop_abandoned(self) -> None:
        """Stop decoding sentences of jobs that failed, were cancelled or expired."""
        now = time.monotonic()
        gone = set()
        for job in list(self._active):
            if job.expired(now):
                job.fail(SchedulerError(SchedulerError.EXPIRED, "deadline exceeded"))
            if job.error is not None:
                gone.add(job)
        if not gone:
            return
        self._active -= gone
        for batch in self._batches.values():
            batch.cancel({item.tag for item in batch.live_items() if item.tag[0] in gone})

    def _drop_abandoned_waiting(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_SECONDS:  # the queue can be long: not at every step
            return
        self._last_sweep = now
        for queue in self._waiting.values():
            if queue and any(job.done or job.expired(now) for job, _ in queue):
                keep = []
                for job, index in queue:
                    if job.expired(now):
                        job.fail(SchedulerError(SchedulerError.EXPIRED, "deadline exceeded while waiting"))
                    if not job.done:
                        keep.append((job, index))
                self._queued -= len(queue) - len(keep)
                queue.clear()
                queue.extend(keep)



class SchedulerGroup:
    """Several instances of one model, each with its own engine and scheduler thread, sharing
    the model's work: a job goes to the least loaded instance (as Triton's instance groups).
    On a CPU, two instances with one onnxruntime thread each beat one with two threads: one
    instance's Python between steps overlaps the other's decoder step, and single-threaded
    kernels waste nothing on synchronisation (measured on 2 cores, 32 clients: 1.35x)."""

    def __init__(self, engines: list[Engine], model: str, config: BatchingConfig, metrics: Metrics | None = None):
        self.model, self.config = model, config
        self.schedulers = [Scheduler(engine, model, config, metrics) for engine in engines]
        if metrics is not None:
            metrics.queue_depth.labels(model).set_function(lambda: self.queued)

    def submit(self, job: Job) -> None:
        _check_room(self.model, self.queued, len(job.sources), self.config.max_queue)  # the model's bound
        min(self.schedulers, key=lambda s: s.load).submit(job)

    def cancel(self, job: Job, reason: str = SchedulerError.CANCELLED) -> None:
        if job.scheduler is not None:
            job.scheduler.cancel(job, reason)
        else:  # never queued (refused)
            job.fail(SchedulerError(reason, f"request {reason}"))

    @property
    def engines(self) -> list[Engine]:
        """One per instance; the repository closes them once the schedulers have stopped."""
        return [s.engine for s in self.schedulers]

    @property
    def queued(self) -> int:
        return sum(s.queued for s in self.schedulers)

    @property
    def busy(self) -> bool:
        return any(s.busy for s in self.schedulers)

    def close(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = True
        for scheduler in self.schedulers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            finished = scheduler.close(left) and finished
        return finished
