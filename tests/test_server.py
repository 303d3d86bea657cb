"""End-to-end tests of the gRPC service over real channels on loopback: the shipped default
model, every RPC, health, reflection, metrics, bad input of every kind, deadlines,
cancellation, hot reload, authentication and TLS. The server must keep serving throughout."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from attnserve.client import TranslatorClient
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from attnserve.server.bundle import load_bundle
from attnserve.server.config import SHIPPED_REPOSITORY, ServerConfig
from attnserve.server.engine import Engine, TranslationOptions
from attnserve.server.service import create_server
from tests.conftest import SHIPPED_BUNDLE

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = SHIPPED_BUNDLE
SENTENCES = ["Open the file.", "The printer is out of paper.", "Could not connect to the server.",
             "Delete the selected items?", "Save changes to the document before closing?", "Settings"]


def attnserve_command() -> str:
    """The project's venv command (as CI installs it), else the one on PATH."""
    venv = ROOT / ".venv" / "bin" / "attnserve"
    return str(venv) if venv.exists() else "attnserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(repository: Path, **settings) -> tuple:
    settings = {"host": "127.0.0.1", "port": 0, "metrics_port": free_port(), "threads": 2, "poll_seconds": 0, **settings}
    config = ServerConfig(model_repository=str(repository), **settings)
    server, port = create_server(config)
    server.start()
    return server, port


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def requests_count(metrics: dict, rpc: str, code: str, model: str = "en-fr") -> float:
    return metrics.get(("attnserve_requests_total", (("code", code), ("model", model), ("rpc", rpc))), 0.0)


def shipped_repository(tmp_path_factory) -> Path:
    """A model repository whose en-fr/1 is the shipped bundle (a symlink, nothing copied)."""
    repo = tmp_path_factory.mktemp("repository")
    (repo / "en-fr").mkdir()
    (repo / "en-fr" / "1").symlink_to(SHIPPED)
    return repo


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return shipped_repository(tmp_path_factory)


@pytest.fixture(scope="module")
def served(repository):
    server, port = start(repository, max_sentences_per_request=8, max_tokens_per_sentence=40,
                         max_message_bytes=64 * 1024, max_beam_size=8)
    client = TranslatorClient(f"127.0.0.1:{port}", timeout=60)
    client.wait_until_serving(30)
    yield server, port, client
    client.close()
    server.stop(1)


@pytest.fixture(scope="module")
def offline() -> Engine:
    return Engine(load_bundle(SHIPPED), "fp32", device="cpu", threads=2)


def test_translate_matches_the_offline_engine(served, offline) -> None:
    _, _, client = served
    response = client.translate(SENTENCES, beam_size=4)
    assert (response.model, response.version) == ("en-fr", "1")
    assert [t.hypotheses[0].text for t in response.translations] == offline.translate_text(SENTENCES, TranslationOptions(beam_size=4))
    greedy = client.translate(SENTENCES, beam_size=1)
    assert [t.hypotheses[0].text for t in greedy.translations] == offline.translate_text(SENTENCES, TranslationOptions(beam_size=1))


def test_nbest_alignment_and_max_length(served) -> None:
    _, _, client = served
    translation = client.translate(["Open the file."], beam_size=4, nbest=3, return_alignment=True).translations[0]
    assert len(translation.hypotheses) == 3
    scores = [h.score for h in translation.hypotheses]
    assert scores == sorted(scores, reverse=True)
    best = translation.hypotheses[0]
    assert translation.source_tokens[-1] == "</s>"
    assert len(best.alignment) == len(best.target_tokens) > 0
    for row in best.alignment:
        assert len(row.weights) == len(translation.source_tokens)
        assert sum(row.weights) == pytest.approx(1.0, abs=1e-3)
    short = client.translate(["Save changes to the document before closing?"], max_length=2).translations[0]
    assert len(short.hypotheses[0].text.split()) <= 2


def test_stream_answers_each_item_exactly_once(served, offline) -> None:
    _, _, client = served
    items = [(f"id-{i}", sentence) for i, sentence in enumerate(SENTENCES * 3)]
    items.insert(4, ("too-long", "word " * 200))
    items.insert(7, ("bad-model", ""))
    results = {}
    for response in client.translate_stream(iter(items), beam_size=4):
        assert response.id not in results
        results[response.id] = response
    assert set(results) == {item_id for item_id, _ in items}
    assert results["too-long"].WhichOneof("result") == "error"
    assert results["too-long"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    expected = dict(zip(SENTENCES, offline.translate_text(SENTENCES, TranslationOptions(beam_size=4))))
    for item_id, sentence in items:
        if item_id.startswith("id-"):
            assert results[item_id].translation.hypotheses[0].text == expected[sentence]
    unknown = list(client.stub.TranslateStream(iter([pb.TranslateStreamRequest(id="x", sentence="Hi", model="nope")]), timeout=30))
    assert len(unknown) == 1 and unknown[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_list_and_get_models(served) -> None:
    _, _, client = served
    models = client.list_models()
    assert [(m.name, m.version) for m in models] == [("en-fr", "1")]
    info = client.get_model("en-fr")
    assert info.state == pb.ModelInfo.READY and info.is_default
    assert (info.source_language, info.target_language) == ("en", "fr")
    assert info.architecture == "transformer" and info.precision == "fp32"
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.test_bleu > 45
    with pytest.raises(grpc.RpcError) as error:
        client.get_model("de-en")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_check_and_watch(served) -> None:
    _, port, client = served
    for service in ("", "attnserve.v1.Translator", "en-fr"):
        assert client.health(service) == "SERVING"
    with pytest.raises(grpc.RpcError) as error:
        client.health("no-such-model")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    watch = client.health_stub.Watch(health_pb2.HealthCheckRequest(service="en-fr"), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_lists_the_service(served) -> None:
    _, _, client = served
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    services = {s.name for s in next(responses).list_services_response.service}
    assert {"attnserve.v1.Translator", "grpc.health.v1.Health"} <= services


@pytest.mark.parametrize("request_kwargs, code, message", [
    (dict(model="de-en"), grpc.StatusCode.NOT_FOUND, "no model 'de-en'"),
    (dict(model="en-fr", version="7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
    (dict(sentences=["a"] * 9), grpc.StatusCode.INVALID_ARGUMENT, "max_sentences_per_request=8"),
    (dict(sentences=["word " * 60]), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens_per_sentence=40"),
    (dict(options=pb.TranslationOptions(beam_size=2, nbest=3)), grpc.StatusCode.INVALID_ARGUMENT, "nbest 3 exceeds beam_size 2"),
    (dict(options=pb.TranslationOptions(beam_size=9)), grpc.StatusCode.INVALID_ARGUMENT, "max_beam_size=8"),
    (dict(options=pb.TranslationOptions(length_penalty=-1)), grpc.StatusCode.INVALID_ARGUMENT, "length_penalty"),
    (dict(sentences=["x" * 70000]), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # over max_message_bytes
])
def test_bad_requests_get_their_status_and_the_server_goes_on(served, request_kwargs, code, message) -> None:
    _, _, client = served
    request = pb.TranslateRequest(**{"sentences": ["Open the file."], **request_kwargs})
    with pytest.raises(grpc.RpcError) as error:
        client.stub.Translate(request, timeout=30)
    assert error.value.code() == code
    assert message in error.value.details()
    assert client.translate_text(["Settings"]) == client.translate_text(["Settings"])  # still serving


def test_expired_deadline_fails_cleanly(served) -> None:
    server, _, client = served
    with pytest.raises(grpc.RpcError) as error:
        client.translate(SENTENCES, timeout=0.001)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    scheduler = server.repository.get("en-fr").scheduler
    wait_for(lambda: not scheduler.busy)
    assert len(client.translate_text(SENTENCES)) == len(SENTENCES)


def test_cancellation_frees_the_work(served) -> None:
    server, _, client = served
    scheduler = server.repository.get("en-fr").scheduler
    long_sentences = ["Save changes to the document before closing it, or discard them and quit now?"] * 8
    future = client.stub.Translate.future(pb.TranslateRequest(sentences=long_sentences,
                                                              options=pb.TranslationOptions(beam_size=8)), timeout=60)
    wait_for(lambda: scheduler.busy)
    future.cancel()
    wait_for(lambda: not scheduler.busy)
    assert future.cancelled()
    assert client.translate_text(["Settings"])


def test_metrics_show_the_requests_just_made(served) -> None:
    server, _, client = served
    before = scrape(server.metrics_port)
    client.translate(SENTENCES[:3])
    with pytest.raises(grpc.RpcError):
        client.translate(["Hi"], model="nope")
    after = scrape(server.metrics_port)
    assert requests_count(after, "Translate", "OK") == requests_count(before, "Translate", "OK") + 1
    assert requests_count(after, "Translate", "NOT_FOUND", model="") == requests_count(before, "Translate", "NOT_FOUND", model="") + 1
    key = ("attnserve_sentences_total", (("model", "en-fr"),))
    assert after[key] == before.get(key, 0) + 3
    for histogram in ("attnserve_request_latency_seconds", "attnserve_queue_time_seconds", "attnserve_onnxruntime_run_seconds",
                      "attnserve_batch_sentences", "attnserve_batch_tokens"):
        assert any(name == histogram + "_bucket" for name, _ in after), histogram
    assert after[("attnserve_model_info", (("model", "en-fr"), ("precision", "fp32"), ("provider", "CPUExecutionProvider"), ("version", "1")))] == 1
    assert ("attnserve_queue_depth", (("model", "en-fr"),)) in after
    assert ("attnserve_inflight_requests", ()) in after


def test_translate_command_line_client(served, capsys) -> None:
    from attnserve.cli import main

    _, port, _ = served
    assert main(["translate", "--server", f"127.0.0.1:{port}", "Open the file.", "Settings"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["translate", "--server", f"127.0.0.1:{port}", "--model-name", "nope", "Settings"]) == 1


def test_queue_bound_refuses_with_resource_exhausted(repository) -> None:
    server, port = start(repository, max_queue=4)
    try:
        with TranslatorClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(grpc.RpcError) as error:
                client.translate(SENTENCES[:5])
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at most 4" in error.value.details()
            assert len(client.translate_text(SENTENCES[:4])) == 4
    finally:
        server.stop(1)


def test_hot_reload_refuses_a_corrupt_version_and_takes_a_good_one(bundles, tmp_path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(bundles["transformer"], repo / "toy" / "1")
    server, port = start(repo, default_model="toy", poll_seconds=0.2)
    try:
        with TranslatorClient(f"127.0.0.1:{port}") as client:
            assert client.translate(["a b c"]).version == "1"
            before = scrape(server.metrics_port).get(("attnserve_model_load_failures_total", (("model", "toy"),)), 0)
            broken = repo / "toy" / "2"
            shutil.copytree(bundles["transformer"], broken)
            graph = broken / "fp32" / "decoder_step.onnx"
            data = bytearray(graph.read_bytes())
            data[len(data) // 2] ^= 0xFF
            graph.write_bytes(bytes(data))
            wait_for(lambda: client.get_model("toy", "2").state == pb.ModelInfo.FAILED)
            assert "sha256" in client.get_model("toy", "2").state_reason
            assert client.translate(["a b c"]).version == "1"  # the old version keeps serving
            assert client.health("toy") == "SERVING"
            after = scrape(server.metrics_port)[("attnserve_model_load_failures_total", (("model", "toy"),))]
            assert after == before + 1
            shutil.copytree(bundles["transformer"], repo / "toy" / "3")
            wait_for(lambda: client.translate(["a b c"]).version == "3")
            wait_for(lambda: client.get_model("toy", "1").state == pb.ModelInfo.UNLOADED)
            shutil.rmtree(repo / "toy" / "3")  # rollback: the newest good version on disk comes back
            wait_for(lambda: client.translate(["a b c"]).version == "1")
    finally:
        server.stop(1)


def test_bearer_token_is_required_except_for_health(repository) -> None:
    server, port = start(repository, auth_token="s3cret")
    try:
        with TranslatorClient(f"127.0.0.1:{port}") as anonymous:
            assert anonymous.health() == "SERVING"
            with pytest.raises(grpc.RpcError) as error:
                anonymous.translate(["Settings"])
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as error:
                list(anonymous.translate_stream(iter([("1", "Settings")])))
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with TranslatorClient(f"127.0.0.1:{port}", token="wrong") as wrong:
            with pytest.raises(grpc.RpcError) as error:
                wrong.list_models()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with TranslatorClient(f"127.0.0.1:{port}", token="s3cret") as client:
            assert client.translate_text(["Settings"])
    finally:
        server.stop(1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls(repository, tmp_path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server, port = start(repository, tls_cert=str(cert), tls_key=str(key))
    server_port = port
    try:
        with TranslatorClient(f"localhost:{server_port}", tls=True, root_certificates=cert.read_bytes()) as client:
            assert client.translate_text(["Settings"])
        with TranslatorClient(f"localhost:{server_port}", timeout=3, attempts=1) as plaintext:
            with pytest.raises(grpc.RpcError):
                plaintext.translate(["Settings"])
    finally:
        server.stop(1)


def test_sigterm_during_load_loses_no_accepted_request(tmp_path) -> None:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen([attnserve_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
                                "--metrics-port", str(metrics_port), "--grace-period", "30", "--threads", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = TranslatorClient(f"127.0.0.1:{port}", timeout=60, attempts=1)
        client.wait_until_serving(60)
        results: dict[int, object] = {}

        def send(i: int) -> None:
            try:
                results[i] = client.translate(SENTENCES, beam_size=4)
            except grpc.RpcError as exc:
                results[i] = exc

        threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        wait_for(lambda: scrape(metrics_port).get(("attnserve_inflight_requests", ()), 0) >= 16)
        process.terminate()  # SIGTERM with 16 requests in flight
        for thread in threads:
            thread.join(60)
        assert process.wait(60) == 0
        assert all(isinstance(r, pb.TranslateResponse) and len(r.translations) == len(SENTENCES) for r in results.values()), results
        assert len(results) == 16
        output = process.stdout.read()
        assert "draining" in output and "stopped" in output
        client.close()
    finally:
        if process.poll() is None:
            process.kill()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_sighup_loads_a_new_version(bundles, tmp_path) -> None:
    """Polling off: a new version is picked up on SIGHUP, verified, and takes the traffic."""
    import signal

    repo = tmp_path / "repo"
    shutil.copytree(bundles["transformer"], repo / "toy" / "1")
    port = free_port()
    process = subprocess.Popen([attnserve_command(), "serve", "--host", "127.0.0.1",
                                "--port", str(port), "--metrics-port", "0", "--model-repository", str(repo),
                                "--default-model", "toy", "--poll-seconds", "0", "--threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with TranslatorClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_until_serving(60)
            assert client.translate(["a b c"]).version == "1"
            shutil.copytree(bundles["transformer"], repo / "toy" / "2")
            time.sleep(0.5)
            assert client.translate(["a b c"]).version == "1"  # no polling: nothing changes by itself
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: client.translate(["a b c"]).version == "2")
            assert client.get_model("toy", "1").state == pb.ModelInfo.UNLOADED
        process.terminate()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_client_retries_unavailable_and_nothing_else() -> None:
    """The client's retry policy (gRPC's own, from its service config): UNAVAILABLE is retried
    with backoff, other codes are not."""
    from concurrent import futures

    class Flaky(pb_grpc.TranslatorServicer):
        def __init__(self) -> None:
            self.calls = 0

        def Translate(self, request, context):
            self.calls += 1
            if request.model == "broken":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not retried")
            if self.calls < 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            return pb.TranslateResponse(model="flaky", version=str(self.calls))

    servicer = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TranslatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TranslatorClient(f"127.0.0.1:{port}", attempts=4) as client:
            assert client.translate(["x"]).version == "3"  # two UNAVAILABLE, then the answer
            servicer.calls = 10
            with pytest.raises(grpc.RpcError) as error:
                client.translate(["x"], model="broken")
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and servicer.calls == 11
    finally:
        server.stop(0)


def test_a_long_stream_is_flow_controlled_not_refused(repository) -> None:
    """A stream far longer than the queue: the server reads it only as fast as it translates
    (stream_window), so every item is translated, none gets RESOURCE_EXHAUSTED."""
    server, port = start(repository, max_queue=8, stream_window=4)
    try:
        with TranslatorClient(f"127.0.0.1:{port}", timeout=120) as client:
            items = [(str(i), SENTENCES[i % len(SENTENCES)]) for i in range(120)]
            results = {r.id: r for r in client.translate_stream(iter(items), beam_size=1)}
            assert len(results) == 120
            assert all(r.WhichOneof("result") == "translation" for r in results.values()), \
                {r.error.message for r in results.values() if r.WhichOneof("result") == "error"}
    finally:
        server.stop(1)
