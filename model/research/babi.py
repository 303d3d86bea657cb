"""A bAbI-style question-answering generator (after Weston et al. 2015, "Towards AI-Complete
Question Answering: A Set of Prerequisite Toy Tasks"), since the original data cannot be
downloaded here.

A small simulated world: four people, three objects and six places. People go/journey/travel/move
to places; they get/pick up/take/grab an object that lies where they are ("... there"), carry it
as they move, and drop/put down/discard it. The world state is tracked as the story unfolds, and
every fact that establishes a piece of state is remembered, so each question records its answer
and the indices of its supporting facts. Five of the twenty tasks, phrased like Weston et al.'s:

  1  single supporting fact   "Mary went to the bathroom. ... Where is Mary?"            (1 fact)
  2  two supporting facts     "Where is the football?" (who took it + where they went)  (2 facts)
  3  three supporting facts   "Where was the apple before the kitchen?"                 (3 facts)
  6  yes/no questions         "Is John in the playground?"-style, about places          (1 fact)
  11 basic coreference        "Daniel went to the kitchen. Afterwards he journeyed to
                               the office. Where is Daniel?"  (antecedent + pronoun)     (1-2 facts)

As in bAbI, a story holds several questions; a question's `story` is every statement before it
(questions are not statements) and its memory is the most recent `MEMORY` = 50 of them, as in
Sukhbaatar et al. 2015. Questions are only asked when their supporting facts lie inside that
window. Sizes follow bAbI: 1k or 10k training questions per task, 1k test questions. Everything
is a pure function of (task, split, seed); the 1k training set is the first 1000 questions of
the 10k one (a story is cut where the count is reached).

This is not the original bAbI: vocabulary, story lengths and question schedules differ, so
accuracies are comparable with the papers' in spirit only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PRONOUN = {"Mary": "she", "Sandra": "she", "John": "he", "Daniel": "he"}
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVES = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
GETS = ("got", "picked up", "took", "grabbed")
DROPS = ("dropped", "put down", "discarded")
THEN = ("Then", "After that", "Afterwards", "Following that")

TASKS = {
    1: "single-supporting-fact",
    2: "two-supporting-facts",
    3: "three-supporting-facts",
    6: "yes-no-questions",
    11: "basic-coreference",
}
SIZES = {"1k": 1000, "10k": 10000}
TEST_SIZE = 1000
MEMORY = 50  # memory = the most recent 50 sentences (Sukhbaatar et al. 2015, section 4)
QUESTIONS_PER_STORY = 5


@dataclass(frozen=True)
class Question:
    task: int
    story_id: int
    story: tuple[str, ...]  # every statement of the story before the question, oldest first
    question: str
    answer: str
    support: tuple[int, ...]  # indices into `story` of the supporting facts, ascending

    def memory(self, limit: int = MEMORY) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The most recent `limit` sentences and the supporting facts' indices among them."""
        start = max(0, len(self.story) - limit)
        return self.story[start:], tuple(i - start for i in self.support if i >= start)


def tokens(sentence: str) -> list[str]:
    """Lower-cased words, punctuation dropped: "Where is Mary?" -> ["where", "is", "mary"]."""
    return re.findall(r"[a-z]+", sentence.lower())


class World:
    """People's places, objects' holders and places, and the facts that established each."""

    def __init__(self) -> None:
        self.place: dict[str, str] = {}  # person -> place
        self.moved_at: dict[str, int] = {}  # person -> index of the sentence that put them there
        self.holder: dict[str, str] = {}  # object -> person carrying it
        self.picked_at: dict[str, int] = {}  # object -> index of its pick-up
        self.at: dict[str, tuple[str, tuple[int, ...]]] = {}  # object -> (place, supporting facts)
        # object -> the places it stayed at, in order: (place, facts that brought it there, latest facts that it
        # was still there)
        self.trail: dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...]]]] = {o: [] for o in OBJECTS}

    def move(self, person: str, place: str, i: int) -> None:
        self.place[person], self.moved_at[person] = place, i
        for obj in OBJECTS:
            if self.holder.get(obj) == person:
                self._locate(obj, place, (self.picked_at[obj], i))

    def can_get(self, person: str, obj: str) -> bool:
        return person in self.place and obj not in self.holder and (obj not in self.at or self.at[obj][0] == self.place[person])

    def get(self, person: str, obj: str, i: int) -> None:
        assert self.can_get(person, obj)
        self.holder[obj], self.picked_at[obj] = person, i
        self._locate(obj, self.place[person], (self.moved_at[person], i))

    def drop(self, person: str, obj: str, i: int) -> None:
        assert self.holder.get(obj) == person
        del self.holder[obj]
        self.at[obj] = (self.place[person], (self.moved_at[person], i))

    def _locate(self, obj: str, place: str, support: tuple[int, ...]) -> None:
        support = tuple(sorted(support))
        self.at[obj] = (place, support)
        trail = self.trail[obj]
        if trail and trail[-1][0] == place:
            trail[-1] = (place, trail[-1][1], support)  # same stay: keep how it came, update the latest evidence
        else:
            trail.append((place, support, support))


class _Story:
    def __init__(self, task: int, story_id: int, rng: random.Random) -> None:
        self.task, self.story_id, self.rng = task, story_id, rng
        self.world = World()
        self.facts: list[str] = []
        self.questions: list[Question] = []

    def say(self, sentence: str) -> int:
        self.facts.append(sentence)
        return len(self.facts) - 1

    def ask(self, question: str, answer: str, support: tuple[int, ...]) -> None:
        support = tuple(sorted(set(support)))
        assert support and min(support) >= len(self.facts) - MEMORY
        self.questions.append(Question(self.task, self.story_id, tuple(self.facts), question, answer, support))

    def in_window(self, support: tuple[int, ...]) -> bool:
        return min(support) >= len(self.facts) - MEMORY

    def move(self, person: str | None = None, pronoun: bool = False) -> str:
        rng, w = self.rng, self.world
        person = person or rng.choice(PEOPLE)
        place = rng.choice([p for p in PLACES if p != w.place.get(person)])
        verb = rng.choice(MOVES)
        if pronoun:
            sentence = f"{rng.choice(THEN)} {PRONOUN[person]} {verb} the {place}."
        else:
            sentence = f"{person} {verb} the {place}."
        w.move(person, place, len(self.facts))
        self.say(sentence)
        return person

    def act(self, p_get: float, p_drop: float, carry: float) -> None:
        """One random action that keeps the world consistent."""
        rng, w = self.rng, self.world
        gets = [(p, o) for p in PEOPLE for o in OBJECTS if w.can_get(p, o)]
        drops = [(w.holder[o], o) for o in OBJECTS if o in w.holder]
        r = rng.random()
        if gets and r < p_get:
            person, obj = rng.choice(gets)
            w.get(person, obj, len(self.facts))
            self.say(f"{person} {rng.choice(GETS)} the {obj} there.")
        elif drops and r < p_get + p_drop:
            person, obj = rng.choice(drops)
            w.drop(person, obj, len(self.facts))
            self.say(f"{person} {rng.choice(DROPS)} the {obj}.")
        else:
            holders = sorted(set(w.holder.values()))
            self.move(rng.choice(holders) if holders and rng.random() < carry else None)


def _task1(s: _Story) -> None:
    for _ in range(QUESTIONS_PER_STORY):
        s.move(), s.move()
        person = s.rng.choice(sorted(s.world.place))
        s.ask(f"Where is {person}?", s.world.place[person], (s.world.moved_at[person],))


def _task6(s: _Story) -> None:
    rng, w = s.rng, s.world
    for _ in range(QUESTIONS_PER_STORY):
        for _ in range(2):
            if w.place and rng.random() < 0.25:
                s.act(p_get=0.6, p_drop=0.4, carry=0.0)  # object facts as distractors
            else:
                s.move()
        person = rng.choice(sorted(w.place))
        truth = rng.random() < 0.5
        place = w.place[person] if truth else rng.choice([p for p in PLACES if p != w.place[person]])
        s.ask(f"Is {person} in the {place}?", "yes" if truth else "no", (w.moved_at[person],))


def _task11(s: _Story) -> None:
    rng, w = s.rng, s.world
    support: dict[str, tuple[int, ...]] = {}
    for _ in range(QUESTIONS_PER_STORY):
        subject = s.move()
        support[subject] = (len(s.facts) - 1,)
        if rng.random() < 0.8:  # "Afterwards he journeyed to the office."
            s.move(subject, pronoun=True)
            support[subject] = (len(s.facts) - 2, len(s.facts) - 1)  # antecedent + pronoun sentence
        else:
            other = s.move(rng.choice([p for p in PEOPLE if p != subject]))
            support[other] = (len(s.facts) - 1,)
        person = subject if rng.random() < 0.6 else rng.choice(sorted(w.place))
        s.ask(f"Where is {person}?", w.place[person], support[person])


def _task2(s: _Story) -> None:
    rng, w = s.rng, s.world
    gap = rng.randint(2, 5)
    since = 0
    while len(s.questions) < QUESTIONS_PER_STORY and len(s.facts) < 60:
        s.act(p_get=0.25, p_drop=0.15, carry=0.5)
        since += 1
        known = [o for o in OBJECTS if o in w.at and s.in_window(w.at[o][1])]
        if since >= gap and known:
            obj = rng.choice(known)
            s.ask(f"Where is the {obj}?", *w.at[obj])
            since, gap = 0, rng.randint(2, 5)


def _task3(s: _Story) -> None:
    rng, w = s.rng, s.world
    gap = rng.randint(3, 8)
    since = 0
    asked: set[tuple[str, str]] = set()
    while len(s.questions) < QUESTIONS_PER_STORY and len(s.facts) < 150:
        s.act(p_get=0.2, p_drop=0.1, carry=0.7)
        since += 1
        if since < gap:
            continue
        candidates = []
        for obj in OBJECTS:
            trail = w.trail[obj]
            places = [place for place, _, _ in trail]
            for i in range(1, len(trail)):
                place = trail[i][0]
                # it was at trail[i-1] (the latest evidence there) and then came to `place` (how it came)
                support = tuple(sorted(set(trail[i - 1][2]) | set(trail[i][1])))
                if places.count(place) == 1 and (obj, place) not in asked and s.in_window(support):
                    candidates.append((obj, place, trail[i - 1][0], support))
        if candidates:
            obj, place, before, support = rng.choice(candidates)
            asked.add((obj, place))
            s.ask(f"Where was the {obj} before the {place}?", before, support)
            since, gap = 0, rng.randint(3, 8)


_BUILDERS = {1: _task1, 2: _task2, 3: _task3, 6: _task6, 11: _task11}


def generate(task: int, n: int, seed: int = 0, split: str = "train") -> list[Question]:
    """`n` questions of `task`, story after story; a pure function of (task, split, seed)."""
    if task not in _BUILDERS:
        raise ValueError(f"task {task} is not generated; choose one of {sorted(_BUILDERS)}")
    rng = random.Random(f"attnserve-babi/{task}/{split}/{seed}")
    out: list[Question] = []
    story_id = 0
    while len(out) < n:
        story = _Story(task, story_id, rng)
        _BUILDERS[task](story)
        out += story.questions[: n - len(out)]
        story_id += 1
    return out


def load(task: int, size: str = "1k", seed: int = 0) -> dict[str, list[Question]]:
    """bAbI's sizes: {"train": 1k or 10k questions, "test": 1k questions}."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {sorted(SIZES)}")
    return {"train": generate(task, SIZES[size], seed, "train"), "test": generate(task, TEST_SIZE, seed, "test")}


def to_babi_text(questions: list[Question]) -> str:
    """bAbI's file format: numbered lines per story, "question<TAB>answer<TAB>support line numbers"."""
    lines: list[str] = []
    story_id, said, line_of = None, 0, {}
    for q in questions:
        if q.story_id != story_id:
            story_id, said, line_of, number = q.story_id, 0, {}, 0
        for i in range(said, len(q.story)):
            number += 1
            line_of[i] = number
            lines.append(f"{number} {q.story[i]}")
        said = len(q.story)
        number += 1
        lines.append(f"{number} {q.question}\t{q.answer}\t{' '.join(str(line_of[i]) for i in q.support)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    task = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    sys.stdout.write(to_babi_text(generate(task, 10, 0, "train")))
