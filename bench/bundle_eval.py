"""BLEU and chrF of an exported bundle on a TSV split, decoded by the serving engine (no torch).

    python -m attnserve.bench.bundle_eval models/repository/en-fr/2 data/en-fr-v2/ood-test.tsv --beam 4

`attnserve eval` scores a training run in torch; this scores what is shipped, as the server
decodes it. fp32 output is token-identical to torch (docs/export.md), and the engine is several
times faster, which matters for a 12,000-sentence split with beam 4. BLEU by source length (in
words) uses the buckets of `attnserve eval`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import sacrebleu

from attnserve.model.hardware import cpu_info
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine, TranslationOptions

log = logging.getLogger("attnserve.bench.bundle_eval")

LENGTH_BUCKETS = ((5, "1-5"), (10, "6-10"), (20, "11-20"), (30, "21-30"), (None, "31+"))


def length_bucket(source: str) -> str:
    words = len(source.split())
    return next(name for limit, name in LENGTH_BUCKETS if limit is None or words <= limit)


def evaluate(bundle: Path, split: Path, beam: int, precision: str = "fp32", threads: int = 1) -> dict:
    pairs = [line.rstrip("\n").split("\t")[:2] for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
    sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
    engine = Engine(load_bundle(bundle), precision, "cpu", threads)
    started = time.perf_counter()
    hypotheses = engine.translate_text(sources, TranslationOptions(beam_size=beam))
    seconds = time.perf_counter() - started
    engine.close()
    by_bucket: dict[str, tuple[list[str], list[str]]] = {name: ([], []) for _, name in LENGTH_BUCKETS}
    for source, hypothesis, reference in zip(sources, hypotheses, references):
        hyps, refs = by_bucket[length_bucket(source)]
        hyps.append(hypothesis)
        refs.append(reference)
    return {
        "bundle": str(bundle), "split": str(split), "precision": precision, "beam": beam, "sentences": len(sources),
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
        "bleu_by_length": {name: round(sacrebleu.corpus_bleu(h, [r]).score, 1) if h else None
                           for name, (h, r) in by_bucket.items()},
        "sentences_by_length": {name: len(h) for name, (h, _) in by_bucket.items()},
        "seconds": round(seconds, 1), "cpu": cpu_info()["model"], "threads": threads,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("split", type=Path, help="TSV: source<TAB>reference")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = evaluate(args.bundle, args.split, args.beam, args.precision, args.threads)
    log.info("%s on %s, beam %d: BLEU %.2f, chrF %.2f", args.bundle, args.split, args.beam, result["bleu"], result["chrf"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
