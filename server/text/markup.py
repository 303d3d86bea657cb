"""Markup stage: HTML/XML taken apart into translatable units and put back together.

`parse_markup(text)` reads a fragment or a document into a tree (every tag kept as it was
written: attributes, quotes, case), checks that it is well-formed (HTML void elements and
optional end tags allowed), and cuts it into `Unit`s: maximal runs of inline content (text,
`<b>`, `<a href>`, `<br>`, ...) between block-level tags. A unit's plain text (tags removed,
entities decoded) is what gets segmented and translated; its inline elements keep their
character offsets in that text. Verbatim content (`<script>`, `<style>`, `<code>`,
`translate="no"`, class "notranslate", comments) is never translated: at block level it is
copied, inside a unit it becomes one private-use character that the protect stage masks.

`render_unit(unit, translation, project)` puts the inline elements back into the translation,
each around the target characters that `project` (the cross-attention) says its content became,
then forces proper nesting (children inside their parent, siblings not overlapping), so the
output is well-formed whenever the input is.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Callable

from attnserve.server.text.protect import SENTINEL_FIRST

VOID_ELEMENTS = frozenset("area base br col embed hr img input link meta param source track wbr".split())
# End tags HTML lets authors omit; a parent's end tag (or the end of input) closes them.
OPTIONAL_END = frozenset("p li dt dd option optgroup tr td th thead tbody tfoot colgroup rt rp html head body".split())
BLOCK_ELEMENTS = frozenset(
    "html head body title meta link address article aside blockquote canvas dd div dl dt fieldset figcaption figure "
    "footer form h1 h2 h3 h4 h5 h6 header hr li main nav noscript ol p pre section table tbody td tfoot th thead tr "
    "ul video caption colgroup col option optgroup select textarea summary details dialog menu legend "
    # XLIFF / DocBook-ish containers, so XML documents split sensibly too
    "source target trans-unit body file group note para section1 section2 simpara".split())
RAW_TEXT_ELEMENTS = frozenset({"script", "style"})
VERBATIM_ELEMENTS = frozenset({"script", "style", "code", "kbd", "samp", "var", "pre", "tt",
                               # XLIFF 1.2 inline codes whose content is the native code (`<ph>%s</ph>`)
                               "ph", "bpt", "ept", "it"})

TOKEN = re.compile(
    r"(?P<comment><!--.*?-->)"
    r"|(?P<cdata><!\[CDATA\[.*?\]\]>)"
    r"|(?P<declaration><![A-Za-z][^>]*>)"
    r"|(?P<pi><\?.*?\?>)"
    r"|(?P<end></(?P<end_name>[A-Za-z][\w:.-]*)\s*>)"
    r"|(?P<start><(?P<start_name>[A-Za-z][\w:.-]*)(?P<attributes>(?:\s+[^\s=/>]+(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?)*)\s*(?P<self_closing>/?)>)",
    re.DOTALL)
NOT_TRANSLATED = re.compile(r"""\btranslate\s*=\s*["']?no\b|\bclass\s*=\s*["'][^"']*\bnotranslate\b""", re.IGNORECASE)
ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


class MarkupError(ValueError):
    """The input is not well-formed markup (the message says where)."""


@dataclasses.dataclass
class Element:
    name: str
    open_text: str  # the start tag as written
    close_text: str = ""  # the end tag as written ("" for void and self-closing elements)
    children: list["Node"] = dataclasses.field(default_factory=list)
    void: bool = False
    offset: int = 0  # of the start tag in the input, for error messages
    # Inside a unit: the element's content is unit.text[start:end].
    start: int = 0
    end: int = 0

    @property
    def verbatim(self) -> bool:
        return self.name.lower() in VERBATIM_ELEMENTS or bool(NOT_TRANSLATED.search(self.open_text))

    @property
    def block(self) -> bool:
        return self.name.lower() in BLOCK_ELEMENTS

    def raw(self) -> str:
        return self.open_text + "".join(_raw(c) for c in self.children) + self.close_text


@dataclasses.dataclass
class Text:
    raw: str


@dataclasses.dataclass
class Raw:
    """A comment, declaration, processing instruction or CDATA section, copied as it is."""

    raw: str


Node = Element | Text | Raw


def _raw(node: Node) -> str:
    return node.raw() if isinstance(node, Element) else node.raw


def parse_tree(text: str, xml: bool = False) -> list[Node]:
    """The nodes of `text`; MarkupError when a tag is not closed or closes the wrong element."""
    root = Element("#root", "")
    stack = [root]
    position = 0
    while position < len(text):
        # Raw-text elements end only at their own end tag.
        top = stack[-1]
        if top.name.lower() in RAW_TEXT_ELEMENTS and not xml:
            match = re.compile(rf"</{re.escape(top.name)}\s*>", re.IGNORECASE).search(text, position)
            if match is None:
                raise MarkupError(f"<{top.name}> at offset {top.offset} is never closed")
            if match.start() > position:
                top.children.append(Text(text[position:match.start()]))
            top.close_text = match.group(0)
            stack.pop()
            position = match.end()
            continue
        match = TOKEN.search(text, position)
        end = match.start() if match else len(text)
        if end > position:
            chunk = text[position:end]
            if "<" in chunk and re.search(r"<[A-Za-z/!?]", chunk):
                bad = position + chunk.index("<")
                raise MarkupError(f"malformed tag at offset {bad}: {text[bad:bad + 30]!r}")
            top.children.append(Text(chunk))
        if match is None:
            break
        if match.group("comment") or match.group("cdata") or match.group("declaration") or match.group("pi"):
            top.children.append(Raw(match.group(0)))
        elif match.group("start"):
            name = match.group("start_name")
            void = bool(match.group("self_closing")) or (not xml and name.lower() in VOID_ELEMENTS)
            element = Element(name, match.group(0), void=void, offset=match.start())
            top.children.append(element)
            if not void:
                stack.append(element)
        else:
            name = match.group("end_name")
            if not xml and name.lower() in VOID_ELEMENTS:
                pass  # a stray </br>: browsers ignore it, so do we (it is dropped from the output)
            else:
                while True:
                    top = stack[-1]
                    if top is root:
                        raise MarkupError(f"</{name}> at offset {match.start()} closes no open element")
                    if _same(top.name, name, xml):
                        top.close_text = match.group(0)
                        stack.pop()
                        break
                    if not xml and top.name.lower() in OPTIONAL_END:
                        stack.pop()  # implicitly closed; its end tag stays omitted
                        continue
                    raise MarkupError(f"</{name}> at offset {match.start()} closes <{top.name}> opened at offset {top.offset}")
        position = match.end()
    for element in stack[1:]:
        if xml or element.name.lower() not in OPTIONAL_END:
            raise MarkupError(f"<{element.name}> at offset {element.offset} is never closed")
    return root.children


def _same(a: str, b: str, xml: bool) -> bool:
    return a == b if xml else a.lower() == b.lower()


# -- units ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
    """A run of inline content to translate as one text."""

    text: str  # plain text: tags out, entities decoded, verbatim inline content as sentinels
    elements: list[Element]  # top-level inline elements; offsets into `text`
    sentinels: dict[str, str]  # sentinel character -> the markup it stands for
    entities: dict[str, str]  # character -> the entity the input wrote it as


@dataclasses.dataclass
class MarkupDocument:
    parts: list[str | Unit]  # markup copied as it is, and units, in order

    @property
    def units(self) -> list[Unit]:
        return [p for p in self.parts if isinstance(p, Unit)]


def parse_markup(text: str, xml: bool = False) -> MarkupDocument:
    parts: list[str | Unit] = []
    _walk(parse_tree(text, xml), parts)
    merged: list[str | Unit] = []
    for part in parts:  # adjacent markup strings become one
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return MarkupDocument(merged)


def _has_block(node: Node) -> bool:
    return isinstance(node, Element) and (node.block or any(_has_block(c) for c in node.children)) and not node.verbatim


def _walk(nodes: list[Node], parts: list[str | Unit]) -> None:
    run: list[Node] = []
    for node in nodes:
        if isinstance(node, Element) and (_has_block(node) or (node.verbatim and not run and node.block)):
            _flush(run, parts)
            run = []
            if node.verbatim:
                parts.append(node.raw())
            else:
                parts.append(node.open_text)
                _walk(node.children, parts)
                parts.append(node.close_text)
        else:
            run.append(node)
    _flush(run, parts)


def _flush(run: list[Node], parts: list[str | Unit]) -> None:
    if not run:
        return
    unit = Unit("", [], {}, {})
    pieces: list[str] = []
    unit.elements = _inline(run, unit, pieces)
    unit.text = "".join(pieces)
    if not any(ch.isalpha() for ch in unit.text if ch not in unit.sentinels):
        parts.append("".join(_raw(n) for n in run))  # nothing to translate: copy it
        return
    parts.append(unit)


def _inline(nodes: list[Node], unit: Unit, pieces: list[str]) -> list[Element]:
    """Append the plain text of `nodes` to `pieces`; return their elements with offsets."""
    elements = []
    for node in nodes:
        offset = sum(len(p) for p in pieces)
        if isinstance(node, Text):
            pieces.append(_decode(node.raw, unit.entities))
        elif isinstance(node, Raw) or (isinstance(node, Element) and node.verbatim):
            sentinel = chr(SENTINEL_FIRST + len(unit.sentinels))
            unit.sentinels[sentinel] = _raw(node)
            pieces.append(sentinel)
        else:
            copy = dataclasses.replace(node, children=[])
            copy.start = offset
            copy.children = _inline(node.children, unit, pieces)
            copy.end = sum(len(p) for p in pieces)
            elements.append(copy)
    return elements


def _decode(raw: str, entities: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        char = html.unescape(match.group(0))
        if len(char) == 1 and match.group(0) not in ("&amp;", "&lt;", "&gt;"):
            entities.setdefault(char, match.group(0))
        return char

    return ENTITY.sub(one, raw)


def escape(text: str, entities: dict[str, str]) -> str:
    """Translation text as markup: & < > escaped, and characters the input wrote as entities
    written as those entities again."""
    out = html.escape(text, quote=False)
    for char, entity in entities.items():
        if char not in "&<>":
            out = out.replace(char, entity)
    return out


# -- cutting a large file -----------------------------------------------------------------------


def balanced_pieces(text: str, xml: bool = False, size: int = 20_000) -> list[tuple[str, bool]]:
    """`text` as pieces that concatenate back to it, for journaling a large file in chunks:
    (markup, False) is the start or end tag of a large element with block content, which the
    pipeline copies anyway; (nodes, True) is a run of sibling nodes, well-formed on its own, of
    at most about `size` characters (one node may be larger). Runs are cut only before and after
    a node with block content, where a unit ends anyway (`_walk`), so each True piece translated
    alone gives what it gives inside the whole text. MarkupError as parse_tree; one piece when
    the tree does not give the text back (a stray `</br>` is dropped by the parser)."""
    pieces: list[tuple[str, bool]] = []
    _cut(parse_tree(text, xml), size, pieces)
    if "".join(piece for piece, _ in pieces) != text:
        return [(text, True)]
    return pieces


def _cut(nodes: list[Node], size: int, pieces: list[tuple[str, bool]]) -> None:
    group: list[str] = []  # raw text of the sibling nodes taken so far

    def flush() -> None:
        if group:
            pieces.append(("".join(group), True))
            group.clear()

    for atom in _atoms(nodes):
        raw = "".join(_raw(node) for node in atom)
        if len(atom) == 1 and _has_block(atom[0]) and len(raw) > size:  # open it: its tags stay as written
            flush()
            element = atom[0]
            pieces.append((element.open_text, False))
            _cut(element.children, size, pieces)
            if element.close_text:
                pieces.append((element.close_text, False))
            continue
        if group and sum(map(len, group)) + len(raw) > size:
            flush()
        group.append(raw)
    flush()


def _atoms(nodes: list[Node]) -> list[list[Node]]:
    """Siblings as the pieces no cut may split: each node with block content alone, and each
    maximal run of the others between them (a unit, or copied markup)."""
    atoms: list[list[Node]] = []
    run: list[Node] = []
    for node in nodes:
        if _has_block(node):
            if run:
                atoms.append(run)
                run = []
            atoms.append([node])
        else:
            run.append(node)
    if run:
        atoms.append(run)
    return atoms


# -- rendering ------------------------------------------------------------------------------

Project = Callable[[int, int], tuple[int, int]]


def render_unit(unit: Unit, translation: str, project: Project, flags: list[str]) -> str:
    """The translation with the unit's inline elements put back (and sentinels replaced)."""
    placed = _place(unit.elements, project, 0, len(translation), flags)
    out = _emit(placed, translation, 0, len(translation), unit.entities)
    for sentinel, raw in unit.sentinels.items():
        if out.count(sentinel) != 1:  # the protect stage guarantees one; never lose markup
            out = out.replace(sentinel, "") + raw
            flags.append("markup_projected")
        else:
            out = out.replace(sentinel, raw)
    return out


@dataclasses.dataclass
class _Placed:
    element: Element
    start: int
    end: int
    children: list["_Placed"]


def _place(elements: list[Element], project: Project, low: int, high: int, flags: list[str]) -> list[_Placed]:
    """Target spans of sibling elements inside [low, high): each where its content went, then
    clamped into the parent and made not to overlap (in target order)."""
    placed = []
    for element in elements:
        start, end = project(element.start, element.end)
        clamped_start = min(max(start, low), high)
        clamped_end = min(max(end, clamped_start), high)
        if (clamped_start, clamped_end) != (start, end):
            flags.append("markup_reordered")
        placed.append(_Placed(element, clamped_start, clamped_end, []))
    placed.sort(key=lambda p: (p.start, p.end))
    previous_end = low
    for item in placed:
        if item.start < previous_end:
            flags.append("markup_reordered")
            item.start = previous_end
            item.end = max(item.end, item.start)
        previous_end = item.end
    for item in placed:
        item.children = _place(item.element.children, project, item.start, item.end, flags)
    return placed


def _emit(placed: list[_Placed], text: str, low: int, high: int, entities: dict[str, str]) -> str:
    out, cursor = [], low
    for item in placed:
        out.append(escape(text[cursor:item.start], entities))
        out.append(item.element.open_text)
        out.append(_emit(item.children, text, item.start, item.end, entities))
        out.append(item.element.close_text)
        cursor = item.end
    out.append(escape(text[cursor:high], entities))
    return "".join(out)


def check_well_formed(text: str, xml: bool = False) -> None:
    """MarkupError unless `text` parses (used on outputs by the tests and the checks)."""
    parse_tree(text, xml)
