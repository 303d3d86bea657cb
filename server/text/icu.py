"""ICU MessageFormat: plural/select/selectordinal blocks keep their structure, and only their
sub-messages are translated.

    {count, plural, one {# file} other {# files}}
    -> structure "{count, plural, one {" + "# file" + "} other {" + "# files" + "}}"

The pipeline translates the text around a block with the block masked (one placeholder), and
each sub-message as a message of its own (`#` protected in plural ones; nested blocks are
handled the same way, recursively), then `rebuild` writes the block back around them.
"""

from __future__ import annotations

import dataclasses
import re

HEADER = re.compile(r"\{\s*[A-Za-z_][\w.]*\s*,\s*(plural|selectordinal|select)\s*,")
SELECTOR = re.compile(r"\s*(offset:\s*\d+\s+)?\s*(=\d+|[A-Za-z_][\w-]*)\s*")


class IcuError(ValueError):
    """An ICU block that does not parse (unbalanced braces, an option without a message)."""


@dataclasses.dataclass
class IcuBlock:
    start: int
    end: int
    kind: str  # plural, select, selectordinal
    # The block as raw structure and sub-messages: structure[0] + messages[0] + structure[1] + ...
    structure: list[str]
    messages: list[str]

    def rebuild(self, messages: list[str]) -> str:
        out = [self.structure[0]]
        for message, after in zip(messages, self.structure[1:]):
            out += [message, after]
        return "".join(out)


def _matching_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `{` at `start` (apostrophe-quoted braces are literal)."""
    depth, i, quoted = 0, start, False
    while i < len(text):
        char = text[i]
        if char == "'":
            if i + 1 < len(text) and text[i + 1] == "'":
                i += 2
                continue
            if quoted or (i + 1 < len(text) and text[i + 1] in "{}#|"):
                quoted = not quoted
        elif not quoted and char == "{":
            depth += 1
        elif not quoted and char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise IcuError(f"the brace at offset {start} is never closed")


def find_blocks(text: str) -> list[IcuBlock]:
    """Top-level plural/select blocks of `text`, left to right."""
    blocks, position = [], 0
    while (match := HEADER.search(text, position)) is not None:
        start = match.start()
        end = _matching_brace(text, start) + 1
        blocks.append(_parse_block(text, start, end, match))
        position = end
    return blocks


def _parse_block(text: str, start: int, end: int, header: re.Match) -> IcuBlock:
    structure, messages = [], []
    cursor = header.end()
    pending = text[start:cursor]
    while cursor < end - 1:
        selector = SELECTOR.match(text, cursor)
        if selector is None or selector.end() >= end - 1 or text[selector.end()] != "{":
            rest = text[cursor:end - 1]
            if not rest.strip():
                break
            raise IcuError(f"ICU {header.group(1)} at offset {start}: expected 'selector {{message}}' at offset {cursor}")
        open_brace = selector.end()
        close_brace = _matching_brace(text, open_brace)
        pending += text[cursor:open_brace + 1]
        structure.append(pending)
        messages.append(text[open_brace + 1:close_brace])
        pending = "}"
        cursor = close_brace + 1
    if not messages:
        raise IcuError(f"ICU {header.group(1)} at offset {start} has no options")
    structure.append(pending + text[cursor:end])
    return IcuBlock(start, end, header.group(1), structure, messages)
