"""End-to-end memory networks on the bAbI-style generator: the generator is deterministic, its
answers follow from the story (re-simulated here from the text alone) and from the supporting facts
alone, supporting facts name the entity, attention is a distribution over the valid memories with
exactly 0 on padding, and MemN2N fits a tiny set; the CLI writes its JSON and figure."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attnserve.model.research.babi import MEMORY, Question, generate, load
from attnserve.model.research.memn2n import (
    LSTMBaseline, MemN2N, RunConfig, Vocab, encode, evaluate_memn2n, main, memory_batch, position_encoding,
    sequence_batch, train_memn2n,
)

torch.set_num_threads(1)

TASK_IDS = (1, 2, 3, 6, 11)
# The test's own reading of the sentences (not the generator's tables).
MOVE_VERBS = {"went to", "journeyed to", "travelled to", "moved to", "went back to"}
GET_VERBS = {"got", "picked up", "took", "grabbed"}
DROP_VERBS = {"dropped", "put down", "discarded"}
NAMED = re.compile(r"^([A-Z][a-z]+) (.+) the ([a-z]+)( there)?\.$")
PRONOUN = re.compile(r"^(Then|After that|Afterwards|Following that) (he|she) (.+) the ([a-z]+)\.$")
GENDER = {"Mary": "she", "Sandra": "she", "John": "he", "Daniel": "he"}


class Sim:
    """Re-simulates a story from its text: people's places, holders, objects' places and trails."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict  # full story: every action must be consistent with the world
        self.loc: dict[str, str] = {}
        self.holder: dict[str, str] = {}
        self.obj: dict[str, str] = {}
        self.trail: dict[str, list[str]] = {}
        self.last_subject: str | None = None

    def _obj_at(self, o: str, place: str) -> None:
        self.obj[o] = place
        trail = self.trail.setdefault(o, [])
        if not trail or trail[-1] != place:
            trail.append(place)

    def read(self, sentence: str) -> None:
        if m := PRONOUN.match(sentence):
            who = self.last_subject
            assert who is not None and GENDER[who] == m[2], sentence
            verb, what = m[3], m[4]
        else:
            m = NAMED.match(sentence)
            assert m, sentence
            who, verb, what = m[1], m[2], m[3]
        self.last_subject = who
        if verb in MOVE_VERBS:
            if self.strict:
                assert self.loc.get(who) != what, f"{sentence}: already there"
            self.loc[who] = what
            for o, p in self.holder.items():
                if p == who:
                    self._obj_at(o, what)
        elif verb in GET_VERBS:
            if self.strict:
                assert who in self.loc and what not in self.holder, sentence
                assert self.obj.get(what, self.loc[who]) == self.loc[who], f"{sentence}: the {what} is elsewhere"
            self.holder[what] = who
            if who in self.loc:
                self._obj_at(what, self.loc[who])
        elif verb in DROP_VERBS:
            if self.strict:
                assert self.holder.get(what) == who, sentence
            self.holder.pop(what, None)
            if who in self.loc:
                self._obj_at(what, self.loc[who])
        else:
            raise AssertionError(f"unknown verb in {sentence!r}")

    def answer(self, question: str) -> str:
        if m := re.match(r"^Where is ([A-Z][a-z]+)\?$", question):
            return self.loc[m[1]]
        if m := re.match(r"^Where is the ([a-z]+)\?$", question):
            o = m[1]
            return self.loc[self.holder[o]] if o in self.holder else self.obj[o]
        if m := re.match(r"^Where was the ([a-z]+) before the ([a-z]+)\?$", question):
            trail = self.trail[m[1]]
            if self.strict:
                assert trail.count(m[2]) == 1, f"{question} is ambiguous: {trail}"
            i = len(trail) - 1 - trail[::-1].index(m[2])
            assert i > 0, question
            return trail[i - 1]
        if m := re.match(r"^Is ([A-Z][a-z]+) in the ([a-z]+)\?$", question):
            return "yes" if self.loc[m[1]] == m[2] else "no"
        raise AssertionError(f"unknown question {question!r}")


def words(sentence: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", sentence)


def simulate(sentences: tuple[str, ...], question: str, strict: bool) -> str:
    sim = Sim(strict)
    for s in sentences:
        sim.read(s)
    return sim.answer(question)


@pytest.fixture(scope="module")
def questions() -> dict[int, list[Question]]:
    return {t: generate(t, 400, seed=5, split="train") for t in TASK_IDS}


def test_generator_is_deterministic_per_seed_and_prefix_stable() -> None:
    for t in TASK_IDS:
        a, b = generate(t, 150, seed=3), generate(t, 150, seed=3)
        assert a == b
        assert a != generate(t, 150, seed=4)
        assert a != generate(t, 150, seed=3, split="test")
        assert generate(t, 60, seed=3) == a[:60]  # the 1k set is the start of the 10k one
    data = load(2, "1k")
    assert len(data["train"]) == 1000 and len(data["test"]) == 1000
    assert len(generate(1, 10000, 0)) == 10000


def test_every_answer_follows_from_its_story(questions) -> None:
    for t, qs in questions.items():
        for q in qs:
            assert simulate(q.story, q.question, strict=True) == q.answer, (t, q)
        if t == 6:
            assert 0.4 < np.mean([q.answer == "yes" for q in qs]) < 0.6


def test_answer_follows_from_the_supporting_facts_alone(questions) -> None:
    expected = {1: {1}, 2: {2}, 3: {3}, 6: {1}, 11: {1, 2}}
    for t, qs in questions.items():
        assert {len(q.support) for q in qs} <= expected[t]
        for q in qs:
            facts = tuple(q.story[i] for i in q.support)
            if t == 6:
                # the one fact says where the person is; the answer is whether that is the place asked
                m = re.match(r"^Is ([A-Z][a-z]+) in the ([a-z]+)\?$", q.question)
                assert (simulate(facts, f"Where is {m[1]}?", strict=False) == m[2]) == (q.answer == "yes")
            else:
                assert simulate(facts, q.question, strict=False) == q.answer, (t, q.question, facts)
    assert any(len(q.support) == 2 for q in questions[11])  # coreference: antecedent + pronoun sentence


def test_supporting_facts_mention_the_entity(questions) -> None:
    for t, qs in questions.items():
        for q in qs:
            facts = [words(q.story[i]) for i in q.support]
            if t in (1, 6, 11):
                person = re.match(r"^(?:Where is|Is) ([A-Z][a-z]+)", q.question)[1]
                for i in q.support:
                    s = q.story[i]
                    if person not in words(s):
                        # a pronoun sentence: the sentence before it names the person and also supports
                        assert t == 11 and PRONOUN.match(s) and GENDER[person] in words(s), (q, s)
                        assert i - 1 in q.support and q.story[i - 1].startswith(person), q
            else:
                obj = re.match(r"^Where (?:is|was) the ([a-z]+)", q.question)[1]
                assert any(obj in f for f in facts), q
                handlers = {f[0] for f in facts if obj in f}
                assert all(obj in f or f[0] in handlers for f in facts), (q, facts)


def test_memory_is_the_last_50_sentences_and_holds_the_support() -> None:
    qs = generate(3, 400, seed=1)
    assert max(len(q.story) for q in qs) > MEMORY  # long stories exist ...
    for q in qs:
        sentences, support = q.memory()
        assert len(sentences) == min(MEMORY, len(q.story)) and sentences == q.story[-len(sentences):]
        assert len(support) == len(q.support)  # ... but the supporting facts are always in memory
        assert [sentences[i] for i in support] == [q.story[i] for i in q.support]


def _random_batch(n_mems=(2, 3, 7, 5), seed=0):
    qs = [q for q in generate(2, 300, seed=seed) if len(q.memory()[0]) in n_mems]
    picked = [next(q for q in qs if len(q.memory()[0]) == n) for n in n_mems]
    vocab = Vocab.of(picked)
    return encode(picked, vocab), vocab


@pytest.mark.parametrize("tying", ["adjacent", "layerwise"])
def test_attention_sums_to_one_over_valid_memories_and_is_zero_on_padding(tying) -> None:
    torch.manual_seed(0)
    data, vocab = _random_batch()
    model = MemN2N(len(vocab), dim=20, hops=3, max_words=16, tying=tying)
    idx = np.arange(len(data))
    batch = memory_batch(data, idx, rn=0.1, rng=np.random.default_rng(0))
    logits, attention = model(**batch)
    assert logits.shape == (len(data), len(vocab)) and len(attention) == 3
    mask = batch["mask"]
    assert mask.sum(1).tolist() == [2, 3, 7, 5]
    for p in attention:
        assert torch.allclose((p * mask).sum(1), torch.ones(len(data)), atol=1e-6)
        assert (p[~mask] == 0).all()
        assert (p[mask] > 0).all()
    # more padding changes nothing; linear start (no softmax) also leaves padding at exactly 0
    wide = {k: v.clone() for k, v in batch.items()}
    pad = 4
    wide["stories"] = torch.cat([batch["stories"], torch.zeros(len(data), pad, batch["stories"].shape[-1], dtype=torch.long)], 1)
    wide["lengths"] = torch.cat([batch["lengths"], torch.zeros(len(data), pad, dtype=torch.long)], 1)
    wide["time"] = torch.cat([batch["time"], torch.full((len(data), pad), 9)], 1)
    wide["mask"] = torch.cat([mask, torch.zeros(len(data), pad, dtype=torch.bool)], 1)
    logits_wide, _ = model(**wide)
    assert torch.allclose(logits, logits_wide, atol=1e-5)
    model.softmax = False
    _, linear = model(**wide)
    for p in linear:
        assert (p[~wide["mask"]] == 0).all()


def test_the_optional_null_memory_is_a_sink_that_adds_nothing() -> None:
    torch.manual_seed(0)
    data, vocab = _random_batch()
    model = MemN2N(len(vocab), dim=20, hops=2, max_words=16, null_memory=True)
    batch = memory_batch(data, np.arange(len(data)))
    _, attention = model(**batch)
    mask = torch.cat([batch["mask"], torch.ones(len(data), 1, dtype=torch.bool)], 1)
    for p in attention:
        assert p.shape == mask.shape and torch.allclose(p.sum(1), torch.ones(len(data)), atol=1e-6)
        assert (p[~mask] == 0).all() and (p[:, -1] > 0).all()


def test_random_noise_only_shifts_time_of_older_memories() -> None:
    data, _ = _random_batch()
    idx = np.arange(len(data))
    plain = memory_batch(data, idx)
    times = [memory_batch(data, idx, rn=0.1, rng=np.random.default_rng(s))["time"] for s in range(30)]
    for t in times:
        for b, n in enumerate(data.n_mem):
            row = t[b, :n]
            assert (row[1:] > row[:-1]).all() and row[-1] <= n - 1 + int(np.ceil(0.1 * n))  # order kept, <= 10% blanks
    assert any((t != plain["time"]).any() for t in times)


def test_position_encoding_follows_the_paper_and_sees_word_order() -> None:
    pe = position_encoding(5, 4)
    J, d = 3, 4
    for j in range(1, J + 1):
        for k in range(1, d + 1):
            assert pe[J, j - 1, k - 1].item() == pytest.approx((1 - j / J) - (k / d) * (1 - 2 * j / J))
    assert (pe[J, J:] == 0).all()
    torch.manual_seed(0)
    words = torch.tensor([[3, 4, 5], [5, 4, 3]])
    lengths = torch.tensor([3, 3])
    with_pe, bow = MemN2N(8, 6, pe=True), MemN2N(8, 6, pe=False)
    a = with_pe.embed(with_pe.emb[0], words, lengths)
    assert not torch.allclose(a[0], a[1])
    b = bow.embed(bow.emb[0], words, lengths)
    assert torch.allclose(b[0], b[1])


def test_weight_tying() -> None:
    adj = MemN2N(10, 8, hops=3, tying="adjacent")
    assert len(adj.emb) == 4 and adj.answer_weight() is adj.emb[3].weight and adj.H is None
    assert all(adj._A(k + 1) is adj._C(k) for k in range(2))
    assert all(adj._TA(k + 1) is adj._TC(k) for k in range(2))
    lw = MemN2N(10, 8, hops=3, tying="layerwise")
    assert all(lw._A(k) is lw._A(0) and lw._C(k) is lw._C(0) for k in range(3)) and lw.H is not None
    assert lw.answer_weight() is not lw._C(2).weight
    assert (adj.emb[0].weight[0] == 0).all()  # the null word embeds to zero


def test_memn2n_fits_a_tiny_task1_set() -> None:
    qs = generate(1, 50, seed=11)
    vocab = Vocab.of(qs)
    data = encode(qs, vocab)
    start = time.process_time()  # CPU time: the wall clock depends on what else the machine runs
    cfg = RunConfig(epochs=100, ls_epochs=5, decay_every=10**6)  # 2 batches an epoch: no annealing
    model, _ = train_memn2n(data, data, vocab, cfg, seed=0, log=lambda *a: None)
    assert time.process_time() - start < 10
    assert evaluate_memn2n(model, data)["accuracy"] > 0.9


def test_lstm_ignores_padding() -> None:
    torch.manual_seed(0)
    qs = generate(1, 20, seed=2)
    data = encode(qs, Vocab.of(qs))
    model = LSTMBaseline(40, 8, 12).eval()
    idx = np.arange(len(data))
    together = model(**sequence_batch(data, idx))
    for n in (0, 7):
        alone = model(**sequence_batch(data, np.array([n])))
        assert torch.allclose(together[n], alone[0], atol=1e-5)


def test_cli_table_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    assert main(["table", "--tasks", "1", "--epochs", "1", "--ls-epochs", "1", "--lstm-epochs", "1", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert [r["model"] for r in table["rows"]] == ["memn2n", "lstm"]
    mem = table["rows"][0]
    assert 0 <= mem["test_accuracy"] <= 1 and mem["n_train"] == 900 and mem["n_test"] == 1000
    assert set(mem["supporting_fact_rate"]) == {"hop1", "hop2", "hop3", "any", "all"}
    ex = mem["examples"][0]
    assert len(ex["attention"]) == 3 and all(len(h) == len(ex["story"]) for h in ex["attention"])
    assert all(abs(sum(h) - 1) < 1e-5 for h in ex["attention"])
    png = main(["figure", "--table", str(out), "--tasks", "1", "--out", str(tmp_path / "hops.png")])
    assert png == 0 and 0 < (tmp_path / "hops.png").stat().st_size < 200_000
