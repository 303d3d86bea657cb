"""XLIFF 1.2 files through the text pipeline: `<target>` of each `<trans-unit>` filled.

    attnserve translate strings.xlf -o strings.fr.xlf --model BUNDLE

ElementTree (stdlib) checks that the file is well-formed XML and XLIFF 1.2; the pipeline's own
markup tree (markup.parse_tree, every tag kept as written, with its offset) finds the units, so
that the output is the input byte for byte except for the targets written. A unit's `<source>`
content goes through the pipeline as XML: inline `<g>`, `<x/>`, `<bx/>`, `<ex/>`, `<mrk>` are
projected into the translation, `<ph>`, `<bpt>`, `<ept>`, `<it>` (native code) copied as they
are. A written target carries `state="needs-review-translation"` (configurable); units with a
non-empty target, and `translate="no"` units, are left alone unless asked. Resume as for
catalogs (attnserve.server.text.files.Journal): by chunk of units, every unit written once.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from attnserve.server.text import markup
from attnserve.server.text.files import FileError, FileSummary, Journal, TranslateItems, _check_output, _digest
from attnserve.server.text.pipeline import TextFormat, TextItem

log = logging.getLogger(__name__)

XLIFF_12 = "urn:oasis:names:tc:xliff:document:1.2"


@dataclasses.dataclass
class XliffOptions:
    state: str = "needs-review-translation"  # the written targets' state ("" for none)
    overwrite: bool = False  # translate units that have a target too
    chunk_units: int = 64


@dataclasses.dataclass
class _Unit:
    source: markup.Element
    target: markup.Element | None
    indent: str  # the whitespace before <source>, for a new <target> on a line of its own


def _local(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def _inner(element: markup.Element) -> str:
    return "".join(markup._raw(child) for child in element.children)


def _elements(nodes: list[markup.Node]):
    for node in nodes:
        if isinstance(node, markup.Element):
            yield node
            yield from _elements(node.children)


def _check(text: str, path: Path) -> str:
    """The file's target-language ("" if none); FileError unless it is XLIFF 1.2."""
    try:
        root = ElementTree.fromstring(text.encode("utf-8"))
    except ElementTree.ParseError as exc:
        raise FileError(f"{path}: not well-formed XML: {exc}") from None
    if root.tag not in (f"{{{XLIFF_12}}}xliff", "xliff") or root.get("version", "1.2") != "1.2":
        raise FileError(f"{path}: not an XLIFF 1.2 document (root {root.tag!r}, version {root.get('version')!r})")
    first = root.find(f"{{{XLIFF_12}}}file")
    first = first if first is not None else root.find("file")
    return first.get("target-language", "") if first is not None else ""


def _units(text: str) -> list[_Unit]:
    units = []
    for element in _elements(markup.parse_tree(text, xml=True)):
        if _local(element.name) != "trans-unit" or re.search(r"""\btranslate\s*=\s*["']no["']""", element.open_text):
            continue
        children = [c for c in element.children if isinstance(c, markup.Element)]
        source = next((c for c in children if _local(c.name) == "source"), None)
        if source is None:
            continue
        target = next((c for c in children if _local(c.name) == "target"), None)
        line_start = text.rfind("\n", 0, source.offset) + 1
        indent = text[line_start:source.offset]
        units.append(_Unit(source, target, "\n" + indent if not indent.strip() else " "))
    return units


def _has_target(unit: _Unit) -> bool:
    return unit.target is not None and bool(_inner(unit.target).strip())


def _target_tag(unit: _Unit, state: str) -> tuple[str, str]:
    """The start and end tags of the written target: the existing one's, with `state` set."""
    if unit.target is None:
        prefix = unit.source.name[: -len("source")]  # the namespace prefix <source> has, if any
        open_text = f"<{prefix}target>"
    else:
        open_text = unit.target.open_text
        if open_text.endswith("/>"):
            open_text = open_text[:-2].rstrip() + ">"
        prefix = unit.target.name[: -len("target")]
    if state:
        if re.search(r"""\sstate\s*=\s*("[^"]*"|'[^']*')""", open_text):
            open_text = re.sub(r"""(\sstate\s*=\s*)("[^"]*"|'[^']*')""", rf'\1"{state}"', open_text, count=1)
        else:
            open_text = open_text[:-1] + f' state="{state}">'
    return open_text, f"</{prefix}target>"


def translate_xliff(input_path: Path, output_path: Path, translate_items: TranslateItems,
                    options: XliffOptions) -> FileSummary:
    _check_output(output_path)
    text = input_path.read_text(encoding="utf-8")
    _check(text, input_path)
    try:
        units = _units(text)
    except markup.MarkupError as exc:
        raise FileError(f"{input_path}: {exc}") from None
    todo = [i for i, unit in enumerate(units) if options.overwrite or not _has_target(unit)]
    summary = FileSummary(entries=len(units), kept=len(units) - len(todo))
    journal = Journal(output_path, _digest(input_path))
    chunks = [todo[i:i + options.chunk_units] for i in range(0, len(todo), options.chunk_units)]
    for number, chunk in enumerate(chunks):
        if number in journal.done:
            summary.resumed += len(chunk)
            continue
        try:
            results = translate_items([TextItem(_inner(units[i].source), TextFormat.XML) for i in chunk])
        except ValueError as exc:  # TextError: markup the pipeline refuses, named by its unit
            raise FileError(f"{input_path}: trans-unit at offset {units[chunk[0]].source.offset}..: {exc}") from None
        journal.record(number, {str(i): [r.text, r.flags] for i, r in zip(chunk, results)})
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in `text`
    for number, chunk in enumerate(chunks):
        for index in chunk:
            translation, flags = journal.done[number][str(index)]
            unit = units[index]
            open_text, close_text = _target_tag(unit, options.state)
            element = open_text + translation + close_text
            if unit.target is not None:
                edits.append((unit.target.offset, unit.target.offset + len(unit.target.raw()), element))
            else:
                end = unit.source.offset + len(unit.source.raw())
                edits.append((end, end, unit.indent + element))
            summary.translated += 1
            summary.flagged += bool(flags)
    out, cursor = [], 0
    for start, end, replacement in sorted(edits):
        out += [text[cursor:start], replacement]
        cursor = end
    out.append(text[cursor:])
    journal.finish(output_path, "".join(out))
    log.info("%s: %s", output_path, summary.describe())
    return summary
