"""Parallel corpus: read gettext catalogs (and user TSV / Moses files), clean, split, report.

The default corpus is the machine's own gettext catalogs: every `<lang>/LC_MESSAGES/<domain>.mo`
holds human translations of the English messages of one program. For a pair with English on
one side the English `msgid` is the source (or target); for two non-English languages the
catalogs of the same domain are joined on (context, msgid), English being the pivot key.

Cleaning follows the usual NMT recipe; every dropped pair is counted under a reason so the
report says exactly what happened:

    read -> normalise (whitespace, accelerators) -> filter -> deduplicate -> split by source hash
"""

from __future__ import annotations

import collections
import dataclasses
import gettext
import hashlib
import itertools
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import polib

from attnserve.model import harvest
from attnserve.model.mallard import HelpRoot, read_help_pages
from attnserve.model.reserved import ReservedList

log = logging.getLogger(__name__)

DEFAULT_LOCALE_DIR = Path("/usr/share/locale")


class CorpusError(Exception):
    """A corpus cannot be built from the given input (missing directory, no catalogs, ...)."""


@dataclasses.dataclass(frozen=True)
class Pair:
    src: str
    tgt: str
    origin: str  # catalog domain or file name, for the per-catalog report
    package: str = ""  # the Debian package a harvested pair came from (out-of-domain split)


@dataclasses.dataclass
class CleanConfig:
    min_chars: int = 1
    max_chars: int = 300  # longer entries are help screens and tables, not sentences
    max_words: int = 60
    max_ratio: float = 3.0  # char-length ratio, applied when both sides have >= ratio_min_chars
    ratio_min_chars: int = 10
    dev_fraction: float = 0.02
    test_fraction: float = 0.02


# --------------------------------------------------------------------------------------------
# Reading


def _plural_indices(catalog: polib._BaseFile) -> tuple[int, int]:
    """Which msgstr[i] translates the English singular (n=1) and the plural (n=2)."""
    header = catalog.metadata.get("Plural-Forms", "")
    match = re.search(r"plural=([^;]+)", header)
    if not match:
        return 0, 1
    try:
        rule = gettext.c2py(match.group(1).strip())
        return rule(1), rule(2)
    except (ValueError, SyntaxError):
        return 0, 1


def catalog_messages(catalog: polib._BaseFile) -> Iterator[tuple[str | None, str, str]]:
    """Yield (context, english, translation) for every translated entry, plural forms expanded."""
    singular_ix, plural_ix = _plural_indices(catalog)
    for entry in catalog:
        if not entry.msgid or entry.obsolete or "fuzzy" in entry.flags:
            continue
        if entry.msgid_plural:
            forms = entry.msgstr_plural
            yield entry.msgctxt, entry.msgid, forms.get(singular_ix, "")
            yield entry.msgctxt, entry.msgid_plural, forms.get(plural_ix, forms.get(0, ""))
        else:
            yield entry.msgctxt, entry.msgid, entry.msgstr


def _load_catalog(path: Path) -> polib._BaseFile:
    return polib.mofile(str(path)) if path.suffix == ".mo" else polib.pofile(str(path))


def _catalog_files(locale_dir: Path, lang: str) -> dict[str, Path]:
    """domain -> catalog path for one language (.po preferred over .mo for the same domain)."""
    messages = locale_dir / lang / "LC_MESSAGES"
    files: dict[str, Path] = {}
    for suffix in (".mo", ".po"):
        for path in sorted(messages.glob(f"*{suffix}")):
            files[path.stem] = path
    return files


def read_catalogs(
    locale_dir: Path, src: str, tgt: str, stats: collections.Counter,
    reserved: ReservedList | None = None, package: str = "", strict: bool = True,
) -> Iterator[Pair]:
    """Pairs from gettext catalogs; corrupt catalogs are skipped and counted in stats.
    Reserved catalogs are recognised by file name and never opened. `strict`: a directory
    without catalogs for the pair is an error (a harvested package's tree need not have them)."""
    if not locale_dir.is_dir():
        raise CorpusError(f"locale directory not found: {locale_dir}")
    if src == tgt:
        raise CorpusError(f"source and target language are the same: {src}")
    foreign = [lang for lang in (src, tgt) if lang != "en"]
    files = {lang: _catalog_files(locale_dir, lang) for lang in foreign}
    if reserved is not None:
        for found in files.values():
            for domain in [d for d in found if d in reserved.catalogs]:
                del found[domain]
                stats["reserved_catalogs_skipped"] += 1
    for lang, found in files.items():
        if not found:
            if not strict:
                return
            raise CorpusError(
                f"no gettext catalogs for language {lang!r} in {locale_dir / lang / 'LC_MESSAGES'}"
            )
    domains = sorted(set.intersection(*(set(found) for found in files.values())))
    if not domains:
        if not strict:
            return
        raise CorpusError(f"no catalog domain is translated into both {src} and {tgt}")
    origin_prefix = f"{package}/" if package else ""

    for domain in domains:
        tables: dict[str, dict[tuple[str | None, str], str]] = {}
        try:
            for lang in foreign:
                catalog = _load_catalog(files[lang][domain])
                tables[lang] = {(ctx, en): tr for ctx, en, tr in catalog_messages(catalog)}
        except Exception as exc:  # polib raises IOError/ValueError/struct/Unicode errors
            log.warning("skipping corrupt catalog %s (%s): %s", domain, lang, exc)
            stats["corrupt_catalogs"] += 1
            continue
        stats["catalogs"] += 1
        for key, first in tables[foreign[0]].items():
            english = key[1]
            if len(foreign) == 1:
                text = {"en": english, foreign[0]: first}
            elif key in tables[foreign[1]]:
                text = {foreign[0]: first, foreign[1]: tables[foreign[1]][key]}
            else:
                continue
            yield Pair(text[src], text[tgt], origin_prefix + domain, package)


def read_cache(
    cache_dir: Path, src: str, tgt: str, stats: collections.Counter, reserved: ReservedList
) -> Iterator[Pair]:
    """Pairs from the catalogs of every package a harvest extracted into cache_dir; each
    package's tree is read like a locale directory (and LibreOffice's resource directory)."""
    if not cache_dir.is_dir():
        raise CorpusError(f"cache directory not found: {cache_dir}")
    for package, tree in harvest.harvested_packages(cache_dir):
        if package in reserved.packages:  # a cache filled before the package was reserved
            stats["reserved_packages_skipped"] += 1
            continue
        stats["packages"] += 1
        for root in harvest.LOCALE_ROOTS:
            if (tree / root).is_dir():
                yield from read_catalogs(tree / root, src, tgt, stats, reserved, package, strict=False)


def help_roots(cache_dirs: Iterable[Path], help_dirs: Iterable[Path], reserved: ReservedList) -> list[HelpRoot]:
    """GNOME help directories: each harvested package's, then local ones (/usr/share/help)."""
    roots = [HelpRoot(Path(d)) for d in help_dirs if Path(d).is_dir()]
    for cache_dir in cache_dirs:
        for package, tree in harvest.harvested_packages(Path(cache_dir)):
            if package not in reserved.packages and (tree / harvest.HELP_ROOT).is_dir():
                roots.append(HelpRoot(tree / harvest.HELP_ROOT, package))
    return roots


def read_help(roots: list[HelpRoot], src: str, tgt: str, stats: collections.Counter,
              reserved: ReservedList) -> Iterator[Pair]:
    for source, target, document, package in read_help_pages(roots, src, tgt, stats, reserved.catalogs):
        yield Pair(source, target, f"help:{document}", package)


def read_tsv(path: Path, stats: collections.Counter) -> Iterator[Pair]:
    """source<TAB>target lines; malformed lines are counted, not fatal."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                stats["malformed_lines"] += 1
                continue
            yield Pair(fields[0], fields[1], path.name)


def read_moses(src_path: Path, tgt_path: Path) -> Iterator[Pair]:
    """Moses-style aligned files: line i of one file translates line i of the other."""
    with open(src_path, encoding="utf-8", errors="replace") as fs, open(
        tgt_path, encoding="utf-8", errors="replace"
    ) as ft:
        for s, t in itertools.zip_longest(fs, ft):
            if s is None or t is None:
                raise CorpusError(f"{src_path} and {tgt_path} have different numbers of lines")
            yield Pair(s.rstrip("\n"), t.rstrip("\n"), src_path.stem)


# --------------------------------------------------------------------------------------------
# Normalisation and filtering

_WHITESPACE = re.compile(r"\s+")
# GTK / Qt accelerators in CJK style: "文件(_F)" or "(&F)".
_BRACKET_ACCEL = re.compile(r"\s*\((?:_|&)[A-Za-z0-9]\)")
# A mnemonic marker before a letter: "_File", "Pri_ority", "&Open" -- but not "&amp;", "&&".
_UNDERSCORE_ACCEL = re.compile(r"(?<![\w%$])_(?=[^\W_])|(?<=[a-z])_(?=[a-z])")
_AMP_ACCEL = re.compile(r"(?<!&)&(?=[^\W_])(?![A-Za-z]+;|#\d+;)")
# Underscores inside identifiers (LC_ALL, snake_case, --no_color) must stay.
_IDENTIFIER = re.compile(r"[A-Z0-9]+_[A-Z0-9_]+|\w+_\w+_\w+|[-$%]\w*_\w*")
# printf conversions: %s, %d, %1$s, %-10.3lf, %lu, %zu ...; "%%" is a literal percent.
PLACEHOLDER = re.compile(r"%%|%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|z|j|t|q)?[diouxXeEfFgGaAcspn]")


def _strip_accelerator(text: str, pattern: re.Pattern) -> str | None:
    """Remove the single mnemonic marker of a UI label; None if the text has no such marker."""
    if _IDENTIFIER.search(text):
        return None
    markers = pattern.findall(text)
    if len(markers) != 1:
        return None
    return pattern.sub("", text)


def normalise(text: str) -> str:
    """One line, single spaces, no keyboard accelerators; placeholders are left untouched."""
    text = text.replace("\u00a0", " ").replace("\u202f", " ")
    text = _WHITESPACE.sub(" ", text).strip()
    text = _BRACKET_ACCEL.sub("", text)
    for pattern in (_UNDERSCORE_ACCEL, _AMP_ACCEL):
        stripped = _strip_accelerator(text, pattern)
        if stripped is not None:
            text = stripped
    return text


def placeholders(text: str) -> list[str]:
    """The printf conversions of a message with positions removed, sorted: %1$s -> %s."""
    return sorted(re.sub(r"\d+\$", "", p) for p in PLACEHOLDER.findall(text) if p != "%%")


def drop_reason(src: str, tgt: str, cfg: CleanConfig) -> str | None:
    """Why a normalised pair should not be used, or None to keep it."""
    if not src or not tgt:
        return "untranslated"
    if src == tgt:
        return "identical"
    if not any(c.isalpha() for c in src):
        return "no_letters"
    for side in (src, tgt):
        if len(side) < cfg.min_chars or len(side) > cfg.max_chars or len(side.split()) > cfg.max_words:
            return "length"
    shorter, longer = sorted((len(src), len(tgt)))
    if shorter >= cfg.ratio_min_chars and longer / shorter > cfg.max_ratio:
        return "length_ratio"
    if shorter < cfg.ratio_min_chars and longer > cfg.ratio_min_chars * cfg.max_ratio:
        return "length_ratio"
    if placeholders(src) != placeholders(tgt):
        return "placeholder_mismatch"
    return None


def split_key(src: str) -> str:
    """The key that decides a pair's split: case, punctuation and spacing do not count, so
    "Open", "_Open" and "Open..." always land in the same split (no near-duplicate leaks)."""
    return "".join(c for c in src.casefold() if c.isalnum())


def split_of(src: str, cfg: CleanConfig) -> str:
    bucket = int.from_bytes(hashlib.sha256(split_key(src).encode()).digest()[:8], "big") / 2**64
    if bucket < cfg.test_fraction:
        return "test"
    if bucket < cfg.test_fraction + cfg.dev_fraction:
        return "dev"
    return "train"


# --------------------------------------------------------------------------------------------
# Building


@dataclasses.dataclass
class CorpusReport:
    src: str
    tgt: str
    inputs: list[str]
    read: int = 0
    kept: int = 0
    splits: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    per_catalog: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    catalogs: int = 0
    corrupt_catalogs: int = 0
    malformed_lines: int = 0
    packages: int = 0  # harvested packages read from caches
    read_by_source: dict[str, int] = dataclasses.field(default_factory=dict)  # gettext / cache / help / tsv ...
    help_pages: dict[str, int] = dataclasses.field(default_factory=dict)  # aligned / misaligned / unreadable
    reserved: dict[str, object] = dataclasses.field(default_factory=dict)  # the list and what it excluded
    ood: dict[str, object] = dataclasses.field(default_factory=dict)  # held-out packages and the overlap removed


@dataclasses.dataclass(frozen=True)
class OodSplit:
    """Whole packages held out of training: their pairs form ood-dev.tsv / ood-test.tsv, and any
    source they contain (hash-folded, as the split key) is removed from train/dev/test, and an
    ood-test source from ood-dev, so a model is scored on messages it has never seen."""

    dev_packages: tuple[str, ...] = ()
    test_packages: tuple[str, ...] = ()

    def split_of(self, package: str) -> str | None:
        if package in self.test_packages:
            return "ood-test"
        if package in self.dev_packages:
            return "ood-dev"
        return None

    def __bool__(self) -> bool:
        return bool(self.dev_packages or self.test_packages)


def clean_and_split(
    pairs: Iterable[Pair], cfg: CleanConfig, report: CorpusReport, ood: OodSplit = OodSplit()
) -> dict[str, list[tuple[str, str]]]:
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    if ood:
        splits.update({"ood-dev": [], "ood-test": []})
    origins: dict[str, list[str]] = {name: [] for name in splits}  # parallel to splits, for the overlap removal
    # Duplicates are found within the in-domain splits and within each ood split separately: a
    # message an ood package shares with a training package must stay in the ood split.
    seen: set[tuple[str, str, str]] = set()
    dropped: collections.Counter = collections.Counter()
    per_catalog: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for pair in pairs:
        report.read += 1
        src, tgt = normalise(pair.src), normalise(pair.tgt)
        reason = drop_reason(src, tgt, cfg)
        held_out = ood.split_of(pair.package) if pair.package else None
        group = held_out or "in-domain"
        if reason is None and (group, src, tgt) in seen:
            reason = "duplicate"
        if reason is not None:
            dropped[reason] += 1
            per_catalog[pair.origin]["dropped"] += 1
            continue
        seen.add((group, src, tgt))
        split = held_out or split_of(src, cfg)
        splits[split].append((src, tgt))
        origins[split].append(pair.origin)
        per_catalog[pair.origin][split] += 1
    if ood:
        report.ood["removed"] = _remove_ood_overlap(splits, origins, per_catalog)
        dropped["ood_source"] += sum(report.ood["removed"].values())
    report.kept = sum(len(rows) for rows in splits.values())
    report.splits = {name: len(rows) for name, rows in splits.items()}
    report.dropped = dict(sorted(dropped.items()))
    report.per_catalog = {k: dict(v) for k, v in sorted(per_catalog.items())}
    return splits


# Held out of training, chosen from the bookworm harvest: none reserved, none with a catalog in
# this dev machine's /usr/share/locale (the shipped model was trained on those). Each split mixes
# GNOME (with help pages), KDE (Qt), Xfce/LXDE apps and command-line tools, about 1.5k pairs each.
DEFAULT_OOD = OodSplit(
    dev_packages=("gnome-calculator", "ark", "mousepad", "alsa-utils"),
    test_packages=("file-roller", "gwenview", "parole", "pcmanfm", "quilt", "dos2unix"),
)


def _remove_ood_overlap(splits: dict[str, list[tuple[str, str]]], origins: dict[str, list[str]],
                        per_catalog: dict[str, collections.Counter]) -> dict[str, int]:
    """Remove from the in-domain splits every pair whose split key an ood split has (and from
    ood-dev what ood-test has); returns the pairs removed per split."""
    test_keys = {split_key(src) for src, _ in splits["ood-test"]}
    held_keys = test_keys | {split_key(src) for src, _ in splits["ood-dev"]}
    removed: dict[str, int] = {}
    for name, keys in (("train", held_keys), ("dev", held_keys), ("test", held_keys), ("ood-dev", test_keys)):
        kept_rows, kept_origins = [], []
        for row, origin in zip(splits[name], origins[name]):
            if split_key(row[0]) in keys:
                per_catalog[origin][name] -= 1
                per_catalog[origin]["dropped"] += 1
            else:
                kept_rows.append(row)
                kept_origins.append(origin)
        removed[name] = len(splits[name]) - len(kept_rows)
        splits[name], origins[name] = kept_rows, kept_origins
    return removed


def _check_ood_packages(ood: OodSplit, cache_dirs: list[Path], locale_dir: Path | None,
                        src: str, tgt: str, reserved: ReservedList) -> dict[str, list[str]]:
    """The held-out packages must be harvested, not reserved, and share no catalog with the
    machine's locale directory (the shipped model was trained on those). Returns each one's
    catalogs and help documents."""
    problems: list[str] = []
    local_domains: set[str] = set()
    if locale_dir is not None:
        for lang in {src, tgt} - {"en"}:
            local_domains |= set(_catalog_files(Path(locale_dir), lang))
    harvested = {package: tree for cache in cache_dirs for package, tree in harvest.harvested_packages(cache)}
    contents: dict[str, list[str]] = {}
    for package in (*ood.dev_packages, *ood.test_packages):
        if package in reserved.packages:
            problems.append(f"{package} is reserved for independent evaluation")
            continue
        if package not in harvested:
            problems.append(f"{package} is not in the harvest cache ({', '.join(map(str, cache_dirs)) or 'none given'})")
            continue
        tree = harvested[package]
        domains = sorted({mo.stem for root in harvest.LOCALE_ROOTS for mo in (tree / root).glob("*/LC_MESSAGES/*.mo")})
        docs = sorted({d.name for d in (tree / harvest.HELP_ROOT).glob("*/*") if d.is_dir()})
        shared = sorted(set(domains) & local_domains)
        if shared:
            problems.append(f"{package} has catalogs the local locale directory also has: {', '.join(shared)}")
        contents[package] = domains + [f"help:{doc}" for doc in docs]
    if set(ood.dev_packages) & set(ood.test_packages):
        problems.append("a package is in both ood-dev and ood-test")
    if problems:
        raise CorpusError("out-of-domain packages: " + "; ".join(problems))
    return contents


def _counted(source: Iterable[Pair], name: str, counts: collections.Counter) -> Iterator[Pair]:
    for pair in source:
        counts[name] += 1
        yield pair


def build_corpus(
    out_dir: Path,
    src: str,
    tgt: str,
    locale_dir: Path | None = DEFAULT_LOCALE_DIR,
    tsv_files: Iterable[Path] = (),
    moses_prefixes: Iterable[Path] = (),
    cfg: CleanConfig | None = None,
    cache_dirs: Iterable[Path] = (),
    help_dirs: Iterable[Path] = (),
    reserved: ReservedList | None = None,
    ood: OodSplit = OodSplit(),
) -> CorpusReport:
    """Read every input, clean, split and write train/dev/test.tsv (ood-dev/ood-test.tsv with
    held-out packages) and report.json to out_dir. Reserved catalogs and packages are never read."""
    cfg = cfg or CleanConfig()
    reserved = reserved or ReservedList()
    cache_dirs = [Path(d) for d in cache_dirs]
    help_dirs = [Path(d) for d in help_dirs]
    stats: collections.Counter = collections.Counter()
    read_by_source: collections.Counter = collections.Counter()
    sources: list[Iterable[Pair]] = []
    inputs: list[str] = []
    ood_contents = _check_ood_packages(ood, cache_dirs, locale_dir, src, tgt, reserved) if ood else {}
    if locale_dir is not None:
        sources.append(_counted(read_catalogs(Path(locale_dir), src, tgt, stats, reserved), "gettext", read_by_source))
        inputs.append(f"gettext:{locale_dir}")
    for cache_dir in cache_dirs:
        sources.append(_counted(read_cache(cache_dir, src, tgt, stats, reserved), "cache", read_by_source))
        inputs.append(f"cache:{cache_dir}")
    roots = help_roots(cache_dirs, help_dirs, reserved)
    if roots:
        sources.append(_counted(read_help(roots, src, tgt, stats, reserved), "help", read_by_source))
        inputs.append(f"help:{len(roots)} directories")
    for path in tsv_files:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"TSV file not found: {path}")
        sources.append(read_tsv(path, stats))
        inputs.append(f"tsv:{path}")
    for prefix in moses_prefixes:
        src_path, tgt_path = Path(f"{prefix}.{src}"), Path(f"{prefix}.{tgt}")
        for path in (src_path, tgt_path):
            if not path.is_file():
                raise CorpusError(f"Moses file not found: {path}")
        sources.append(read_moses(src_path, tgt_path))
        inputs.append(f"moses:{prefix}")
    if not sources:
        raise CorpusError("no input: give a locale directory, TSV files or Moses file prefixes")

    report = CorpusReport(src=src, tgt=tgt, inputs=inputs)
    if ood:
        report.ood = {"dev_packages": list(ood.dev_packages), "test_packages": list(ood.test_packages),
                      "contents": ood_contents}
    splits = clean_and_split((p for s in sources for p in s), cfg, report, ood)
    report.catalogs = stats["catalogs"]
    report.corrupt_catalogs = stats["corrupt_catalogs"]
    report.malformed_lines = stats["malformed_lines"]
    report.packages = stats["packages"]
    report.read_by_source = dict(read_by_source)
    report.help_pages = {key.removeprefix("help_pages_"): stats[key] for key in
                         ("help_pages_aligned", "help_pages_misaligned", "help_pages_unreadable") if stats[key]}
    report.reserved = {**reserved.summary(), "catalogs_skipped": stats["reserved_catalogs_skipped"],
                       "packages_skipped": stats["reserved_packages_skipped"],
                       "help_docs_skipped": stats["reserved_help_docs_skipped"]}
    if report.kept == 0:
        raise CorpusError(f"no usable {src}->{tgt} pairs in {', '.join(inputs)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_tsv(out_dir / f"{name}.tsv", rows)
    (out_dir / "report.json").write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    log.info("corpus %s-%s: %s kept of %d read, splits %s", src, tgt, report.kept, report.read, report.splits)
    return report


def write_tsv(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s, t in rows:
            f.write(f"{s}\t{t}\n")
    tmp.replace(path)


def load_tsv(path: Path) -> list[tuple[str, str]]:
    """Read a split written by build_corpus."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            s, _, t = line.rstrip("\n").partition("\t")
            rows.append((s, t))
    return rows
