"""Glossary terms: protection-and-substitution against constrained decoding (with and without
its substitution fallback), for docs/text.md.

    python -m attnserve.bench.glossary_eval --model models/repository/en-fr/1 [--out docs/glossary-eval.json]

The test set is built from this machine's gettext catalogs (/usr/share/locale/fr/LC_MESSAGES/*.mo,
read with polib), never from the catalogs and packages reserved for independent evaluation
(/work/shared/heldout-packages.txt, checked by domain name and by owning Debian package before
a file is opened): single-line messages containing a term of GLOSSARY whose reference translation
uses the glossary's target for it (so the glossary agrees with the references, as a project's
own terminology would).

Four ways to translate each message, all through the text pipeline (placeholders masked and
restored the same way), at beam 1 and 4:
- none: no glossary;
- substitute (glossary_mode "substitute"): each term masked, its mask replaced by the target;
- constrained only: the term left in the source, the decoder made to emit the target's subwords
  (search.py), even where the model never wanted them (pipeline.fallback not run);
- constrained (glossary_mode "constrained", what the server does): constrained, and the sentences
  where a term had to be forced at the end translated again with substitution.

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
    # Terms where catalogs agree on one of several translations a model may pick.
    ("Trash", "Corbeille"), ("tab", "onglet"), ("bookmark", "signet"), ("toolbar", "barre d'outils"),
    ("email", "courriel"), ("screenshot", "capture d'écran"), ("wallpaper", "fond d'écran"),
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
    from attnserve.server.text import Glossary, GlossaryEntry, PipelineConfig, TextItem, TextPipeline, engine_translator

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/repository/en-fr/1")
    parser.add_argument("--locale-dir", type=Path, default=Path("/usr/share/locale"))
    parser.add_argument("--language", default="fr")
    parser.add_argument("--size", type=int, default=200, help="messages in the test set")
    parser.add_argument("--exclude", type=Path, default=Path("data/en-fr/train.tsv"),
                        help="the model's training split: its sources are left out of the set")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    glossary = Glossary([GlossaryEntry.checked(s, t) for s, t in GLOSSARY])
    data = build_set(catalog_messages(args.locale_dir, args.language), glossary, args.size, 13,
                     training_sources(args.exclude))
    targets = [[s.output for s in glossary.find(source)] for source, _ in data]
    engine = Engine(load_bundle(args.model), "fp32", device="cpu", threads=args.threads)
    # The bundle has no glossary.tsv: the terms come with the items.
    pipelines = {mode: TextPipeline.for_engine(engine, PipelineConfig(glossary_mode=mode))
                 for mode in ("constrained", "substitute")}
    engine.warm_up()
    runs, examples = [], {}
    for beam in (int(b) for b in args.beams.split(",")):
        translate = engine_translator(engine, TranslationOptions(beam_size=beam))
        for name, mode, items_glossary in (("none", "constrained", None), ("substitute", "substitute", glossary),
                                           ("constrained only", "constrained", glossary),
                                           ("constrained", "constrained", glossary)):
            pipeline = pipelines[mode]
            items = [TextItem(s, glossary=items_glossary) for s, _ in data]
            started = time.perf_counter()
            if name == "constrained only":  # no fallback: what the search alone does
                plan = pipeline.prepare(items)
                results = pipeline.finish(plan, translate(plan.sources, plan.constraints))
            else:
                results = pipeline.translate(items, translate)
            runs.append(score(f"{name} beam {beam}", data, [r.text for r in results], targets, time.perf_counter() - started))
            examples[f"{name} beam {beam}"] = [r.text for r in results[:10]]
    numbers = {"model": args.model, "catalogs": f"{args.locale_dir}/{args.language}/LC_MESSAGES/*.mo",
               "glossary": GLOSSARY, "runs": runs,
               "examples": [{"source": s, "reference": r, **{name: texts[i] for name, texts in examples.items()}}
                            for i, (s, r) in enumerate(data[:10])]}
    if args.out:
        args.out.write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
