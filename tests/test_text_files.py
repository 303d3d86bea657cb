"""Files through the text pipeline: PO/POT catalogs (msgfmt --check, plural forms, untouched
translations, flags), HTML files and documents, and exactly-once output across a SIGKILL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polib
import pytest

from attnserve.server.text import TextFormat, TextItem, TextResult
from attnserve.server.text.files import FileError, PoOptions, detect_format, translate_po, translate_text_file
from attnserve.server.text.markup import check_well_formed
from tests.interrupt import sigkill_after_lines

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "repository" / "en-fr" / "1"
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
