"""Files through the text pipeline: gettext PO/POT catalogs, HTML/XML files and documents
(XLIFF 1.2: attnserve.server.text.xliff, on the journal below).

    attnserve translate messages.po -o messages.fr.po      # offline, or with --server

The front end hands in `translate_items(items) -> results` (the pipeline on a local engine, or a
server through the API), so the same code serves both.

Resume: the translations are journaled to OUTPUT.partial (one JSON line per finished chunk:
catalog entries, paragraphs cut after blank lines, markup cut where it is balanced;
fsynced, its first line naming the input's sha256); a rerun after a kill reads the journal,
drops a torn last line and translates only what is missing; the output is written once, at the
end, to a temporary file renamed over OUTPUT. Every entry is written exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from attnserve.server.text import markup
from attnserve.server.text.pipeline import TextFormat, TextItem, TextResult
from attnserve.server.text.protect import find_protected

log = logging.getLogger(__name__)

TranslateItems = Callable[[list[TextItem]], Sequence[TextResult]]

# Plural forms of common target languages (CLDR, as gettext writes them), for catalogs whose
# header has none (a POT).
PLURAL_FORMS = {
    "fr": "nplurals=2; plural=(n > 1);", "pt_BR": "nplurals=2; plural=(n > 1);",
    "en": "nplurals=2; plural=(n != 1);", "de": "nplurals=2; plural=(n != 1);", "es": "nplurals=2; plural=(n != 1);",
    "it": "nplurals=2; plural=(n != 1);", "nl": "nplurals=2; plural=(n != 1);", "pt": "nplurals=2; plural=(n != 1);",
    "sv": "nplurals=2; plural=(n != 1);", "da": "nplurals=2; plural=(n != 1);", "fi": "nplurals=2; plural=(n != 1);",
    "ja": "nplurals=1; plural=0;", "zh": "nplurals=1; plural=0;", "ko": "nplurals=1; plural=0;", "vi": "nplurals=1; plural=0;",
    "ru": "nplurals=3; plural=(n%10==1 && n%100!=11 ? 0 : n%10>=2 && n%10<=4 && (n%100<10 || n%100>=20) ? 1 : 2);",
    "uk": "nplurals=3; plural=(n%10==1 && n%100!=11 ? 0 : n%10>=2 && n%10<=4 && (n%100<10 || n%100>=20) ? 1 : 2);",
    "pl": "nplurals=3; plural=(n==1 ? 0 : n%10>=2 && n%10<=4 && (n%100<10 || n%100>=20) ? 1 : 2);",
    "cs": "nplurals=3; plural=(n==1) ? 0 : (n>=2 && n<=4) ? 1 : 2;",
    "ar": "nplurals=6; plural=n==0 ? 0 : n==1 ? 1 : n==2 ? 2 : n%100>=3 && n%100<=10 ? 3 : n%100>=11 ? 4 : 5;",
}
FORMAT_BY_SUFFIX = {".po": "po", ".pot": "po", ".html": "html", ".htm": "html", ".xhtml": "html", ".xlf": "xliff",
                    ".xliff": "xliff", ".jsonl": "jsonl", ".txt": "text", ".md": "document"}


class FileError(Exception):
    """The file cannot be translated as asked."""


def detect_format(path: Path, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return FORMAT_BY_SUFFIX.get(path.suffix.lower(), "text")


@dataclasses.dataclass
class FileSummary:
    entries: int = 0  # units of the file: catalog entries, paragraphs
    translated: int = 0
    kept: int = 0  # already translated (PO) or nothing to translate
    resumed: int = 0  # done by an earlier, interrupted run
    refused: int = 0  # left untranslated: a format check would fail
    flagged: int = 0  # translated, with at least one pipeline flag

    def describe(self) -> str:
        return (f"{self.entries} entries: {self.translated} translated ({self.resumed} before an interruption), "
                f"{self.kept} kept, {self.refused} left untranslated (format check), {self.flagged} flagged")


# -- the journal --------------------------------------------------------------------------------


class Journal:
    """Finished chunks of one output, keyed by chunk number, on disk before the next starts."""

    def __init__(self, output: Path, input_digest: str):
        self.path = output.with_name(output.name + ".partial")
        self.done: dict[int, object] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            complete = data.rfind(b"\n") + 1  # a torn last line is dropped
            lines = data[:complete].decode("utf-8").splitlines()
            if lines and json.loads(lines[0]).get("input") != input_digest:
                raise FileError(f"{self.path} belongs to another input; remove it")
            for line in lines[1:]:
                record = json.loads(line)
                self.done[record["chunk"]] = record["value"]
            with open(self.path, "r+b") as f:
                f.truncate(complete)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append({"input": input_digest})

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, chunk: int, value: object) -> None:
        self._append({"chunk": chunk, "value": value})
        self.done[chunk] = value

    def finish(self, output: Path, text: str) -> None:
        temporary = output.with_name(output.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        temporary.replace(output)
        self.path.unlink()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_output(output: Path) -> None:
    if output.exists():
        raise FileError(f"{output} exists and is complete; remove it to translate again")


# -- gettext catalogs ---------------------------------------------------------------------------


@dataclasses.dataclass
class PoOptions:
    language: str = ""  # target language; default: the catalog's Language header, else the model's
    fuzzy: bool = True  # mark what was written `#, fuzzy`
    overwrite: bool = False  # translate entries that already have a translation too
    chunk_entries: int = 64


def _printf_signature(text: str, kinds: tuple[str, ...]) -> list[str]:
    return sorted(s.text for s in find_protected(text, kinds))


FORMAT_FLAG_KINDS = {"c-format": ("printf",), "python-format": ("printf",), "python-brace-format": ("brace",),
                     "qt-format": ("qt",), "sh-format": ("variable",), "javascript-format": ("printf",)}


def _format_ok(entry, source: str, translation: str) -> bool:
    """What msgfmt --check verifies for the entry's format flags: the same directives."""
    for flag, kinds in FORMAT_FLAG_KINDS.items():
        if flag in entry.flags and _printf_signature(source, kinds) != _printf_signature(translation, kinds):
            return False
    # msgfmt also wants a leading/trailing newline exactly where the msgid has one.
    return (source.startswith("\n") == translation.startswith("\n")) and (source.endswith("\n") == translation.endswith("\n"))


def translate_po(input_path: Path, output_path: Path, translate_items: TranslateItems, options: PoOptions,
                 model_language: str = "") -> FileSummary:
    import polib

    _check_output(output_path)
    catalog = polib.pofile(str(input_path), wrapwidth=79)
    language = options.language or catalog.metadata.get("Language", "") or model_language
    if not language:
        raise FileError(f"{input_path}: no target language (no Language header); pass --language")
    plural_forms = catalog.metadata.get("Plural-Forms", "")
    if not re.search(r"nplurals\s*=\s*\d+", plural_forms):  # absent, or a POT's "nplurals=INTEGER"
        plural_forms = PLURAL_FORMS.get(language, PLURAL_FORMS.get(language.split("_")[0], ""))
        if not plural_forms and any(e.msgid_plural for e in catalog):
            raise FileError(f"{input_path}: no Plural-Forms header and no plural rule known for {language!r}")
    nplurals = int(re.search(r"nplurals\s*=\s*(\d+)", plural_forms).group(1)) if plural_forms else 2
    entries = [e for e in catalog if not e.obsolete and e.msgid]
    todo = [i for i, e in enumerate(entries) if options.overwrite or not _has_translation(e)]
    summary = FileSummary(entries=len(entries), kept=len(entries) - len(todo))
    journal = Journal(output_path, _digest(input_path))
    chunks = [todo[i:i + options.chunk_entries] for i in range(0, len(todo), options.chunk_entries)]
    resumed_entries = 0
    for number, chunk in enumerate(chunks):
        if number in journal.done:
            resumed_entries += len(chunk)
            continue
        items, owners = [], []
        for index in chunk:
            entry = entries[index]
            sources = [entry.msgid] if not entry.msgid_plural else (
                [entry.msgid_plural] if nplurals == 1 else [entry.msgid, entry.msgid_plural])
            for source in sources:
                items.append(TextItem(source, TextFormat.SENTENCE))
                owners.append(index)
        results = translate_items(items) if items else []
        by_entry: dict[int, list[TextResult]] = {}
        for owner, result in zip(owners, results):
            by_entry.setdefault(owner, []).append(result)
        journal.record(number, {str(i): [[r.text, r.flags] for r in rs] for i, rs in by_entry.items()})
    summary.resumed = resumed_entries
    for number, chunk in enumerate(chunks):
        done = journal.done[number]
        for index in chunk:
            entry = entries[index]
            translations = [text for text, _flags in done[str(index)]]
            flags = [f for _text, fl in done[str(index)] for f in fl]
            if not _apply(entry, translations, nplurals, options):
                summary.refused += 1
                continue
            summary.translated += 1
            summary.flagged += bool(flags)
    catalog.metadata["Language"] = catalog.metadata.get("Language") or language
    catalog.metadata["Plural-Forms"] = plural_forms or catalog.metadata.get("Plural-Forms", "")
    if "CHARSET" in catalog.metadata.get("Content-Type", ""):
        catalog.metadata["Content-Type"] = "text/plain; charset=UTF-8"
    catalog.encoding = "utf-8"
    journal.finish(output_path, catalog.__unicode__())
    log.info("%s: %s", output_path, summary.describe())
    return summary


def _has_translation(entry) -> bool:
    if entry.msgid_plural:
        return any(entry.msgstr_plural.get(i) for i in entry.msgstr_plural)
    return bool(entry.msgstr)


def _apply(entry, translations: list[str], nplurals: int, options: PoOptions) -> bool:
    """Write the translations into the entry, unless a format check fails (then it stays
    untranslated: a wrong placeholder in a catalog crashes programs; an empty one falls back to
    English)."""
    if entry.msgid_plural:
        singular, plural = (translations[0], translations[-1])
        forms = {0: singular if nplurals > 1 else plural}
        forms.update({i: plural for i in range(1, nplurals)})
        if not (_format_ok(entry, entry.msgid, forms[0]) and all(_format_ok(entry, entry.msgid_plural, forms[i])
                                                                  for i in range(1, nplurals))):
            return False
        entry.msgstr_plural = forms
    else:
        if not _format_ok(entry, entry.msgid, translations[0]):
            return False
        entry.msgstr = translations[0]
    if options.fuzzy and "fuzzy" not in entry.flags:
        entry.flags.insert(0, "fuzzy")  # first, as gettext's tools write it
    return True


# -- documents and HTML files ---------------------------------------------------------------------


def _paragraph_chunks(text: str, size: int = 20_000) -> list[str]:
    """The text cut after blank lines into chunks of about `size` characters (concatenating
    back to it exactly), so that a resumed run redoes at most one chunk."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            blank = text.find("\n\n", end)
            end = len(text) if blank < 0 else blank + 2
        chunks.append(text[start:end])
        start = end
    return chunks


def _markup_chunks(text: str, xml: bool, size: int) -> list[list[tuple[str, bool]]]:
    """An HTML/XML text as chunks of about `size` characters, each a list of markup.balanced_pieces
    (copied tags, and well-formed runs to translate); FileError when the markup is malformed."""
    try:
        pieces = markup.balanced_pieces(text, xml, size)
    except markup.MarkupError as exc:
        raise FileError(f"not well-formed {'XML' if xml else 'HTML'}: {exc}") from None
    chunks: list[list[tuple[str, bool]]] = [[]]
    length = 0
    for piece in pieces:
        if chunks[-1] and length + len(piece[0]) > size:
            chunks.append([])
            length = 0
        chunks[-1].append(piece)
        length += len(piece[0])
    return [chunk for chunk in chunks if chunk]


def translate_text_file(input_path: Path, output_path: Path, translate_items: TranslateItems, text_format: TextFormat,
                        chunk_chars: int = 20_000) -> FileSummary:
    """A document (chunks cut after blank lines) or an HTML/XML file (chunks cut where the
    markup is balanced: between elements with block content) through the pipeline, resumable
    by chunk. Each piece of a chunk is translated as an item of its own, so the output is what
    translating the whole file at once gives, but for what the model does with a batch."""
    _check_output(output_path)
    text = input_path.read_text(encoding="utf-8")
    if text_format in (TextFormat.HTML, TextFormat.XML):
        chunks = _markup_chunks(text, text_format == TextFormat.XML, chunk_chars)
    else:
        chunks = [[(chunk, True)] for chunk in _paragraph_chunks(text, chunk_chars)]
    journal = Journal(output_path, _digest(input_path))
    summary = FileSummary(entries=len(chunks), resumed=len(journal.done))
    for number, chunk in enumerate(chunks):
        if number in journal.done:
            continue
        items = [TextItem(piece, text_format) for piece, translate in chunk if translate]
        results = iter(translate_items(items) if items else [])
        translated, flags = [], []
        for piece, translate in chunk:
            if translate:
                result = next(results)
                translated.append(result.text)
                flags.extend(result.flags)
            else:
                translated.append(piece)
        journal.record(number, ["".join(translated), list(dict.fromkeys(flags))])
    summary.translated = len(chunks)  # as for catalogs: those of an earlier run included
    summary.flagged = sum(bool(journal.done[i][1]) for i in range(len(chunks)))
    journal.finish(output_path, "".join(journal.done[i][0] for i in range(len(chunks))))
    log.info("%s: %s", output_path, summary.describe())
    return summary
