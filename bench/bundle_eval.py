"""BLEU and chrF of an exported bundle on a TSV split, decoded by the serving engine.

    python -m attnserve.bench.bundle_eval models/repository/en-fr/2 data/en-fr-v2/ood-test.tsv --beam 4

`attnserve eval` scores a training run in torch; this scores what is shipped, as the server
decodes it, and reports what `attnserve eval` does (its `score`). fp32 output is token-identical
to torch (docs/export.md), and the engine is several times faster, which matters for a
12,000-sentence split with beam 4. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from attnserve.model.corpus import load_tsv
from attnserve.model.evaluate import score
from attnserve.model.hardware import cpu_info
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine, TranslationOptions

log = logging.getLogger("attnserve.bench.bundle_eval")


def evaluate(bundle: Path, split: Path, beam: int, precision: str = "fp32", threads: int = 1) -> dict:
    """Decode the split with the bundle; `attnserve eval`'s score (BLEU, chrF, BLEU by length)."""
    rows = load_tsv(split)
    sources, references = [source for source, _ in rows], [reference for _, reference in rows]
    engine = Engine(load_bundle(bundle), precision, "cpu", threads)
    started = time.perf_counter()
    hypotheses = engine.translate_text(sources, TranslationOptions(beam_size=beam))
    seconds = time.perf_counter() - started
    engine.close()
    return {"bundle": str(bundle), "split": str(split), "precision": precision, "beam": beam,
            **score(sources, hypotheses, references),
            "seconds": round(seconds, 1), "cpu": cpu_info()["model"], "threads": threads}


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
