"""End-to-end tests of the HTTP/JSON gateway (server/http.py) over real sockets: the LibreTranslate
API through the real libretranslatepy client and raw HTTP, the /v1 JSON API against gRPC, every
error shape, client keys and rate limits shared with gRPC, and SIGTERM drain."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import json_format
from libretranslatepy import LibreTranslateAPI

from attnserve.client import TranslatorClient
from attnserve.v1 import translator_pb2 as pb
from tests.test_server import SENTENCES, attnserve_command, free_port, requests_count, scrape, shipped_repository, start, wait_for


def call(port: int, path: str, body: bytes | dict | None = None, content_type: str = "application/json",
         headers: dict[str, str] | None = None, method: str | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={**({"Content-Type": content_type} if data is not None else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return shipped_repository(tmp_path_factory)


@pytest.fixture(scope="module")
def served(repository):
    http_port = free_port()
    server, port = start(repository, http_port=http_port, max_sentences_per_request=8, max_tokens_per_sentence=40,
                         max_message_bytes=64 * 1024, max_characters_per_request=2000, max_beam_size=8)
    client = TranslatorClient(f"127.0.0.1:{port}", timeout=60)
    client.wait_until_serving(30)
    yield server, http_port, client
    client.close()
    server.stop(1)


def pipeline(client: TranslatorClient, texts: list[str], text_format: int) -> list[str]:
    response = client.stub.Translate(pb.TranslateRequest(sentences=texts, options=pb.TranslationOptions(text_format=text_format)),
                                     timeout=60)
    return [t.hypotheses[0].text for t in response.translations]


def test_libretranslatepy_client_single_string_detect_and_languages(served) -> None:
    _, http_port, client = served
    lt = LibreTranslateAPI(f"http://127.0.0.1:{http_port}")
    assert lt.translate("Open the file.", "en", "fr") == pipeline(client, ["Open the file."], pb.DOCUMENT)[0]
    assert lt.translate("Open the file.", "auto", "fr") == pipeline(client, ["Open the file."], pb.DOCUMENT)[0]
    # The client's translate() sends neither a list nor `format`; HTML through it is text, as
    # against LibreTranslate: the markup is kept as protected spans by the document pipeline.
    html = "Open the <b>file</b>."
    assert lt.translate(html, "en", "fr") == pipeline(client, [html], pb.DOCUMENT)[0]
    assert "<b>" in lt.translate(html, "en", "fr")
    english = lt.detect("Save the document before closing the window.")
    assert [d["language"] for d in english] == ["en", "fr"] and english[0]["confidence"] > 90
    assert lt.detect("Enregistrer le document avant de fermer la fenêtre.")[0]["language"] == "fr"
    languages = {entry["code"]: entry for entry in lt.languages()}
    assert languages["en"]["targets"] == ["fr"] and languages["en"]["name"] == "English"
    assert "fr" in languages


def test_libretranslate_list_html_alternatives_and_form_data(served) -> None:
    _, http_port, client = served
    # A list, exactly as Weblate's LibreTranslate machinery sends it (JSON, api_key empty when
    # none is configured).
    weblate = {"api_key": "", "q": SENTENCES[:3], "source": "en", "target": "fr"}
    status, body, _ = call(http_port, "/translate", weblate)
    assert status == 200 and body == {"translatedText": pipeline(client, SENTENCES[:3], pb.DOCUMENT)}
    status, body, _ = call(http_port, "/translate", {"q": SENTENCES[:3], "source": "auto", "target": "fr"})
    assert status == 200 and body["translatedText"] == pipeline(client, SENTENCES[:3], pb.DOCUMENT)
    assert [d["language"] for d in body["detectedLanguage"]] == ["en"] * 3
    assert len({d["confidence"] for d in body["detectedLanguage"]}) == 1 and body["detectedLanguage"][0]["confidence"] > 90
    # Text in the target language: the only source is still used, with a confidence that says so.
    status, body, _ = call(http_port, "/translate", {"q": "Le fichier est introuvable.", "source": "auto", "target": "fr"})
    assert status == 200 and body["detectedLanguage"]["language"] == "en" and body["detectedLanguage"]["confidence"] < 10
    html = "<p>Open the <b>file</b>.</p>"
    status, body, _ = call(http_port, "/translate", {"q": html, "source": "en", "target": "fr", "format": "html", "alternatives": 2})
    assert status == 200 and body["translatedText"] == pipeline(client, [html], pb.HTML)[0]
    assert body["translatedText"].startswith("<p>") and "<b>" in body["translatedText"] and body["alternatives"] == []
    status, body, _ = call(http_port, "/translate", {"q": "Open the file.", "source": "en", "target": "fr", "alternatives": 2})
    assert status == 200 and len(body["alternatives"]) <= 2 and body["translatedText"] not in body["alternatives"]
    assert "detectedLanguage" not in body
    status, body, _ = call(http_port, "/translate", b"q=Settings&source=en&target=fr", "application/x-www-form-urlencoded")
    assert status == 200 and body == {"translatedText": pipeline(client, ["Settings"], pb.DOCUMENT)[0]}
    status, settings, _ = call(http_port, "/frontend/settings")
    assert status == 200 and settings["charLimit"] == 2000 and settings["language"]["source"]["code"] == "en"


def test_native_api_matches_grpc(served) -> None:
    _, http_port, client = served
    for options in ({"beamSize": 4, "nbest": 3, "returnAlignment": True},
                    {"textFormat": "SENTENCE", "glossary": [{"source": "file", "target": "dossier"}]}):
        request = {"sentences": ["Open the file.", "Could not open %s: permission denied."], "options": options}
        status, body, _ = call(http_port, "/v1/translate", request)
        assert status == 200, body
        expected = client.stub.Translate(json_format.ParseDict(request, pb.TranslateRequest()), timeout=60)
        got = json_format.ParseDict(body, pb.TranslateResponse())
        assert [[h.text for h in t.hypotheses] for t in got.translations] == \
               [[h.text for h in t.hypotheses] for t in expected.translations]
        assert [list(t.placeholders) for t in got.translations] == [list(t.placeholders) for t in expected.translations]
        for mine, theirs in zip(got.translations, expected.translations):
            assert list(mine.source_tokens) == list(theirs.source_tokens)
            assert [list(h.target_tokens) for h in mine.hypotheses] == [list(h.target_tokens) for h in theirs.hypotheses]
    status, models, _ = call(http_port, "/v1/models")
    assert status == 200 and [(m["name"], m["state"]) for m in models["models"]] == [("en-fr", "READY")]
    assert call(http_port, "/v1/models/en-fr")[1]["sourceLanguage"] == "en"


TOO_BIG = b'{"q": "' + b"x" * 70_000 + b'", "source": "en", "target": "fr"}'
LT = {"source": "en", "target": "fr"}


@pytest.mark.parametrize("path, body, content_type, status, message", [
    ("/translate", {"source": "en", "target": "fr"}, "application/json", 400, "missing q parameter"),
    ("/translate", {"q": "Hi", "target": "fr"}, "application/json", 400, "missing source parameter"),
    ("/translate", {"q": "Hi", "source": "en"}, "application/json", 400, "missing target parameter"),
    ("/translate", {"q": 42, **LT}, "application/json", 400, "q must be a string or a list"),
    ("/translate", {"q": ["a", 1], **LT}, "application/json", 400, "q must be a string or a list"),
    ("/translate", {"q": {"a": 1}, **LT}, "application/json", 400, "q must be a string or a list"),
    ("/translate", {"q": "Hi", "source": "xx", "target": "fr"}, "application/json", 400, "xx is not supported"),
    ("/translate", {"q": "Hi", "source": "en", "target": "en"}, "application/json", 400,
     "English (en) is not available as a target language from English (en)"),
    ("/translate", {"q": "Hi", "source": ["en"], "target": "fr"}, "application/json", 400, "source must be a string"),
    ("/translate", {"q": "Hi", "format": "pdf", **LT}, "application/json", 400, "pdf format is not supported"),
    ("/translate", {"q": "Hi", "alternatives": "many", **LT}, "application/json", 400, "alternatives parameter is not a number"),
    ("/translate", {"q": "Hi", "alternatives": 50, **LT}, "application/json", 400, "alternatives parameter must be <= 7"),
    ("/translate", {"q": ["a"] * 9, **LT}, "application/json", 400, "max_sentences_per_request=8"),
    ("/translate", {"q": "word " * 500, **LT}, "application/json", 400, "max_characters_per_request=2000"),
    ("/translate", {"q": "<b>unclosed", "format": "html", **LT}, "application/json", 400, "sentence 0"),
    ("/translate", b'{"q": "\\ud800", "source": "en", "target": "fr"}', "application/json", 400, "not valid Unicode"),
    ("/translate", b'{"q": "Hi", ', "application/json", 400, "Invalid JSON format"),
    ("/translate", b'["Hi"]', "application/json", 400, "Invalid JSON format"),
    ("/translate", b'\xff\xfe{}', "application/json", 400, "Invalid JSON format"),
    ("/translate", b"q=%FF&source=en&target=fr", "application/x-www-form-urlencoded", 400, "Invalid form data"),
    ("/translate", b"Hi", "text/plain", 400, "unsupported Content-Type"),
    ("/translate", TOO_BIG, "application/json", 413, "max_message_bytes"),
    ("/detect", {}, "application/json", 400, "missing q parameter"),
    ("/detect", {"q": ["Hi"]}, "application/json", 400, "q must be a string"),
    ("/detect", {"q": "word " * 500}, "application/json", 400, "max_characters_per_request=2000"),
    ("/detect", b"q=%FF", "application/x-www-form-urlencoded", 400, "Invalid form data"),
    ("/v1/translate", {"sentences": "Hi"}, "application/json", 400, "invalid TranslateRequest"),
    ("/v1/translate", {"sentences": ["Hi"], "bogus": 1}, "application/json", 400, "invalid TranslateRequest"),
    ("/v1/translate", {"sentences": ["Hi"], "options": {"beamSize": 9}}, "application/json", 400, "max_beam_size=8"),
    ("/v1/translate", {"sentences": ["Hi"], "options": {"beamSize": 2, "nbest": 3}}, "application/json", 400, "nbest 3 exceeds"),
    ("/v1/translate", {"sentences": ["word " * 60]}, "application/json", 400, "max_tokens_per_sentence=40"),
    ("/v1/translate", {"model": "de-en", "sentences": ["Hi"]}, "application/json", 404, "no model 'de-en'"),
    ("/v1/translate", b"sentences=Hi", "application/x-www-form-urlencoded", 400, "unsupported Content-Type"),
])
def test_bad_requests_get_an_error_shape_and_the_server_goes_on(served, path, body, content_type, status, message) -> None:
    _, http_port, client = served
    got, answer, _ = call(http_port, path, body, content_type)
    assert got == status, answer
    assert set(answer) == {"error"} and message in answer["error"], answer
    assert call(http_port, "/translate", {"q": "Settings", **LT})[0] == 200  # still serving


def test_other_bad_requests(served) -> None:
    _, http_port, _ = served
    assert call(http_port, "/nope")[0] == 404
    status, answer, _ = call(http_port, "/translate", method="GET")
    assert status == 405 and "error" in answer
    assert call(http_port, "/v1/models/nope")[0] == 404
    status, answer, _ = call(http_port, "/v1/translate", {"sentences": ["Hi"]}, headers={"Request-Timeout": "soon"})
    assert status == 400 and "Request-Timeout" in answer["error"]
    status, answer, _ = call(http_port, "/v1/translate", {"sentences": SENTENCES}, headers={"Request-Timeout": "0.000001"})
    assert status == 504 and "deadline" in answer["error"]
    # Odd but valid Unicode is translated, not refused.
    for text in ("😀 Open the file 👍", "שלום Open", "e\u0301\u200b\ufeff\u0000 Settings", "\u202eOpen\u202c"):
        status, answer, _ = call(http_port, "/translate", {"q": text, **LT})
        assert status == 200 and isinstance(answer["translatedText"], str), (text, answer)


def test_metrics_count_http_calls_with_the_grpc_labels(served) -> None:
    server, http_port, _ = served
    before = scrape(server.metrics_port)
    call(http_port, "/translate", {"q": "Settings", **LT})
    call(http_port, "/translate", {"q": "Hi", "source": "en", "target": "en"})
    after = scrape(server.metrics_port)
    assert requests_count(after, "http.LibreTranslate", "OK") == requests_count(before, "http.LibreTranslate", "OK") + 1
    assert requests_count(after, "http.LibreTranslate", "INVALID_ARGUMENT", model="") == \
           requests_count(before, "http.LibreTranslate", "INVALID_ARGUMENT", model="") + 1
    key = ("attnserve_http_responses_total", (("route", "/translate"), ("status", "400")))
    assert after[key] == before.get(key, 0) + 1


def test_keys_and_rate_limits_are_shared_by_both_transports(repository, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# key  requests per minute\nweblate 3\n")
    http_port = free_port()
    server, port = start(repository, http_port=http_port, auth_token="s3cret", api_keys_file=str(keys),
                         http_cors_origins="https://weblate.example")
    try:
        ok = {"q": "Settings", **LT}
        assert call(http_port, "/translate", ok)[:2] == (400, {"error": "Please contact the server operator to get an API key"})
        assert call(http_port, "/translate", {**ok, "api_key": "wrong"})[:2] == (403, {"error": "Invalid API key"})
        assert call(http_port, "/translate", {**ok, "api_key": "s3cret"})[0] == 200
        assert LibreTranslateAPI(f"http://127.0.0.1:{http_port}", api_key="s3cret").translate("Settings", "en", "fr")
        status, _, headers = call(http_port, "/v1/translate", {"sentences": ["Hi"]})
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert call(http_port, "/v1/translate", {"sentences": ["Hi"]}, headers={"Authorization": "Bearer nope"})[0] == 403
        assert call(http_port, "/v1/translate", {"sentences": ["Hi"]}, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(http_port, "/health/ready")[0] == 200 and call(http_port, "/languages")[0] == 200
        # weblate: 3 a minute, over HTTP and gRPC together.
        assert call(http_port, "/translate", {**ok, "api_key": "weblate"})[0] == 200
        with TranslatorClient(f"127.0.0.1:{port}", token="weblate", attempts=1) as client:
            assert client.translate_text(["Settings"])
            assert call(http_port, "/translate", {**ok, "api_key": "weblate"})[0] == 200
            status, answer, headers = call(http_port, "/translate", {**ok, "api_key": "weblate"})
            assert status == 429 and answer["error"].startswith("Slowdown: rate limit of 3") and int(headers["retry-after"]) >= 1
            with pytest.raises(grpc.RpcError) as error:
                client.translate(["Settings"])
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(http_port, "/translate", {**ok, "api_key": "s3cret"})[0] == 200  # other keys unaffected
        preflight = urllib.request.Request(f"http://127.0.0.1:{http_port}/translate", method="OPTIONS", headers={
            "Origin": "https://weblate.example", "Access-Control-Request-Method": "POST"})
        with urllib.request.urlopen(preflight, timeout=10) as reply:
            assert reply.headers["access-control-allow-origin"] == "https://weblate.example"
    finally:
        server.stop(1)


def test_sigterm_drains_http_and_loses_no_accepted_request() -> None:
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    process = subprocess.Popen([attnserve_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port",
                                str(http_port), "--metrics-port", str(metrics_port), "--grace-period", "30", "--threads", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with TranslatorClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(60)
        results: dict[int, object] = {}

        def send(i: int) -> None:
            try:
                results[i] = call(http_port, "/v1/translate", {"sentences": SENTENCES, "options": {"beamSize": 4}})
            except Exception as exc:  # a reset connection would land here
                results[i] = exc

        threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        wait_for(lambda: scrape(metrics_port).get(("attnserve_inflight_requests", ()), 0) >= 16)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert process.wait(60) == 0
        assert len(results) == 16
        for result in results.values():
            assert isinstance(result, tuple) and result[0] == 200 and len(result[1]["translations"]) == len(SENTENCES), result
        output = process.stdout.read()
        assert "draining" in output and "HTTP gateway stopped" in output and "stopped" in output
    finally:
        if process.poll() is None:
            process.kill()


def test_responses_are_not_delayed_by_nagle(served) -> None:
    """uvicorn writes headers and body separately: without TCP_NODELAY on accepted sockets each
    keep-alive response waits ~40 ms for a delayed ACK."""
    import http.client
    import statistics
    import time

    _, http_port, _ = served
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    latencies = []
    for _ in range(15):
        started = time.perf_counter()
        connection.request("GET", "/health")
        assert connection.getresponse().read() == b'{"status":"ok"}'
        latencies.append(time.perf_counter() - started)
    connection.close()
    assert statistics.median(latencies) < 0.02, latencies


def test_requests_over_the_workers_get_429_and_the_rest_are_served(repository) -> None:
    """--workers bounds the requests in flight on HTTP as it does gRPC's handler threads;
    the one over it gets 429 with Retry-After at once, and nothing is half-done."""
    http_port = free_port()
    server, _ = start(repository, http_port=http_port, workers=1, max_beam_size=8)
    try:
        heavy = {"sentences": SENTENCES * 4, "options": {"beamSize": 8}}
        results: list[tuple[int, dict, dict]] = []
        threads = [threading.Thread(target=lambda: results.append(call(http_port, "/v1/translate", heavy))) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        statuses = sorted(status for status, _, _ in results)
        assert len(results) == 6 and set(statuses) == {200, 429}, statuses
        for status, body, headers in results:
            if status == 429:
                assert set(body) == {"error"} and "requests in flight" in body["error"] and int(headers["retry-after"]) >= 1
            else:
                assert len(body["translations"]) == len(heavy["sentences"])
        libre = call(http_port, "/translate", {"q": "Settings", **LT})
        assert libre[0] == 200  # the slot came back
    finally:
        server.stop(1)


def test_a_client_that_disconnects_has_its_translation_cancelled(repository) -> None:
    """The gateway polls for a disconnect while the model works; the job leaves the scheduler
    and the call is counted CANCELLED, and the server goes on."""
    import socket
    import time

    http_port = free_port()
    server, _ = start(repository, http_port=http_port, max_sentences_per_request=256, max_beam_size=8,
                      max_characters_per_request=100_000)
    try:
        before = scrape(server.metrics_port)
        body = json.dumps({"sentences": SENTENCES * 40, "options": {"beamSize": 8}}).encode()
        with socket.create_connection(("127.0.0.1", http_port)) as sock:
            sock.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_for(lambda: scrape(server.metrics_port).get(("attnserve_inflight_requests", ()), 0) >= 1)
        started = time.monotonic()
        wait_for(lambda: requests_count(scrape(server.metrics_port), "http.Translate", "CANCELLED")
                 == requests_count(before, "http.Translate", "CANCELLED") + 1)
        assert time.monotonic() - started < 10  # cancelled, not run to the end (240 sentences, beam 8)
        assert requests_count(scrape(server.metrics_port), "http.Translate", "OK") == requests_count(before, "http.Translate", "OK")
        assert call(http_port, "/translate", {"q": "Settings", **LT})[0] == 200
    finally:
        server.stop(1)
