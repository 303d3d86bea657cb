"""The onnxruntime engine against the torch reference: identical tokens for greedy and beam
search on every architecture, n-best, alignments, options and their refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnserve.model.checkpoint import load_model
from attnserve.model.corpus import load_tsv
from attnserve.model.decode import DecodeOptions
from attnserve.model.evaluate import translate_texts
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine, TranslationOptions
from tests.conftest import ARCHITECTURES


def dev_sources(run: Path) -> list[str]:
    from attnserve.model.checkpoint import read_config

    return [s for s, _ in load_tsv(Path(read_config(run).train.data_dir) / "dev.tsv")]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("beam, nbest, alpha", [(1, 1, 1.0), (4, 1, 1.0), (3, 3, 0.0)])
def test_engine_matches_torch_reference(trained, bundles, name: str, beam: int, nbest: int, alpha: float) -> None:
    model, tokenizer, _ = load_model(trained[name])
    engine = Engine(load_bundle(bundles[name]), "fp32", device="cpu")
    sources = dev_sources(trained[name])
    reference = translate_texts(model, tokenizer, sources, DecodeOptions(beam_size=beam, nbest=nbest, length_penalty=alpha))
    # Small batches so that sentences finish and leave at different times.
    results = engine.translate(sources, TranslationOptions(beam_size=beam, nbest=nbest, length_penalty=alpha),
                               max_batch_sentences=7)
    assert len(results) == len(sources)
    for ref_hyps, hyps in zip(reference, results):
        assert [h.tokens for h in hyps] == [h.tokens for h in ref_hyps]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in ref_hyps], abs=1e-3)
        assert hyps[0].text == tokenizer.decode([ref_hyps[0].tokens])[0]


@pytest.mark.parametrize("beam", [1, 3])
def test_alignments_match_torch(trained, bundles, beam: int) -> None:
    model, tokenizer, _ = load_model(trained["transformer"])
    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    sources = dev_sources(trained["transformer"])[:6]
    reference = translate_texts(model, tokenizer, sources, DecodeOptions(beam_size=beam, return_attention=True))
    results = engine.translate(sources, TranslationOptions(beam_size=beam, return_alignment=True))
    for ref, hyp, src in zip(reference, results, engine.encode_texts(sources)):
        alignment = hyp[0].alignment
        assert len(alignment) == len(ref[0].attention)
        for row, ref_row in zip(alignment, ref[0].attention):
            assert len(row) >= len(src)  # padded to the batch's longest source
            assert row[: len(src)] == pytest.approx(ref_row[: len(src)], abs=1e-4)
            assert sum(row) == pytest.approx(1.0, abs=1e-4)


def test_options_min_and_max_length(bundles) -> None:
    engine = Engine(load_bundle(bundles["bahdanau"]), "fp32", device="cpu")
    engine.warm_up()
    sources = ["the cat sees the dog", "the old red car has the big green book"]
    short = engine.translate(sources, TranslationOptions(max_len_a=0, max_len_b=3))
    assert all(len(h[0].tokens) <= 3 for h in short)
    for beam in (1, 2):
        long = engine.translate(sources, TranslationOptions(beam_size=beam, min_length=12, max_len_a=0, max_len_b=20))
        assert all(len(h[0].tokens) >= 12 for h in long)


@pytest.mark.parametrize("options, message", [
    (TranslationOptions(beam_size=0), "beam_size"),
    (TranslationOptions(beam_size=2, nbest=3), "nbest"),
    (TranslationOptions(min_length=-1), "min_length"),
])
def test_bad_options_are_refused(bundles, options: TranslationOptions, message: str) -> None:
    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    with pytest.raises(ValueError, match=message):
        engine.translate(["the cat"], options)


def test_empty_and_unknown_input(bundles) -> None:
    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    out = engine.translate(["", "ᚠᚢᚦᚨᚱᚲ ☃ 🐈"], TranslationOptions(beam_size=2))
    assert len(out) == 2 and all(isinstance(h[0].text, str) for h in out)
    assert engine.translate([]) == []


@pytest.mark.parametrize("beam", [1, 3])
def test_target_prefix_is_forced_and_consistent(bundles, beam: int) -> None:
    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    sources = ["the red cat sees the dog", "the old house has the big green car", "the book likes the tree"]
    opts = TranslationOptions(beam_size=beam)
    free = engine.translate(sources, opts)
    ids = engine.encode_texts(sources)
    # A prefix the model would choose anyway changes nothing (greedy: same path, same score).
    own = [h[0].tokens[:2] for h in free]
    again = engine.translate_ids(ids, opts, prefixes=own)
    if beam == 1:
        assert [h[0].tokens for h in again] == [h[0].tokens for h in free]
        assert [h[0].score for h in again] == pytest.approx([h[0].score for h in free], abs=1e-5)
    # Any other prefix starts every hypothesis; prefixes of different lengths share a batch.
    forced = [engine.tokenizer.encode("maison")[:3], [], engine.tokenizer.encode("le livre vert")]
    out = engine.translate_ids(ids, TranslationOptions(beam_size=beam, nbest=beam), prefixes=forced)
    for prefix, hyps in zip(forced, out):
        assert all(h.tokens[: len(prefix)] == prefix and len(h.tokens) > len(prefix) - 1 for h in hyps)
    with pytest.raises(ValueError, match="prefix"):
        engine.translate_ids(ids[:1], opts, prefixes=[[engine.eos]])
    with pytest.raises(ValueError, match="prefixes for"):
        engine.translate_ids(ids, opts, prefixes=[[]])


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("beam", [1, 3])
def test_sentences_joining_a_running_batch_decode_as_alone(trained, bundles, name: str, beam: int) -> None:
    """Continuous batching: sentences that join a batch mid-decoding (their caches padded on the
    left, their sources padded to the batch) and leave it as they finish get the tokens they get
    in a batch of their own."""
    import random

    from attnserve.server.engine import BeamBatch, SearchItem

    engine = Engine(load_bundle(bundles[name]), "fp32", device="cpu")
    ids = engine.encode_texts(dev_sources(trained[name])[:40])
    opts = TranslationOptions(beam_size=beam, return_alignment=True)
    alone = engine.translate_ids(ids, opts, max_batch_sentences=1)
    batch, pending, results, rng, joined_late = BeamBatch(engine, beam, alignment=True), list(range(len(ids))), {}, random.Random(0), 0
    while pending or len(batch):
        if pending and rng.random() < 0.5:
            joined_late += len(batch) > 0
            count = rng.randint(1, 4)
            take, pending = pending[:count], pending[count:]
            batch.add([SearchItem(ids[i], opts, None, i) for i in take])
        for item, hyps in batch.step():
            assert item.tag not in results  # each sentence answered once
            results[item.tag] = hyps
    assert joined_late > 0 and sorted(results) == list(range(len(ids)))
    for i, hyps in enumerate(alone):
        assert results[i][0].tokens == hyps[0].tokens
        assert results[i][0].score == pytest.approx(hyps[0].score, abs=1e-4)
        assert len(results[i][0].alignment[0]) == len(ids[i])  # over this sentence's source only


def test_cancelled_sentences_leave_without_a_result(bundles) -> None:
    from attnserve.server.engine import BeamBatch, SearchItem

    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    ids = engine.encode_texts(["the red cat sees the dog", "the book likes the tree", "the old house"])
    batch = BeamBatch(engine, 2)
    batch.add([SearchItem(src, TranslationOptions(beam_size=2), None, i) for i, src in enumerate(ids)])
    batch.step()
    assert batch.cancel({1}) == 1 and len(batch) == 2
    done = {}
    while len(batch):
        done.update((item.tag, hyps) for item, hyps in batch.step())
    assert sorted(done) == [0, 2]


def test_a_long_running_batch_keeps_its_buffers_bounded(bundles) -> None:
    """Sentences of alternating lengths joining and leaving for many steps: the static buffers
    grow only with the rows in use and the cache only with the steps the rows need."""
    from attnserve.server.engine import BeamBatch, SearchItem

    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    short, long = engine.encode_texts(["the cat", "the old house has the big green car and the red book"])
    batch = BeamBatch(engine, 2)
    opts = TranslationOptions(beam_size=2, min_length=3, max_len_a=0, max_len_b=6)
    for i in range(120):
        batch.add([SearchItem(long if i % 2 else short, opts, None, i)])
        batch.step()
        if batch.state is not None:
            assert len(next(iter(batch.state.buffers.values()))) <= 2 * 2 * 8  # rows: at most ~7 sentences x 2 beams, doubled
            assert batch.state.past_width() <= 2 * 7 + 16 + 1
    while len(batch):
        batch.step()


def test_alignments_survive_the_batch_narrowing(bundles) -> None:
    """A long sentence leaves first: the batch's source buffers narrow to the short ones, and
    the alignments of those that stay keep their shape and their sum."""
    from attnserve.server.engine import BeamBatch, SearchItem

    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    long, short = engine.encode_texts(["the old house has the big green car and the red book and the tree", "the cat"])
    batch = BeamBatch(engine, 2, alignment=True)
    batch.add([SearchItem(long, TranslationOptions(beam_size=2, max_len_a=0, max_len_b=2, return_alignment=True), None, "long"),
               SearchItem(short, TranslationOptions(beam_size=2, min_length=6, max_len_a=0, max_len_b=8, return_alignment=True),
                          None, "short")])
    done, widths = {}, []
    while len(batch):
        done.update((item.tag, hyps) for item, hyps in batch.step())
        if batch.state is not None:
            widths.append(batch.state.source_width)
    assert widths[0] == len(long) and min(widths) == len(short)  # it did narrow while "short" went on
    for tag, src in (("long", long), ("short", short)):
        for row in done[tag][0].alignment:
            assert len(row) == len(src) and sum(row) == pytest.approx(1.0, abs=1e-4)


def test_rows_joining_a_state_with_no_previous_rows_start_fresh(bundles) -> None:
    """The step graph starts a joining row's cached keys/values as a copy of a previous row
    (the cache mask hides it), so a state with no previous rows cannot take joins through the
    graph: it starts fresh instead, and steps exactly as a state started with those rows."""
    import numpy as np

    from attnserve.server.state import DecoderState

    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    source = np.array(engine.encode_texts(["the red cat sees the dog"]), dtype=np.int64)
    rows = engine._encoded_rows(source, 2)
    joined = DecoderState(engine.layout, engine.runtime.to_device, {name: value[:0] for name, value in rows.items()}, 2)
    joined.join(rows)
    assert (joined.previous_rows, joined.zero_rows, joined.parent_rows.tolist()) == (2, 0, [0, 1])
    started = engine.start_state(source, 2)
    tokens = np.full(2, engine.bos, dtype=np.int64)
    for _ in range(3):
        got, want = (engine.decode_step(state, tokens, 4, None, False) for state in (joined, started))
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        tokens = want[1][:, 0].copy()


@pytest.mark.parametrize("spin_step", [False, True])
def test_only_the_step_session_may_spin(bundles, spin_step: bool) -> None:
    """spin_step lets the decoder-step session's workers spin between its runs; the encoder's
    never do (two spinning pools would fight over the cores), and the tokens do not change."""
    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu", threads=2, spin_step=spin_step)
    spinning = {name: session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
                for name, session in (("encoder", engine.runtime.encoder_session), ("step", engine.runtime.step_session))}
    assert spinning == {"encoder": "0", "step": "1" if spin_step else "0"}
    sleeping = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu", threads=2)
    ids = engine.encode_texts(["the red cat sees the dog", "the old house"])
    opts = TranslationOptions(beam_size=3)
    assert ([h[0].tokens for h in engine.translate_ids(ids, opts)]
            == [h[0].tokens for h in sleeping.translate_ids(ids, opts)])
