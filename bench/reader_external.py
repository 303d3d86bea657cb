"""The house-number reader on images that this repository's generator did not make.

Two outside generators, neither of which shares code, fonts or rendering with
model/vision/data.py:

    magick   ImageMagick's `convert` renders the number with a font the training data never
             used (Droid Sans Mono, from the captcha wheel), at its own size and spacing, on a
             plain or gradient plate, with an optional border, blur, rotation and JPEG; the
             crop is tight around the number, at whatever aspect ratio that gives
    captcha  the `captcha` package's ImageCaptcha: warped, rotated and overlapping digits with
             noise curves and dots, a style much harder than house numbers; not reproducible
             (it draws from `secrets`)

Each image is sent as encoded bytes through the served path's own decoding (server/reader.py:
decode, stretch to the bundle's input size, read), offline:

    python -m bench.reader_external --model models/repository/house-numbers/1 --images 500 \
        --out docs/vision-external.json

Needs ImageMagick (`apt-get install imagemagick`) and `pip install captcha==0.7.1`; either is skipped, and said so,
when absent.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np

from attnserve.model.hardware import cpu_info
from attnserve.server.reader import OrtReader

log = logging.getLogger("bench.reader_external")


def droid_font() -> Path | None:
    try:
        import captcha
    except ImportError:
        return None
    path = Path(captcha.__file__).parent / "data" / "DroidSansMono.ttf"
    return path if path.is_file() else None


def random_number(rng: random.Random) -> str:
    length = rng.randint(1, 5)
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(length - 1))


def imagemagick() -> str | None:
    """ImageMagick's command: `magick` (7), else Debian's `convert` (6). A `convert` elsewhere on
    PATH may be something else, so the Debian path is asked for by name."""
    for candidate in (shutil.which("magick"), "/usr/bin/convert"):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-version"], capture_output=True, text=True)
            if "ImageMagick" in probe.stdout:
                return candidate
    return None


def magick_image(rng: random.Random, text: str, font: Path, command: str) -> bytes:
    """One plate rendered by ImageMagick: PNG or JPEG bytes."""
    bg = [rng.randint(0, 255) for _ in range(3)]
    # A foreground far enough from the background to be read (a real plate is made to be read).
    while True:
        fg = [rng.randint(0, 255) for _ in range(3)]
        if abs(sum(fg) - sum(bg)) > 200:
            break
    colour = "rgb({},{},{})".format
    # -seed: ImageMagick's own noise generator, seeded from ours, so a run repeats exactly.
    args = [command, "-seed", str(rng.randint(0, 2**31 - 1)), "-background", colour(*bg), "-fill", colour(*fg), "-font", str(font),
            "-pointsize", str(rng.randint(18, 60)), "-kerning", str(rng.randint(-2, 6)), f"label:{text}"]
    if rng.random() < 0.5:  # a lighting gradient over the plate: darker or lighter towards one corner
        shade = rng.randint(150, 230)
        args += ["(", "+clone", "-sparse-color", "barycentric", f"0,0 white %w,%h rgb({shade},{shade},{shade})",
                 ")", "-compose", "multiply", "-composite"]
    args += ["-bordercolor", colour(*bg), "-border", f"{rng.randint(2, 12)}x{rng.randint(2, 10)}"]
    if rng.random() < 0.5:
        args += ["-rotate", f"{rng.uniform(-6, 6):.1f}", "-gravity", "center"]
    if rng.random() < 0.4:
        args += ["-blur", f"0x{rng.uniform(0.3, 1.2):.2f}"]
    if rng.random() < 0.3:
        args += ["-attenuate", f"{rng.uniform(0.2, 0.6):.2f}", "+noise", "Gaussian"]
    fmt = "jpg:-" if rng.random() < 0.4 else "png:-"
    if fmt.startswith("jpg"):
        args += ["-quality", str(rng.randint(30, 90))]
    return subprocess.run(args + [fmt], check=True, capture_output=True).stdout


def captcha_image(generator, text: str) -> bytes:
    buffer = io.BytesIO()
    generator.generate_image(text).save(buffer, "PNG")
    return buffer.getvalue()


def measure(reader: OrtReader, images: list[bytes], labels: list[str], batch: int = 64) -> dict:
    texts: list[str] = []
    for start in range(0, len(images), batch):
        texts += [r.text for r in reader.read_images(images[start : start + batch])]
    by_length: dict[str, list[bool]] = {}
    for text, label in zip(texts, labels):
        by_length.setdefault(str(len(label)), []).append(text == label)
    digits = sum(sum(a == b for a, b in zip(t, l)) for t, l in zip(texts, labels))
    return {
        "images": len(labels),
        "accuracy": round(100 * float(np.mean([t == l for t, l in zip(texts, labels)])), 2),
        "digit_accuracy": round(100 * digits / sum(len(l) for l in labels), 2),
        "by_length": {k: round(100 * float(np.mean(v)), 1) for k, v in sorted(by_length.items())},
        "examples": [{"label": l, "read": t} for t, l in list(zip(texts, labels))[:12]],
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/repository/house-numbers/1", help="reader bundle")
    parser.add_argument("--images", type=int, default=500, help="images per generator")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--samples", help="write a PNG of the first images of each generator here")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    reader = OrtReader(args.model)
    rng = random.Random(args.seed)
    results: dict = {"model": args.model, "seed": args.seed, "cpu": cpu_info()["model"]}
    sets: dict[str, tuple[list[bytes], list[str]]] = {}
    font = droid_font()
    command = imagemagick()
    if command and font:
        labels = [random_number(rng) for _ in range(args.images)]
        sets["magick"] = ([magick_image(rng, text, font, command) for text in labels], labels)
    else:
        log.warning("magick skipped: needs ImageMagick (apt-get install imagemagick) and the captcha wheel's font")
    try:
        from captcha.image import ImageCaptcha

        generator = ImageCaptcha(width=160, height=60)
        # captcha draws its distortions from `secrets`, which cannot be seeded: its images, and
        # so its score, change from run to run (16-19% of numbers in five runs at 500 images); the labels do not.
        labels = [random_number(rng) for _ in range(args.images)]
        sets["captcha"] = ([captcha_image(generator, text) for text in labels], labels)
    except ImportError:
        log.warning("captcha skipped: pip install captcha==0.7.1")
    for name, (images, labels) in sets.items():
        results[name] = measure(reader, images, labels)
        log.info("%s: %s%% of %d numbers, %s%% of digits, by length %s", name, results[name]["accuracy"],
                 len(labels), results[name]["digit_accuracy"], results[name]["by_length"])
    if args.samples and sets:
        write_samples(sets, reader, Path(args.samples))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def write_samples(sets: dict[str, tuple[list[bytes], list[str]]], reader: OrtReader, path: Path, per_row: int = 8) -> None:
    """One row per generator: its first images as the reader sees them (stretched), with the reading."""
    from PIL import Image, ImageDraw

    h, w = reader.input.height * 2, reader.input.width * 2
    sheet = Image.new("RGB", (per_row * (w + 4) + 4, len(sets) * (h + 18) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (name, (images, labels)) in enumerate(sets.items()):
        readings = reader.read_images(images[:per_row])
        for col, (data, reading, label) in enumerate(zip(images, readings, labels)):
            x, y = 4 + col * (w + 4), 4 + row * (h + 18)
            sheet.paste(Image.fromarray(reader.decode(data)).resize((w, h)), (x, y))
            mark = "ok" if reading.text == label else f"!= {label}"
            draw.text((x, y + h + 2), f"{name}: {reading.text} {mark}", fill=(0, 0, 0))
    sheet.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
