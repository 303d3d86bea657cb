"""Measurements of the text pipeline for docs/text.md, on held-out data (sentences the model
never saw in training: the corpus's dev and test splits, or out-of-domain ood-*.tsv files).

    python -m attnserve.bench.text_eval --model models/repository/en-fr/1 [--test data/en-fr/test.tsv] [--dev data/en-fr/dev.tsv]

- placeholders: held-out messages with placeholders; share whose every placeholder comes back
  exactly as often, raw model vs the pipeline (and how often the pipeline had to project one);
- markup: held-out sentences with inline tags put around random word spans (nested, with
  attributes and void tags), and the held-out messages that have markup: well-formed and
  every tag kept, raw model (tags fed to it) vs the pipeline;
- documents: paragraphs of 3-6 held-out sentences: chrF against the joined references, the
  whole paragraph as one model input vs segmented, and exact whitespace;
- confidence: weights fitted on dev (logistic regression, target chrF >= 50), then on test:
  Spearman correlation with sentence chrF, and the share of bad sentences (chrF < 30) caught
  below a threshold.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np


def load(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")[:2]) for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line]


def chrf(hypothesis: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(hypothesis, [reference]).score


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def wrap_random(sentence: str, rng: random.Random) -> str:
    """Inline markup around random word spans: a nested pair, a link with attributes, a void tag."""
    words = sentence.split(" ")
    if len(words) < 4:
        return f"<b>{sentence}</b>"
    i = rng.randrange(0, len(words) - 2)
    j = rng.randrange(i + 1, min(len(words), i + 4))
    style = rng.choice(["b", "i", "nested", "a", "br"])
    if style == "nested":
        inner = words[i:j]
        inner[0] = "<i>" + inner[0]
        inner[-1] += "</i>"
        words[i:j] = ["<b>" + " ".join(inner) + "</b>"]
    elif style == "a":
        words[i:j] = ['<a href="https://example.org/help" class="x">' + " ".join(words[i:j]) + "</a>"]
    elif style == "br":
        words.insert(i + 1, "<br/>")
    else:
        words[i:j] = [f"<{style}>" + " ".join(words[i:j]) + f"</{style}>"]
    return " ".join(words)


def tags_of(text: str) -> Counter:
    return Counter(re.findall(r"<[^>]+>", text))


def main(argv: list[str] | None = None) -> int:
    from attnserve.server.bundle import load_bundle
    from attnserve.server.engine import Engine, TranslationOptions
    from attnserve.server.text import TextFormat, TextItem, TextPipeline, engine_translator
    from attnserve.server.text.confidence import ConfidenceWeights, Signals
    from attnserve.server.text.markup import MarkupError, check_well_formed
    from attnserve.server.text.protect import find_protected

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/repository/en-fr/1")
    parser.add_argument("--test", type=Path, default=Path("data/en-fr/test.tsv"))
    parser.add_argument("--dev", type=Path, default=Path("data/en-fr/dev.tsv"))
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="at most this many sentences per set (0: all)")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    engine = Engine(load_bundle(args.model), "fp32", device="cpu", threads=args.threads)
    pipeline = TextPipeline.for_engine(engine)
    options = TranslationOptions(beam_size=args.beam)
    translate = engine_translator(engine, options)
    rng = random.Random(13)
    test, dev = load(args.test), load(args.dev)
    if args.limit:
        test, dev = test[: args.limit], dev[: args.limit]
    numbers: dict[str, object] = {"model": args.model, "test": str(args.test), "dev": str(args.dev), "beam": args.beam}
    kinds = ("printf", "brace", "qt", "variable", "url", "email", "path", "option")

    # -- placeholders --
    started = time.perf_counter()
    with_placeholders = [(s, r) for s, r in test if find_protected(s, kinds) and "<" not in s]
    raw = engine.translate_text([s for s, _ in with_placeholders], options)
    piped = pipeline.translate([TextItem(s) for s, _ in with_placeholders], translate)

    def kept(source: str, output: str) -> bool:
        expected = Counter(p.text for p in find_protected(source, kinds))
        return all(output.count(text) >= count for text, count in expected.items())

    numbers["placeholders"] = {
        "messages": len(with_placeholders),
        "raw_kept": sum(kept(s, o) for (s, _), o in zip(with_placeholders, raw)) / len(with_placeholders),
        "pipeline_kept": sum(kept(s, r.text) for (s, _), r in zip(with_placeholders, piped)) / len(with_placeholders),
        "pipeline_projected": sum(any(f.startswith("placeholder_projected") for f in r.flags) for r in piped) / len(piped),
        "raw_chrf": float(np.mean([chrf(o, ref) for (_, ref), o in zip(with_placeholders, raw)])),
        "pipeline_chrf": float(np.mean([chrf(r.text, ref) for (_, ref), r in zip(with_placeholders, piped)])),
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(numbers["placeholders"]), flush=True)

    # -- markup --
    plain = [(s, r) for s, r in test if "<" not in s and "&" not in s and len(s.split()) >= 3]
    rng.shuffle(plain)
    synthetic = [wrap_random(s, rng) for s, _ in plain[:300]]
    native = [s for s, _ in test if re.search(r"<(b|i|a|big|small|span|tt)\b[^>]*>", s)]
    sets = {"synthetic": synthetic, "catalog": native}
    numbers["markup"] = {}
    for name, sources in sets.items():
        valid = []
        for s in sources:
            try:
                check_well_formed(s)
                valid.append(s)
            except MarkupError:
                pass
        if not valid:
            continue
        raw = engine.translate_text(valid, options)
        piped = pipeline.translate([TextItem(s, TextFormat.HTML) for s in valid], translate)

        def good(source: str, output: str) -> tuple[bool, bool]:
            try:
                check_well_formed(output)
                formed = True
            except MarkupError:
                formed = False
            return formed, formed and tags_of(output) == tags_of(source)

        raw_scores = [good(s, o) for s, o in zip(valid, raw)]
        piped_scores = [good(s, r.text) for s, r in zip(valid, piped)]
        numbers["markup"][name] = {
            "messages": len(valid),
            "raw_well_formed": sum(f for f, _ in raw_scores) / len(valid), "raw_tags_kept": sum(k for _, k in raw_scores) / len(valid),
            "pipeline_well_formed": sum(f for f, _ in piped_scores) / len(valid),
            "pipeline_tags_kept": sum(k for _, k in piped_scores) / len(valid),
            "pipeline_reordered": sum("markup_reordered" in r.flags for r in piped) / len(valid),
        }
        print(name, json.dumps(numbers["markup"][name]), flush=True)

    # -- documents --
    sentences = [(s, r) for s, r in test if re.match(r"^[A-Z].*[.!?]$", s) and not re.search(r"[.!?] [A-Z]", s)]
    rng.shuffle(sentences)
    paragraphs, position = [], 0
    while position < len(sentences) and len(paragraphs) < 60:
        size = rng.randint(3, 6)
        paragraphs.append(sentences[position:position + size])
        position += size
    sources = [" ".join(s for s, _ in p) for p in paragraphs]
    references = [" ".join(r for _, r in p) for p in paragraphs]
    raw = engine.translate_text(sources, options)
    piped = pipeline.translate([TextItem(s, TextFormat.DOCUMENT) for s in sources], translate)
    numbers["documents"] = {
        "paragraphs": len(paragraphs), "sentences": sum(len(p) for p in paragraphs),
        "raw_chrf": float(np.mean([chrf(o, ref) for o, ref in zip(raw, references)])),
        "pipeline_chrf": float(np.mean([chrf(r.text, ref) for r, ref in zip(piped, references)])),
        "segments_right": sum(len(r.segments) == len(p) for r, p in zip(piped, paragraphs)) / len(paragraphs),
        "raw_length_ratio": float(np.mean([len(o) / len(ref) for o, ref in zip(raw, references)])),
        "pipeline_length_ratio": float(np.mean([len(r.text) / len(ref) for r, ref in zip(piped, references)])),
    }
    print(json.dumps(numbers["documents"]), flush=True)

    # -- confidence --
    def signals_and_chrf(rows: list[tuple[str, str]]):
        plan = pipeline.prepare([TextItem(s) for s, _ in rows])
        hypotheses = translate(plan.sources)
        results = pipeline.finish(plan, hypotheses)
        features, scores, confidences = [], [], []
        for (source, reference), result in zip(rows, results):
            if not result.segments:
                continue
            scores.append(chrf(result.text, reference))
            confidences.append(result.confidence)
            features.append(result)
        return features, scores, confidences

    # Signals are internal to the pipeline; capture them by wrapping confidence().
    import attnserve.server.text.pipeline as pipeline_module

    captured: list[Signals] = []
    original = pipeline_module.confidence

    def capture(signals, weights=ConfidenceWeights()):
        captured.append(signals)
        return original(signals, weights)

    pipeline_module.confidence = capture
    dev_rows = [(s, r) for s, r in dev]
    captured.clear()
    _, dev_chrf, _ = signals_and_chrf(dev_rows)
    dev_x = np.array([s.features() for s in captured[: len(dev_chrf)]])
    dev_y = (np.array(dev_chrf) >= 50).astype(float)
    weights = fit_logistic(dev_x, dev_y)
    fitted = ConfidenceWeights(bias=weights[0], log_prob=weights[1], coverage=weights[2], repetition=weights[3],
                               problems=weights[4])
    captured.clear()
    _, test_chrf, _ = signals_and_chrf(test)
    pipeline_module.confidence = original
    test_x = np.array([s.features() for s in captured[: len(test_chrf)]])
    conf_default = [original(Signals(*row[:3], int(row[3]))) for row in test_x]
    conf_fitted = [original(Signals(*row[:3], int(row[3])), fitted) for row in test_x]
    bad = np.array(test_chrf) < 30
    numbers["confidence"] = {
        "fitted_weights": dataclass_dict(fitted), "dev_sentences": len(dev_chrf), "test_sentences": len(test_chrf),
        "spearman_default": spearman(conf_default, test_chrf), "spearman_fitted": spearman(conf_fitted, test_chrf),
        "spearman_log_prob_only": spearman(list(test_x[:, 0]), test_chrf),
        "bad_share": float(bad.mean()),
        "thresholds": {str(t): {"flagged": float((np.array(conf_fitted) < t).mean()),
                                "bad_caught": float(((np.array(conf_fitted) < t) & bad).sum() / max(1, bad.sum())),
                                "precision": float(((np.array(conf_fitted) < t) & bad).sum() / max(1, (np.array(conf_fitted) < t).sum()))}
                       for t in (0.3, 0.5, 0.7)},
    }
    print(json.dumps(numbers["confidence"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 5000, rate: float = 0.1, l2: float = 1e-3) -> list[float]:
    """Bias and weights of a logistic regression by gradient descent (features as they are)."""
    design = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(design.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-design @ w))
        w -= rate * (design.T @ (p - y) / len(y) + l2 * w)
    return [round(float(v), 3) for v in w]


def dataclass_dict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


if __name__ == "__main__":
    raise SystemExit(main())
