"""The search over the public step interface alone: a toy DecoderStep in numpy (no onnxruntime,
no bundle) is decoded greedily and with beams, sentences join and leave a running batch, and the
engine's rooms stay apart (the search knows no onnxruntime, the runtime no search)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from attnserve.decoding_rules import SPECIAL_IDS, LengthLimit, length_normalised
from attnserve.server.search import BeamBatch, Constraint, DecoderStep, SearchItem, TranslationOptions, decode_together

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 8
BOS, EOS = SPECIAL_IDS.bos, SPECIAL_IDS.eos
# Next-token log-probabilities by previous token: from BOS the best path is 5, 6, EOS.
TABLE = np.log(np.full((VOCAB, VOCAB), 0.02, dtype=np.float32))
for previous, best, second in ((BOS, 5, 6), (5, 6, EOS), (6, EOS, 7), (7, EOS, 5)):
    TABLE[previous, best], TABLE[previous, second] = np.log(0.6), np.log(0.3)
TABLE = TABLE - np.log(np.exp(TABLE).sum(1, keepdims=True))


class ToyState:
    """A SearchState with no tensors: rows only."""

    def __init__(self, rows: int, width: int):
        self.rows, self.source_width = rows, width
        self.reorders = 0

    def reorder(self, parent_rows: np.ndarray) -> None:
        self.reorders += 1

    def keep_rows(self, rows: np.ndarray, longest_source: int) -> None:
        self.rows = len(rows)

    def bound_cache(self, steps_needed: int) -> None:
        pass


class ToyStep:
    """A DecoderStep whose next-token distribution depends on the previous token only."""

    special_ids = SPECIAL_IDS
    vocab_size = VOCAB
    max_len = 32
    default_length_limit = LengthLimit(2.0, 10)

    def __init__(self) -> None:
        self.steps = 0

    def start_state(self, source_ids: np.ndarray, copies: int) -> ToyState:
        return ToyState(len(source_ids) * copies, source_ids.shape[1])

    def join_state(self, state: ToyState, source_ids: np.ndarray, copies: int) -> None:
        state.rows += len(source_ids) * copies
        state.source_width = max(state.source_width, source_ids.shape[1])

    def decode_step(self, state: ToyState, previous_tokens: np.ndarray, candidates: int, forced_tokens, want_alignment):
        assert len(previous_tokens) == state.rows
        self.steps += 1
        log_probs = TABLE[previous_tokens]  # (rows, V)
        order = np.argsort(-log_probs, axis=1, kind="stable")[:, :candidates]
        forced = log_probs[np.arange(len(log_probs)), forced_tokens] if forced_tokens is not None else None
        alignment = np.full((state.rows, state.source_width), 1.0 / state.source_width, dtype=np.float32) if want_alignment else None
        return np.take_along_axis(log_probs, order, 1), order.astype(np.int64), forced, alignment


def test_a_toy_step_satisfies_the_interface() -> None:
    step: DecoderStep = ToyStep()  # structurally: nothing to inherit
    assert step.special_ids.eos == EOS


@pytest.mark.parametrize("beam", [1, 2, 3])
def test_greedy_and_beam_search_over_a_toy_step(beam: int) -> None:
    results = decode_together(ToyStep(), [[4, EOS], [4, 4, 4, EOS]], TranslationOptions(beam_size=beam, nbest=beam))
    for hypotheses in results:
        best = hypotheses[0]
        assert best.tokens == [5, 6]
        expected = float(TABLE[BOS, 5] + TABLE[5, 6] + TABLE[6, EOS])
        assert best.score == pytest.approx(length_normalised(expected, 3, 1.0), abs=1e-5)
        assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)


def test_min_length_prefix_and_alignment_over_a_toy_step() -> None:
    opts = TranslationOptions(beam_size=2, min_length=4, return_alignment=True)
    (hypotheses,) = decode_together(ToyStep(), [[4, 4, EOS]], opts, prefixes=[[7]])
    best = hypotheses[0]
    assert best.tokens[0] == 7 and len(best.tokens) >= 4
    assert len(best.alignment) == len(best.tokens) + 1  # a row per token and the EOS
    assert all(len(row) == 3 and sum(row) == pytest.approx(1.0) for row in best.alignment)


def test_sentences_join_and_leave_a_running_toy_batch() -> None:
    step = ToyStep()
    batch = BeamBatch(step, 2)
    batch.add([SearchItem([4, EOS], TranslationOptions(beam_size=2, min_length=6), None, "long")])
    batch.step()
    batch.add([SearchItem([4, 4, EOS], TranslationOptions(beam_size=2), None, "short")])
    assert len(batch) == 2 and batch.longest_source == 3 and batch.source_tokens == 2 * (2 + 3)
    assert [item.tag for item in batch.live_items()] == ["long", "short"]
    done = {}
    while len(batch):
        done.update((item.tag, hyps) for item, hyps in batch.step())
    assert done["short"][0].tokens == [5, 6] and len(done["long"][0].tokens) >= 6
    assert batch.state is None and batch.longest_source == 0



def test_sentences_cut_at_their_length_limit_decode_in_a_running_batch_as_they_do_alone() -> None:
    """Sentences with their own length limits, minimum lengths, a prefix and a cancellation join
    a running batch at different steps: each gets what it gets decoded alone, at the step its
    limit says. (The step skips the finishing work when no sentence can finish: this checks
    that it never skips a sentence that does.)"""
    def options(limit: int, min_length: int = 0) -> TranslationOptions:
        return TranslationOptions(beam_size=2, nbest=2, max_len_a=0, max_len_b=limit, min_length=min_length)

    # (joins before step, source, options, prefix); those with a minimum length run into their limit
    sentences = [(0, [4, EOS], options(2, min_length=5), None), (0, [4, 4, EOS], options(9), None),
                 (1, [4, EOS], options(3, min_length=5), None), (2, [4, 4, 4, EOS], options(1), None),
                 (2, [4, EOS], options(4), [7]), (3, [4, EOS], options(6, min_length=6), None)]
    batch, done, step = BeamBatch(ToyStep(), 2), {}, 0
    while (step < 4 or len(batch)) and step < 40:
        batch.add([SearchItem(src, opts, prefix, tag) for tag, (at, src, opts, prefix) in enumerate(sentences) if at == step])
        if step == 1:
            batch.add([SearchItem([4, EOS], options(9, min_length=5), None, "cancelled")])
        if step == 2:
            assert batch.cancel({"cancelled"}) == 1
        for item, hyps in batch.step():
            done[item.tag] = (step, hyps)
        step += 1
    assert sorted(done) == list(range(len(sentences)))
    for tag, (at, src, opts, prefix) in enumerate(sentences):
        (alone,) = decode_together(ToyStep(), [src], opts, prefixes=[prefix] if prefix else None)
        finished_at, hyps = done[tag]
        assert [(h.tokens, round(h.score, 5)) for h in hyps] == [(h.tokens, round(h.score, 5)) for h in alone]
        if opts.min_length:  # cut by its limit: it leaves at the step that reaches it
            assert finished_at - at + 1 == opts.max_len_b and all(len(h.tokens) == opts.max_len_b for h in hyps)


def _contains(tokens: list[int], term: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i:i + len(term)]) == term for i in range(len(tokens) - len(term) + 1))


@pytest.mark.parametrize("beam", [1, 2])
def test_constraints_appear_where_the_model_wants_them_and_are_forced_otherwise(beam: int) -> None:
    opts = TranslationOptions(beam_size=beam, nbest=beam)
    wanted, unwanted, two = [Constraint((6,))], [Constraint((4,))], [Constraint((7,)), Constraint((5, 6))]
    results = decode_together(ToyStep(), [[4, EOS]] * 4, opts, constraints=[wanted, unwanted, two, None])
    # 6 is the second choice after BOS (within the margin): taken there, then EOS; nothing forced.
    assert results[0][0].tokens == [6] and not results[0][0].forced_constraint
    # 4 is never within 2 nats of the best: the sentence would end after 5, 6; 4 is forced there.
    assert results[1][0].tokens[:3] == [5, 6, 4] and results[1][0].forced_constraint
    for hypotheses, terms in zip(results, (wanted, unwanted, two)):  # every hypothesis of the n-best
        assert len(hypotheses) == beam and all(_contains(h.tokens, t.tokens) for h in hypotheses for t in terms)
    tokens = results[2][0].tokens  # both terms, in order
    assert tokens.index(7) < max(i for i in range(len(tokens) - 1) if tokens[i:i + 2] == [5, 6])
    assert results[3][0].tokens == [5, 6] and not results[3][0].forced_constraint  # no constraints: as before


def test_a_constraint_written_in_other_subwords_counts_and_one_that_cannot_fit_is_dropped() -> None:
    class Pieces(ToyStep):
        def piece_texts(self) -> list[str]:
            texts = [""] * VOCAB
            texts[5], texts[6], texts[7] = " ab", "c", " abc"
            return texts

    opts = TranslationOptions(beam_size=1)
    # 7 is " abc" as one piece; the model writes " ab" + "c" (5, 6) by itself: nothing is forced.
    (hypotheses,) = decode_together(Pieces(), [[4, EOS]], opts, constraints=[[Constraint((7,), "abc")]])
    assert hypotheses[0].tokens == [5, 6] and not hypotheses[0].forced_constraint
    # A term longer than the length limit (2 * 2 + 10 = 14 here) leaves the search unconstrained.
    (hypotheses,) = decode_together(ToyStep(), [[4, EOS]], opts, constraints=[[Constraint((7,) * 20)]])
    assert hypotheses[0].tokens == [5, 6] and not hypotheses[0].forced_constraint


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_engine_rooms_keep_to_themselves() -> None:
    """search: no onnxruntime; state: no onnxruntime (OrtValues come through to_device); runtime:
    no search; none of them imports the engine facade."""
    rooms = {name: _imports(ROOT / "server" / f"{name}.py") for name in ("runtime", "state", "search")}
    assert "onnxruntime" not in rooms["search"] and "onnxruntime" not in rooms["state"]
    assert "attnserve.server.search" not in rooms["runtime"]
    assert not any("attnserve.server.engine" in imports for imports in rooms.values())
