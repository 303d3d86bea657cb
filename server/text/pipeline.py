"""The text pipeline: segment -> protect -> translate -> restore -> reassemble.

One interface below every front end (gRPC, the offline batch tool, the HTTP gateway):

    pipeline = TextPipeline.for_engine(engine)             # or TextPipeline(tokenizer, ...)
    plan = pipeline.prepare([TextItem(text, TextFormat.HTML)])   # TextError names a bad item
    hypotheses = translate(plan.sources, plan.constraints)  # best Hypothesis (with alignment) per source
    for index, source in pipeline.fallback(plan, hypotheses).items():   # glossary terms, see below
        hypotheses[index] = translate([source])[0]
    results = pipeline.finish(plan, hypotheses)            # TextResult per item

Glossary terms (glossary_mode "constrained", the default): the term stays in the source and its
translation is a constraint of that sentence's decoding (plan.constraints: target strings per
source; search.py makes them appear where the model puts them). Where the model never wanted a
term (a name it does not know, or a word it translates otherwise) the search forces it where the
sentence would end, and says so; `fallback` then switches that sentence to substitution: the
term masked like a placeholder, translated again, and its translation put in the mask's place.
A term still missing is flagged `glossary_missing:TERM`. glossary_mode "substitute" substitutes
every term (docs/text.md, "Glossary", measures the three).

`prepare` and `finish` are pure Python; the model call between them is whatever the front end
uses (the server's scheduler, Engine.translate offline), so batching, deadlines and
cancellation stay where they are. `pipeline.translate(items, translate)` does all three.

Formats: SENTENCE is one catalog message (placeholders, accelerators, ICU plurals; cut only
when longer than the model takes), DOCUMENT is paragraphs of sentences with the whitespace
kept exactly, HTML (and XML) adds inline markup projected through the alignment.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from attnserve.server.text import icu, markup, segment
from attnserve.server.text.align import SentenceAlignment, Tokenizer, source_spans, target_text_and_spans
from attnserve.server.text.confidence import ConfidenceWeights, Signals, attention_coverage, confidence, count_problems, repetition
from attnserve.server.text.glossary import Glossary, GlossaryError
from attnserve.server.text.protect import (ALL_KINDS, SENTINEL_FIRST, SENTINEL_LAST, Accelerator, Edit, Masked, MaskStyle,
                                           ProtectedSpan, apply_edits, find_protected, mask, mask_edits, put_accelerator,
                                           take_accelerator)

log = logging.getLogger(__name__)

# Kinds whose count in the output is checked once more at the end (numbers are not: a
# translation may legitimately spell one out or add one).
CHECKED_KINDS = ("printf", "brace", "qt", "variable", "url", "email")


class TextFormat(str, enum.Enum):
    SENTENCE = "sentence"
    DOCUMENT = "document"
    HTML = "html"
    XML = "xml"


class TextError(ValueError):
    """An item the pipeline cannot take; `item` is its index, the message says why."""

    def __init__(self, item: int, reason: str):
        super().__init__(f"item {item}: {reason}")
        self.item, self.reason = item, reason


@dataclasses.dataclass
class PipelineConfig:
    language: str = "en"  # source language, for the segmenter
    mask_style: MaskStyle = MaskStyle()
    protect_kinds: tuple[str, ...] = ALL_KINDS
    accelerators: bool = True  # SENTENCE format: find and re-add `_File` / `&Open`
    icu: bool = True  # SENTENCE format: translate ICU plural/select sub-messages
    max_source_tokens: int = 255  # what the model takes; longer sentences are cut
    split_margin: int = 16  # tokens left for masks, which can be longer than what they hide
    max_text_chars: int = 200_000  # one item
    max_glossary_entries: int = 1000  # per request
    glossary_mode: str = "constrained"  # or "substitute" (see the module docstring)
    low_confidence: float | None = None  # flag sentences below this
    weights: ConfidenceWeights = ConfidenceWeights()


@dataclasses.dataclass
class TextItem:
    text: str
    format: TextFormat = TextFormat.SENTENCE
    glossary: Glossary | None = None  # the request's terms, on top of the model's


@dataclasses.dataclass
class SegmentResult:
    source: str
    translation: str
    confidence: float
    flags: list[str]


@dataclasses.dataclass
class TextResult:
    text: str
    confidence: float  # source-length weighted mean of the segments' (1.0 with nothing translated)
    flags: list[str]  # every segment's flags and the item's own, each once, in order
    placeholders: list[str]  # the source's protected spans (placeholders, URLs, numbers, ...)
    segments: list[SegmentResult]


class Hypothesis(Protocol):
    """What finish reads of a hypothesis (attnserve.server.engine.Hypothesis has it)."""

    tokens: list[int]
    score: float
    alignment: list[list[float]] | None


# -- the plan: what prepare decided, for finish ---------------------------------------------------


@dataclasses.dataclass
class _Sentence:
    source: str  # the sentence as in its block
    masked: Masked
    breaks: list[tuple[int, int, str]]  # soft line breaks: (start, end, whitespace) in `source`
    source_index: int | None  # into plan.sources; None: nothing to translate, copied
    terms: list[str] = dataclasses.field(default_factory=list)  # constrained glossary translations to find
    substitute: Masked | None = None  # the sentence with its terms masked: the fallback's model input
    # finish:
    translation: str = ""
    alignment: SentenceAlignment | None = None
    confidence: float = 1.0
    flags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Block:
    text: str  # plain text (markup out, accelerator out, ICU blocks as sentinels)
    pieces: list[segment.Piece]
    sentences: dict[int, _Sentence]  # piece index -> sentence
    spans: list[ProtectedSpan]
    accelerator: Accelerator | None = None
    unit: markup.Unit | None = None  # HTML/XML: the unit this block renders
    # sentinel -> what replaces it after rendering: a string, or an ICU block and its child blocks
    icu: dict[str, tuple[icu.IcuBlock, list["_Block"]]] = dataclasses.field(default_factory=dict)
    literal: dict[str, str] = dataclasses.field(default_factory=dict)  # sentinel -> text (ICU "#")


@dataclasses.dataclass
class _ItemPlan:
    item: TextItem
    blocks: list[_Block]
    parts: list[str | _Block]  # the output in order: copied markup and rendered blocks


@dataclasses.dataclass
class Plan:
    items: list[_ItemPlan]
    sources: list[str]  # model inputs, in order; finish wants one hypothesis for each
    constraints: list[list[str]] = dataclasses.field(default_factory=list)  # per source: glossary targets
    sentences: list[_Sentence] = dataclasses.field(default_factory=list)  # per source: whose it is


class TextPipeline:
    def __init__(self, tokenizer: Tokenizer, config: PipelineConfig | None = None, glossary: Glossary | None = None):
        self.tokenizer = tokenizer
        self.config = config or PipelineConfig()
        self.glossary = glossary or Glossary()

    @classmethod
    def for_engine(cls, engine: Any, config: PipelineConfig | None = None) -> "TextPipeline":
        """A pipeline for an attnserve.server.engine.Engine: its tokenizer, its source language
        and length limit, and the glossary beside its bundle."""
        config = config or PipelineConfig()
        manifest = engine.bundle.manifest
        # The typed manifest (attnserve.bundle_format) or, from older code, its JSON dict.
        languages = manifest["languages"] if isinstance(manifest, dict) else dataclasses.asdict(manifest.languages)
        config = dataclasses.replace(config, language=languages.get("source", config.language),
                                     max_source_tokens=min(config.max_source_tokens, engine.max_len - 1))
        return cls(engine.tokenizer, config, Glossary.beside_bundle(engine.bundle.path))

    # -- prepare ---------------------------------------------------------------------------------

    def prepare(self, items: Sequence[TextItem]) -> Plan:
        if self.config.glossary_mode not in ("constrained", "substitute"):
            raise ValueError(f"unknown glossary_mode {self.config.glossary_mode!r}; choose constrained or substitute")
        plan = Plan([], [])
        for index, item in enumerate(items):
            try:
                plan.items.append(self._prepare_item(item, plan))
            except (markup.MarkupError, icu.IcuError, GlossaryError) as exc:
                raise TextError(index, str(exc)) from None
            except TextError as exc:
                raise TextError(index, exc.reason) from None
        return plan

    def _prepare_item(self, item: TextItem, plan: Plan) -> _ItemPlan:
        config = self.config
        if len(item.text) > config.max_text_chars:
            raise TextError(-1, f"{len(item.text)} characters; the limit is {config.max_text_chars}")
        if item.glossary is not None and len(item.glossary) > config.max_glossary_entries:
            raise TextError(-1, f"{len(item.glossary)} glossary entries; the limit is {config.max_glossary_entries}")
        glossary = self.glossary.merged(item.glossary)
        if item.format in (TextFormat.HTML, TextFormat.XML):
            document = markup.parse_markup(item.text, xml=item.format == TextFormat.XML)
            parts: list[str | _Block] = []
            blocks = []
            for part in document.parts:
                if isinstance(part, str):
                    parts.append(part)
                    continue
                block = self._block(part.text, True, False, glossary, plan)
                block.unit = part
                blocks.append(block)
                parts.append(block)
            return _ItemPlan(item, blocks, parts)
        message = item.format == TextFormat.SENTENCE
        block = self._block(item.text, not message, message, glossary, plan)
        return _ItemPlan(item, [block], [block])

    def _block(self, text: str, split_sentences: bool, message: bool, glossary: Glossary, plan: Plan,
               plural: bool = False) -> _Block:
        config = self.config
        accelerator = None
        if message and config.accelerators:
            text, accelerator = take_accelerator(text)
        block = _Block(text, [], {}, [], accelerator)
        if message and config.icu:
            text = self._take_icu(block, text, glossary, plan)
        if plural:  # `#` in a plural sub-message is the number: a placeholder of its own
            sentinel = _free_sentinel(text, block)
            if "#" in text:
                block.literal[sentinel] = "#"
                text = text.replace("#", sentinel)
        block.text = text
        spans = find_protected(text, config.protect_kinds)
        taken = [(s.start, s.end) for s in spans]
        spans += [g for g in glossary.find(text) if not any(a < g.end and g.start < b for a, b in taken)]
        block.spans = sorted(spans, key=lambda s: s.start)
        protected = [(s.start, s.end) for s in block.spans]
        pieces = segment.layout(text, config.language, split_sentences, protected)
        block.pieces = self._cut_long(text, pieces, protected)
        for number, piece in enumerate(block.pieces):
            if piece.sentence:
                block.sentences[number] = self._sentence(text, piece, block.spans, plan)
        return block

    def _take_icu(self, block: _Block, text: str, glossary: Glossary, plan: Plan) -> str:
        """The text with each ICU plural/select block as one sentinel; its sub-messages become
        child blocks."""
        for found in reversed(icu.find_blocks(text)):
            sentinel = _free_sentinel(text, block)
            children = [self._block(message, False, True, glossary, plan, plural=found.kind != "select")
                        for message in found.messages]
            block.icu[sentinel] = (found, children)
            text = text[:found.start] + sentinel + text[found.end:]
        return text

    def _cut_long(self, text: str, pieces: list[segment.Piece], protected: list[tuple[int, int]]) -> list[segment.Piece]:
        limit = self.config.max_source_tokens - self.config.split_margin
        out = []
        for piece in pieces:
            if not piece.sentence:
                out.append(piece)
                continue
            spans = segment.split_long(text, piece.start, piece.end, self._count_tokens, limit, protected)
            for i, (a, b) in enumerate(spans):
                if i:
                    out.append(segment.Piece(spans[i - 1][1], a, False))
                out.append(segment.Piece(a, b, True))
        return out

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def _sentence(self, text: str, piece: segment.Piece, spans: list[ProtectedSpan], plan: Plan) -> _Sentence:
        source = piece.text_of(text)
        local = [dataclasses.replace(s, start=s.start - piece.start, end=s.end - piece.start)
                 for s in spans if s.start >= piece.start and s.end <= piece.end]
        # Soft line breaks: the model sees a space (same length, so offsets hold), the
        # alignment puts the whitespace back.
        breaks = [(m.start(), m.end(), m.group(0)) for m in re.finditer(r"[ \t]*\n\s*", source)]
        flat = re.sub(r"\n", " ", source)
        masked = mask(flat, local, self.config.mask_style)
        masked.source = source
        if not any(ch.isalpha() for ch in re.sub(self.config.mask_style.pattern, "", masked.text)):
            return _copied(source, masked, breaks)  # a term alone is replaced in either mode
        terms, substitute = [], None
        if self.config.glossary_mode == "constrained" and any(s.kind == "glossary" for s in local):
            # The terms stay for the model to read; their translations become constraints.
            terms, substitute = [s.output for s in local if s.kind == "glossary"], masked
            masked = mask(flat, [s for s in local if s.kind != "glossary"], self.config.mask_style)
            masked.source = source
        sentence = _Sentence(source, masked, breaks, len(plan.sources), terms, substitute)
        plan.sources.append(masked.text)
        plan.constraints.append(terms)
        plan.sentences.append(sentence)
        return sentence

    def fallback(self, plan: Plan, hypotheses: Sequence[Hypothesis]) -> dict[int, str]:
        """The sentences whose glossary term the search had to force where the model would end
        (`forced_constraint`), switched to substitution: {source index: its new model input},
        to translate again (without constraints) before finish."""
        again = {}
        for index, hypothesis in enumerate(hypotheses):
            sentence = plan.sentences[index]
            if getattr(hypothesis, "forced_constraint", False) and sentence.substitute is not None:
                sentence.masked, sentence.terms, sentence.substitute = sentence.substitute, [], None
                plan.sources[index] = again[index] = sentence.masked.text
                plan.constraints[index] = []
        return again

    # -- finish ----------------------------------------------------------------------------------

    def finish(self, plan: Plan, hypotheses: Sequence[Hypothesis]) -> list[TextResult]:
        if len(hypotheses) != len(plan.sources):
            raise ValueError(f"{len(hypotheses)} hypotheses for {len(plan.sources)} sources")
        return [self._finish_item(item, plan, hypotheses) for item in plan.items]

    def _finish_item(self, item: _ItemPlan, plan: Plan, hypotheses: Sequence[Hypothesis]) -> TextResult:
        flags: list[str] = []
        segments: list[SegmentResult] = []
        out = []
        for part in item.parts:
            out.append(part if isinstance(part, str) else self._render_block(part, plan, hypotheses, segments, flags))
        text = "".join(out)
        placeholders = [s.text for b in item.blocks for s in _all_spans(b) if s.kind not in ("glossary", "inline")]
        self._check_counts(item, text, placeholders, flags)
        weights = [max(1, len(s.source)) for s in segments]
        score = sum(w * s.confidence for w, s in zip(weights, segments)) / sum(weights) if segments else 1.0
        if self.config.low_confidence is not None and score < self.config.low_confidence:
            flags.append("low_confidence")
        for s in segments:
            flags.extend(s.flags)
        return TextResult(text, score, list(dict.fromkeys(flags)), placeholders, segments)

    def _check_counts(self, item: _ItemPlan, text: str, placeholders: list[str], flags: list[str]) -> None:
        """Every checked placeholder of the source exactly as often in the output."""
        if item.item.format in (TextFormat.HTML, TextFormat.XML):
            return  # the output is markup: attribute values would count too
        source = collections.Counter(s.text for b in item.blocks for s in _all_spans(b) if s.kind in CHECKED_KINDS)
        output = collections.Counter(s.text for s in find_protected(text, CHECKED_KINDS))
        for placeholder in source.keys() | output.keys():
            if source[placeholder] != output[placeholder]:
                flags.append(f"placeholder_mismatch:{placeholder}")

    def _render_block(self, block: _Block, plan: Plan, hypotheses: Sequence[Hypothesis], segments: list[SegmentResult],
                      flags: list[str]) -> str:
        pieces, starts = [], []
        for number, piece in enumerate(block.pieces):
            starts.append(sum(len(p) for p in pieces))
            sentence = block.sentences.get(number)
            if sentence is None:
                pieces.append(piece.text_of(block.text))
                continue
            if sentence.source_index is not None:
                self._restore(sentence, plan.sources[sentence.source_index], hypotheses[sentence.source_index])
                segments.append(SegmentResult(sentence.source, sentence.translation, sentence.confidence, sentence.flags))
            pieces.append(sentence.translation)
        translation = "".join(pieces)
        project = self._projector(block, starts, [len(p) for p in pieces])
        if block.unit is not None:
            translation = markup.render_unit(block.unit, translation, project, flags)
        if block.accelerator is not None:
            point = project(block.accelerator.position, block.accelerator.position + 1)[0]
            translation = put_accelerator(translation, block.accelerator, point)
        for sentinel, text in block.literal.items():
            translation = translation.replace(sentinel, text)
        for sentinel, (found, children) in block.icu.items():
            messages = [self._render_block(child, plan, hypotheses, segments, flags) for child in children]
            translation = translation.replace(sentinel, found.rebuild(messages))
        return translation

    def _restore(self, sentence: _Sentence, model_input: str, hypothesis: Hypothesis) -> None:
        """Translation of one sentence with its protected spans and line breaks back, and its
        alignment in (sentence, translation) characters."""
        output, target = target_text_and_spans(self.tokenizer, hypothesis.tokens)
        source = source_spans(self.tokenizer, model_input)
        alignment = SentenceAlignment.from_attention(source, target, hypothesis.alignment, len(output))
        flags = sentence.flags
        edits = mask_edits(output, sentence.masked, self.config.mask_style, alignment.target_point, flags)
        masked = sentence.masked
        for start, end, whitespace in sentence.breaks:
            point = alignment.target_point(_masked_position(masked, end))
            if point > 0 and output[point - 1] == " ":
                edits.append(Edit(point - 1, point, whitespace))
            elif point < len(output) and output[point] == " ":
                edits.append(Edit(point, point + 1, whitespace))
            else:
                edits.append(Edit(point, point, whitespace))
        restored, to_new = apply_edits(output, edits)
        folded = restored.casefold()
        for term in sentence.terms:  # constrained decoding drops a term only when it cannot fit
            if term.casefold() not in folded:
                flags.append(f"glossary_missing:{term}")
        sentence.translation = restored
        sentence.alignment = SentenceAlignment(
            [(masked.to_source(a), masked.to_source(b, end=True)) for a, b in source],
            [(to_new(a), to_new(b, end=True)) for a, b in target], alignment.links, len(restored))
        signals = Signals(hypothesis.score, attention_coverage(hypothesis.alignment, len(source)),
                          repetition(restored), count_problems(flags))
        sentence.confidence = confidence(signals, self.config.weights)
        if self.config.low_confidence is not None and sentence.confidence < self.config.low_confidence:
            flags.append("low_confidence")

    def _projector(self, block: _Block, starts: list[int], lengths: list[int]) -> Callable[[int, int], tuple[int, int]]:
        """Block source characters [a, b) -> the translation characters they became. Ends in
        gaps map exactly (gaps are copied); ends inside a sentence follow its alignment."""

        def locate(position: int, is_end: bool) -> int | None:
            for number, piece in enumerate(block.pieces):
                if piece.start < position < piece.end or (position == piece.start and not is_end) or (
                        position == piece.end and is_end):
                    return number
            return len(block.pieces) - 1 if block.pieces else None

        def side(position: int, other: int, is_end: bool) -> int:
            number = locate(position, is_end)
            if number is None:
                return 0
            piece = block.pieces[number]
            sentence = block.sentences.get(number)
            offset = starts[number]
            if sentence is None or sentence.alignment is None:  # a gap or a copied sentence: exact
                return offset + min(max(position - piece.start, 0), lengths[number])
            local = position - piece.start
            if not is_end and local == 0:
                return offset
            if is_end and position == piece.end:
                return offset + lengths[number]
            alignment = sentence.alignment
            if is_end:
                hull = alignment.target_hull(max(other, piece.start) - piece.start, local)
                return offset + (hull[1] if hull else alignment.target_point(local))
            hull = alignment.target_hull(local, min(other, piece.end) - piece.start)
            return offset + (hull[0] if hull else alignment.target_point(local))

        def project(a: int, b: int) -> tuple[int, int]:
            first, last = locate(a, False), locate(b, True)
            sentence = block.sentences.get(first) if first is not None else None
            if a < b and first == last and sentence is not None and sentence.alignment is not None:
                # Both ends inside one sentence: one hull, or one point when nothing links there.
                piece, offset = block.pieces[first], starts[first]
                local_a, local_b = a - piece.start, b - piece.start
                hull = sentence.alignment.target_hull(local_a, local_b)
                if hull is None:
                    point = offset + sentence.alignment.target_point(local_a)
                    return point, point
                hull = _trim_hull(sentence.source[local_a:local_b], sentence.translation, *hull)
                return offset + hull[0], offset + hull[1]
            if a == b:
                point = side(a, a, False)
                return point, point
            start, end = side(a, b, False), side(b, a, True)
            return start, max(start, end)

        return project

    # -- convenience -----------------------------------------------------------------------------

    def translate(self, items: Sequence[TextItem], translate: Callable[[list[str]], Sequence[Any]]) -> list[TextResult]:
        """`translate(sources)`, or `translate(sources, constraints)` when a glossary term is to
        be made to appear (constraints: per source, target strings; engine_translator takes
        them): one best hypothesis per source."""
        plan = self.prepare(items)
        if not plan.sources:
            hypotheses = []
        elif any(plan.constraints):
            hypotheses = list(translate(plan.sources, plan.constraints))
            again = self.fallback(plan, hypotheses)
            for index, hypothesis in zip(again, translate(list(again.values())) if again else []):
                hypotheses[index] = hypothesis
        else:
            hypotheses = translate(plan.sources)
        return self.finish(plan, hypotheses)


def engine_translator(engine: Any, options: Any) -> Callable[..., list[Any]]:
    """Best hypothesis (with alignment) per source from an Engine, as `finish` needs them, with
    the plan's glossary constraints."""
    options = dataclasses.replace(options, return_alignment=True, nbest=1)

    def translate(sources: list[str], constraints: list[list[str]] | None = None) -> list[Any]:
        wanted = constraints if constraints is not None and any(constraints) else None
        return [hyps[0] for hyps in engine.translate(sources, options, constraints=wanted)]

    return translate


def _copied(source: str, masked: Masked, breaks: list[tuple[int, int, str]]) -> _Sentence:
    """A sentence with nothing for the model (no letters outside its protected spans): copied,
    with its glossary terms replaced ("Password: " is a message of its own in many catalogs).
    With replacements, an exact alignment (each term to its translation, every other character
    to itself) lets markup and accelerators around a term follow it."""
    if all(span.replacement is None for span in masked.spans):
        return _Sentence(source, masked, breaks, None, translation=source)
    source_spans: list[tuple[int, int]] = []
    target_spans: list[tuple[int, int]] = []
    out: list[str] = []
    cursor = length = 0

    def link(a: int, b: int, text: str) -> None:
        nonlocal length
        source_spans.append((a, b))
        target_spans.append((length, length + len(text)))
        out.append(text)
        length += len(text)

    for span in masked.spans:
        for position in range(cursor, span.start):  # no letters here: one character at a time
            link(position, position + 1, source[position])
        link(span.start, span.end, span.output)
        cursor = span.end
    for position in range(cursor, len(source)):
        link(position, position + 1, source[position])
    translation = "".join(out)
    alignment = SentenceAlignment(source_spans, target_spans, list(range(len(source_spans))), len(translation))
    return _Sentence(source, masked, breaks, None, translation=translation, alignment=alignment)


def _masked_position(masked: Masked, position: int) -> int:
    """A position of masked.source as a position of masked.text (outside masks)."""
    shift = 0
    for span, (start, end) in zip(masked.spans, masked.mask_spans):
        if position < span.start:
            break
        if position < span.end:
            return start
        shift = end - span.end
    return position + shift


def _trim_hull(source: str, translation: str, start: int, end: int) -> tuple[int, int]:
    """A target hull without the spaces and punctuation at an end where the source span has none
    (attention often links a sentence's final stop to its last word)."""
    while start < end and translation[start].isspace():
        start += 1
    while end > start and (translation[end - 1].isspace() or (
            not translation[end - 1].isalnum() and source[-1:].isalnum() and translation[end - 1] not in ")]}>»\"'")):
        end -= 1
    return start, end


def _free_sentinel(text: str, block: _Block) -> str:
    used = set(block.icu) | set(block.literal)
    for code in range(SENTINEL_LAST, SENTINEL_FIRST - 1, -1):  # from the top: markup takes the bottom
        char = chr(code)
        if char not in text and char not in used:
            return char
    raise TextError(-1, "too many inline spans")


def _all_spans(block: _Block) -> list[ProtectedSpan]:
    spans = [s for s in block.spans if s.text not in block.icu and s.text not in block.literal]
    for _found, children in block.icu.values():
        for child in children:
            spans.extend(_all_spans(child))
    return spans
