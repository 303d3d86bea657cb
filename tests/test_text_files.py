"""Files through the text pipeline: PO/POT catalogs (msgfmt --check, plural forms, untouched
translations, flags), HTML files and documents, and exactly-once output across a SIGKILL."""

from __future__ import annotations

import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polib
import pytest

from attnserve.server.text import TextFormat, TextItem, TextResult
from attnserve.server.text.files import FileError, PoOptions, detect_format, translate_po, translate_text_file
from attnserve.server.text.markup import balanced_pieces, check_well_formed
from tests.conftest import SHIPPED_BUNDLE
from tests.interrupt import sigkill_after_lines

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = SHIPPED_BUNDLE
MSGFMT = shutil.which("msgfmt")

CATALOG = r'''# Demo catalog.
msgid ""
msgstr ""
"Project-Id-Version: demo 1.0\n"
"Language: fr\n"
"MIME-Version: 1.0\n"
"Content-Type: text/plain; charset=UTF-8\n"
"Content-Transfer-Encoding: 8bit\n"
"Plural-Forms: nplurals=2; plural=(n > 1);\n"

#. Translators: a file name follows
#: src/main.c:10
#, c-format
msgid "Could not open %s: %s"
msgstr ""

#: src/main.c:20
#, c-format
msgid "%d file deleted"
msgid_plural "%d files deleted"
msgstr[0] ""
msgstr[1] ""

#: src/ui.c:5
msgctxt "menu"
msgid "_Open"
msgstr ""

#, python-format
msgid "Copying %(name)s to %(dest)s"
msgstr ""

#, python-brace-format
msgid "Delete {count} files in {folder}?"
msgstr ""

msgid ""
"Usage: demo [OPTION]... FILE\n"
"Print FILE to standard output.\n"
msgstr ""

#: src/done.c:1
msgid "Save the file"
msgstr "Enregistrer le fichier"

#, c-format
msgid "One item"
msgid_plural "%d items"
msgstr[0] "Un élément"
msgstr[1] "%d éléments"

#~ msgid "Old message"
#~ msgstr "Ancien message"
'''


@pytest.fixture(scope="module")
def translate_items():
    from attnserve.server.bundle import load_bundle
    from attnserve.server.engine import Engine, TranslationOptions
    from attnserve.server.text import TextPipeline, engine_translator

    engine = Engine(load_bundle(SHIPPED), "fp32", device="cpu", threads=1)
    pipeline = TextPipeline.for_engine(engine)
    translate = engine_translator(engine, TranslationOptions(beam_size=2))
    return lambda items: pipeline.translate(items, translate)


def test_formats_come_from_the_extension() -> None:
    assert [detect_format(Path(p)) for p in ("a.po", "a.pot", "b.html", "c.xlf", "d.jsonl", "e.txt", "f.md")] == \
        ["po", "po", "html", "xliff", "jsonl", "text", "document"]
    assert detect_format(Path("a.txt"), "document") == "document"


def test_po_is_filled_checked_and_keeps_everything_else(tmp_path: Path, translate_items) -> None:
    source = tmp_path / "messages.po"
    source.write_text(CATALOG, encoding="utf-8")
    output = tmp_path / "messages.fr.po"
    summary = translate_po(source, output, translate_items, PoOptions())
    before, after = polib.pofile(str(source)), polib.pofile(str(output))
    assert summary.entries == 8 and summary.kept == 2 and summary.translated + summary.refused == 6
    assert len(after) == len(before) and len(after.obsolete_entries()) == 1
    for old, new in zip(before, after):
        assert (old.msgid, old.msgctxt, old.msgid_plural, old.occurrences, old.comment) == \
            (new.msgid, new.msgctxt, new.msgid_plural, new.occurrences, new.comment)
        assert set(old.flags) <= set(new.flags)
        if old.translated() or old.obsolete:  # translated entries untouched, not marked
            assert (new.msgstr, new.msgstr_plural, new.flags) == (old.msgstr, old.msgstr_plural, old.flags)
        elif new.msgid_plural:
            assert sorted(new.msgstr_plural) == [0, 1] and all(new.msgstr_plural.values())  # every form filled
            assert "fuzzy" in new.flags
        elif "fuzzy" in new.flags:
            assert new.msgstr
    accelerated = after.find("_Open", msgctxt="menu")
    assert not accelerated.msgstr or accelerated.msgstr.count("_") == 1
    if MSGFMT is None:
        pytest.skip("msgfmt (Debian package gettext) is not installed: the --check part is skipped")
    check = subprocess.run([MSGFMT, "--check", "-o", os.devnull, str(output)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_pot_gets_plural_forms_from_the_language(tmp_path: Path, translate_items) -> None:
    pot = CATALOG.replace('"Language: fr\\n"\n', '').replace('"Plural-Forms: nplurals=2; plural=(n > 1);\\n"\n',
                                                             '"Plural-Forms: nplurals=INTEGER; plural=EXPRESSION;\\n"\n')
    source = tmp_path / "messages.pot"
    source.write_text(pot, encoding="utf-8")
    with pytest.raises(FileError, match="no target language"):
        translate_po(source, tmp_path / "x.po", translate_items, PoOptions())
    output = tmp_path / "ru.po"
    translate_po(source, output, translate_items, PoOptions(language="ru", fuzzy=False))
    catalog = polib.pofile(str(output))
    assert catalog.metadata["Plural-Forms"].startswith("nplurals=3;")
    plural = catalog.find("%d file deleted")
    assert sorted(plural.msgstr_plural) == [0, 1, 2] and all(plural.msgstr_plural.values())
    assert "fuzzy" not in plural.flags


def test_a_format_mismatch_leaves_the_entry_untranslated(tmp_path: Path) -> None:
    source = tmp_path / "m.po"
    source.write_text(CATALOG, encoding="utf-8")

    def losing(items: list[TextItem]) -> list[TextResult]:  # drops every placeholder
        return [TextResult("texte", 0.5, [], [], []) for _ in items]

    summary = translate_po(source, tmp_path / "out.po", losing, PoOptions())
    catalog = polib.pofile(str(tmp_path / "out.po"))
    assert catalog.find("Could not open %s: %s").msgstr == ""  # c-format: would fail msgfmt --check
    assert catalog.find("_Open", msgctxt="menu").msgstr == "texte"
    assert summary.refused >= 4


def test_html_and_document_files(tmp_path: Path, translate_items) -> None:
    html = tmp_path / "page.html"
    html.write_text("<!DOCTYPE html>\n<html><head><title>Help</title></head><body>\n<h1>Printing</h1>\n"
                    "<p>Open the <b>File</b> menu.<br>Choose <i>Print</i>.</p>\n</body></html>\n", encoding="utf-8")
    translate_text_file(html, tmp_path / "page.fr.html", translate_items, TextFormat.HTML)
    out = (tmp_path / "page.fr.html").read_text(encoding="utf-8")
    check_well_formed(out)
    assert out.startswith("<!DOCTYPE html>\n<html><head><title>") and "<b>" in out and "<br>" in out
    document = tmp_path / "notes.md"
    document.write_text("Open the file.\n\nSave the file. Close the window.\n", encoding="utf-8")
    translate_text_file(document, tmp_path / "notes.fr.md", translate_items, TextFormat.DOCUMENT, chunk_chars=5)
    translated = (tmp_path / "notes.fr.md").read_text(encoding="utf-8")
    assert translated.count("\n\n") == 1 and translated.endswith(".\n") and "file" not in translated


def _po_with(entries: int) -> str:
    # Distinct UI messages built here: the corpus under data/ is git-ignored, and CI has none.
    verbs = ["Open", "Close", "Save", "Delete", "Rename", "Print", "Copy", "Move", "Select", "Export"]
    objects = ["the file", "the window", "the folder", "the document", "the image", "the page", "the selection",
               "the archive", "the project", "the message", "the account", "the playlist", "the tab", "the printer",
               "the calendar"]
    sources = [f"{verb} {thing}." for thing in objects for verb in verbs][:entries]
    assert len(sources) == entries
    body = "".join(f'msgid "{s}"\nmsgstr ""\n\n' for s in sources)
    return CATALOG.split("#. Translators")[0] + body


@pytest.mark.timeout(600)
def test_po_resume_after_sigkill_writes_every_entry_once(tmp_path: Path) -> None:
    source = tmp_path / "big.po"
    source.write_text(_po_with(150), encoding="utf-8")
    output = tmp_path / "big.fr.po"
    partial = output.with_name(output.name + ".partial")
    command = [sys.executable, "-m", "attnserve.cli", "translate", str(source), "-o", str(output), "--model", str(SHIPPED),
               "--threads", "1", "--beam", "1", "--chunk-lines", "10", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sigkill_after_lines(command, env, partial, lines=4, timeout_s=300)
    chunks_done = partial.read_bytes().count(b"\n") - 1
    assert 3 <= chunks_done < 15 and not output.exists(), "the run was not interrupted mid-way"
    with open(partial, "ab") as f:  # a torn write, as a kill during write() leaves
        f.write(b'{"chunk": 99, "val')
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr
    assert not partial.exists() and f"({chunks_done * 10} before an interruption)" in result.stdout
    resumed = polib.pofile(str(output))
    msgids = [e.msgid for e in resumed if e.msgid]
    assert len(msgids) == len(set(msgids)) == len([e for e in polib.pofile(str(source)) if e.msgid])  # each once
    assert all(e.msgstr for e in resumed if e.msgid and "fuzzy" in e.flags)
    # The same as an uninterrupted run.
    again = tmp_path / "again.po"
    subprocess.run(command[:6] + [str(again)] + command[7:], env=env, check=True, capture_output=True, timeout=500)
    assert again.read_text(encoding="utf-8") == output.read_text(encoding="utf-8")


# -- HTML and documents in chunks, and their resume ------------------------------------------------

def _html_with(sections: int) -> str:
    # Built here (not from data/): numbered sections of help text, nested blocks, inline markup.
    verbs = ["Open", "Close", "Save", "Delete", "Rename", "Print", "Copy", "Move", "Select", "Export"]
    body = "".join(f'<div class="s" id="s{i}">\n<h2>{verbs[i % 10]} the <i>item</i></h2>\n'
                   f'<p>{verbs[(i + 3) % 10]} the <b>file</b> now.<br>Then press <code>Enter</code>.</p>\n</div>\n'
                   for i in range(sections))
    return f"<!DOCTYPE html>\n<html><head><title>Help</title></head>\n<body>\n{body}<!-- end -->\n</body></html>\n"


def _document_with(paragraphs: int) -> str:
    verbs = ["Open", "Close", "Save", "Delete", "Rename", "Print", "Copy", "Move", "Select", "Export"]
    return "".join(f"{verbs[i % 10]} the file notes{i}.txt. Then close the window.\n"
                   f"{'  ' if i % 3 else ''}Press Enter to continue.\n\n" for i in range(paragraphs))


def test_markup_is_cut_only_where_it_is_balanced() -> None:
    page = _html_with(12)
    pieces = balanced_pieces(page, size=150)
    assert "".join(piece for piece, _ in pieces) == page  # byte for byte
    assert sum(translate for _, translate in pieces) > 12  # cut inside <body>, not one piece
    assert [piece for piece, translate in pieces if not translate] == ["<html>", "<body>", "</body>", "</html>"]
    for piece, translate in pieces:
        if translate:
            check_well_formed(piece)  # each run stands on its own
            assert not piece.startswith(("</", "<b>", "<i>"))  # never inside an inline run
    assert balanced_pieces(page, size=10**6) == [(page, True)]  # small enough: one piece
    assert balanced_pieces("<p>a</br>b</p>", size=1) == [("<p>a</br>b</p>", True)]  # the tree loses </br>: whole


def test_html_in_chunks_is_the_html_in_one_go(tmp_path: Path, translate_items) -> None:
    page = tmp_path / "page.html"
    page.write_text(_html_with(8), encoding="utf-8")
    whole, chunked = tmp_path / "whole.html", tmp_path / "chunked.html"
    assert translate_text_file(page, whole, translate_items, TextFormat.HTML).entries == 1
    assert translate_text_file(page, chunked, translate_items, TextFormat.HTML, chunk_chars=200).entries > 4
    out = chunked.read_text(encoding="utf-8")
    check_well_formed(out)
    assert out == whole.read_text(encoding="utf-8")
    with pytest.raises(FileError, match="not well-formed HTML"):
        bad = tmp_path / "bad.html"
        bad.write_text("<div><b>a</div>", encoding="utf-8")
        translate_text_file(bad, tmp_path / "bad.fr.html", translate_items, TextFormat.HTML, chunk_chars=5)


def _resume_after_sigkill(tmp_path: Path, name: str, text: str, chunks: int) -> tuple[str, str]:
    """Kill `attnserve translate` with SIGKILL after some chunks, tear the journal's last line,
    rerun: (the resumed output, an uninterrupted run's output)."""
    source = tmp_path / name
    source.write_text(text, encoding="utf-8")
    output = tmp_path / f"out-{name}"
    partial = output.with_name(output.name + ".partial")
    command = [sys.executable, "-m", "attnserve.cli", "translate", str(source), "-o", str(output), "--model", str(SHIPPED),
               "--threads", "1", "--beam", "1", "--chunk-chars", "300", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sigkill_after_lines(command, env, partial, lines=4, timeout_s=300)
    chunks_done = partial.read_bytes().count(b"\n") - 1
    assert 3 <= chunks_done < chunks and not output.exists(), "the run was not interrupted mid-way"
    with open(partial, "ab") as f:  # a torn write, as a kill during write() leaves
        f.write(b'{"chunk": 99, "val')
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr
    assert not partial.exists() and f"{chunks} entries: {chunks} translated ({chunks_done} before an interruption)" \
        in result.stdout, result.stdout
    again = tmp_path / f"again-{name}"
    subprocess.run(command[:6] + [str(again)] + command[7:], env=env, check=True, capture_output=True, timeout=500)
    return output.read_text(encoding="utf-8"), again.read_text(encoding="utf-8")


@pytest.mark.timeout(600)
def test_html_resume_after_sigkill_writes_every_chunk_once(tmp_path: Path) -> None:
    page = _html_with(40)
    assert _chunk_count(page, TextFormat.HTML) > 10
    resumed, again = _resume_after_sigkill(tmp_path, "help.html", page, chunks=_chunk_count(page, TextFormat.HTML))
    check_well_formed(resumed)
    assert all(resumed.count(f'<div class="s" id="s{i}">') == 1 for i in range(40))  # every section, once
    assert resumed.count("<code>Enter</code>") == 40 and resumed.endswith("<!-- end -->\n</body></html>\n")
    assert resumed == again  # the same as an uninterrupted run


@pytest.mark.timeout(600)
def test_document_resume_after_sigkill_writes_every_paragraph_once(tmp_path: Path) -> None:
    document = _document_with(40)
    resumed, again = _resume_after_sigkill(tmp_path, "notes.md", document,
                                           chunks=_chunk_count(document, TextFormat.DOCUMENT))
    assert all(resumed.count(f"notes{i}.txt") == 1 for i in range(40))  # every paragraph, once
    assert resumed.count("\n\n") == document.count("\n\n") and resumed.count("\n  ") == document.count("\n  ")
    assert resumed == again


def _chunk_count(text: str, text_format: TextFormat) -> int:
    from attnserve.server.text.files import _markup_chunks, _paragraph_chunks

    if text_format == TextFormat.HTML:
        return len(_markup_chunks(text, False, 300))
    return len(_paragraph_chunks(text, 300))


# -- XLIFF 1.2 -------------------------------------------------------------------------------------

XLIFF = '''<?xml version="1.0" encoding="UTF-8"?>
<xliff version="1.2" xmlns="urn:oasis:names:tc:xliff:document:1.2">
  <file original="ui.properties" source-language="en" target-language="fr" datatype="plaintext">
    <body>
      <trans-unit id="open">
        <source>Open the file.</source>
      </trans-unit>
      <trans-unit id="bold">
        <source>Click <g id="1">Save</g> to keep<x id="2"/> the changes.</source>
        <note>A note for translators.</note>
      </trans-unit>
      <trans-unit id="ph">
        <source>Could not open <ph id="1">&lt;%s&gt;</ph> &amp; retry.</source>
        <target/>
      </trans-unit>
      <trans-unit id="done">
        <source>Save the file</source>
        <target state="translated">Enregistrer le fichier</target>
      </trans-unit>
      <trans-unit id="skip" translate="no">
        <source>GNOME</source>
      </trans-unit>
    </body>
  </file>
</xliff>
'''
NS = {"x": "urn:oasis:names:tc:xliff:document:1.2"}


def test_xliff_targets_are_filled_and_the_rest_kept(tmp_path: Path, translate_items) -> None:
    import xml.etree.ElementTree as ElementTree

    from attnserve.server.text.xliff import XliffOptions, translate_xliff

    source, output = tmp_path / "ui.xlf", tmp_path / "ui.fr.xlf"
    source.write_text(XLIFF, encoding="utf-8")
    summary = translate_xliff(source, output, translate_items, XliffOptions())
    assert (summary.entries, summary.kept, summary.translated) == (4, 1, 3)
    out = output.read_text(encoding="utf-8")
    units = {u.get("id"): u for u in ElementTree.fromstring(out.encode()).iter(f"{{{NS['x']}}}trans-unit")}
    for unit_id in ("open", "bold", "ph"):
        target = units[unit_id].find("x:target", NS)
        assert target is not None and target.get("state") == "needs-review-translation"
        assert "".join(target.itertext()).strip()
    bold = ElementTree.tostring(units["bold"].find("x:target", NS), encoding="unicode")
    assert bold.count('<ns0:g id="1">') == 1 and bold.count('<ns0:x id="2" />') == 1  # inline codes kept
    assert '<ph id="1">&lt;%s&gt;</ph>' in out and out.count("&amp;") == 2  # native code copied, entity kept
    assert units["done"].find("x:target", NS).text == "Enregistrer le fichier"  # untouched
    assert units["skip"].find("x:target", NS) is None  # translate="no"
    # Everything but the written targets is the input byte for byte.
    written = r'\s*<target state="needs-review-translation">.*?</target>'
    assert re.sub(written, "", out) == re.sub(r"\s*<target/>", "", XLIFF)
    assert '        <source>Open the file.</source>\n        <target state=' in out  # on a line of its own


def test_xliff_resume_translates_only_what_is_missing(tmp_path: Path, translate_items) -> None:
    from attnserve.server.text.xliff import XliffOptions, translate_xliff

    source = tmp_path / "ui.xlf"
    source.write_text(XLIFF, encoding="utf-8")
    options = XliffOptions(chunk_units=1)
    calls: list[str] = []

    def dying(items: list[TextItem]) -> list[TextResult]:
        if calls:
            raise KeyboardInterrupt  # the run stops after its first chunk
        calls.extend(item.text for item in items)
        return translate_items(items)

    output = tmp_path / "ui.fr.xlf"
    with pytest.raises(KeyboardInterrupt):
        translate_xliff(source, output, dying, options)
    assert not output.exists() and len(calls) == 1

    def counting(items: list[TextItem]) -> list[TextResult]:
        calls.extend(item.text for item in items)
        return translate_items(items)

    summary = translate_xliff(source, output, counting, options)
    assert summary.resumed == 1 and len(calls) == 3 and len(set(calls)) == 3  # each unit translated once
    translate_xliff(source, tmp_path / "again.xlf", translate_items, options)
    assert output.read_text(encoding="utf-8") == (tmp_path / "again.xlf").read_text(encoding="utf-8")


def test_xliff_through_the_cli(tmp_path: Path) -> None:
    source, output = tmp_path / "ui.xlf", tmp_path / "ui.fr.xlf"
    source.write_text(XLIFF, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "attnserve.cli", "translate", str(source), "-o", str(output),
                             "--model", str(SHIPPED), "--threads", "1", "--device", "cpu", "--xliff-state", "new"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4 entries: 3 translated" in result.stdout and output.read_text(encoding="utf-8").count('state="new"') == 3
