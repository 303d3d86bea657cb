"""Language identification for the gateway's /detect and `source: "auto"`: langid.py's naive
Bayes model (py3langid, 97 languages, shipped in its wheel), restricted to the languages the
server translates, as LibreTranslate restricts its detector to the languages it has loaded.

The model takes about a second to load, so it is loaded once, on first use; classify() is pure
numpy and thread-safe once loaded (set_languages is not, so each language set gets its own
identifier, built from the same loaded model).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectedLanguage:
    language: str
    confidence: float  # 0-100, LibreTranslate's scale: the normalised probability among the candidates


class LanguageDetector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base = None  # the py3langid LanguageIdentifier over all of its languages
        self._by_languages: dict[tuple[str, ...], object] = {}

    def known(self) -> set[str]:
        return set(self._identifier(()).labels)

    def _identifier(self, languages: tuple[str, ...]):
        with self._lock:
            if self._base is None:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                self._base = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
                log.info("language identifier loaded (%d languages)", len(self._base.nb_classes))
            if not languages:
                return self._base
            identifier = self._by_languages.get(languages)
            if identifier is None:
                identifier = copy.copy(self._base)  # shares the model's arrays; set_languages rebinds, never mutates
                identifier.set_languages(list(languages))
                self._by_languages[languages] = identifier
            return identifier

    def rank(self, text: str, languages: list[str]) -> list[DetectedLanguage]:
        """`languages` by how likely `text` is in each, best first. Codes langid does not know
        are left out; with one language left it is certain (100)."""
        known = self.known()
        candidates = tuple(sorted(code for code in set(languages) if code in known))
        if not candidates:
            return []
        if len(candidates) == 1:
            return [DetectedLanguage(candidates[0], 100.0)]
        ranked = self._identifier(candidates).rank(text)
        return [DetectedLanguage(code, round(float(p) * 100.0, 1)) for code, p in ranked]
