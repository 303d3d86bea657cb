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

log = logging.getLogger(__name__)

DEFAULT_LOCALE_DIR = Path("/usr/share/locale")


class CorpusError(Exception):
    """A corpus cannot be built from the given input (missing directory, no catalogs, ...)."""


@dataclasses.dataclass(frozen=True)
class Pair:
    src: str
    tgt: str
    origin: str  # catalog domain or file name, for the per-catalog report


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
    locale_dir: Path, src: str, tgt: str, stats: collections.Counter
) -> Iterator[Pair]:
    """Pairs from gettext catalogs; corrupt catalogs are skipped and counted in stats."""
    if not locale_dir.is_dir():
        raise CorpusError(f"locale directory not found: {locale_dir}")
    if src == tgt:
        raise CorpusError(f"source and target language are the same: {src}")
    foreign = [lang for lang in (src, tgt) if lang != "en"]
    files = {lang: _catalog_files(locale_dir, lang) for lang in foreign}
    for lang, found in files.items():
        if not found:
            raise CorpusError(
                f"no gettext catalogs for language {lang!r} in {locale_dir / lang / 'LC_MESSAGES'}"
            )
    domains = sorted(set.intersection(*(set(found) for found in files.values())))
    if not domains:
        raise CorpusError(f"no catalog domain is translated into both {src} and {tgt}")

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
            yield Pair(text[src], text[tgt], domain)


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


def clean_and_split(
    pairs: Iterable[Pair], cfg: CleanConfig, report: CorpusReport
) -> dict[str, list[tuple[str, str]]]:
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    seen: set[tuple[str, str]] = set()
    dropped: collections.Counter = collections.Counter()
    per_catalog: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for pair in pairs:
        report.read += 1
        src, tgt = normalise(pair.src), normalise(pair.tgt)
        reason = drop_reason(src, tgt, cfg)
        if reason is None and (src, tgt) in seen:
            reason = "duplicate"
        if reason is not None:
            dropped[reason] += 1
            per_catalog[pair.origin]["dropped"] += 1
            continue
        seen.add((src, tgt))
        split = split_of(src, cfg)
        splits[split].append((src, tgt))
        per_catalog[pair.origin][split] += 1
    report.kept = len(seen)
    report.splits = {name: len(rows) for name, rows in splits.items()}
    report.dropped = dict(sorted(dropped.items()))
    report.per_catalog = {k: dict(v) for k, v in sorted(per_catalog.items())}
    return splits


def build_corpus(
    out_dir: Path,
    src: str,
    tgt: str,
    locale_dir: Path | None = DEFAULT_LOCALE_DIR,
    tsv_files: Iterable[Path] = (),
    moses_prefixes: Iterable[Path] = (),
    cfg: CleanConfig | None = None,
) -> CorpusReport:
    """Read every input, clean, split and write train/dev/test.tsv and report.json to out_dir."""
    cfg = cfg or CleanConfig()
    stats: collections.Counter = collections.Counter()
    sources: list[Iterable[Pair]] = []
    inputs: list[str] = []
    if locale_dir is not None:
        sources.append(read_catalogs(Path(locale_dir), src, tgt, stats))
        inputs.append(f"gettext:{locale_dir}")
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
    splits = clean_and_split((p for s in sources for p in s), cfg, report)
    report.catalogs = stats["catalogs"]
    report.corrupt_catalogs = stats["corrupt_catalogs"]
    report.malformed_lines = stats["malformed_lines"]
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
