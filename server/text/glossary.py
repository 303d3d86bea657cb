"""Glossary and do-not-translate terms: where they are in a text, and what they become.

The pipeline applies them (pipeline.py): by constrained decoding, the term's translation made to
appear in the model's output (search.py), falling back to substitution for a sentence where the
model never wanted the term: the term masked like a placeholder and its mask replaced by the
translation (a do-not-translate term's translation is itself). docs/text.md measures both.

Per model: `glossary.tsv` in the bundle's directory, `source<TAB>target` a line (`#` comments;
an empty target means do not translate). Per request: entries given with the request, which
win over the model's for the same source term.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from attnserve.server.text.protect import ProtectedSpan

log = logging.getLogger(__name__)

GLOSSARY_FILE = "glossary.tsv"
MAX_TERM_CHARS = 200


class GlossaryError(ValueError):
    """A glossary entry or file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class GlossaryEntry:
    source: str
    target: str  # == source: do not translate

    @classmethod
    def checked(cls, source: str, target: str | None, what: str = "glossary entry") -> "GlossaryEntry":
        source = source.strip()
        target = (target or "").strip() or source
        if not source:
            raise GlossaryError(f"{what}: empty source term")
        if len(source) > MAX_TERM_CHARS or len(target) > MAX_TERM_CHARS:
            raise GlossaryError(f"{what}: a term is longer than {MAX_TERM_CHARS} characters")
        if "\n" in source or "\n" in target:
            raise GlossaryError(f"{what}: a term contains a newline")
        return cls(source, target)


class Glossary:
    def __init__(self, entries: Iterable[GlossaryEntry] = ()):
        self.entries: dict[str, GlossaryEntry] = {}
        for entry in entries:
            self.entries[entry.source.lower()] = entry
        self._pattern: re.Pattern | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def merged(self, other: "Glossary | None") -> "Glossary":
        """This glossary with `other`'s entries added (winning on the same source term)."""
        if not other:
            return self
        return Glossary([*self.entries.values(), *other.entries.values()])

    @classmethod
    def load(cls, path: Path) -> "Glossary":
        entries = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            source, _, target = line.partition("\t")
            entries.append(GlossaryEntry.checked(source, target, f"{path}:{number}"))
        log.info("glossary %s: %d terms", path, len(entries))
        return cls(entries)

    @classmethod
    def beside_bundle(cls, bundle_path: Path) -> "Glossary":
        path = Path(bundle_path) / GLOSSARY_FILE
        return cls.load(path) if path.is_file() else cls()

    def find(self, text: str) -> list[ProtectedSpan]:
        """Non-overlapping term occurrences (whole words, any case, longest first)."""
        if not self.entries:
            return []
        if self._pattern is None:
            terms = sorted(self.entries, key=len, reverse=True)
            self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in terms) + r")(?!\w)", re.IGNORECASE)
        spans = []
        for match in self._pattern.finditer(text):
            entry = self.entries[match.group(0).lower()]
            # Do-not-translate (an empty target, or the term itself): the text as written.
            target = entry.target if entry.target and entry.target != entry.source else match.group(0)
            if match.group(0)[:1].isupper() and target[:1].islower() and entry.source[:1].islower():
                target = target[:1].upper() + target[1:]
            spans.append(ProtectedSpan(match.start(), match.end(), match.group(0), "glossary", target))
        return spans
