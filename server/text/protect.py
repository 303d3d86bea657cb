"""Protect stage: placeholders and other spans the model must copy, not translate.

Every protected span of a sentence is replaced by a numbered mask (`{0}`, `{1}`, ... by
default: of the forms measured on the shipped model, the one it copies most often, see
docs/text.md) before translation; `restore` puts the originals back. A mask the model dropped
is inserted where the cross-attention says its source position went, a duplicated one is
removed, and both are flagged: every source placeholder appears in the output exactly as often
as in the source, and the result says when the model did not place one itself.

Kinds (in the order they are tried; the longest match at a position wins):
printf (`%s`, `%1$s`, `%-5.2f`, `%%`, `%(name)s`), brace (`{0}`, `{name}`, `{0:>8}`, ICU simple
arguments `{n, number}`), Qt (`%1`, `%L2`), shell/JS variables (`${var}`, `$HOME`), URLs, e-mail
addresses, file paths and names, command-line options, numbers, and inline spans the other
stages hand in as private-use characters (verbatim markup such as `<code>`, ICU plural blocks).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

# Private-use characters stand for inline spans decided elsewhere (markup kept verbatim, ICU
# blocks, glossary terms): one character each, so offsets stay simple.
SENTINEL_FIRST, SENTINEL_LAST = 0xE000, 0xF8FF

PRINTF = (r"%(?:\d+\$)?[-+#0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|ll|[hlLqjzt]|I64|I32)?[diouxXeEfFgGaAcspn]"
          r"|%%|%\([A-Za-z_]\w*\)[-+#0]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]")
BRACE = r"\{(?:\d+|[A-Za-z_]\w*(?:\.\w+)*)?(?:![rsa])?(?::[^{}\s][^{}]*)?\}|\{[A-Za-z_]\w*,\s*(?:number|date|time|spellout|ordinal|duration)(?:,[^{}]*)?\}"
QT = r"%L?\d+"
VARIABLE = r"\$\{[^{}\s]+\}|\$[A-Z_][A-Z0-9_]*\b"
URL = r"(?:https?|ftp|file)://[^\s<>\"']+|www\.[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+(?:/[^\s<>\"']*)?"
EMAIL = r"[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
FILE_EXTENSIONS = ("txt|po|pot|mo|json|jsonl|yaml|yml|toml|ini|conf|cfg|xml|html?|css|js|ts|py|c|h|cc|cpp|hpp|rs|go|java|"
                   "sh|deb|rpm|tar|gz|bz2|xz|zst|zip|7z|iso|img|pdf|png|jpe?g|gif|svg|mp3|mp4|ogg|wav|csv|tsv|log|md|"
                   "rst|so|dll|exe|bin|desktop|service|socket|list|db|sqlite|onnx|pem|key|crt|lock|bak|tmp|xlf|ui")
PATH = (r"(?<![\w/.~])(?:~|\.{1,2})?/(?:[\w.+@-]+/)*[\w.+@-]*[\w]/?|[A-Za-z]:\\(?:[\w. -]+\\)*[\w.-]+"
        # relative: two slashes at least, or one and a file extension (not "and/or", "TCP/IP")
        r"|\b(?:[\w.-]+/){2,}[\w.-]*\w|\b(?:[\w.-]+/)+[\w-]+\.\w{1,5}\b"
        r"|\b[\w-]+(?:\.[\w-]+)*\.(?:" + FILE_EXTENSIONS + r")\b")
OPTION = r"(?<![\w-])--?[A-Za-z][\w-]*(?:=[^\s,;)]+)?"
NUMBER = r"(?<![\w.])\d+(?:[.,:]\d+)*(?![\w])"
SENTINEL = f"[{chr(SENTINEL_FIRST)}-{chr(SENTINEL_LAST)}]"

KIND_PATTERNS = {"printf": PRINTF, "brace": BRACE, "qt": QT, "variable": VARIABLE, "url": URL, "email": EMAIL,
                 "path": PATH, "option": OPTION, "number": NUMBER, "inline": SENTINEL}
ALL_KINDS = tuple(KIND_PATTERNS)
# URLs and e-mails end before trailing sentence punctuation.
TRAILING_PUNCTUATION = ".,;:!?)»\"'"


@dataclasses.dataclass(frozen=True)
class ProtectedSpan:
    start: int
    end: int
    text: str  # the source text of the span
    kind: str
    replacement: str | None = None  # what the output gets instead (glossary terms); None: text itself

    @property
    def output(self) -> str:
        return self.text if self.replacement is None else self.replacement


def find_protected(text: str, kinds: tuple[str, ...] = ALL_KINDS) -> list[ProtectedSpan]:
    """Non-overlapping protected spans, left to right; at one position the longest match wins."""
    candidates: list[ProtectedSpan] = []
    for kind in kinds:
        for match in re.finditer(KIND_PATTERNS[kind], text):
            start, end = match.span()
            if kind in ("url", "email", "path"):
                while end > start + 1 and text[end - 1] in TRAILING_PUNCTUATION:
                    end -= 1
            if end > start:
                candidates.append(ProtectedSpan(start, end, text[start:end], kind))
    candidates.sort(key=lambda s: (s.start, -(s.end - s.start), ALL_KINDS.index(s.kind)))
    spans, covered = [], 0
    for span in candidates:
        if span.start >= covered:
            spans.append(span)
            covered = span.end
    return merge_adjacent(text, spans)


def merge_adjacent(text: str, spans: list[ProtectedSpan]) -> list[ProtectedSpan]:
    """Spans that touch (`%-5.2f%%`, `{0}{1}`) as one: the model copies one mask far more often
    than two masks in a row. Glossary spans, which have their own replacement, stay apart."""
    merged: list[ProtectedSpan] = []
    for span in spans:
        last = merged[-1] if merged else None
        if (last is not None and last.end == span.start and last.replacement is None and span.replacement is None
                and "inline" not in (last.kind, span.kind)):
            kind = last.kind if last.kind == span.kind else f"{last.kind}+{span.kind}"
            merged[-1] = ProtectedSpan(last.start, span.end, text[last.start:span.end], kind)
        else:
            merged.append(span)
    return merged


def printf_key(span_text: str) -> str:
    """What identifies a printf/Qt/brace placeholder for the format checks (msgfmt compares
    conversion letters and argument numbers): the span itself."""
    return span_text


# -- masks ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskStyle:
    """How masks look to the model: `template` with the mask number, and the regex that finds
    them in the output (group 1: the number). Model-agnostic: a model that copies another form
    better gets another style."""

    template: str = "{%d}"
    pattern: str = r"\{(\d+)\}"

    def mask(self, number: int) -> str:
        return self.template % number


@dataclasses.dataclass
class Masked:
    """A sentence with its protected spans replaced by masks."""

    source: str  # the sentence as given
    text: str  # what the model translates
    spans: list[ProtectedSpan]  # in source order; spans[i] became mask i
    mask_spans: list[tuple[int, int]]  # where mask i is in `text`

    def to_source(self, position: int, end: bool = False) -> int:
        """A position in `text` as a position in `source`; inside a mask, the span's start (or
        with `end`, its end)."""
        shift = 0
        for span, (start, stop) in zip(self.spans, self.mask_spans):
            if position < start:
                break
            if position < stop:
                return span.end if end and position > start else span.start
            shift = span.end - stop
        return position + shift


def mask(sentence: str, spans: list[ProtectedSpan], style: MaskStyle) -> Masked:
    parts, mask_spans, cursor, length = [], [], 0, 0
    for number, span in enumerate(spans):
        parts.append(sentence[cursor:span.start])
        length += span.start - cursor
        token = style.mask(number)
        mask_spans.append((length, length + len(token)))
        parts.append(token)
        length += len(token)
        cursor = span.end
    parts.append(sentence[cursor:])
    return Masked(sentence, "".join(parts), list(spans), mask_spans)


@dataclasses.dataclass(frozen=True)
class Edit:
    """Replace output[start:end] with `text` (start == end: an insertion)."""

    start: int
    end: int
    text: str


def mask_edits(output: str, masked: Masked, style: MaskStyle, point_of: Callable[[int], int],
               flags: list[str]) -> list[Edit]:
    """Edits that turn a translation with masks into one with the protected spans: each mask
    found once is replaced, extra copies and unknown numbers are removed, and masks the model
    dropped are inserted at `point_of(mask start in masked.text)` (an output position from the
    attention). Flags say what the model got wrong."""
    edits: list[Edit] = []
    seen: set[int] = set()
    found_at: dict[int, tuple[int, int]] = {}  # output start of a mask -> (its number, its end)
    for match in re.finditer(style.pattern, output):
        number = int(match.group(1))
        start, end = match.span()
        if number >= len(masked.spans) or number in seen:
            # Remove it with one adjacent space, so no double space is left.
            if start > 0 and output[start - 1] == " ":
                start -= 1
            elif end < len(output) and output[end] == " ":
                end += 1
            edits.append(Edit(start, end, ""))
            extra = masked.spans[number].text if number < len(masked.spans) else match.group(0)
            flags.append(f"placeholder_extra:{extra}")
            continue
        seen.add(number)
        found_at[start] = (number, end)
        edits.append(Edit(start, end, masked.spans[number].output))
    for number, span in enumerate(masked.spans):
        if number in seen:
            continue
        point = point_of(masked.mask_spans[number][0])
        # Attention often points a dropped mask at its neighbour's copy: keep source order.
        while point in found_at and found_at[point][0] < number:
            point = found_at[point][1]
        text = span.output
        before = masked.source[span.start - 1] if span.start > 0 else ""
        after = masked.source[span.end] if span.end < len(masked.source) else ""
        left = output[point - 1] if point > 0 else ""
        right = output[point] if point < len(output) else ""
        if left and not left.isspace() and (before.isspace() or (left.isalnum() and text[:1].isalnum())):
            text = " " + text
        if right and not right.isspace() and (after.isspace() or right.isalnum() or right in "{"):
            text = text + " "
        edits.append(Edit(point, point, text))
        flags.append(f"{'glossary' if span.kind == 'glossary' else 'placeholder'}_projected:{span.text}")
    return edits


def apply_edits(text: str, edits: list[Edit]) -> tuple[str, Callable[..., int]]:
    """The edited text, and a function mapping positions of `text` to positions of the result
    (a position inside a replaced range goes to the start of its replacement)."""
    edits = sorted(edits, key=lambda e: (e.start, e.end))
    parts, cursor, anchors = [], 0, []  # anchors: (old start, old end, new start, new end)
    length = 0
    for edit in edits:
        if edit.start < cursor:
            # Overlaps the previous edit (a dropped mask's point inside a removed duplicate, a
            # line break at a removed space): what it adds goes right after that edit, so
            # nothing that must be in the output is lost.
            edit = Edit(cursor, cursor, edit.text)
        parts.append(text[cursor:edit.start])
        length += edit.start - cursor
        anchors.append((edit.start, edit.end, length, length + len(edit.text)))
        parts.append(edit.text)
        length += len(edit.text)
        cursor = edit.end
    parts.append(text[cursor:])

    def to_new(position: int, end: bool = False) -> int:
        """A position of `text` in the result. A position inside a replaced range goes to the
        replacement's start, or with `end` to its end; at an insertion, a start goes after the
        inserted text and an `end` before it."""
        shift = 0
        for old_start, old_end, new_start, new_end in anchors:
            if position < old_start:
                break
            if old_start == old_end == position:
                return new_start if end else new_end
            if position < old_end:
                return new_end if end and position > old_start else new_start
            shift = new_end - old_end
        return position + shift

    return "".join(parts), to_new


# -- accelerators -----------------------------------------------------------------------------

ACCELERATOR = re.compile(r"(?<![\w&_])([_&])(?=[^\W_])")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    marker: str  # "_" or "&"
    position: int  # where the accelerated character is in the text without the marker


def take_accelerator(text: str) -> tuple[str, Accelerator | None]:
    """A keyboard accelerator (`_File`, `&Open`): the text without its marker, and where it was.
    Only a message with exactly one candidate has one (`snake_case` and entities `&amp;` are
    not accelerators; two candidates are ambiguous and left alone)."""
    matches = [m for m in ACCELERATOR.finditer(text) if not (m.group(1) == "&" and re.match(r"&#?\w+;", text[m.start():]))]
    if len(matches) != 1:
        return text, None
    match = matches[0]
    return text[:match.start()] + text[match.end():], Accelerator(match.group(1), match.start())


def put_accelerator(translation: str, accelerator: Accelerator, point: int) -> str:
    """The translation with the marker before the first letter at or after `point` (the
    translation of the accelerated word), else before its first letter."""
    for start in (point, 0):
        for i in range(max(0, start), len(translation)):
            if translation[i].isalnum():
                return translation[:i] + accelerator.marker + translation[i:]
    return accelerator.marker + translation
