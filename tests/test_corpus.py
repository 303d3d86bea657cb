"""The corpus reader on gettext catalogs the tests write themselves, cleaning, and the split."""

from __future__ import annotations

import json
from pathlib import Path

import polib
import pytest

from attnserve.cli import main
from attnserve.model.corpus import (
    CleanConfig,
    CorpusError,
    build_corpus,
    load_tsv,
    normalise,
    placeholders,
    split_key,
    split_of,
)


def write_catalog(path: Path, entries: list[polib.POEntry], plural_forms: str = "nplurals=2; plural=(n > 1);") -> None:
    po = polib.POFile()
    po.metadata = {"Content-Type": "text/plain; charset=UTF-8", "Plural-Forms": plural_forms}
    for entry in entries:
        po.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mo":
        po.save_as_mofile(str(path))
    else:
        po.save(str(path))


@pytest.fixture
def locale_dir(tmp_path: Path) -> Path:
    root = tmp_path / "locale"
    write_catalog(root / "fr/LC_MESSAGES/editor.mo", [
        polib.POEntry(msgid="_File", msgstr="_Fichier"),
        polib.POEntry(msgid="Save &As...", msgstr="Enregistrer &sous..."),
        polib.POEntry(msgid="Cannot open %s: %s", msgstr="Impossible d'ouvrir %s : %s"),
        polib.POEntry(msgid="Moved %1$s to %2$s", msgstr="%2$s a reçu %1$s"),
        polib.POEntry(msgid="Line one\nline two", msgstr="Ligne un\nligne deux"),
        polib.POEntry(msgid="OK", msgstr="OK"),
        polib.POEntry(msgid="Wrong %d placeholder", msgstr="Mauvais %s paramètre"),
        polib.POEntry(msgid="%d file", msgid_plural="%d files", msgstr_plural={0: "%d fichier", 1: "%d fichiers"}),
        polib.POEntry(msgctxt="verb", msgid="Open", msgstr="Ouvrir"),
        polib.POEntry(msgctxt="adjective", msgid="Open", msgstr="Ouvert"),
    ])
    write_catalog(root / "fr/LC_MESSAGES/viewer.po", [
        polib.POEntry(msgid="Zoom in", msgstr="Zoom avant"),
        polib.POEntry(msgid="_File", msgstr="_Fichier"),  # duplicate of editor's pair
        polib.POEntry(msgid="Fuzzy one", msgstr="Flou", flags=["fuzzy"]),
        polib.POEntry(msgid="Untranslated message", msgstr=""),  # .mo files never hold these
    ])
    (root / "fr/LC_MESSAGES/broken.mo").write_bytes(b"\xde\x12\x04\x95 this is not a catalog")
    # Russian: three plural forms; n=1 -> form 0, n=2 -> form 1.
    write_catalog(root / "ru/LC_MESSAGES/editor.mo", [
        polib.POEntry(msgid="%d file", msgid_plural="%d files", msgstr_plural={0: "%d файл", 1: "%d файла", 2: "%d файлов"}),
        polib.POEntry(msgid="Zoom in", msgstr="Увеличить"),
    ], plural_forms="nplurals=3; plural=(n%10==1 && n%100!=11 ? 0 : n%10>=2 && n%10<=4 && (n%100<10 || n%100>=20) ? 1 : 2);")
    write_catalog(root / "ru/LC_MESSAGES/viewer.mo", [polib.POEntry(msgid="Zoom in", msgstr="Приблизить")])
    return root


def all_pairs(out: Path) -> list[tuple[str, str]]:
    return [pair for split in ("train", "dev", "test") for pair in load_tsv(out / f"{split}.tsv")]


def test_reads_mo_and_po_catalogs_and_cleans(locale_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    report = build_corpus(out, "en", "fr", locale_dir, cfg=CleanConfig(dev_fraction=0.3, test_fraction=0.3))
    pairs = set(all_pairs(out))
    assert ("File", "Fichier") in pairs  # accelerators gone on both sides
    assert ("Save As...", "Enregistrer sous...") in pairs
    assert ("Cannot open %s: %s", "Impossible d'ouvrir %s : %s") in pairs  # placeholders intact
    assert ("Moved %1$s to %2$s", "%2$s a reçu %1$s") in pairs  # reordered positional ones are fine
    assert ("Line one line two", "Ligne un ligne deux") in pairs  # multi-line entry on one line
    assert ("%d file", "%d fichier") in pairs and ("%d files", "%d fichiers") in pairs
    assert ("Open", "Ouvrir") in pairs and ("Open", "Ouvert") in pairs  # both contexts kept
    assert ("Zoom in", "Zoom avant") in pairs
    sources = {s for s, _ in pairs}
    assert not sources & {"Untranslated message", "OK", "Wrong %d placeholder", "Fuzzy one"}
    assert report.dropped == {"duplicate": 1, "identical": 1, "placeholder_mismatch": 1, "untranslated": 1}
    assert report.corrupt_catalogs == 1 and report.catalogs == 2
    assert report.kept == len(pairs) == sum(report.splits.values())
    saved = json.loads((out / "report.json").read_text())
    assert saved["per_catalog"]["editor"]["dropped"] == 2  # identical, placeholder mismatch
    assert saved["per_catalog"]["viewer"]["dropped"] == 2  # duplicate, untranslated
    for line in (out / "train.tsv").read_text().splitlines():
        assert line.count("\t") == 1


def test_plural_forms_follow_the_catalog_rule(locale_dir: Path, tmp_path: Path) -> None:
    build_corpus(tmp_path / "ru", "en", "ru", locale_dir, cfg=CleanConfig(dev_fraction=0, test_fraction=0))
    pairs = set(all_pairs(tmp_path / "ru"))
    assert ("%d file", "%d файл") in pairs and ("%d files", "%d файла") in pairs


def test_two_foreign_languages_pivot_through_english(locale_dir: Path, tmp_path: Path) -> None:
    build_corpus(tmp_path / "fr-ru", "fr", "ru", locale_dir, cfg=CleanConfig(dev_fraction=0, test_fraction=0))
    pairs = set(all_pairs(tmp_path / "fr-ru"))
    assert ("Zoom avant", "Приблизить") in pairs  # joined within the same domain only
    assert ("%d fichiers", "%d файла") in pairs


def test_bad_inputs_give_clear_errors(locale_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="locale directory not found"):
        build_corpus(tmp_path / "x", "en", "fr", tmp_path / "nowhere")
    with pytest.raises(CorpusError, match="no gettext catalogs for language 'xx'"):
        build_corpus(tmp_path / "x", "en", "xx", locale_dir)
    with pytest.raises(CorpusError, match="TSV file not found"):
        build_corpus(tmp_path / "x", "en", "fr", None, tsv_files=[tmp_path / "missing.tsv"])
    assert main(["data", "build", "--out", str(tmp_path / "x"), "--locale-dir", str(tmp_path / "nowhere")]) == 2


def test_tsv_and_moses_inputs(tmp_path: Path) -> None:
    (tmp_path / "own.tsv").write_text("Hello world\tBonjour le monde\nno tab here\nGood night\tBonne nuit\n")
    (tmp_path / "para.en").write_text("The cat\nThe dog\n")
    (tmp_path / "para.fr").write_text("Le chat\nLe chien\n")
    report = build_corpus(tmp_path / "out", "en", "fr", None, tsv_files=[tmp_path / "own.tsv"],
                          moses_prefixes=[tmp_path / "para"], cfg=CleanConfig(dev_fraction=0, test_fraction=0))
    assert set(all_pairs(tmp_path / "out")) == {
        ("Hello world", "Bonjour le monde"), ("Good night", "Bonne nuit"), ("The cat", "Le chat"), ("The dog", "Le chien")}
    assert report.malformed_lines == 1
    (tmp_path / "bad.en").write_text("one\ntwo\n")
    (tmp_path / "bad.fr").write_text("un\n")
    with pytest.raises(CorpusError, match="different numbers of lines"):
        build_corpus(tmp_path / "out2", "en", "fr", None, moses_prefixes=[tmp_path / "bad"])


@pytest.mark.parametrize("text, expected", [
    ("_File", "File"), ("Pri_ority:", "Priority:"), ("&Open", "Open"), ("Save &As...", "Save As..."),
    ("文件(_F)", "文件"), ("LC_ALL is not set", "LC_ALL is not set"), ("Tom & Jerry", "Tom & Jerry"),
    ("Rock &amp; roll", "Rock &amp; roll"), ("use --no_color", "use --no_color"), ("%s_%d", "%s_%d"),
    ("  two\n lines\u00a0:  ", "two lines :"),
])
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


def test_placeholders_ignore_position() -> None:
    assert placeholders("%1$s copied to %2$d") == placeholders("%d reçu %s") == ["%d", "%s"]
    assert placeholders("100%% done, %-10.3lf left %zu") == ["%-10.3lf", "%zu"]


def test_split_is_deterministic_and_leak_free(locale_dir: Path, tmp_path: Path) -> None:
    cfg = CleanConfig(dev_fraction=0.3, test_fraction=0.3)
    build_corpus(tmp_path / "a", "en", "fr", locale_dir, cfg=cfg)
    build_corpus(tmp_path / "b", "en", "fr", locale_dir, cfg=cfg)
    for split in ("train", "dev", "test"):
        assert (tmp_path / "a" / f"{split}.tsv").read_bytes() == (tmp_path / "b" / f"{split}.tsv").read_bytes()
    # Near-duplicates share a split key, so they can never straddle two splits.
    variants = ["Open", "_Open", "Open...", "open", "OPEN!"]
    assert len({split_key(v) for v in variants}) == 1
    assert len({split_of(v, cfg) for v in variants}) == 1
    keys = {split: {split_key(s) for s, _ in load_tsv(tmp_path / "a" / f"{split}.tsv")} for split in ("train", "dev", "test")}
    assert not keys["train"] & keys["dev"] and not keys["train"] & keys["test"] and not keys["dev"] & keys["test"]
    # Fractions are honoured on a large synthetic set.
    counts = {"train": 0, "dev": 0, "test": 0}
    for i in range(20000):
        counts[split_of(f"message number {i}", CleanConfig())] += 1
    assert 300 < counts["dev"] < 500 and 300 < counts["test"] < 500
