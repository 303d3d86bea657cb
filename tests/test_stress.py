"""Concurrency stress: many unary and streaming clients at once, with deadlines, cancellations
and deadline-less calls mixed, against one server. Every answer must be the right translation
of its own sentence (ids and order checked), nothing answered twice, nothing lost, and the
server must be idle and serving afterwards. Bounded: about 20 s of load."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest

from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.test_server import shipped_repository, start, wait_for

POOL = ["Open the file.", "Close the window.", "Settings", "The printer is out of paper.",
        "Could not connect to the server.", "Delete the selected items?", "Save changes before closing?",
        "Unable to find the requested page.", "Show hidden files", "Quit", "Print the current document.",
        "The password is incorrect."]
BEAMS = (1, 2)
LOAD_SECONDS = 20.0
CLIENTS = 12


@dataclass
class Tally:
    """What the clients saw; each list is appended to by many threads (list.append is atomic)."""
    correct: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def stress_server(tmp_path_factory):
    repository = shipped_repository(tmp_path_factory)
    server, port = start(repository, max_queue=4096, stream_window=8)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield server, pb_grpc.TranslatorStub(channel)
    channel.close()
    server.stop(1.0)


def _options(beam: int) -> pb.TranslationOptions:
    return pb.TranslationOptions(beam_size=beam)


def _unary(stub, rng: random.Random, expected: dict, tally: Tally) -> None:
    beam = rng.choice(BEAMS)
    sentences = rng.sample(POOL, rng.randint(1, 4))
    kind = rng.choice(["no-deadline", "deadline", "short-deadline", "cancel"])
    timeout = {"no-deadline": None, "deadline": 60.0, "short-deadline": rng.uniform(0.001, 0.2), "cancel": None}[kind]
    future = stub.Translate.future(pb.TranslateRequest(sentences=sentences, options=_options(beam)), timeout=timeout)
    if kind == "cancel":
        time.sleep(rng.uniform(0.0, 0.1))
        future.cancel()
    try:
        reply = future.result()
    except grpc.FutureCancelledError:
        tally.cancelled.append("unary")
        return
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and kind == "short-deadline":
            tally.expired.append("unary")
        elif error.code() == grpc.StatusCode.CANCELLED and kind == "cancel":
            tally.cancelled.append("unary")
        else:
            tally.wrong.append(f"unary {kind}: {error.code()} {error.details()}")
        return
    got = [t.hypotheses[0].text for t in reply.translations]
    want = [expected[beam, s] for s in sentences]
    (tally.correct if got == want else tally.wrong).append(f"unary {kind}: {got} != {want}" if got != want else "unary")


def _stream(stub, rng: random.Random, expected: dict, tally: Tally, stream_number: int) -> None:
    beam = rng.choice(BEAMS)
    count = rng.randint(1, 24)
    items = {f"{stream_number}-{i}": rng.choice(POOL) for i in range(count)}
    kind = rng.choice(["no-deadline", "deadline", "short-deadline", "cancel"])
    timeout = {"no-deadline": None, "deadline": 60.0, "short-deadline": rng.uniform(0.01, 0.3), "cancel": None}[kind]
    requests = (pb.TranslateStreamRequest(id=i, sentence=s, options=_options(beam)) for i, s in items.items())
    call = stub.TranslateStream(requests, timeout=timeout)
    cancel_after = rng.randint(0, count) if kind == "cancel" else None
    seen: Counter[str] = Counter()
    try:
        for reply in call:
            seen[reply.id] += 1
            if reply.HasField("error"):
                if reply.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and kind == "short-deadline":
                    tally.expired.append("item")
                else:
                    tally.wrong.append(f"stream {kind} item {reply.id}: error {reply.error.code} {reply.error.message}")
            elif reply.id not in items or reply.translation.hypotheses[0].text != expected[beam, items[reply.id]]:
                tally.wrong.append(f"stream item {reply.id}: {reply.translation.hypotheses[0].text!r}")
            else:
                tally.correct.append("item")
            if cancel_after is not None and sum(seen.values()) >= cancel_after:
                call.cancel()
    except grpc.RpcError as error:
        ok = {"short-deadline": grpc.StatusCode.DEADLINE_EXCEEDED, "cancel": grpc.StatusCode.CANCELLED}.get(kind)
        if error.code() != ok:
            tally.wrong.append(f"stream {kind}: {error.code()} {error.details()}")
        (tally.expired if kind == "short-deadline" else tally.cancelled).append("stream")
    duplicated = [i for i, n in seen.items() if n > 1]
    if duplicated:
        tally.wrong.append(f"stream answered twice: {duplicated}")
    if kind in ("no-deadline", "deadline") and set(seen) != set(items):
        tally.wrong.append(f"stream {kind} lost items: {sorted(set(items) - set(seen))}")


def test_concurrent_clients_get_exactly_their_own_answers(stress_server) -> None:
    server, stub = stress_server
    expected = {}
    for beam in BEAMS:
        reply = stub.Translate(pb.TranslateRequest(sentences=POOL, options=_options(beam)), timeout=120)
        expected.update({(beam, s): t.hypotheses[0].text for s, t in zip(POOL, reply.translations)})
    tally = Tally()
    stop_at = time.monotonic() + LOAD_SECONDS

    def client(number: int) -> None:
        rng = random.Random(number)
        streams = 0
        while time.monotonic() < stop_at:
            try:
                if rng.random() < 0.4:
                    streams += 1
                    _stream(stub, rng, expected, tally, number * 10_000 + streams)
                else:
                    _unary(stub, rng, expected, tally)
            except Exception as exc:  # a crash in the client is a finding too
                tally.wrong.append(f"client {number}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not tally.wrong, tally.wrong[:10]
    assert len(tally.correct) > 50 and tally.cancelled and tally.expired, \
        (len(tally.correct), len(tally.cancelled), len(tally.expired))

    # Afterwards: nothing left running or queued, and the server answers as before.
    scheduler = server.repository.get("en-fr").scheduler
    wait_for(lambda: not scheduler.busy and scheduler.queued == 0)
    reply = stub.Translate(pb.TranslateRequest(sentences=POOL, options=_options(1)))
    assert [t.hypotheses[0].text for t in reply.translations] == [expected[1, s] for s in POOL]
