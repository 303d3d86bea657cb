"""The text pipeline through gRPC: text_format, glossary, confidence and flags in results, old
clients unchanged, bad items refused with INVALID_ARGUMENT naming the item; and
`attnserve translate FILE.po --server`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import polib
import pytest

from attnserve.client import TranslatorClient
from attnserve.server.text import Glossary, GlossaryEntry, TextFormat, TextItem
from attnserve.server.text.markup import check_well_formed
from attnserve.v1 import translator_pb2 as pb
from tests.test_server import ROOT, shipped_repository, start
from tests.test_text_files import CATALOG


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repository = shipped_repository(tmp_path_factory)
    # A request limit above the pipeline's one-item limit (200,000 characters), so that the
    # per-item refusal below is what answers; the request limit has its own tests (test_http.py).
    server, port = start(repository, max_sentences_per_request=200, max_characters_per_request=400_000, metrics_port=0)
    client = TranslatorClient(f"127.0.0.1:{port}", timeout=120)
    client.wait_until_serving(120)
    yield port, client
    client.close()
    server.stop(0)


def test_old_clients_get_the_raw_behaviour(served) -> None:
    _, client = served
    translation = client.translate(["Open the file."], beam_size=4).translations[0]
    assert translation.hypotheses[0].text and not translation.flags and not translation.segments
    assert translation.confidence == 0.0  # unset: the pipeline did not run


def test_documents_html_and_placeholders_through_the_api(served) -> None:
    _, client = served
    glossary = Glossary([GlossaryEntry.checked("Software Center", "Logithèque")])
    items = [TextItem("The disk is full.\n\nDelete the selected files? Then restart.", TextFormat.DOCUMENT),
             TextItem("<p>Open the <b>Software Center</b> now.</p>", TextFormat.HTML),
             TextItem("Could not open %s in {0}", TextFormat.SENTENCE)]
    results = client.translate_items(items, glossary=glossary, beam_size=4, low_confidence=0.99)
    assert results[0].text.count("\n\n") == 1 and len(results[0].segments) == 3
    check_well_formed(results[1].text)
    assert "<b>" in results[1].text and "Logithèque" in results[1].text
    assert results[2].text.count("%s") == 1 and results[2].text.count("{0}") == 1
    assert results[2].placeholders == ["%s", "{0}"]
    assert all(0.0 <= r.confidence <= 1.0 for r in results)
    assert all("low_confidence" in r.flags for r in results if r.confidence < 0.99)


@pytest.mark.parametrize("options, sentences, message", [
    (pb.TranslationOptions(text_format=pb.HTML), ["fine", "<b>bold <i>x</b></i>"],
     "sentence 1: </b> at offset 12 closes <i> opened at offset 8"),
    (pb.TranslationOptions(text_format=7), ["x"], "unknown text_format 7"),
    (pb.TranslationOptions(text_format=pb.SENTENCE, glossary=[pb.GlossaryEntry(source="", target="x")]), ["x"],
     "glossary entry 0: empty source term"),
    (pb.TranslationOptions(text_format=pb.DOCUMENT), ["ok", "x" * 300_000], "sentence 1: 300000 characters; the limit is"),
])
def test_bad_input_is_invalid_argument_naming_the_item(served, options, sentences, message) -> None:
    _, client = served
    with pytest.raises(grpc.RpcError) as raised:
        client.stub.Translate(pb.TranslateRequest(sentences=sentences, options=options), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()


def test_po_file_through_the_server(served, tmp_path: Path) -> None:
    port, _ = served
    source = tmp_path / "messages.po"
    source.write_text(CATALOG, encoding="utf-8")
    output = tmp_path / "messages.fr.po"
    result = subprocess.run([sys.executable, "-m", "attnserve.cli", "translate", str(source), "-o", str(output),
                             "--server", f"127.0.0.1:{port}", "--timeout", "120"],
                            capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    catalog = polib.pofile(str(output))
    assert catalog.find("Could not open %s: %s").msgstr.count("%s") == 2
    assert all(catalog.find("%d file deleted").msgstr_plural.values())


def _stream(client: TranslatorClient, requests: list[pb.TranslateStreamRequest]) -> dict[str, pb.TranslateStreamResponse]:
    responses = list(client.stub.TranslateStream(iter(requests), timeout=120))
    assert len(responses) == len(requests)  # one answer per item, no more
    return {r.id: r for r in responses}


def test_translate_stream_runs_the_text_pipeline_per_item(served) -> None:
    _, client = served
    html = "<p>Open the <b>Software Center</b> now.</p>"
    glossary = [pb.GlossaryEntry(source="Software Center", target="Logithèque")]
    requests = [
        pb.TranslateStreamRequest(id="doc", sentence="The disk is full.\n\nDelete the selected files? Then restart.",
                                  options=pb.TranslationOptions(beam_size=4, text_format=pb.DOCUMENT)),
        pb.TranslateStreamRequest(id="html", sentence=html,
                                  options=pb.TranslationOptions(beam_size=4, text_format=pb.HTML, glossary=glossary)),
        pb.TranslateStreamRequest(id="msg", sentence="Could not open %s in {0}",
                                  options=pb.TranslationOptions(beam_size=4, text_format=pb.SENTENCE, low_confidence=0.99)),
        pb.TranslateStreamRequest(id="bad", sentence="<b>bold <i>x</b></i>", options=pb.TranslationOptions(text_format=pb.HTML)),
        pb.TranslateStreamRequest(id="none", sentence="<p>42</p>", options=pb.TranslationOptions(text_format=pb.HTML)),
        pb.TranslateStreamRequest(id="raw", sentence="Open the file.", options=pb.TranslationOptions(beam_size=4)),
    ]
    answers = _stream(client, requests)
    doc = answers["doc"].translation
    assert doc.hypotheses[0].text.count("\n\n") == 1 and len(doc.segments) == 3 and 0.0 < doc.confidence <= 1.0
    page = answers["html"].translation.hypotheses[0].text
    check_well_formed(page)
    assert "<b>" in page and "Logithèque" in page and answers["html"].model
    message = answers["msg"].translation
    assert message.hypotheses[0].text.count("%s") == 1 and message.hypotheses[0].text.count("{0}") == 1
    assert list(message.placeholders) == ["%s", "{0}"]
    assert ("low_confidence" in message.flags) == (message.confidence < 0.99)
    assert answers["bad"].WhichOneof("result") == "error"
    assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers["bad"].error.message == "item 'bad': </b> at offset 12 closes <i> opened at offset 8"
    assert answers["none"].translation.hypotheses[0].text == "<p>42</p>"  # nothing for the model: copied
    raw = answers["raw"].translation  # no text_format: the old behaviour, untouched
    assert raw.hypotheses[0].text and not raw.segments and not raw.flags and raw.confidence == 0.0
    # The same service code as Translate: one item alone gives what a one-sentence request gives.
    alone = _stream(client, [requests[1]])["html"].translation
    unary = client.stub.Translate(pb.TranslateRequest(sentences=[html], options=requests[1].options), timeout=60)
    assert alone == unary.translations[0]
