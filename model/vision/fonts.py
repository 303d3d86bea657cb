"""More typefaces for the house-number generator, from Debian's font packages.

A reader trained on the DejaVu faces alone reads DejaVu: on numbers set in a typeface it never
saw it loses most of its accuracy (docs/vision.md). Debian's archive has dozens of free text
faces; like the corpus harvest (model/harvest.py), they are fetched with `apt-get download`,
never installed, and only the font files are kept:

    attnserve data fonts --cache data/fonts
    attnserve data vision --fonts data/fonts --out data/vision/house-numbers

`fonts-droid-fallback` is left out on purpose: its Droid Sans Mono is the typeface of the
outside measurement (bench/reader_external.py), which must stay unseen.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

# Latin text faces with ordinary digits: sans, serif, slab, mono, condensed, rounded, display.
FONT_PACKAGES = (
    "fonts-adf-accanthis", "fonts-b612", "fonts-bebas-neue", "fonts-cabin", "fonts-cantarell", "fonts-comic-neue",
    "fonts-crosextra-caladea", "fonts-crosextra-carlito", "fonts-ebgaramond", "fonts-fantasque-sans",
    "fonts-firacode", "fonts-freefont-ttf", "fonts-gfs-didot", "fonts-hack", "fonts-inconsolata",
    "fonts-jetbrains-mono", "fonts-junicode", "fonts-lato", "fonts-league-spartan", "fonts-liberation2",
    "fonts-linuxlibertine", "fonts-lobster", "fonts-mplus", "fonts-open-sans", "fonts-paratype", "fonts-quicksand",
    "fonts-roboto-slab", "fonts-roboto-unhinted", "fonts-sil-andika", "fonts-sil-charis", "fonts-sil-gentium",
    "fonts-stix", "fonts-texgyre", "fonts-urw-base35", "fonts-vollkorn", "fonts-yanone-kaffeesatz",
)
HELD_OUT_PACKAGES = ("fonts-droid-fallback",)  # the outside measurement's typeface
FONT_SUFFIXES = (".ttf", ".otf")
# Faces whose digit code points draw pictures, not digits (they pass the shape check below).
SYMBOL_FACES = ("D050000L", "Dingbats")


def fetch_fonts(cache_dir: Path, packages: tuple[str, ...] = FONT_PACKAGES) -> dict:
    """Download each package (`apt-get download`) and keep its font files under
    cache_dir/<package>/; a package already there is skipped, one that fails is reported."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"fetched": [], "cached": [], "failed": {}}
    for package in packages:
        if package in HELD_OUT_PACKAGES:
            report["failed"][package] = "held out for the outside measurement"
            continue
        dest = cache_dir / package
        if (dest / "fonts.json").is_file():
            report["cached"].append(package)
            continue
        with tempfile.TemporaryDirectory(prefix="fonts-") as tmp:
            got = subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if got.returncode or not debs:
                report["failed"][package] = (got.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
                log.warning("%s: %s", package, report["failed"][package])
                continue
            tree = Path(tmp) / "tree"
            unpacked = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], capture_output=True, text=True)
            if unpacked.returncode:
                report["failed"][package] = f"corrupt .deb: {unpacked.stderr.strip()}"
                log.warning("%s: %s", package, report["failed"][package])
                continue
            files = sorted(p for p in tree.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
            dest.mkdir(exist_ok=True)
            for file in files:
                shutil.copyfile(file, dest / file.name)
            (dest / "fonts.json").write_text(json.dumps({"package": package, "deb": debs[0].name,
                                                         "files": [f.name for f in files]}, indent=1) + "\n")
        report["fetched"].append(package)
        log.info("%s: %d font files", package, len(files))
    return report


@cache
def renders_digits(path: str) -> bool:
    """Whether a face draws the ten digits as ten different, non-empty glyphs (symbol, icon
    and non-Latin faces map them to nothing, to boxes or to one shape)."""
    try:
        font = ImageFont.truetype(path, 32)
    except OSError:
        return False
    shapes = set()
    for digit in "0123456789":
        canvas = Image.new("L", (48, 48))
        ImageDraw.Draw(canvas).text((8, 40), digit, font=font, fill=255, anchor="ls")
        if canvas.getbbox() is None:
            return False
        shapes.add(canvas.tobytes())
    return len(shapes) == 10


def fonts_in(directory: Path | str) -> tuple[str, ...]:
    """The usable font files under a directory, sorted so that choice by index is stable."""
    files = sorted(str(p) for p in Path(directory).rglob("*") if p.suffix.lower() in FONT_SUFFIXES)
    usable = tuple(f for f in files if not any(face in Path(f).name for face in SYMBOL_FACES) and renders_digits(f))
    if files and not usable:
        raise RuntimeError(f"none of the {len(files)} font files under {directory} draws the ten digits")
    return usable
