"""Sentence segmenter comparison for docs/text.md: accuracy and speed on catalog-style text.

    python -m attnserve.bench.segmenters [--tsv data/en-fr/test.tsv --tsv data/en-fr/dev.tsv]

Two gold sets:
- challenge: hand-written help/catalog paragraphs whose sentence boundaries are marked " ||| ",
  full of abbreviations, version numbers, file names, URLs, options and ellipses;
- catalog: paragraphs of 2-6 consecutive one-sentence catalog messages (source side of the
  held-out splits), joined by one space: the boundaries are where the messages meet.
Scores: boundary precision, recall and F1 (a boundary is the character offset where a sentence
starts), paragraphs wholly right, and characters per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

CHALLENGE = [
    "Install version 1.2.3 of the package. ||| Then restart the service.",
    "The file config.yaml could not be read. ||| Check its permissions.",
    "Open ~/.bashrc in an editor, e.g. nano or vim. ||| Save it and log in again.",
    "Loading... ||| Please wait.",
    "Copying files... 42% done.",
    "See https://example.org/docs/v2.0/index.html for details. ||| The manual is also in /usr/share/doc.",
    "Use -v for verbose output, i.e. more messages. ||| Use -q to silence them.",
    "GNU Make 4.3 was built for x86_64-pc-linux-gnu. ||| Report bugs to bug-make@gnu.org.",
    "Dr. Smith wrote this tool. ||| Thanks to Mr. Jones and Ms. Lee for testing.",
    "Are you sure? ||| All changes will be lost!",
    "Error: cannot open 'data.tar.gz' (No such file or directory). ||| Aborting.",
    "The value must be between 0.5 and 2.0. ||| The default is 1.0.",
    "Supported formats: PNG, JPEG, etc. ||| Other formats are converted first.",
    "Python 3.11 or later is required. ||| Run python3 -m pip install attnserve to install it.",
    "Press Ctrl+C to stop. ||| Press Enter to continue...",
    "Wait... ||| What happened?",
    "The option --max-len=256 sets the limit. ||| Longer sentences are split.",
    "Files ending in .po or .pot are gettext catalogs. ||| Others are read as text.",
    "Version 2.4.1 fixes bug no. 1234. ||| Upgrade soon.",
    "Saved as report.pdf (3.5 MB). ||| Open it now?",
    "Use %s to insert the name, e.g. \"Hello, %s.\" ||| The name is taken from the account.",
    "The approx. size is 10 MB. ||| It fits on one disk.",
    "Edit /etc/apt/sources.list. ||| Then run apt update.",
    "Click OK. ||| The dialog closes.",
    "This is beta software (v0.9.1-rc.2). ||| Use it at your own risk.",
    "Requires libfoo >= 1.2. ||| Build with make -j4.",
    "The U.S. keyboard layout is used by default. ||| Change it in Settings.",
    "Read the FAQ at www.example.com. ||| It answers most questions.",
    "Unknown error (code 0x1F). ||| Try again later.",
    "Select File > Save As... to save a copy. ||| The original stays unchanged.",
]


def challenge_set() -> list[tuple[str, list[int]]]:
    out = []
    for line in CHALLENGE:
        parts = line.split(" ||| ")
        text, starts, offset = " ".join(parts), [], 0
        for part in parts[1:]:
            offset += len(parts[len(starts)]) + 1
            starts.append(offset)
        out.append((text, starts))
    return out


ONE_SENTENCE = re.compile(r"^[A-Z][^\n\t]*[.!?]$")


def catalog_set(paths: list[Path], paragraphs: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """Paragraphs of consecutive one-sentence messages: messages that start with a capital, end
    with . ! or ?, and have no internal sentence end (". " before a capital) of their own."""
    messages = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            source = line.split("\t")[0].strip()
            if ONE_SENTENCE.match(source) and not re.search(r"[.!?] [A-Z]", source) and len(source.split()) >= 3:
                messages.append(source)
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        picked = rng.sample(messages, rng.randint(2, 6))
        text, starts = picked[0], []
        for message in picked[1:]:
            starts.append(len(text) + 1)
            text += " " + message
        out.append((text, starts))
    return out


def _starts_of(text: str, sentences: list[str]) -> list[int]:
    """Where each sentence after the first starts in text (segmenters may strip or keep spaces)."""
    starts, position = [], 0
    for i, sentence in enumerate(sentences):
        stripped = sentence.strip()
        if not stripped:
            continue
        found = text.find(stripped, position)
        if found < 0:
            found = position
        if starts or i:
            starts.append(found)
        position = found + len(stripped)
    return [s for s in starts if s > 0]


def candidates() -> dict[str, Callable[[str], list[str]]]:
    found: dict[str, Callable[[str], list[str]]] = {}
    if importlib.util.find_spec("sentencex"):
        from sentencex import segment

        found["sentencex"] = lambda text: list(segment("en", text))
    if importlib.util.find_spec("pysbd"):
        import pysbd

        segmenter = pysbd.Segmenter(language="en", clean=False)
        found["pysbd"] = segmenter.segment
    if importlib.util.find_spec("syntok"):
        import syntok.segmenter as syntok_segmenter

        def syntok_split(text: str) -> list[str]:
            sentences = []
            for paragraph in syntok_segmenter.analyze(text):
                for sentence in paragraph:
                    sentences.append("".join(token.spacing + token.value for token in sentence))
            return sentences

        found["syntok"] = syntok_split
    if importlib.util.find_spec("blingfire"):
        import blingfire

        found["blingfire"] = lambda text: blingfire.text_to_sentences(text).split("\n")
    if importlib.util.find_spec("nltk"):
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        punkt = PunktSentenceTokenizer()  # untrained: nltk's English model needs a download
        found["nltk-punkt (untrained)"] = punkt.tokenize
    if importlib.util.find_spec("sentence_splitter"):
        from sentence_splitter import SentenceSplitter

        moses = SentenceSplitter(language="en")
        found["sentence-splitter (Moses)"] = moses.split
    return found


def score(split: Callable[[str], list[str]], gold: list[tuple[str, list[int]]]) -> dict[str, float]:
    true_pos = predicted = expected = whole = 0
    characters = sum(len(text) for text, _ in gold)
    split(gold[0][0])  # warm-up: first calls load rules and compile regexes
    started = time.perf_counter()
    outputs = [split(text) for text, _ in gold]
    seconds = time.perf_counter() - started
    for (text, starts), sentences in zip(gold, outputs):
        found = set(_starts_of(text, sentences))
        true_pos += len(found & set(starts))
        predicted += len(found)
        expected += len(starts)
        whole += found == set(starts)
    precision = true_pos / predicted if predicted else 1.0
    recall = true_pos / expected if expected else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "whole": whole / len(gold),
            "chars_per_s": characters / seconds if seconds else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tsv", type=Path, action="append", help="held-out TSV splits (default data/en-fr test and dev)")
    parser.add_argument("--paragraphs", type=int, default=400)
    args = parser.parse_args(argv)
    paths = args.tsv or [Path("data/en-fr/test.tsv"), Path("data/en-fr/dev.tsv")]
    sets = {"challenge": challenge_set(), "catalog": catalog_set(paths, args.paragraphs)}
    from attnserve.server.text.segment import segment_sentences

    found = candidates()
    found["attnserve (sentencex + guards)"] = lambda text: [text[a:b] for a, b in segment_sentences(text)]
    print(f"{'segmenter':32s} " + "  ".join(f"{name:>38s}" for name in sets))
    print(f"{'':32s} " + "  ".join(f"{'P':>6s} {'R':>6s} {'F1':>6s} {'whole':>6s} {'kchar/s':>9s}" for _ in sets))
    for name, split in found.items():
        cells = []
        for gold in sets.values():
            s = score(split, gold)
            cells.append(f"{s['precision']:6.3f} {s['recall']:6.3f} {s['f1']:6.3f} {s['whole']:6.3f} {s['chars_per_s'] / 1000:9.0f}")
        print(f"{name:32s} " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
