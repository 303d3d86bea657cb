"""Greedy and beam search over an abstract decoder step, with continuous batching.

The search is model/decode.py's, so that fp32 output is token-identical to the torch reference:
per-sentence length limits, 2K best continuations a step, an EOS among the first K finishes a
hypothesis (it leaves the beam), the K best others go on, GNMT length penalty on finished ones;
greedy is K = 1. Unlike the reference, finished sentences leave the batch at once, and beams only
reorder the dynamic state (the static state is the same for every beam of a sentence).

The model is anything with the `DecoderStep` interface (engine.Engine on onnxruntime); its
decoder state anything with the `SearchState` interface (state.DecoderState).

Lexical constraints (glossary terms, `SearchItem.constraints`): target strings each hypothesis
must contain, in order, given as the subwords they are after a space. A row emitting a term has
its next subword as its only candidate. A row with a term still to start starts it where the
model would put it: when the term's first subword is within CONSTRAINT_MARGIN nats of its best
token. A term the model writes by itself in other subwords ("l'imprimante" for "▁imprimante")
counts as written. Until its terms are in, a row may not end: where it would end, or where only
the room for the pending terms is left, the term is forced there, and the hypothesis says so
(`Hypothesis.forced_constraint`: the model never wanted the term, so it sits where it does not
belong; the text pipeline then substitutes it instead). (docs/text.md measures
this against masking the term and substituting its translation.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from attnserve.decoding_rules import LengthLimit, SpecialIds, length_normalised, max_target_length
from attnserve.server.state import fit_axis

# How far below a row's best token (in nats) a constraint's first subword may be to start there.
# bench/glossary_eval.py chose it: 2.0 kept 99.6% of the terms at the unconstrained chrF.
CONSTRAINT_MARGIN = 2.0


@dataclasses.dataclass
class TranslationOptions:
    beam_size: int = 1
    length_penalty: float = 1.0  # GNMT alpha; 0 = raw log-probability
    nbest: int = 1
    max_len_a: float | None = None  # None: the bundle's default (manifest "decoding")
    max_len_b: int | None = None
    min_length: int = 0  # EOS is not allowed before this many target tokens
    return_alignment: bool = False

    def validate(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"nbest must be between 1 and beam_size ({self.beam_size}), got {self.nbest}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")


@dataclasses.dataclass
class Hypothesis:
    tokens: list[int]  # target ids without BOS/EOS (a target prefix, if given, included)
    score: float  # length-normalised log-probability
    alignment: list[list[float]] | None = None  # per target token (and EOS): weights over source positions
    text: str = ""
    forced_constraint: bool = False  # a constraint had to be forced where the model would end (module docstring)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A target string every hypothesis contains: its subword ids after a space (no BOS, EOS
    or PAD), and its text, casefolded, to recognise it written in other subwords."""
    tokens: tuple[int, ...]
    text: str = ""


@dataclasses.dataclass
class SearchItem:
    """One sentence to decode: source ids ending in EOS, its options, an optional target prefix
    (ids without BOS/EOS) forced at the start of every hypothesis, and the caller's tag, which
    comes back with its result."""
    src: list[int]
    opts: TranslationOptions
    prefix: list[int] | None = None
    tag: Any = None
    constraints: list[Constraint] | None = None  # every hypothesis contains them, in order


class SearchState(Protocol):
    """A batch's decoder state, as the search changes it between steps (state.DecoderState)."""

    @property
    def source_width(self) -> int:
        """Source positions of the state (the alignment rows a step returns are this wide)."""

    def reorder(self, parent_rows: np.ndarray) -> None:
        """Row i continues row parent_rows[i] at the next step."""

    def keep_rows(self, rows: np.ndarray, longest_source: int) -> None:
        """Row i becomes row rows[i]; the others leave. `longest_source`: of the rows that stay."""

    def bound_cache(self, steps_needed: int) -> None:
        """The next step needs at most this many cached target steps."""


class DecoderStep(Protocol):
    """The public step interface: what a search needs of a model (engine.Engine)."""

    special_ids: SpecialIds
    vocab_size: int
    max_len: int  # positions the model has
    default_length_limit: LengthLimit  # for options that leave max_len_a/b None

    def start_state(self, source_ids: np.ndarray, copies: int) -> SearchState:
        """Encode source_ids (n, S), padded with PAD, into a state of n * copies rows (each
        sentence's rows consecutive)."""

    def join_state(self, state: SearchState, source_ids: np.ndarray, copies: int) -> None:
        """Encode more sentences and append their n * copies rows to `state`."""

    def decode_step(self, state: SearchState, previous_tokens: np.ndarray, candidates: int,
                    forced_tokens: np.ndarray | None, want_alignment: bool,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One step of every row: (top_log_probs, top_ids) (rows, candidates) best first, ties to
        the lower id; forced_log_probs (rows,) if forced_tokens is given; the alignment (rows,
        source_width) if wanted. The state moves one step on."""


def target_length_limit(model: DecoderStep, source_length: int, opts: TranslationOptions, prefix: list[int] | None) -> int:
    """Max target length of one sentence (source_length: its ids, EOS included), as
    model/decode.py computes it, and never shorter than a target prefix plus one token."""
    default = model.default_length_limit
    limit = LengthLimit(default.max_len_a if opts.max_len_a is None else opts.max_len_a,
                        default.max_len_b if opts.max_len_b is None else opts.max_len_b)
    length = max_target_length(source_length, model.max_len, limit)
    return max(length, min(len(prefix) + 1, model.max_len - 1)) if prefix is not None else length


class BeamBatch:
    """Sentences decoded together, beam_size rows (beams) each, one decoder step at a time.

    Sentences join between steps (`add`) and leave as soon as they are done (`step` returns
    them), so a long sentence never holds short ones back and a scheduler can keep the batch
    full: continuous batching. Each sentence has its own step count, length limit, minimum
    length, length penalty and prefix; the beam size and whether alignments are kept belong to
    the batch.

    The public interface: add, step, cancel, len(), live_items(), longest_source, source_tokens.
    """

    def __init__(self, model: DecoderStep, beam_size: int, alignment: bool = False):
        self.model, self.beam_size, self.alignment = model, beam_size, alignment
        self.pad_id, self.bos_id, self.eos_id = model.special_ids.pad, model.special_ids.bos, model.special_ids.eos
        self.vocab_size = model.vocab_size
        beam = beam_size
        self.items: list[SearchItem] = []  # (n,) the sentences, closed ones until the next compaction
        self.steps = np.zeros(0, dtype=np.int64)  # (n,) target tokens generated per sentence
        self.limits = np.zeros(0, dtype=np.int64)  # (n,) max target length per sentence
        self.min_lengths = np.zeros(0, dtype=np.int64)  # (n,)
        self.closed = np.zeros(0, dtype=bool)  # (n,) done or cancelled; rows not yet dropped
        self.finished: list[list[Hypothesis]] = []  # (n,) finished hypotheses per sentence
        self.scores = np.zeros((0, beam), dtype=np.float32)  # (n, beam) running log-probabilities
        self.prev = np.zeros(0, dtype=np.int64)  # (n*beam,) last token of each row
        # (n*beam, L): right-aligned, the last steps[sentence] columns of a row are its tokens
        self.history = np.zeros((0, 0), dtype=np.int64)
        self.attention = np.zeros((0, 0, 0), dtype=np.float32)  # (n*beam, L, S), only with alignment
        self.state: SearchState | None = None
        # Constraints, per row (n*beam,): the next term to emit (index into its item's
        # constraints) and how many of its subwords the row has emitted (0: not started).
        self.term_next = np.zeros(0, dtype=np.int64)
        self.term_pos = np.zeros(0, dtype=np.int64)
        self.term_forced = np.zeros(0, dtype=bool)  # a term of the row was forced where the model would end
        # id -> piece text (SentencePiece's ▁ as a space), to see a term written in other subwords.
        self.piece_texts: list[str] | None = None
        # Candidate j of a sentence (of beam * 2*beam: 2*beam per beam) comes from beam j // (2*beam);
        # its tie-break key is (beam, token): beam * vocab_size + token.
        self.candidate_key_offsets = np.repeat(np.arange(beam) * self.vocab_size, 2 * beam)[None, :]  # (1, beam*2*beam)
        self.candidate_positions = np.arange(2 * beam)[None, :]  # (1, 2*beam)
        # What the common step may skip, kept by _refresh (after add and compaction) so that a
        # batch-1 step, where each numpy call counts, does not look for it every step.
        self._prefixed = self._constrained = self._min_lengths = False  # some sentence has one
        self._steps_to_limit = 0  # steps until the first sentence reaches its length limit
        self._longest_steps = 0  # steps.max(): the cache the next step needs
        self._closing = False  # some sentence was closed (cancel) and awaits compaction
        self._row_index: tuple[np.ndarray, np.ndarray] | None = None  # (n, 1) sentence index, and its first row

    def __len__(self) -> int:
        """Sentences still being decoded."""
        return int((~self.closed).sum())

    def live_items(self) -> list[SearchItem]:
        """The sentences still being decoded."""
        return [item for item, closed in zip(self.items, self.closed) if not closed]

    @property
    def longest_source(self) -> int:
        """Source ids (EOS included) of the longest sentence still being decoded; 0 if none."""
        return max((len(item.src) for item, closed in zip(self.items, self.closed) if not closed), default=0)

    @property
    def source_tokens(self) -> int:
        """Source tokens of the sentences being decoded, times the beam: what a batch-size budget counts."""
        return self.beam_size * sum(len(item.src) for item, closed in zip(self.items, self.closed) if not closed)

    def add(self, items: Sequence[SearchItem]) -> None:
        """Encode these sentences and let them join the batch at the next step."""
        if not items:
            return
        model, beam = self.model, self.beam_size
        self._compact()
        width = max(len(item.src) for item in items)
        source_ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        for row, item in enumerate(items):
            source_ids[row, : len(item.src)] = item.src
        if self.state is None:
            self.state = model.start_state(source_ids, beam)
        else:
            model.join_state(self.state, source_ids, beam)
        joining = len(items)
        limits = [target_length_limit(model, len(item.src), item.opts, item.prefix) for item in items]
        for item, limit in zip(items, limits):
            item.constraints = _fitting_constraints(item.constraints, limit - len(item.prefix or ()))
        self.items.extend(items)
        self.steps = np.concatenate([self.steps, np.zeros(joining, dtype=np.int64)])
        self.limits = np.concatenate([self.limits, limits]).astype(np.int64)
        self.min_lengths = np.concatenate([self.min_lengths, [item.opts.min_length for item in items]]).astype(np.int64)
        self.closed = np.concatenate([self.closed, np.zeros(joining, dtype=bool)])
        self.finished.extend([] for _ in items)
        scores = np.full((joining, beam), -np.inf, dtype=np.float32)
        scores[:, 0] = 0.0  # only the first beam is alive at the start
        self.scores = np.concatenate([self.scores, scores])
        self.prev = np.concatenate([self.prev, np.full(joining * beam, self.bos_id, dtype=np.int64)])
        self.term_next = np.concatenate([self.term_next, np.zeros(joining * beam, dtype=np.int64)])
        self.term_pos = np.concatenate([self.term_pos, np.zeros(joining * beam, dtype=np.int64)])
        self.term_forced = np.concatenate([self.term_forced, np.zeros(joining * beam, dtype=bool)])
        if self.piece_texts is None and any(item.constraints for item in items):
            pieces = getattr(model, "piece_texts", None)
            self.piece_texts = pieces() if callable(pieces) else None
        self.history = np.concatenate([self.history, np.full((joining * beam, self.history.shape[1]), self.pad_id, dtype=np.int64)])
        if self.alignment:
            kept = fit_axis(self.attention, 2, self.state.source_width)
            self.attention = np.concatenate([kept, np.zeros((joining * beam,) + kept.shape[1:], dtype=np.float32)])
        self._refresh()

    def cancel(self, tags: set) -> int:
        """Stop decoding the sentences with these tags (no result); returns how many."""
        cancelled = 0
        for sentence, item in enumerate(self.items):
            if item.tag in tags and not self.closed[sentence]:
                self.closed[sentence], cancelled = True, cancelled + 1
                self._closing = True
        return cancelled

    def step(self) -> list[tuple[SearchItem, list[Hypothesis]]]:
        """One decoder step for every row; returns the sentences done at this step with their
        n-best hypotheses, best first."""
        beam, sentences, eos = self.beam_size, len(self.items), self.eos_id
        if sentences == 0:
            return []
        # The common step has no minimum length, prefix or constraint left: it skips their work.
        no_eos = None  # (n*beam,) rows that may not end yet
        if self._min_lengths:
            too_short = self.steps < self.min_lengths  # (n,)
            no_eos = np.repeat(too_short, beam) if too_short.any() else None
        forced = self._forced() if self._prefixed else None
        term_token, in_term = self._constraint_tokens(forced) if self._constrained else (None, None)
        if term_token is not None:  # a row with a term left may not end; its term's subword is scored
            pending_term = term_token != self.pad_id
            no_eos = pending_term if no_eos is None else no_eos | pending_term
            forced = np.where(pending_term, term_token, forced if forced is not None else self.pad_id)
        # One more candidate per row replaces an EOS dropped on those rows.
        eos_replacement = int(no_eos is not None and bool(no_eos.any()))
        top_log_probs, top_ids, forced_log_probs, alignment = self.model.decode_step(
            self.state, self.prev, 2 * beam + eos_replacement, forced, self.alignment)  # (n*beam, 2*beam [+1])
        if term_token is not None:
            forced = self._constraint_decisions(forced, term_token, in_term, top_log_probs, top_ids, forced_log_probs)
        if eos_replacement:
            top_log_probs[no_eos[:, None] & (top_ids == eos)] = -np.inf
            order = np.argsort(-top_log_probs, axis=1, kind="stable")[:, : 2 * beam]
            top_log_probs, top_ids = np.take_along_axis(top_log_probs, order, 1), np.take_along_axis(top_ids, order, 1)
        if forced is not None:  # a row with a prefix token to take has that token as its only candidate
            rows = forced != self.pad_id
            top_log_probs[rows] = -np.inf
            top_log_probs[rows, 0] = forced_log_probs[rows]
            top_ids[rows, 0] = forced[rows]
        if self.alignment:  # the source width may have changed since the last step (joins, narrowing)
            self.attention = np.concatenate([fit_axis(self.attention, 2, alignment.shape[1]), alignment[:, None, :]], axis=1)
        candidates = (self.scores.reshape(sentences * beam, 1) + top_log_probs).reshape(sentences, 2 * beam * beam)
        tokens = top_ids.reshape(sentences, 2 * beam * beam)
        # Best first; ties go to the lower (beam, token) index, as torch.topk over (beam * V).
        order = np.lexsort((self.candidate_key_offsets + tokens, -candidates), axis=1)[:, : 2 * beam]
        sentence_index, first_rows = self._sentence_index(sentences)  # (n, 1) each
        top_scores = candidates[sentence_index, order]  # (n, 2*beam)
        top_beam = order // (2 * beam)
        top_token = tokens[sentence_index, order]
        is_eos = top_token == eos
        ending = is_eos[:, :beam]
        ended = bool(ending.any())
        if ended:
            for sentence, j in np.argwhere(ending & np.isfinite(top_scores[:, :beam]) & ~self.closed[:, None]):
                row = sentence * beam + top_beam[sentence, j]
                self.finished[sentence].append(self._hypothesis(sentence, row, top_scores[sentence, j], int(self.steps[sentence]),
                                                                ended=True))
            # The beam best non-EOS candidates go on (EOS ones sorted after every other).
            pick = np.argsort(np.where(is_eos, self.candidate_positions + 2 * beam, self.candidate_positions),
                              axis=1, kind="stable")[:, :beam]
            self.scores = top_scores[sentence_index, pick]
            parent_rows = (top_beam[sentence_index, pick] + first_rows).reshape(-1)
            self.prev = top_token[sentence_index, pick].reshape(-1).astype(np.int64)
        else:  # no EOS among the first beam candidates: they are the ones that go on
            self.scores = top_scores[:, :beam]
            parent_rows = (top_beam[:, :beam] + first_rows).reshape(-1)
            self.prev = np.ascontiguousarray(top_token[:, :beam].reshape(-1), dtype=np.int64)
        self.state.reorder(parent_rows)
        self.state.bound_cache(self._longest_steps + 1)  # cached steps the next step needs, at most
        self.history = np.concatenate([self.history[parent_rows], self.prev[:, None]], axis=1)
        if term_token is not None:
            self._advance_constraints(parent_rows)
        if self.alignment:
            self.attention = self.attention[parent_rows]
        self.steps += 1
        self._longest_steps += 1
        self._steps_to_limit -= 1
        if not (ended or self._steps_to_limit <= 0 or self._closing):
            return []  # nothing finished, and nothing to compact
        at_limit = self.limits <= self.steps
        for sentence in np.flatnonzero(at_limit & ~self.closed) if at_limit.any() else ():  # live hypotheses finish as they are
            for live_beam in np.flatnonzero(np.isfinite(self.scores[sentence])):
                self.finished[sentence].append(self._hypothesis(sentence, sentence * beam + live_beam,
                                                                self.scores[sentence, live_beam], int(self.steps[sentence]),
                                                                ended=False))
        done = ~self.closed & (at_limit | np.array([len(f) >= beam for f in self.finished]))
        self.closed |= done
        results = [(self.items[sentence], sorted(self.finished[sentence], key=lambda h: -h.score)[: self.items[sentence].opts.nbest])
                   for sentence in np.flatnonzero(done)]
        self._compact()
        return results

    def _forced(self) -> np.ndarray | None:
        """The prefix token each row must take at this step (PAD: none), or None if no row has one."""
        if not any(item.prefix and step < len(item.prefix) for item, step in zip(self.items, self.steps)):
            return None
        forced = [item.prefix[step] if item.prefix and step < len(item.prefix) else self.pad_id
                  for item, step in zip(self.items, self.steps.tolist())]
        return np.repeat(np.array(forced, dtype=np.int64), self.beam_size)

    def _constraint_tokens(self, forced: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per row (n*beam,): the subword of its constraints it would emit next (PAD: none left,
        or a target prefix still being forced), and whether it is inside a term; (None, None) if
        no sentence of the batch has constraints."""
        if not any(item.constraints for item in self.items):
            return None, None
        beam = self.beam_size
        token = np.full(len(self.prev), self.pad_id, dtype=np.int64)
        for sentence, item in enumerate(self.items):
            if not item.constraints or self.closed[sentence]:
                continue
            for row in range(sentence * beam, sentence * beam + beam):
                nxt = self.term_next[row]
                if nxt < len(item.constraints) and (forced is None or forced[row] == self.pad_id):
                    token[row] = item.constraints[nxt].tokens[self.term_pos[row]]
        return token, (token != self.pad_id) & (self.term_pos > 0)

    def _constraint_decisions(self, forced: np.ndarray, term_token: np.ndarray, in_term: np.ndarray,
                              top_log_probs: np.ndarray, top_ids: np.ndarray, forced_log_probs: np.ndarray) -> np.ndarray:
        """The rows that take their constraint subword at this step (the others keep their
        prefix token or PAD): those inside a term, and those whose term starts here."""
        beam = self.beam_size
        pending = (term_token != self.pad_id) & ~in_term
        start = pending
        if pending.any():
            steps, limits = np.repeat(self.steps, beam), np.repeat(self.limits, beam)
            need = np.zeros(len(term_token), dtype=np.int64)  # subwords of the row's terms not yet emitted
            for row in np.flatnonzero(pending):
                need[row] = sum(len(c.tokens) for c in self.items[row // beam].constraints[self.term_next[row]:])
            wanted = forced_log_probs >= top_log_probs[:, 0] - CONSTRAINT_MARGIN
            forced_here = pending & ~wanted & ((top_ids[:, 0] == self.eos_id) | (need >= limits - steps))
            self.term_forced |= forced_here
            start = pending & (wanted | forced_here)
        take = in_term | start
        kept_prefix = (forced != self.pad_id) & (term_token == self.pad_id)
        return np.where(take | kept_prefix, forced, self.pad_id)

    def _advance_constraints(self, parent_rows: np.ndarray) -> None:
        """After the beams chose (self.prev, and the history has it): each row continues its
        parent's constraint state with the token it took."""
        self.term_next, self.term_pos = self.term_next[parent_rows], self.term_pos[parent_rows]
        self.term_forced = self.term_forced[parent_rows]
        beam = self.beam_size
        for sentence, item in enumerate(self.items):
            if not item.constraints or self.closed[sentence]:
                continue
            for row in range(sentence * beam, sentence * beam + beam):
                nxt = self.term_next[row]
                if nxt >= len(item.constraints):
                    continue
                constraint = item.constraints[nxt]
                term = constraint.tokens
                if self.term_pos[row] > 0 or self.prev[row] == term[0]:  # inside the term (forced), or it starts
                    self.term_pos[row] += 1
                elif self._written(row, constraint):
                    self.term_next[row] += 1
                    continue
                if self.term_pos[row] == len(term):
                    self.term_next[row], self.term_pos[row] = nxt + 1, 0

    def _written(self, row: int, constraint: Constraint) -> bool:
        """Whether the row's last tokens (self.prev included) end the constraint's text, written
        in other subwords than the constraint's own."""
        if self.piece_texts is None or not constraint.text:
            return False
        tail, chars = [], 0
        generated = int(self.steps[row // self.beam_size]) + 1  # this step's token is in the history already
        tokens = self.history[row, -min(generated, len(constraint.tokens) + 4):].tolist()
        for token in reversed(tokens):
            tail.append(self.piece_texts[token])
            chars += len(tail[-1])
            if chars > len(constraint.text) + 1:
                break
        text = "".join(reversed(tail)).casefold()
        return text.endswith(constraint.text) and (len(text) == len(constraint.text) or not text[-len(constraint.text) - 1].isalnum())

    def _hypothesis(self, sentence: int, row: int, score: float, generated: int, ended: bool) -> Hypothesis:
        """A finished hypothesis of `sentence` from `row`: its last `generated` tokens, plus the
        EOS just chosen if it ended (which counts in the length and has an alignment row)."""
        item = self.items[sentence]
        length = generated + ended
        tokens = self.history[row, self.history.shape[1] - generated:].tolist() if generated else []
        alignment = None
        if self.alignment:
            alignment = self.attention[row, self.attention.shape[1] - length:, : len(item.src)].tolist()
        return Hypothesis(tokens, length_normalised(float(score), length, item.opts.length_penalty), alignment,
                          forced_constraint=bool(self.term_forced[row]) if item.constraints else False)

    def _compact(self) -> None:
        """Drop the rows of closed (done or cancelled) sentences. Sentences from the end of the
        batch fill the holes, so only the rows that move are copied, and a finished sentence
        costs no further decoder work."""
        self._closing = False
        if not self.closed.any():
            return
        sentences, beam = len(self.items), self.beam_size
        closed = int(self.closed.sum())
        alive = sentences - closed
        order = np.arange(alive)  # the sentence each kept slot takes
        holes = np.flatnonzero(self.closed[:alive])
        order[holes] = np.flatnonzero(~self.closed[alive:]) + alive
        rows = (order[:, None] * beam + np.arange(beam)).reshape(-1)
        self.items = [self.items[sentence] for sentence in order]
        self.finished = [self.finished[sentence] for sentence in order]
        self.steps, self.limits, self.min_lengths = self.steps[order], self.limits[order], self.min_lengths[order]
        self.closed, self.scores = self.closed[order], self.scores[order]
        longest = int(self.steps.max(initial=0))  # older columns belong to sentences that left
        self.prev = self.prev[rows]
        self.term_next, self.term_pos, self.term_forced = self.term_next[rows], self.term_pos[rows], self.term_forced[rows]
        self.history = self.history[rows][:, self.history.shape[1] - longest:]
        if self.alignment:
            self.attention = self.attention[rows][:, self.attention.shape[1] - longest:]
        if not self.items:
            self.state = None
            self.history = np.zeros((0, 0), dtype=np.int64)
            self.attention = np.zeros((0, 0, 0), dtype=np.float32)
        else:
            self.state.keep_rows(rows, max(len(item.src) for item in self.items))
        self._refresh()

    def _refresh(self) -> None:
        """Recount what the common step may skip (__init__), after the sentences changed."""
        self._prefixed = any(item.prefix for item in self.items)
        self._constrained = any(item.constraints for item in self.items)
        self._min_lengths = bool(self.min_lengths.any())
        self._steps_to_limit = int((self.limits - self.steps).min()) if len(self.items) else 0
        self._longest_steps = int(self.steps.max(initial=0))
        self._row_index = None

    def _sentence_index(self, sentences: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 1) arrays: each sentence's index (to index (n, k) arrays with an (n, k) order) and its
        first row; made once per batch composition."""
        if self._row_index is None or len(self._row_index[0]) != sentences:
            index = np.arange(sentences)[:, None]
            self._row_index = index, index * self.beam_size
        return self._row_index


def _fitting_constraints(constraints: list[Constraint] | None, room: int) -> list[Constraint] | None:
    """The constraints (empty terms left out) that fit, in order, in `room` target tokens with
    one to spare; a term that does not fit, and those after it, are dropped (the caller sees it
    missing from the output)."""
    if not constraints:
        return None
    kept, used = [], 0
    for term in constraints:
        if not term.tokens:
            continue
        if used + len(term.tokens) >= room:
            break
        kept.append(term)
        used += len(term.tokens)
    return kept or None


def decode_together(model: DecoderStep, sources: Sequence[list[int]], opts: TranslationOptions,
                    prefixes: Sequence[list[int]] | None = None,
                    constraints: Sequence[list[Constraint] | None] | None = None) -> list[list[Hypothesis]]:
    """Decode these sources (ids ending in EOS) as one batch until every one is done."""
    batch = BeamBatch(model, opts.beam_size, opts.return_alignment)
    batch.add([SearchItem(list(src), opts, list(prefixes[i]) if prefixes is not None else None, i,
                          constraints[i] if constraints is not None else None)
               for i, src in enumerate(sources)])
    results: list[list[Hypothesis]] = [[] for _ in sources]
    while len(batch):
        for item, hyps in batch.step():
            results[item.tag] = hyps
    return results
