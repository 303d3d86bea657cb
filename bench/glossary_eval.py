"""Glossary terms: protection-and-substitution (what the pipeline does) against constrained
decoding, for docs/text.md.

    python -m attnserve.bench.glossary_eval --model models/repository/en-fr/1 [--out docs/glossary-eval.json]

The test set is built from this machine's gettext catalogs (/usr/share/locale/fr/LC_MESSAGES/*.mo,
read with polib), never from the catalogs and packages reserved for independent evaluation
(/work/shared/heldout-packages.txt, checked by domain name and by owning Debian package before
a file is opened): single-line messages containing a term of GLOSSARY whose reference translation
uses the glossary's target for it (so the glossary agrees with the references, as a project's
own terminology would).

Three ways to translate each message, all through the text pipeline (placeholders masked and
restored the same way), at the same beam:
- none: no glossary;
- substitution: the pipeline's glossary (the term masked, its mask replaced by the target);
- constrained: no mask; the decoder is made to emit the target's subwords (greedy, batched,
  `constrained_greedy` below: a term starts where its first subword is within `--margin` nats
  of the best token, where the model would end the sentence, or where only the room for the
  pending terms is left). The engine's beam search has only target prefixes, so this decoder
  drives the engine's public step interface (search.DecoderStep) itself; beam 1 only.

Numbers: share of messages with every term's target in the output, chrF of the whole output and
chrF of the rest (the targets taken out of output and reference), messages per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("attnserve.bench.glossary_eval")

HELDOUT = Path("/work/shared/heldout-packages.txt")
# Common software terms and the French that the catalogs mostly use (checked against each
# message's reference below); the last three are do-not-translate terms.
GLOSSARY = [
    ("file", "fichier"), ("folder", "dossier"), ("password", "mot de passe"), ("directory", "répertoire"),
    ("printer", "imprimante"), ("keyboard", "clavier"), ("window", "fenêtre"), ("server", "serveur"),
    ("network", "réseau"), ("device", "périphérique"), ("user", "utilisateur"), ("account", "compte"),
    ("disk", "disque"), ("package", "paquet"), ("repository", "dépôt"), ("database", "base de données"),
    ("certificate", "certificat"), ("command", "commande"), ("memory", "mémoire"), ("signature", "signature"),
    ("GnuPG", ""), ("D-Bus", ""), ("URL", ""),
]


def heldout(path: Path = HELDOUT) -> tuple[set[str], set[str]]:
    """(catalog domains, Debian packages) reserved for independent evaluation."""
    catalogs, packages = set(), set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            kind, _, name = line.partition(" ")
            (catalogs if kind == "catalog" else packages if kind == "package" else set()).add(name.strip())
    return catalogs, packages


def owning_package(path: Path) -> str:
    """The Debian package that installed `path` ("" if unknown): dpkg's database, not the file."""
    found = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True)
    return found.stdout.split(":", 1)[0].strip() if found.returncode == 0 else ""


def catalog_messages(locale_dir: Path, language: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) of the non-plural single-line messages of every catalog not reserved."""
    import polib

    reserved_catalogs, reserved_packages = heldout()
    pairs: dict[str, str] = {}
    for mo in sorted((locale_dir / language / "LC_MESSAGES").glob("*.mo")):
        if mo.stem in reserved_catalogs or owning_package(mo) in reserved_packages:
            log.info("skipping %s (reserved for independent evaluation)", mo.name)
            continue
        for entry in polib.mofile(str(mo)):
            if entry.msgid and entry.msgstr and not entry.msgid_plural and "\n" not in entry.msgid \
                    and 3 <= len(entry.msgid) <= 200:
                pairs.setdefault(entry.msgid, entry.msgstr)
    return sorted(pairs.items())


def build_set(pairs: list[tuple[str, str]], glossary, size: int, seed: int, seen: set[str]) -> list[tuple[str, str]]:
    """Messages not in `seen` (the model's training sources) with at least one term, whose every
    term's target is in the reference; taken round-robin over their first term, so that "file"
    (half of the candidates) does not make up the whole set."""
    by_term: dict[str, list[tuple[str, str]]] = {}
    for source, reference in pairs:
        spans = glossary.find(source)
        if source not in seen and spans and all(s.output.lower() in reference.lower() for s in spans):
            by_term.setdefault(spans[0].text.lower(), []).append((source, reference))
    rng = random.Random(seed)
    groups = [by_term[term] for term in sorted(by_term)]
    for group in groups:
        rng.shuffle(group)
    chosen: list[tuple[str, str]] = []
    while len(chosen) < size and any(groups):
        for group in groups:
            if group and len(chosen) < size:
                chosen.append(group.pop())
    return chosen


def training_sources(path: Path | None) -> set[str]:
    if path is None or not path.exists():
        log.warning("no training split to exclude (%s): the set may hold messages the model was trained on", path)
        return set()
    return {line.split("\t", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()}


# -- constrained decoding ------------------------------------------------------------------------


class _Row:
    def __init__(self, source: list[int], limit: int, constraints: list[list[int]]):
        self.source, self.limit = source, limit
        self.pending = [c for c in constraints if c]  # terms not started, in source order
        self.current: list[int] = []  # the rest of the term being emitted
        self.tokens: list[int] = []
        self.alignment: list[list[float]] = []
        self.log_prob = 0.0
        self.done = False

    def forced(self, pad: int) -> int:
        return self.current[0] if self.current else self.pending[0][0] if self.pending else pad

    def choose(self, top_lp: np.ndarray, top_ids: np.ndarray, forced_lp: float, eos: int, margin: float) -> tuple[int, float]:
        if self.current:
            return self.current.pop(0), forced_lp
        if self.pending:
            room = self.limit - len(self.tokens)
            need = sum(len(c) for c in self.pending)
            if forced_lp >= top_lp[0] - margin or top_ids[0] == eos or need >= room:
                term = self.pending.pop(0)
                self.current = term[1:]
                return term[0], forced_lp
        return int(top_ids[0]), float(top_lp[0])


def constrained_greedy(engine, sources: Sequence[list[int]], constraints: Sequence[list[list[int]]],
                       margin: float, batch_size: int = 32):
    """Greedy decoding in which each source's constraint token sequences all appear (Hypothesis
    per source, with the alignment the pipeline projects through)."""
    from attnserve.decoding_rules import length_normalised
    from attnserve.server.search import Hypothesis, TranslationOptions, target_length_limit

    opts = TranslationOptions(beam_size=1)
    results: list = [None] * len(sources)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        width = max(len(sources[i]) for i in batch)
        ids = np.full((len(batch), width), engine.pad, dtype=np.int64)
        for row, i in enumerate(batch):
            ids[row, :len(sources[i])] = sources[i]
        rows = [_Row(sources[i], target_length_limit(engine, len(sources[i]), opts, None), constraints[i]) for i in batch]
        state = engine.start_state(ids, 1)
        previous = np.full(len(batch), engine.bos, dtype=np.int64)
        step = 0
        while not all(r.done for r in rows):
            forced = np.array([r.forced(engine.pad) for r in rows], dtype=np.int64)
            state.bound_cache(step + 1)
            top_lp, top_ids, forced_lp, alignment = engine.decode_step(state, previous, 2, forced, True)
            for number, r in enumerate(rows):
                if r.done:
                    continue
                token, log_prob = r.choose(top_lp[number], top_ids[number], float(forced_lp[number]), engine.eos, margin)
                r.log_prob += log_prob
                r.alignment.append(alignment[number, :len(r.source)].tolist())
                if token == engine.eos:
                    r.done = True
                else:
                    r.tokens.append(token)
                    r.done = len(r.tokens) >= r.limit
                previous[number] = token
            step += 1
        for i, r in zip(batch, rows):
            length = len(r.tokens) + (len(r.alignment) > len(r.tokens))
            results[i] = Hypothesis(r.tokens, length_normalised(r.log_prob, length, 1.0), r.alignment)
    return results


# -- the measurement -----------------------------------------------------------------------------


def chrf(hypothesis: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(hypothesis, [reference]).score


def without(text: str, terms: list[str]) -> str:
    for term in terms:
        text = re.sub(re.escape(term), " ", text, count=1, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip()


def score(name: str, data: list[tuple[str, str]], outputs: list[str], targets: list[list[str]], seconds: float) -> dict:
    appears = [all(t.lower() in o.lower() for t in ts) for o, ts in zip(outputs, targets)]
    term_hits = [t.lower() in o.lower() for o, ts in zip(outputs, targets) for t in ts]
    numbers = {
        "run": name, "messages": len(data), "terms": len(term_hits),
        "all_terms_appear": sum(appears) / len(appears), "term_appears": sum(term_hits) / len(term_hits),
        "chrf": float(np.mean([chrf(o, ref) for o, (_, ref) in zip(outputs, data)])),
        "chrf_rest": float(np.mean([chrf(without(o, ts), without(ref, ts)) for o, (_, ref), ts in zip(outputs, data, targets)])),
        "seconds": seconds, "messages_per_second": len(data) / seconds,
    }
    print(json.dumps(numbers, ensure_ascii=False), flush=True)
    return numbers


def main(argv: list[str] | None = None) -> int:
    from attnserve.server.bundle import load_bundle
    from attnserve.server.engine import Engine, TranslationOptions
    from attnserve.server.text import Glossary, GlossaryEntry, TextItem, TextPipeline, engine_translator

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/repository/en-fr/1")
    parser.add_argument("--locale-dir", type=Path, default=Path("/usr/share/locale"))
    parser.add_argument("--language", default="fr")
    parser.add_argument("--size", type=int, default=200, help="messages in the test set")
    parser.add_argument("--exclude", type=Path, default=Path("data/en-fr/train.tsv"),
                        help="the model's training split: its sources are left out of the set")
    parser.add_argument("--beams", default="1,4", help="beams for none/substitution (constrained: 1)")
    parser.add_argument("--margin", type=float, default=2.0, help="constrained: nats below the best to start a term")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    glossary = Glossary([GlossaryEntry.checked(s, t) for s, t in GLOSSARY])
    data = build_set(catalog_messages(args.locale_dir, args.language), glossary, args.size, 13,
                    training_sources(args.exclude))
    targets = [[s.output for s in glossary.find(source)] for source, _ in data]
    engine = Engine(load_bundle(args.model), "fp32", device="cpu", threads=args.threads)
    plain = TextPipeline.for_engine(engine)  # the bundle has no glossary.tsv: terms come with the items
    engine.warm_up()
    runs = []
    for beam in (int(b) for b in args.beams.split(",")):
        translate = engine_translator(engine, TranslationOptions(beam_size=beam))
        for name, items_glossary in (("none", None), ("substitution", glossary)):
            started = time.perf_counter()
            results = plain.translate([TextItem(s, glossary=items_glossary) for s, _ in data], translate)
            runs.append(score(f"{name} beam {beam}", data, [r.text for r in results], targets, time.perf_counter() - started))
    started = time.perf_counter()
    plan = plain.prepare([TextItem(s) for s, _ in data])
    constraints = [[engine.tokenizer.encode(span.output) for span in glossary.find(source)] for source in plan.sources]
    hypotheses = constrained_greedy(engine, engine.encode_texts(plan.sources), constraints, args.margin)
    results = plain.finish(plan, hypotheses)
    runs.append(score("constrained beam 1", data, [r.text for r in results], targets, time.perf_counter() - started))
    numbers = {"model": args.model, "catalogs": f"{args.locale_dir}/{args.language}/LC_MESSAGES/*.mo", "margin": args.margin,
               "glossary": GLOSSARY, "runs": runs, "examples": [
                   {"source": s, "reference": r, "constrained": res.text} for (s, r), res in list(zip(data, results))[:8]]}
    if args.out:
        args.out.write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
