"""Segment stage: a text as sentences and the exact whitespace between them.

`layout(text, ...)` cuts a text into pieces that concatenate back to it exactly: sentences (to
translate) and gaps (copied verbatim: blank lines, indentation, the spaces between sentences).
Sentences come from sentencex (chosen by measurement, see docs/text.md and
bench/segmenters.py), with guards against the splits it gets wrong on software text:
abbreviations, an ellipsis followed by lower case or a placeholder, and the inside of a
protected span (a URL, a file name, a version number). Line breaks: blank lines always end a
paragraph; a single newline ends a sentence too unless the line runs on (it does not end in
sentence punctuation and the next one starts in lower case), as in a wrapped paragraph; such a
soft break stays inside the sentence and is put back by the alignment.

A sentence longer than the model takes is cut at clause boundaries (; : , then conjunctions,
then the middle space), never truncated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable

log = logging.getLogger(__name__)

# Abbreviations after which sentencex splits in software text although the sentence goes on.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e eg ie approx appx cf no nos vol fig figs ch sec min max "
    "incl excl esp resp ca jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun "
    "u.s u.k inc ltd corp co dept est".split())
ABBREVIATIONS_THAT_END = frozenset({"etc", "u.s", "u.k", "inc", "ltd", "co", "corp"})
SENTENCE_END = re.compile(r"[.!?…:;]['\")\]»]*$")
LIST_ITEM = re.compile(r"^\s*(?:[-*•+]|\d+[.)]|[A-Za-z][.)]|--?\w)\s")


@dataclasses.dataclass(frozen=True)
class Piece:
    start: int
    end: int
    sentence: bool  # False: a gap copied as it is

    def text_of(self, text: str) -> str:
        return text[self.start:self.end]


@functools.lru_cache(maxsize=8)
def _sentencex(language: str) -> Callable[[str], list[str]]:
    from sentencex import segment

    try:
        segment(language, "Test. Test.")
    except Exception:  # a language sentencex does not know: its English rules are the fallback
        log.warning("sentencex has no rules for %r; using English rules", language)
        language = "en"
    return lambda text: list(segment(language, text))


def _raw_starts(text: str, language: str) -> list[int]:
    """Where sentencex starts sentences after the first, as offsets of `text`."""
    starts, position, first = [], 0, True
    for sentence in _sentencex(language)(text):
        stripped = sentence.strip()
        found = text.find(stripped, position) if stripped else -1
        if found < 0:
            continue
        if not first:
            starts.append(found)
        first, position = False, found + len(stripped)
    return starts


def _keeps_going(text: str, start: int, protected: list[tuple[int, int]]) -> bool:
    """Whether a sentencex split before `start` is wrong: inside a protected span, after an
    abbreviation, or after an ellipsis or colon followed by something that is not a capital."""
    if any(a < start < b for a, b in protected):
        return True
    before = text[:start].rstrip()
    following = text[start:start + 1]
    word = re.search(r"(\S+)$", before)
    last = word.group(1).lower().rstrip(".") if word else ""
    last = last.lstrip("(")
    if before.endswith(".") and last in ABBREVIATIONS:
        # "etc." and "U.S." also end sentences: then a capitalised word follows.
        return last not in ABBREVIATIONS_THAT_END or not re.match(r"[A-Z][a-z]", text[start:start + 2])
    # After an ellipsis or a colon a new sentence starts with a capitalised word ("Then"), not
    # with lower case, a placeholder or an upper-case metavariable ("[OPTION]... FILE").
    next_word = re.match(r"\S*", text[start:]).group(0)
    starts_sentence = bool(re.match(r"[A-Z][a-z]|[A-Z]$|I\b", next_word))
    return (before.endswith("...") or before.endswith("…") or before.endswith(":")) and not starts_sentence


def segment_sentences(text: str, language: str = "en",
                      protected: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Sentence spans (stripped) of one paragraph-like text; `protected` spans are never cut."""
    protected = protected or []
    starts = [s for s in _raw_starts(text, language) if not _keeps_going(text, s, protected)]
    spans, begin = [], 0
    for boundary in [*starts, len(text)]:
        chunk = text[begin:boundary]
        if chunk.strip():
            left = begin + len(chunk) - len(chunk.lstrip())
            right = begin + len(chunk.rstrip())
            spans.append((left, right))
        begin = boundary
    return spans


def _hard_line_break(previous: str, following: str) -> bool:
    """Whether the newline between these two lines ends a sentence (help text, lists, option
    tables) rather than wrapping one (a prose paragraph)."""
    if not previous.strip() or not following.strip():
        return True
    if SENTENCE_END.search(previous.rstrip()) or LIST_ITEM.match(following):
        return True
    return not following.lstrip()[:1].islower()


def layout(text: str, language: str = "en", split_sentences: bool = True,
           protected: list[tuple[int, int]] | None = None) -> list[Piece]:
    """Pieces that concatenate back to `text` exactly. Without `split_sentences` every run of
    text between hard line breaks is one sentence (a catalog message)."""
    pieces: list[Piece] = []
    # Runs of text between hard line breaks; the breaks (and blank lines) become gaps.
    lines = text.split("\n")
    starts = []
    offset = 0
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    runs: list[tuple[int, int]] = []
    run_start = None
    for index, line in enumerate(lines):
        if not line.strip():
            if run_start is not None:
                runs.append((run_start, starts[index] - 1))
                run_start = None
            continue
        if run_start is None:
            run_start = starts[index]
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if index + 1 == len(lines) or _hard_line_break(line, following):
            runs.append((run_start, starts[index] + len(line)))
            run_start = None
    cursor = 0
    for run_start, run_end in runs:
        run = text[run_start:run_end]
        local_protected = [(a - run_start, b - run_start) for a, b in protected or [] if a >= run_start and b <= run_end]
        spans = (segment_sentences(run, language, local_protected) if split_sentences
                 else [(len(run) - len(run.lstrip()), len(run.rstrip()))])
        for a, b in spans:
            if a >= b:
                continue
            if run_start + a > cursor:
                pieces.append(Piece(cursor, run_start + a, False))
            pieces.append(Piece(run_start + a, run_start + b, True))
            cursor = run_start + b
    if cursor < len(text):
        pieces.append(Piece(cursor, len(text), False))
    return pieces


# -- over-long sentences ----------------------------------------------------------------------

CLAUSE_BOUNDARIES = [re.compile(r"(?<=[;:])\s+"), re.compile(r"(?<=,)\s+"),
                     re.compile(r"\s+(?=(?:and|or|but|because|which|while|when|if|so|then)\b)"),
                     re.compile(r"\s+")]


def split_long(text: str, start: int, end: int, count_tokens: Callable[[str], int], limit: int,
               protected: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """[start, end) as spans of at most `limit` tokens each, cut at the strongest clause
    boundary nearest the middle (semicolons and colons, then commas, then conjunctions, then
    any space), recursively. A span with no space left (one enormous token run) is cut at
    characters: still every character is translated."""
    if count_tokens(text[start:end]) <= limit:
        return [(start, end)]
    protected = protected or []
    middle = (start + end) / 2
    for boundary in CLAUSE_BOUNDARIES:
        cuts = [m for m in boundary.finditer(text, start, end)
                if start < m.start() and m.end() < end and not any(a < m.start() < b for a, b in protected)]
        if cuts:
            cut = min(cuts, key=lambda m: abs(m.start() - middle))
            return (split_long(text, start, cut.start(), count_tokens, limit, protected)
                    + split_long(text, cut.end(), end, count_tokens, limit, protected))
    half = (start + end) // 2
    if half == start:
        return [(start, end)]
    return split_long(text, start, half, count_tokens, limit, protected) + split_long(text, half, end, count_tokens, limit, protected)
