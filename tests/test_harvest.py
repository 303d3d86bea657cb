"""The Debian harvest on fixture .deb files the tests build themselves (dpkg-deb --build): package
and file selection, extraction of only translation files, resumability, bad packages, the
reserved list, and what `data build` makes of the cache (help-page alignment, the ood split).
Nothing here downloads: apt is replaced by a local directory of .debs or a fake apt-get."""

from __future__ import annotations

import collections
import gzip
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import polib
import pytest

from attnserve.cli import main
from attnserve.model import corpus as corpus_module
from attnserve.model import harvest as harvest_module
from attnserve.model.corpus import CorpusError, OodSplit, build_corpus, load_tsv
from attnserve.model.harvest import (
    AptGetFetcher,
    DirectoryFetcher,
    HarvestOptions,
    PackageInfo,
    apt_sources,
    contents_urls,
    harvest,
    local_package_info,
)
from attnserve.model.mallard import HelpRoot, align_pages, read_help_pages
from attnserve.model.reserved import ReservedList

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")

RESERVED_TEXT = """\
# reserved for evaluation
package reserved-tool
catalog secretcat
"""


def mo_bytes(entries: dict[str, str]) -> bytes:
    po = polib.POFile()
    po.metadata = {"Content-Type": "text/plain; charset=UTF-8"}
    for msgid, msgstr in entries.items():
        po.append(polib.POEntry(msgid=msgid, msgstr=msgstr))
    return po.to_binary()


def mallard(body: str, info: str = "") -> str:
    return ('<?xml version="1.0" encoding="utf-8"?>\n'
            '<page xmlns="http://projectmallard.org/1.0/" xmlns:its="http://www.w3.org/2005/11/its" type="topic" id="p">\n'
            f'  <info><desc>Open a file.</desc><credit type="author"><name>Someone</name></credit>{info}</info>\n'
            f"{body}\n</page>\n")


C_PAGE = mallard("""
  <title>Open files</title>
  <p>You can open a file from the <gui>File</gui> menu. Press <key>Ctrl</key>+<key>O</key> to open it faster.</p>
  <p>See <link xref="other"/> for more.</p>
  <code>editor --open FILE</code>
  <section><title>Recent files</title>
    <list><item><p>Recent files are listed first.</p></item></list>
  </section>""")
FR_PAGE = mallard("""
  <title>Ouvrir des fichiers</title>
  <p>Vous pouvez ouvrir un fichier depuis le menu <gui>Fichier</gui>. Appuyez sur <key>Ctrl</key>+<key>O</key> pour l’ouvrir plus vite.</p>
  <p>Consultez <link xref="other"/> pour en savoir plus.</p>
  <code>editor --open FILE</code>
  <section><title>Fichiers récents</title>
    <list><item><p>Les fichiers récents sont affichés en premier.</p></item></list>
  </section>""", info='<credit type="translator"><name>Traducteur</name></credit>').replace("Open a file.", "Ouvrir un fichier.")
C_SHIFTED = mallard("<title>Shifted</title><p>One.</p>")
FR_SHIFTED = mallard("<title>Décalé</title><p>Un.</p><p>Deux.</p>").replace("Open a file.", "Ouvrir un fichier.")


def build_deb(out_dir: Path, name: str, version: str, files: dict[str, bytes | str], work: Path) -> Path:
    root = work / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        f"Description: fixture\n fixture package\n")
    for path, content in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    deb = out_dir / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


# Package -> files. What each package tests is said next to it.
PACKAGES: dict[str, dict[str, bytes | str]] = {
    # gettext in two target languages, plus files that must never be extracted
    "gnome-editor": {
        "usr/share/locale/fr/LC_MESSAGES/editor.mo": mo_bytes({"Open": "Ouvrir", "Save the file": "Enregistrer le fichier"}),
        "usr/share/locale/de/LC_MESSAGES/editor.mo": mo_bytes({"Open": "Öffnen"}),
        "usr/share/locale/ru/LC_MESSAGES/editor.mo": mo_bytes({"Open": "Открыть"}),  # a language not asked for
        "usr/share/help/fr/editor/open.page": FR_PAGE,
        "usr/share/help/fr/editor/shifted.page": FR_SHIFTED,
        "usr/bin/editor": b"\x7fELF not really",
        "usr/share/doc/gnome-editor/README": "readme",
    },
    # the English help pages live in a sibling package
    "gnome-editor-common": {
        "usr/share/help/C/editor/open.page": C_PAGE,
        "usr/share/help/C/editor/shifted.page": C_SHIFTED,
        "usr/share/help/C/manual-nobody-translated/index.page": C_SHIFTED,
    },
    "libreoffice-l10n-fr": {
        "usr/lib/libreoffice/program/resource/fr/LC_MESSAGES/sw.mo": mo_bytes({"Insert Table": "Insérer un tableau"}),
    },
    # a command-line tool, held out in the ood test
    "cli-tool": {
        "usr/share/locale/fr/LC_MESSAGES/clitool.mo": mo_bytes({"Open": "Ouvrir", "invalid option": "option invalide",
                                                                "missing operand": "opérande manquant"}),
    },
    # a reserved package: never downloaded
    "reserved-tool": {
        "usr/share/locale/fr/LC_MESSAGES/reservedtool.mo": mo_bytes({"Reserved package text": "Texte réservé"}),
    },
    # an ordinary package that ships a reserved catalog: that catalog is never extracted
    "sneaky": {
        "usr/share/locale/fr/LC_MESSAGES/secretcat.mo": mo_bytes({"Secret catalog text": "Texte secret"}),
        "usr/share/locale/fr/LC_MESSAGES/sneaky.mo": mo_bytes({"Sneaky but fine": "Sournois mais correct"}),
    },
    # only English pages and no translation: not selected at all
    "english-only": {"usr/share/help/C/lonely/index.page": C_SHIFTED},
}


def write_contents(path: Path, packages: dict[str, dict[str, bytes | str]]) -> Path:
    """A Contents-all.gz in the archive's format (path, padding, section/package list)."""
    owners: dict[str, list[str]] = collections.defaultdict(list)
    for name, files in packages.items():
        for file_path in files:
            owners[file_path].append(f"misc/{name}")
    lines = [f"{file_path:<60} {','.join(names)}\n" for file_path, names in sorted(owners.items())]
    with gzip.open(path, "wt") as f:
        f.writelines(lines)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A local 'archive': .debs, a Contents index, a corrupt package and a reserved list."""
    base = tmp_path_factory.mktemp("archive")
    debs = base / "debs"
    debs.mkdir()
    for name, files in PACKAGES.items():
        build_deb(debs, name, "1.0", files, base / "work")
    (debs / "broken_1.0_all.deb").write_bytes(b"!<arch>\nthis is no deb at all")
    listed = dict(PACKAGES, broken={"usr/share/locale/fr/LC_MESSAGES/broken.mo": b""})
    contents = write_contents(base / "Contents-all.gz", listed)
    reserved = base / "heldout-packages.txt"
    reserved.write_text(RESERVED_TEXT)
    return {"debs": debs, "contents": contents, "reserved": reserved}


class CountingFetcher(DirectoryFetcher):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        object.__setattr__(self, "asked", [])

    def __call__(self, packages, workdir):  # type: ignore[override]
        self.asked.extend(p.name for p in packages)  # type: ignore[attr-defined]
        return super().__call__(packages, workdir)


def run_harvest(archive: dict[str, Path], cache: Path, fetcher=None, langs=("fr", "de")):
    options = HarvestOptions(src="en", tgt=list(langs), cache=cache, reserved=ReservedList.load(archive["reserved"]),
                             contents=[archive["contents"]], progress=False, jobs=2, batch_packages=3)
    fetcher = fetcher or CountingFetcher(archive["debs"])
    return harvest(options, fetcher, lambda names: local_package_info(archive["debs"])), fetcher


def tree_files(cache: Path, package: str) -> set[str]:
    root = cache / "packages" / package
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_selects_packages_and_extracts_only_translation_files(archive: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    report, fetcher = run_harvest(archive, cache)
    harvested = {r.package: r for r in report.harvested}
    assert set(harvested) == {"gnome-editor", "gnome-editor-common", "libreoffice-l10n-fr", "cli-tool", "sneaky"}
    assert "english-only" not in fetcher.asked and "reserved-tool" not in fetcher.asked
    assert report.reserved_packages_skipped == ["reserved-tool"]
    assert tree_files(cache, "gnome-editor") == {
        ".harvest.json",
        "usr/share/locale/fr/LC_MESSAGES/editor.mo",
        "usr/share/locale/de/LC_MESSAGES/editor.mo",
        "usr/share/help/fr/editor/open.page",
        "usr/share/help/fr/editor/shifted.page",
    }  # no binary, no README, no Russian
    # the sibling's English pages of the translated manual, not of the untranslated one
    assert tree_files(cache, "gnome-editor-common") == {
        ".harvest.json", "usr/share/help/C/editor/open.page", "usr/share/help/C/editor/shifted.page"}
    assert tree_files(cache, "libreoffice-l10n-fr") == {
        ".harvest.json", "usr/lib/libreoffice/program/resource/fr/LC_MESSAGES/sw.mo"}
    editor = harvested["gnome-editor"]
    assert editor.version == "1.0" and editor.catalogs == {"fr": 1, "de": 1} and editor.messages == {"fr": 2, "de": 1}
    assert editor.help_pages == {"fr": 2}
    assert not list((cache / "tmp").rglob("*.deb"))  # every .deb deleted after extraction
    saved = json.loads((cache / "harvest-report.json").read_text())
    assert {p["package"]: p["version"] for p in saved["harvested"]}["cli-tool"] == "1.0"
    assert saved["totals"]["fr"]["packages"] == 4


def test_reserved_catalog_is_never_extracted(archive: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    report, _ = run_harvest(archive, cache)
    assert tree_files(cache, "sneaky") == {".harvest.json", "usr/share/locale/fr/LC_MESSAGES/sneaky.mo"}
    assert report.reserved_catalogs_skipped == 1
    assert not (cache / "packages" / "reserved-tool").exists()


def test_corrupt_deb_is_reported_and_skipped(archive: dict[str, Path], tmp_path: Path) -> None:
    report, _ = run_harvest(archive, tmp_path / "cache")
    failed = {f.package: f.reason for f in report.failed}
    assert set(failed) == {"broken"} and "corrupt" in failed["broken"]
    assert not (tmp_path / "cache/packages/broken").exists()


def test_rerun_is_idempotent_and_resumes(archive: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, _ = run_harvest(archive, cache)
    shutil.rmtree(cache / "packages" / "cli-tool")  # as if interrupted before this package
    again, fetcher = run_harvest(archive, cache)
    assert sorted(fetcher.asked) == ["broken", "cli-tool"]  # only what is not done (the failure is retried)
    assert [r.package for r in again.harvested] == [r.package for r in first.harvested]
    assert tree_files(cache, "gnome-editor") == tree_files(cache, "gnome-editor")


def test_fake_apt_get_batches_and_isolates_a_failing_package(archive: dict[str, Path], tmp_path: Path) -> None:
    """AptGetFetcher runs the command once for a batch; a package the command cannot fetch
    (apt exits 100 for the whole batch) is retried alone, so only it fails."""
    fake = tmp_path / "fake-apt-get"
    log_file = tmp_path / "calls.log"
    fake.write_text(textwrap.dedent(f"""\
        import shutil, sys
        from pathlib import Path
        names = [arg.split("=")[0] for arg in sys.argv[1:]]
        with open({str(log_file)!r}, "a") as log:
            log.write(" ".join(names) + "\\n")
        if "missing" in names:
            sys.exit(100)  # like apt: an unknown package aborts the whole call
        for name in names:
            for deb in Path({str(archive["debs"])!r}).glob(name + "_*.deb"):
                shutil.copy(deb, ".")
        """))
    fetcher = AptGetFetcher(command=(sys.executable, str(fake)))
    packages = [PackageInfo("cli-tool", "1.0", 1), PackageInfo("missing", "1.0", 1), PackageInfo("sneaky", "1.0", 1)]
    workdir = tmp_path / "work"
    workdir.mkdir()
    debs, errors = fetcher(packages, workdir)
    assert set(debs) == {"cli-tool", "sneaky"} and set(errors) == {"missing"}
    assert log_file.read_text().splitlines()[0] == "cli-tool missing sneaky"


def test_missing_index_is_reported_not_a_crash(archive: dict[str, Path], tmp_path: Path) -> None:
    options = HarvestOptions(src="en", tgt=["fr"], cache=tmp_path / "cache", contents=[tmp_path / "nope.gz"],
                             progress=False)
    report = harvest(options, DirectoryFetcher(archive["debs"]), lambda names: {})
    assert report.selected == 0 and report.index_problems and not report.harvested
    assert (tmp_path / "cache/harvest-report.json").is_file()


def test_apt_sources_give_the_contents_urls(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://deb.example.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://deb.example.org/debian-security\nSuites: bookworm-security\n"
        "Components: main\n")
    sources = apt_sources(tmp_path / "d", tmp_path / "none.list")
    assert contents_urls(sources, "amd64") == [
        "http://deb.example.org/debian/dists/bookworm/main/Contents-all.gz",
        "http://deb.example.org/debian/dists/bookworm/main/Contents-amd64.gz"]


def test_cli_harvest_from_a_deb_directory(archive: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "harvest", "--tgt", "fr", "--cache", str(tmp_path / "cache"), "--deb-dir", str(archive["debs"]),
                 "--contents", str(archive["contents"]), "--reserved", str(archive["reserved"]), "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reserved_packages_skipped"] == 1 and summary["failed"] == 1


# --------------------------------------------------------------------------------------------
# Help pages


def test_help_pages_align_block_by_block(tmp_path: Path) -> None:
    (tmp_path / "C.page").write_text(C_PAGE)
    (tmp_path / "fr.page").write_text(FR_PAGE)
    pairs = align_pages(tmp_path / "C.page", tmp_path / "fr.page")
    assert pairs == [
        ("Open a file.", "Ouvrir un fichier."),  # info/desc; the translator's credit does not shift anything
        ("Open files", "Ouvrir des fichiers"),
        ("You can open a file from the File menu.", "Vous pouvez ouvrir un fichier depuis le menu Fichier."),
        ("Press Ctrl+O to open it faster.", "Appuyez sur Ctrl+O pour l’ouvrir plus vite."),  # same sentence count: split
        ("Recent files", "Fichiers récents"),
        ("Recent files are listed first.", "Les fichiers récents sont affichés en premier."),
    ]  # the paragraph with a generated link text and the code block are left out
    (tmp_path / "C2.page").write_text(C_SHIFTED)
    (tmp_path / "fr2.page").write_text(FR_SHIFTED)
    assert align_pages(tmp_path / "C2.page", tmp_path / "fr2.page") is None  # different structure


def test_help_pages_across_sibling_packages(tmp_path: Path) -> None:
    for lang, name, page in (("C", "common", C_PAGE), ("fr", "app", FR_PAGE)):
        target = tmp_path / name / lang / "editor/open.page"
        target.parent.mkdir(parents=True)
        target.write_text(page)
    stats: collections.Counter = collections.Counter()
    roots = [HelpRoot(tmp_path / "common", "app-common"), HelpRoot(tmp_path / "app", "app")]
    pairs = list(read_help_pages(roots, "en", "fr", stats))
    assert len(pairs) == 6 and {p[3] for p in pairs} == {"app"} and {p[2] for p in pairs} == {"editor"}
    assert stats["help_pages_aligned"] == 1
    assert list(read_help_pages(roots, "en", "fr", stats, reserved_docs=frozenset({"editor"}))) == []


# --------------------------------------------------------------------------------------------
# data build on the cache


@pytest.fixture
def harvested(archive: dict[str, Path], tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    run_harvest(archive, cache)
    return cache


@pytest.fixture
def local_locale(tmp_path: Path) -> Path:
    """A machine locale directory holding an ordinary catalog and a reserved one."""
    root = tmp_path / "locale"
    (root / "fr/LC_MESSAGES").mkdir(parents=True)
    (root / "fr/LC_MESSAGES/localapp.mo").write_bytes(mo_bytes({"Quit the program": "Quitter le programme"}))
    (root / "fr/LC_MESSAGES/secretcat.mo").write_bytes(mo_bytes({"Installed secret text": "Texte secret installé"}))
    (root / "fr/LC_MESSAGES/secretcat.po").write_text('msgid "Po secret"\nmsgstr "Po secret fr"\n')
    return root


def all_rows(out: Path) -> list[tuple[str, str]]:
    return [row for split in out.glob("*.tsv") for row in load_tsv(split)]


def test_build_reads_cache_help_and_locale_never_reserved(harvested: Path, local_locale: Path, tmp_path: Path,
                                                          archive: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real_load = corpus_module._load_catalog
    monkeypatch.setattr(corpus_module, "_load_catalog", lambda path: opened.append(path) or real_load(path))
    reserved = ReservedList.load(archive["reserved"])
    out = tmp_path / "corpus"
    report = build_corpus(out, "en", "fr", local_locale, cache_dirs=[harvested], reserved=reserved)
    sources = {s for s, _ in all_rows(out)}
    assert {"Quit the program", "Save the file", "Insert Table", "Sneaky but fine", "invalid option",
            "Recent files are listed first."} <= sources
    assert not any("secret" in s.lower() or "reserved" in s.lower() for s in sources)
    assert not [p for p in opened if p.stem == "secretcat"]  # the reserved catalog was never opened
    assert report.reserved["catalogs_skipped"] == 1  # its .mo and .po (one domain) in the local locale directory
    assert report.read_by_source["help"] == 6 and report.help_pages == {"aligned": 1, "misaligned": 1}
    assert report.packages == 5


def test_build_cli_reserved_default_flag_and_ood(harvested: Path, local_locale: Path, tmp_path: Path,
                                                 archive: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v2"
    code = main(["data", "build", "--out", str(out), "--locale-dir", str(local_locale), "--cache", str(harvested),
                 "--reserved", str(archive["reserved"]), "--ood-dev", "gnome-editor", "--ood-test", "cli-tool"])
    assert code == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["ood"]["dev_packages"] == ["gnome-editor"] and report["ood"]["test_packages"] == ["cli-tool"]
    ood_test = set(load_tsv(out / "ood-test.tsv"))
    ood_dev = set(load_tsv(out / "ood-dev.tsv"))
    assert ("invalid option", "option invalide") in ood_test
    assert ("You can open a file from the File menu.", "Vous pouvez ouvrir un fichier depuis le menu Fichier.") in ood_dev
    # "Open" is in both held-out packages: ood-test keeps it, ood-dev and the in-domain splits lose it
    assert ("Open", "Ouvrir") in ood_test and ("Open", "Ouvrir") not in ood_dev
    in_domain = {row for split in ("train", "dev", "test") for row in load_tsv(out / f"{split}.tsv")}
    held_sources = {corpus_module.split_key(s) for s, _ in ood_test | ood_dev}
    assert not {s for s, _ in in_domain if corpus_module.split_key(s) in held_sources}
    assert ("Insert Table", "Insérer un tableau") in in_domain
    assert report["reserved"]["catalogs_skipped"] == 1


def test_ood_packages_must_not_be_local_or_reserved(harvested: Path, tmp_path: Path, archive: dict[str, Path]) -> None:
    reserved = ReservedList.load(archive["reserved"])
    local = tmp_path / "locale/fr/LC_MESSAGES"
    local.mkdir(parents=True)
    (local / "clitool.mo").write_bytes(mo_bytes({"Open": "Ouvrir"}))  # the held-out tool is installed here
    with pytest.raises(CorpusError, match="clitool"):
        build_corpus(tmp_path / "a", "en", "fr", tmp_path / "locale", cache_dirs=[harvested], reserved=reserved,
                     ood=OodSplit(test_packages=("cli-tool",)))
    with pytest.raises(CorpusError, match="reserved"):
        build_corpus(tmp_path / "b", "en", "fr", None, cache_dirs=[harvested], reserved=reserved,
                     ood=OodSplit(test_packages=("reserved-tool",)))


def test_build_for_another_language_from_the_same_cache(harvested: Path, tmp_path: Path) -> None:
    report = build_corpus(tmp_path / "de", "en", "de", None, cache_dirs=[harvested])
    assert report.kept == 1 and load_tsv(tmp_path / "de/train.tsv") + load_tsv(tmp_path / "de/dev.tsv") + \
        load_tsv(tmp_path / "de/test.tsv") == [("Open", "Öffnen")]
    assert harvest_module.HELP_ROOT == "usr/share/help"
