"""Character-level use of the model's cross-attention: which target characters a span of source
characters became. This is how markup, dropped placeholders, line breaks and accelerators are
put back (Bergamot projects its tags the same way).

Each target subword is linked to the source subword it attends to most (hard alignment from
the engine's attention rows); a source character span maps to the hull of the target subwords
linked to the source subwords it overlaps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What the text pipeline needs of a SentencePiece processor."""

    def encode(self, text: Any, **kwargs: Any) -> Any: ...

    def decode(self, ids: Any, **kwargs: Any) -> Any: ...


def _char_offsets(text: str) -> list[int]:
    """Byte offset -> character offset table for UTF-8 `text` (len(bytes) + 1 entries)."""
    table = []
    for index, char in enumerate(text):
        table.extend([index] * len(char.encode("utf-8")))
    table.append(len(text))
    return table


def source_spans(tokenizer: Tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of each source subword of `text`, as the engine encodes it (EOS excluded)."""
    proto = tokenizer.encode(text, out_type="proto")
    table = _char_offsets(text)
    spans = []
    for piece in proto.pieces:
        start, end = table[min(piece.begin, len(table) - 1)], table[min(piece.end, len(table) - 1)]
        while start < end and text[start].isspace():  # the piece's ▁ covers the space before it
            start += 1
        spans.append((start, end))
    return spans


def target_text_and_spans(tokenizer: Tokenizer, tokens: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded translation and the character span of each of its subwords."""
    proto = tokenizer.decode(list(tokens), out_type="proto")
    text = proto.text
    table = _char_offsets(text)
    spans = []
    for piece in proto.pieces:
        start, end = table[min(piece.begin, len(table) - 1)], table[min(piece.end, len(table) - 1)]
        while start < end and text[start].isspace():
            start += 1
        spans.append((start, end))
    return text, spans


@dataclasses.dataclass
class SentenceAlignment:
    source_spans: list[tuple[int, int]]  # per source subword (EOS excluded): characters of the source
    target_spans: list[tuple[int, int]]  # per target subword (EOS excluded): characters of the translation
    links: list[int]  # per target subword: the source subword it attends to most (-1: none, EOS)
    target_length: int

    @classmethod
    def from_attention(cls, source: list[tuple[int, int]], target: list[tuple[int, int]],
                       attention: Sequence[Sequence[float]] | None, target_length: int) -> "SentenceAlignment":
        links = []
        for j in range(len(target)):
            row = attention[j] if attention is not None and j < len(attention) else None
            if not row:
                links.append(-1)
                continue
            best = max(range(min(len(row), len(source))), key=row.__getitem__, default=-1)
            links.append(best)
        return cls(source, target, links, target_length)

    def _sources_in(self, start: int, end: int) -> set[int]:
        if start == end:  # a point: the subword at or after it
            for i, (a, b) in enumerate(self.source_spans):
                if b > start:
                    return {i}
            return set()
        return {i for i, (a, b) in enumerate(self.source_spans) if a < end and b > start}

    def target_hull(self, start: int, end: int) -> tuple[int, int] | None:
        """Target characters of the source characters [start, end); None if nothing links there."""
        sources = self._sources_in(start, end)
        hits = [self.target_spans[j] for j, link in enumerate(self.links) if link in sources]
        if not hits:
            return None
        return min(a for a, _ in hits), max(b for _, b in hits)

    def target_point(self, position: int) -> int:
        """Where something standing at source character `position` goes in the translation:
        before the first target subword linked to the source subword at or after it (at the end
        when that subword is untranslated or `position` is past the last subword)."""
        hull = self.target_hull(position, position)
        if hull is not None:
            return hull[0]
        # Nothing links to that subword: go after the target of the nearest earlier subword.
        for i in sorted(self._sources_before(position), reverse=True):
            hits = [self.target_spans[j][1] for j, link in enumerate(self.links) if link == i]
            if hits:
                return max(hits)
        return 0 if position == 0 else self.target_length

    def _sources_before(self, position: int) -> list[int]:
        return [i for i, (a, b) in enumerate(self.source_spans) if b <= position]

    def coverage(self) -> float:
        """Share of source subwords some target subword links to (1.0: nothing was skipped)."""
        if not self.source_spans:
            return 1.0
        return len({link for link in self.links if link >= 0}) / len(self.source_spans)
