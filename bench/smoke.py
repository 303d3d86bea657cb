"""The smoke list: short, common UI messages with the translation a French localization team
would accept, translated by a bundle and scored with chrF (sacrebleu).

    python -m attnserve.bench.smoke models/repository/en-fr/2 --beam 4

Prints a Markdown table (source, expected, output, sentence chrF) and the corpus chrF over the
list; tests/test_smoke.py asserts the shipped bundle's corpus chrF stays above a threshold.
The list is in smoke-en-fr.tsv next to this file (source<TAB>expected).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import sacrebleu

from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine, TranslationOptions

log = logging.getLogger(__name__)

SMOKE_LIST = Path(__file__).with_name("smoke-en-fr.tsv")


@dataclasses.dataclass(frozen=True)
class SmokeResult:
    source: str
    expected: str
    output: str

    @property
    def chrf(self) -> float:
        return sacrebleu.sentence_chrf(self.output, [self.expected]).score


def load_smoke_list(path: Path = SMOKE_LIST) -> list[tuple[str, str]]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(source, expected) for source, expected in rows]


def run_smoke(engine: Engine, beam: int = 4, pairs: list[tuple[str, str]] | None = None) -> list[SmokeResult]:
    pairs = pairs if pairs is not None else load_smoke_list()
    outputs = engine.translate_text([source for source, _ in pairs], TranslationOptions(beam_size=beam))
    return [SmokeResult(source, expected, output) for (source, expected), output in zip(pairs, outputs)]


def corpus_chrf(results: list[SmokeResult]) -> float:
    return sacrebleu.corpus_chrf([r.output for r in results], [[r.expected for r in results]]).score


def markdown(results: list[SmokeResult]) -> str:
    lines = ["| source | expected | output | chrF |", "|---|---|---|---:|"]
    lines += [f"| {r.source} | {r.expected} | {r.output} | {r.chrf:.1f} |" for r in results]
    exact = sum(r.output == r.expected for r in results)
    lines.append(f"\ncorpus chrF {corpus_chrf(results):.2f}; {exact}/{len(results)} exactly as expected")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a bundle version directory, e.g. models/repository/en-fr/2")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = Engine(load_bundle(args.bundle), args.precision, device="cpu", threads=args.threads)
    try:
        log.info("%s", markdown(run_smoke(engine, args.beam)))
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
