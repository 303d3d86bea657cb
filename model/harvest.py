"""Harvest translations from the Debian archive: every package that ships gettext catalogs (or
GNOME help pages, or LibreOffice resource catalogs) for the target languages, not only what this
machine has installed.

    index (Contents-*.gz or apt-file) -> select packages -> apt-get download -> extract only the
    translation files into CACHE/packages/<package>/ -> delete the .deb -> mark the package done

The cache then reads like a set of locale directories (`corpus.read_cache`). Every step that can
fail on the network or on a bad file is reported and skipped: a missing index, a package apt does
not know, a failed download, a corrupt .deb. A rerun skips the packages already done, so an
interrupted harvest resumes where it stopped.

Reserved packages (the evaluation list) are never downloaded, and reserved catalogs are never
extracted, so nothing downstream can read them by accident.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import fcntl
import gzip
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from attnserve.model.reserved import ReservedList

log = logging.getLogger(__name__)

STATE_FILE = ".harvest.json"  # per-package done-marker: written last, after a complete extraction
REPORT_FILE = "harvest-report.json"
PACKAGES_DIR = "packages"
DEFAULT_MAX_DEB_MB = 50.0  # the 8 packages above this (2.4 GB -> 3.7 GB) are game data and images
INDEX_MAX_AGE_S = 7 * 24 * 3600

# Where translation files live inside a package (paths as dpkg-deb lists them, without "./").
LOCALE_ROOTS = ("usr/share/locale", "usr/lib/libreoffice/program/resource")
HELP_ROOT = "usr/share/help"
HELP_SOURCE_LANG = "C"  # GNOME help's untranslated (English) pages


class HarvestError(Exception):
    """The harvest cannot start (no index at all, bad arguments)."""


# --------------------------------------------------------------------------------------------
# Which files are translation files


@dataclasses.dataclass(frozen=True)
class TranslationFiles:
    """Recognises the translation files of some languages; `doc_filter` limits the English
    (C) help pages to documents that have a translation, so an English-only manual is not kept."""

    langs: tuple[str, ...]
    reserved: ReservedList = ReservedList()

    def __post_init__(self) -> None:
        alternatives = "|".join(re.escape(lang) for lang in self.langs)
        roots = "|".join(re.escape(root) for root in LOCALE_ROOTS)
        object.__setattr__(self, "_catalog", re.compile(rf"^(?:{roots})/({alternatives})/LC_MESSAGES/([^/]+)\.mo$"))
        object.__setattr__(self, "_help", re.compile(
            rf"^{re.escape(HELP_ROOT)}/({alternatives}|{HELP_SOURCE_LANG})/([^/]+)/(?:[^/]+/)*[^/]+\.page$"))

    def classify(self, path: str) -> tuple[str, str, str] | None:
        """(kind, lang, name) for a translation file, kind "catalog" (name: the domain) or
        "help" (name: the document); None for anything else."""
        path = path.removeprefix("./").removeprefix("/")
        match = self._catalog.match(path)  # type: ignore[attr-defined]
        if match:
            return "catalog", match.group(1), match.group(2)
        match = self._help.match(path)  # type: ignore[attr-defined]
        if match:
            return "help", match.group(1), match.group(2)
        return None

    def reserved_file(self, path: str) -> bool:
        """A reserved catalog (NAME.mo) or a help document named like one: never extracted."""
        found = self.classify(path)
        return found is not None and found[2] in self.reserved.catalogs


@dataclasses.dataclass
class PackageWant:
    """What the index says one package holds for us."""

    name: str
    catalogs: dict[str, int] = dataclasses.field(default_factory=dict)  # lang -> .mo files
    help_pages: dict[str, int] = dataclasses.field(default_factory=dict)  # lang (or C) -> pages
    help_docs: set[str] = dataclasses.field(default_factory=set)


# --------------------------------------------------------------------------------------------
# The index: which package ships which file


@dataclasses.dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]


def apt_sources(sources_dir: Path = Path("/etc/apt/sources.list.d"),
                sources_list: Path = Path("/etc/apt/sources.list")) -> list[AptSource]:
    """The `deb` entries of apt's configuration, deb822 (*.sources) and one-line format."""
    found: list[AptSource] = []
    for path in sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    found.append(AptSource(uri.rstrip("/"), suite, tuple(fields.get("components", "main").split())))
    if sources_list.is_file():
        for line in sources_list.read_text(encoding="utf-8", errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                found.append(AptSource(words[1].rstrip("/"), words[2], tuple(words[3:]) or ("main",)))
    return found


def _dpkg_architecture() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip() or "amd64"
    except (OSError, subprocess.CalledProcessError):
        return "amd64"


def contents_urls(sources: list[AptSource], arch: str) -> list[str]:
    """Contents indexes of the first base suite (not -updates/-security: those hold a few
    fixed packages whose file lists the base suite already has)."""
    base = [s for s in sources if "-" not in s.suite and "security" not in s.uri] or sources
    if not base:
        return []
    source = base[0]
    component = "main" if "main" in source.components else source.components[0]
    return [f"{source.uri}/dists/{source.suite}/{component}/Contents-{name}.gz" for name in ("all", arch)]


def download_index(urls: list[str], index_dir: Path, refresh: bool = False) -> tuple[list[Path], list[str]]:
    """Download (or reuse) the Contents files; returns the files and the problems met."""
    index_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    problems: list[str] = []
    for url in urls:
        target = index_dir / url.rsplit("/", 1)[-1]
        fresh = target.is_file() and time.time() - target.stat().st_mtime < INDEX_MAX_AGE_S
        if not fresh or refresh:
            partial = target.with_suffix(".partial")
            try:
                log.info("downloading %s", url)
                with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
                partial.replace(target)
            except OSError as exc:
                partial.unlink(missing_ok=True)
                problems.append(f"{url}: {exc}")
                if not target.is_file():
                    continue
                log.warning("using the older copy of %s", target)
        files.append(target)
    return files, problems


def scan_contents(files: Iterable[Path], wanted: TranslationFiles) -> Iterator[tuple[str, str]]:
    """(package, path) for every translation file a Contents index lists. A Contents line is
    `PATH   section/pkg[,section/pkg...]`; the path may hold spaces, the package list does not."""
    prefixes = tuple(f"{root}/" for root in (*LOCALE_ROOTS, HELP_ROOT))
    for path in files:
        try:
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.startswith(prefixes):
                        continue
                    file_path, _, locations = line.rstrip("\n").rpartition(" ")
                    file_path = file_path.rstrip()
                    if wanted.classify(file_path) is None:
                        continue
                    for location in locations.split(","):
                        yield location.rsplit("/", 1)[-1], file_path
        except (OSError, EOFError) as exc:
            log.warning("cannot read index %s: %s", path, exc)


def scan_apt_file(wanted: TranslationFiles) -> Iterator[tuple[str, str]]:
    """The same from `apt-file search` (when apt-file is installed and its cache is updated)."""
    langs = "|".join(re.escape(lang) for lang in wanted.langs)
    pattern = rf"^/(usr/share/locale|usr/lib/libreoffice/program/resource)/({langs})/LC_MESSAGES/|^/usr/share/help/({langs}|C)/"
    result = subprocess.run(["apt-file", "search", "--regexp", pattern], capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise OSError(f"apt-file failed: {result.stderr.strip()[:200]}")
    for line in result.stdout.splitlines():
        package, _, file_path = line.partition(": ")
        if wanted.classify(file_path):
            yield package.strip(), file_path.strip().lstrip("/")


def select_packages(listing: Iterable[tuple[str, str]], wanted: TranslationFiles) -> dict[str, PackageWant]:
    """Packages with a catalog or help page in a target language, plus the packages that hold
    the English (C) pages of a translated help document (often a sibling, e.g. gedit-common)."""
    packages: dict[str, PackageWant] = {}
    english_help: dict[str, list[str]] = {}  # document -> packages with C pages of it
    translated_docs: set[str] = set()
    for package, path in listing:
        kind, lang, name = wanted.classify(path)  # type: ignore[misc]
        if kind == "help" and lang == HELP_SOURCE_LANG:
            english_help.setdefault(name, []).append(package)
            continue
        want = packages.setdefault(package, PackageWant(package))
        if kind == "catalog":
            want.catalogs[lang] = want.catalogs.get(lang, 0) + 1
        else:
            want.help_pages[lang] = want.help_pages.get(lang, 0) + 1
            want.help_docs.add(name)
            translated_docs.add(name)
    for doc in translated_docs:
        for package in english_help.get(doc, []):
            want = packages.setdefault(package, PackageWant(package))
            want.help_pages[HELP_SOURCE_LANG] = want.help_pages.get(HELP_SOURCE_LANG, 0) + 1
            want.help_docs.add(doc)
    return packages


# --------------------------------------------------------------------------------------------
# Package metadata (version, size) from apt's lists


@dataclasses.dataclass(frozen=True)
class PackageInfo:
    name: str
    version: str
    size: int  # bytes of the .deb

    @property
    def size_mb(self) -> float:
        return self.size / 1e6


def apt_package_info(names: list[str], chunk: int = 200) -> dict[str, PackageInfo]:
    """Candidate version and .deb size of each package apt knows (`apt-cache show`)."""
    info: dict[str, PackageInfo] = {}
    for start in range(0, len(names), chunk):
        batch = names[start:start + chunk]
        result = subprocess.run(["apt-cache", "show", "--no-all-versions", *batch], capture_output=True, text=True)
        # apt-cache exits 100 when one name is unknown, after printing the others.
        for stanza in result.stdout.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[:1].isspace())
            if "Package" in fields and "Version" in fields and fields["Package"] not in info:
                info[fields["Package"]] = PackageInfo(fields["Package"], fields["Version"], int(fields.get("Size", 0)))
    return info


# --------------------------------------------------------------------------------------------
# Fetching


class Fetcher(Protocol):
    """Puts the .debs of some packages into `workdir`; returns package -> .deb path for those it
    got and package -> error message for those it did not."""

    def __call__(self, packages: list[PackageInfo], workdir: Path) -> tuple[dict[str, Path], dict[str, str]]: ...


class FetchError(Exception):
    pass


def _debs_by_package(workdir: Path) -> dict[str, Path]:
    """NAME_VERSION_ARCH.deb files, by package name."""
    return {deb.name.split("_", 1)[0]: deb for deb in sorted(workdir.glob("*.deb"))}


@dataclasses.dataclass(frozen=True)
class AptGetFetcher:
    """`apt-get download NAME=VERSION ...` in a private directory, many packages a call: apt
    spends about a CPU second loading its cache on every start, more than a small package takes
    to download. When a batch fails as a whole (one unknown version aborts it), each missing
    package is retried alone, so one bad package costs only itself. `command` can be replaced
    (a fake apt-get for tests, or a proxy wrapper)."""

    command: tuple[str, ...] = ("apt-get", "download", "-q")
    timeout_s: float = 900.0

    def _run(self, packages: list[PackageInfo], workdir: Path) -> str:
        targets = [f"{p.name}={p.version}" if p.version else p.name for p in packages]
        try:
            result = subprocess.run([*self.command, *targets], cwd=workdir, capture_output=True, text=True,
                                    timeout=self.timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"download failed: {exc}"
        if result.returncode == 0:
            return ""
        message = " ".join(line for line in result.stderr.splitlines() if not line.startswith("W:"))
        return f"download failed (exit {result.returncode}): {message.strip()[:300]}"

    def __call__(self, packages: list[PackageInfo], workdir: Path) -> tuple[dict[str, Path], dict[str, str]]:
        problem = self._run(packages, workdir)
        got = _debs_by_package(workdir)
        missing = [p for p in packages if p.name not in got]
        errors: dict[str, str] = {}
        if missing and len(packages) > 1:
            for package in missing:
                problem = self._run([package], workdir)
                got = _debs_by_package(workdir)
                if package.name not in got:
                    errors[package.name] = problem or "download produced no .deb"
        elif missing:
            errors[missing[0].name] = problem or "download produced no .deb"
        wanted = {p.name for p in packages}
        return {name: path for name, path in got.items() if name in wanted}, errors


@dataclasses.dataclass(frozen=True)
class DirectoryFetcher:
    """Offline: take NAME_*.deb from a local directory (a mirror, or the tests' fixtures)."""

    directory: Path

    def __call__(self, packages: list[PackageInfo], workdir: Path) -> tuple[dict[str, Path], dict[str, str]]:
        got: dict[str, Path] = {}
        errors: dict[str, str] = {}
        for package in packages:
            candidates = sorted(self.directory.glob(f"{package.name}_*.deb"))
            exact = [p for p in candidates if p.name.split("_")[1] == package.version.replace(":", "%3a")]
            chosen = (exact or candidates)[:1]
            if not chosen:
                errors[package.name] = f"no {package.name}_*.deb in {self.directory}"
                continue
            got[package.name] = workdir / chosen[0].name
            shutil.copyfile(chosen[0], got[package.name])
        return got, errors


def local_package_info(directory: Path) -> dict[str, PackageInfo]:
    """Package versions and sizes from the file names of a directory of .debs."""
    info: dict[str, PackageInfo] = {}
    for deb in sorted(directory.glob("*.deb")):
        parts = deb.stem.split("_")
        if len(parts) >= 2:
            info[parts[0]] = PackageInfo(parts[0], parts[1].replace("%3a", ":"), deb.stat().st_size)
    return info


# --------------------------------------------------------------------------------------------
# Extraction


def mo_message_count(path: Path) -> int:
    """Translated messages in a .mo file, from its header (the empty msgid is the metadata)."""
    with open(path, "rb") as f:
        header = f.read(12)
    if len(header) < 12:
        return 0
    magic = struct.unpack("<I", header[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        return 0
    return max(0, struct.unpack(f"{order}I", header[8:12])[0] - 1)


@dataclasses.dataclass
class Extracted:
    files: list[str] = dataclasses.field(default_factory=list)
    reserved_files: list[str] = dataclasses.field(default_factory=list)
    links_skipped: int = 0


def extract_translations(deb: Path, dest: Path, wanted: TranslationFiles, help_docs: set[str] | None) -> Extracted:
    """Stream the package's file system through `dpkg-deb --fsys-tarfile` and write only its
    translation files under dest (same relative paths). Nothing else touches the disk, and no
    member can escape dest. Raises on a corrupt package."""
    extracted = Extracted()
    process = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    written: dict[str, Path] = {}
    try:
        assert process.stdout is not None
        with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
            for member in archive:
                name = member.name.removeprefix("./").lstrip("/")
                found = wanted.classify(name)
                if found is None:
                    continue
                kind, lang, doc = found
                if kind == "help" and lang == HELP_SOURCE_LANG and help_docs is not None and doc not in help_docs:
                    continue  # English pages of a manual nobody translated
                if wanted.reserved_file(name):
                    extracted.reserved_files.append(name)
                    continue
                if ".." in Path(name).parts:
                    continue
                target = dest / name
                if member.isfile():
                    source = archive.extractfile(member)
                    if source is None:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
                elif member.islnk() and member.linkname.removeprefix("./") in written:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(written[member.linkname.removeprefix("./")], target)
                else:
                    # Symlinks point at files of other packages or outside the tree: not ours to follow.
                    extracted.links_skipped += 1
                    continue
                written[name] = target
                extracted.files.append(name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        process.kill()
        process.wait()
        raise FetchError(f"corrupt .deb: {exc}") from exc
    finally:
        if process.stdout:
            process.stdout.close()
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.wait() != 0:
        raise FetchError(f"corrupt .deb (dpkg-deb exit {process.returncode}): {stderr.strip()[:300]}")
    return extracted


# --------------------------------------------------------------------------------------------
# The harvest


@dataclasses.dataclass
class PackageResult:
    package: str
    version: str
    size_mb: float
    catalogs: dict[str, int] = dataclasses.field(default_factory=dict)  # lang -> .mo files
    messages: dict[str, int] = dataclasses.field(default_factory=dict)  # lang -> translated messages
    help_pages: dict[str, int] = dataclasses.field(default_factory=dict)  # lang (C: English) -> pages
    reserved_catalogs_skipped: list[str] = dataclasses.field(default_factory=list)
    links_skipped: int = 0


@dataclasses.dataclass
class Skipped:
    package: str
    reason: str
    version: str = ""
    size_mb: float = 0.0


@dataclasses.dataclass
class HarvestReport:
    src: str
    langs: list[str]
    cache: str
    index: list[str]
    index_problems: list[str]
    reserved: dict[str, object]
    max_deb_mb: float
    selected: int = 0
    harvested: list[PackageResult] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    failed: list[Skipped] = dataclasses.field(default_factory=list)
    reserved_packages_skipped: list[str] = dataclasses.field(default_factory=list)
    reserved_catalogs_skipped: int = 0
    downloaded_mb: float = 0.0
    totals: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    finished: str = ""

    def summary(self) -> dict[str, object]:
        return {
            "selected": self.selected, "harvested": len(self.harvested), "skipped": len(self.skipped),
            "failed": len(self.failed), "reserved_packages_skipped": len(self.reserved_packages_skipped),
            "reserved_catalogs_skipped": self.reserved_catalogs_skipped, "downloaded_mb": round(self.downloaded_mb, 1),
            "totals": self.totals, "index_problems": self.index_problems,
        }


@dataclasses.dataclass
class HarvestOptions:
    src: str
    tgt: list[str]
    cache: Path
    reserved: ReservedList = ReservedList()
    max_deb_mb: float = DEFAULT_MAX_DEB_MB
    jobs: int = 4
    batch_packages: int = 24  # packages per apt-get call
    batch_mb: float = 80.0
    refresh_index: bool = False
    contents: list[Path] | None = None  # local Contents-*.gz files instead of the mirror's
    progress: bool = True

    @property
    def langs(self) -> tuple[str, ...]:
        """Every non-English language of the pairs: English is the msgid / the C help pages."""
        return tuple(dict.fromkeys(lang for lang in (self.src, *self.tgt) if lang not in ("en", HELP_SOURCE_LANG)))


def package_dir(cache: Path, package: str) -> Path:
    return cache / PACKAGES_DIR / package


def read_state(cache: Path, package: str) -> PackageResult | None:
    marker = package_dir(cache, package) / STATE_FILE
    try:
        return PackageResult(**json.loads(marker.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def harvest_batch(batch: list[PackageInfo], selection: dict[str, PackageWant], options: HarvestOptions,
                  wanted: TranslationFiles, fetch: Fetcher) -> list[PackageResult | Skipped]:
    """Download a batch of packages together, then extract each; one result per package."""
    scratch_root = options.cache / "tmp"
    scratch_root.mkdir(parents=True, exist_ok=True)
    results: list[PackageResult | Skipped] = []
    with tempfile.TemporaryDirectory(prefix="batch.", dir=scratch_root) as scratch:
        workdir = Path(scratch)
        try:
            debs, errors = fetch(batch, workdir)
        except Exception as exc:  # a fetcher that raises fails its batch, not the harvest
            debs, errors = {}, {info.name: f"download failed: {exc}" for info in batch}
        for info in batch:
            if info.name not in debs:
                results.append(Skipped(info.name, errors.get(info.name, "download produced no .deb"), info.version,
                                       round(info.size_mb, 1)))
                continue
            try:
                results.append(harvest_package(info, debs[info.name], selection.get(info.name), options, wanted))
            except Exception as exc:  # a corrupt package must never stop the others
                results.append(Skipped(info.name, str(exc), info.version, round(info.size_mb, 1)))
            finally:
                debs[info.name].unlink(missing_ok=True)  # never keep the .deb: only its translations
    return results


def harvest_package(info: PackageInfo, deb: Path, want: PackageWant | None, options: HarvestOptions,
                    wanted: TranslationFiles) -> PackageResult:
    """Extract, count, mark done. The package directory is built beside its final place and
    renamed in, so a crash leaves either nothing or a complete, marked package."""
    final = package_dir(options.cache, info.name)
    with tempfile.TemporaryDirectory(prefix=f"{info.name}.", dir=options.cache / "tmp") as scratch:
        staging = Path(scratch) / "tree"
        staging.mkdir()
        extracted = extract_translations(deb, staging, wanted, want.help_docs if want else None)
        result = PackageResult(info.name, info.version, round(info.size_mb, 3),
                               reserved_catalogs_skipped=sorted(extracted.reserved_files),
                               links_skipped=extracted.links_skipped)
        for name in extracted.files:
            kind, lang, _ = wanted.classify(name)  # type: ignore[misc]
            if kind == "catalog":
                result.catalogs[lang] = result.catalogs.get(lang, 0) + 1
                result.messages[lang] = result.messages.get(lang, 0) + mo_message_count(staging / name)
            else:
                result.help_pages[lang] = result.help_pages.get(lang, 0) + 1
        (staging / STATE_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
    return result


def build_listing(options: HarvestOptions, wanted: TranslationFiles, report: HarvestReport) -> list[tuple[str, str]]:
    if options.contents is not None:
        report.index = [str(p) for p in options.contents]
        report.index_problems.extend(f"index not found: {p}" for p in options.contents if not Path(p).is_file())
        return list(scan_contents([p for p in options.contents if Path(p).is_file()], wanted))
    if shutil.which("apt-file"):
        try:
            listing = list(scan_apt_file(wanted))
            if listing:
                report.index = ["apt-file"]
                return listing
            report.index_problems.append("apt-file found no translation files (run apt-file update?)")
        except OSError as exc:
            report.index_problems.append(str(exc))
    urls = contents_urls(apt_sources(), _dpkg_architecture())
    if not urls:
        report.index_problems.append("no deb source in apt's configuration to take a Contents index from")
        return []
    files, problems = download_index(urls, options.cache / "index", options.refresh_index)
    report.index = urls
    report.index_problems.extend(problems)
    return list(scan_contents(files, wanted))


def harvest(options: HarvestOptions, fetch: Fetcher | None = None,
            package_info: Callable[[list[str]], dict[str, PackageInfo]] | None = None) -> HarvestReport:
    """Select, fetch and extract every package with translations for options.langs; write
    CACHE/harvest-report.json. `fetch` and `package_info` default to apt (tests pass local ones)."""
    if not options.langs:
        raise HarvestError("no non-English language among --src/--tgt")
    fetch = fetch or AptGetFetcher()
    package_info = package_info or apt_package_info
    options.cache.mkdir(parents=True, exist_ok=True)
    # One harvest per cache at a time; the lock also makes leftovers in tmp/ safe to delete.
    with open(options.cache / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise HarvestError(f"another harvest is running on {options.cache}") from exc
        shutil.rmtree(options.cache / "tmp", ignore_errors=True)  # an interrupted run's scratch
        return _harvest_locked(options, fetch, package_info)


def _harvest_locked(options: HarvestOptions, fetch: Fetcher,
                    package_info: Callable[[list[str]], dict[str, PackageInfo]]) -> HarvestReport:
    wanted = TranslationFiles(options.langs, options.reserved)
    report = HarvestReport(src=options.src, langs=list(options.langs), cache=str(options.cache), index=[],
                           index_problems=[], reserved=options.reserved.summary(), max_deb_mb=options.max_deb_mb)

    listing = build_listing(options, wanted, report)
    selection = select_packages(listing, wanted)
    report.selected = len(selection)
    if not selection:
        for problem in report.index_problems:
            log.error("index: %s", problem)
        log.error("no package with translations for %s found; nothing harvested", ", ".join(options.langs))
    report.reserved_packages_skipped = sorted(name for name in selection if name in options.reserved.packages)
    candidates = sorted(name for name in selection if name not in options.reserved.packages)
    infos = package_info(candidates) if candidates else {}

    todo: list[PackageInfo] = []
    for name in candidates:
        info = infos.get(name)
        if info is None:
            report.skipped.append(Skipped(name, "not in apt's package lists"))
            continue
        if info.size_mb > options.max_deb_mb:
            report.skipped.append(Skipped(name, f"larger than --max-deb-mb {options.max_deb_mb:g}", info.version,
                                          round(info.size_mb, 1)))
            continue
        done = read_state(options.cache, name)
        if done is not None and done.version == info.version:
            report.harvested.append(done)
            continue
        todo.append(info)
    log.info("%d packages with translations (%d reserved, %d skipped), %d already harvested, %d to fetch (%.0f MB)",
             len(selection), len(report.reserved_packages_skipped), len(report.skipped), len(report.harvested),
             len(todo), sum(i.size_mb for i in todo))

    # Largest first: the long downloads start early and the tail of the progress bar is short.
    todo.sort(key=lambda i: -i.size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        futures = [pool.submit(harvest_batch, batch, selection, options, wanted, fetch)
                   for batch in make_batches(todo, options.batch_packages, options.batch_mb)]
        bar = tqdm(total=len(todo), unit="pkg", desc="harvest", disable=not options.progress)
        for future in concurrent.futures.as_completed(futures):
            for result in future.result():
                if isinstance(result, Skipped):
                    log.warning("skipping %s %s: %s", result.package, result.version, result.reason)
                    report.failed.append(result)
                else:
                    report.harvested.append(result)
                    report.downloaded_mb += result.size_mb
                bar.update()
        bar.close()

    report.harvested.sort(key=lambda r: r.package)
    report.failed.sort(key=lambda r: r.package)
    report.reserved_catalogs_skipped = sum(len(r.reserved_catalogs_skipped) for r in report.harvested)
    totals: dict[str, dict[str, int]] = {}
    for result in report.harvested:
        for field_name in ("catalogs", "messages", "help_pages"):
            for lang, count in getattr(result, field_name).items():
                per_lang = totals.setdefault(lang, {})
                per_lang[field_name] = per_lang.get(field_name, 0) + count
    for lang, per_lang in totals.items():
        per_lang["packages"] = sum(1 for r in report.harvested if lang in r.catalogs or lang in r.help_pages)
    report.totals = dict(sorted(totals.items()))
    report.finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_report(options.cache / REPORT_FILE, report)
    log.info("harvest: %s", json.dumps(report.summary()))
    return report


def make_batches(todo: list[PackageInfo], max_packages: int, max_mb: float) -> Iterator[list[PackageInfo]]:
    """Consecutive groups of at most max_packages packages and about max_mb megabytes."""
    batch: list[PackageInfo] = []
    for info in todo:
        if batch and (len(batch) >= max_packages or sum(i.size_mb for i in batch) + info.size_mb > max_mb):
            yield batch
            batch = []
        batch.append(info)
    if batch:
        yield batch


def write_report(path: Path, report: HarvestReport) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(report), indent=1) + "\n")
    os.replace(tmp, path)


def harvested_packages(cache: Path) -> Iterator[tuple[str, Path]]:
    """(package, its extracted tree) for every package the harvest marked done."""
    root = cache / PACKAGES_DIR
    if not root.is_dir():
        return
    for directory in sorted(root.iterdir()):
        if (directory / STATE_FILE).is_file():
            yield directory.name, directory
