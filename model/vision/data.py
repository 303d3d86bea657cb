"""Street-number crops, generated: the stand-in for SVHN, which cannot be downloaded here.

Every sample is a pure function of (seed, split, index): its own random.Random and numpy
Generator are seeded from those three, so a split can be regenerated (or extended) exactly, and
the test split does not depend on how many training images were asked for.

One sample, step by step:

    digits     1-5 digits (a leading 0 is rare, as on houses)
    glyphs     a DejaVu face found through fontconfig or, with font_dir, any face of Debian's font
               packages (model/vision/fonts.py); size, tracking, optional stroke (weight)
    layout     the digits on a large canvas, per-digit ink boxes recorded; optionally a plate
               behind them; partial distractor digits beyond the left and right crop edges
    background plain colour, a linear gradient, or a texture (blotches, stripes, grain)
    geometry   one homography canvas -> output: the crop with random margins (so the aspect
               ratio of the crop varies), small rotation, shear and perspective, and the scale to
               the output size; the boxes go through the same homography
    degrade    Gaussian blur, additive noise, JPEG re-encoding

Images are (H, W, 3) uint8; boxes (x0, y0, x1, y1) in output pixels, one per digit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import random
import subprocess
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

log = logging.getLogger(__name__)

DIGITS = "0123456789"
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What the renderer may vary; the defaults are the house-number style of the shipped reader."""

    height: int = 32  # output image size (the reader's input)
    width: int = 64
    min_digits: int = 1
    max_digits: int = 5
    font_size: tuple[int, int] = (30, 46)  # canvas pixels; the crop is then scaled to the output
    tracking: tuple[float, float] = (-0.06, 0.3)  # extra space between digits, in font sizes
    max_rotation: float = 7.0  # degrees
    max_shear: float = 0.22
    max_perspective: float = 0.0012  # homography's projective terms, per canvas pixel
    min_contrast: float = 0.28  # |luminance(text) - luminance(background)|, 0..1
    distractor_p: float = 0.5  # chance of a partial digit at each edge
    plate_p: float = 0.3
    blur_p: float = 0.5
    noise_p: float = 0.6
    jpeg_p: float = 0.5
    # More typefaces beside DejaVu: every usable font file under this directory (model/vision/
    # fonts.py fetches Debian's font packages into one). Empty: DejaVu only.
    font_dir: str = ""


@dataclasses.dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    digits: str
    boxes: np.ndarray  # (n, 4) float32 x0, y0, x1, y1 in output pixels
    masks: np.ndarray | None = None  # (n, H, W) float32 ink of each digit, when asked for


@cache
def dejavu_fonts() -> tuple[str, ...]:
    """The DejaVu faces fontconfig knows (Math excluded: its digits are ordinary but the face is
    a symbol font), sorted so that font choice by index is stable across runs."""
    out = subprocess.run(["fc-list", "--format", "%{file}\n", ":family=DejaVu Sans"], capture_output=True, text=True)
    files = set(out.stdout.split())
    for family in ("DejaVu Serif", "DejaVu Sans Mono", "DejaVu Sans Condensed", "DejaVu Serif Condensed"):
        more = subprocess.run(["fc-list", "--format", "%{file}\n", f":family={family}"], capture_output=True, text=True)
        files.update(more.stdout.split())
    fonts = tuple(sorted(f for f in files if "Math" not in f and f.endswith((".ttf", ".otf"))))
    if not fonts:
        raise RuntimeError("fontconfig lists no DejaVu fonts (install fonts-dejavu-core)")
    return fonts


@cache
def generator_fonts(font_dir: str = "") -> tuple[str, ...]:
    """DejaVu, then the usable faces under font_dir."""
    if not font_dir:
        return dejavu_fonts()
    from attnserve.model.vision.fonts import fonts_in

    return dejavu_fonts() + fonts_in(font_dir)


@cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def sample_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114])) / 255.0


def _contrasting_colours(rng: random.Random, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """A background and a text colour whose luminances differ by at least min_contrast."""
    while True:
        bg = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float64)
        if rng.random() < 0.4:  # many plates are near-grey
            bg[:] = bg.mean() + np.array([rng.uniform(-20, 20) for _ in range(3)])
        fg = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float64)
        if rng.random() < 0.5:  # black or white digits are the most common
            fg[:] = rng.choice([rng.uniform(0, 40), rng.uniform(215, 255)])
        bg, fg = bg.clip(0, 255), fg.clip(0, 255)
        if abs(_luminance(bg) - _luminance(fg)) >= min_contrast:
            return bg, fg


def _background(rng: random.Random, nrng: np.random.Generator, size: tuple[int, int], colour: np.ndarray) -> np.ndarray:
    """(h, w, 3) float canvas around `colour`: plain, a gradient or a texture."""
    w, h = size
    kind = rng.choice(["plain", "gradient", "texture", "texture"])
    base = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
    if kind == "plain":
        return base.copy()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(w, h)
        shift = nrng.uniform(-60, 60, size=3).astype(np.float32)
        return base + (t - t.mean())[..., None] * shift * 2
    texture = rng.choice(["blotches", "stripes", "grain"])
    if texture == "blotches":
        cells = nrng.normal(0, 1, size=(max(2, h // 24), max(2, w // 24), 1)).astype(np.float32)
        field = np.asarray(Image.fromarray(cells[..., 0]).resize((w, h), Image.BICUBIC))[..., None]
    elif texture == "stripes":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
        field = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)[..., None]
    else:  # grain: wood or concrete, noise smeared along one axis
        noise = nrng.normal(0, 1, size=(h // 2, max(2, w // 16))).astype(np.float32)
        field = np.asarray(Image.fromarray(noise).resize((w, h), Image.BILINEAR))[..., None]
        field = field / (field.std() + 1e-6)
    amplitude = rng.uniform(8, 28)
    tint = nrng.uniform(0.6, 1.0, size=3).astype(np.float32)
    return base + field * amplitude * tint


def _homography(crop: tuple[float, float, float, float], out_size: tuple[int, int], rng: random.Random,
                cfg: GeneratorConfig) -> np.ndarray:
    """3x3 map from canvas pixels to output pixels: distort around the crop's centre, then map
    the crop rectangle onto the output."""
    x0, y0, x1, y1 = crop
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=np.float64)
    a = math.radians(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    rotate = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    shear = np.array([[1, rng.uniform(-cfg.max_shear, cfg.max_shear), 0], [0, 1, 0], [0, 0, 1]])
    p = cfg.max_perspective
    project = np.array([[1, 0, 0], [0, 1, 0], [rng.uniform(-p, p), rng.uniform(-p, p), 1]])
    W, H = out_size
    scale = np.array([[W / (x1 - x0), 0, W / 2], [0, H / (y1 - y0), H / 2], [0, 0, 1]])
    return scale @ project @ shear @ rotate @ to_centre


def _fitting_homography(crop: tuple[float, float, float, float], glyph_boxes: list, rng: random.Random,
                        cfg: GeneratorConfig) -> np.ndarray:
    """A random homography under which every digit stays inside the output (1 px clear): the
    label must be readable in the image. Rotation and shear can push a digit out of a tight
    crop, so the crop's margins grow until the number fits."""
    x0, y0, x1, y1 = crop
    for _ in range(8):
        h = _homography((x0, y0, x1, y1), (cfg.width, cfg.height), rng, cfg)
        corners = np.array([[a, b] for gx0, gy0, gx1, gy1 in glyph_boxes for a in (gx0, gx1) for b in (gy0, gy1)])
        mapped = _apply(h, corners)
        if mapped.min() >= 1 and (mapped[:, 0] <= cfg.width - 1).all() and (mapped[:, 1] <= cfg.height - 1).all():
            return h
        grow_x, grow_y = 0.08 * (x1 - x0), 0.08 * (y1 - y0)
        x0, y0, x1, y1 = x0 - grow_x, y0 - grow_y, x1 + grow_x, y1 + grow_y
    return h


def _apply(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    ones = np.ones((len(points), 1))
    mapped = np.hstack([points, ones]) @ h.T  # (N, 3)
    return mapped[:, :2] / mapped[:, 2:3]


def _inverse(h: np.ndarray) -> tuple[float, ...]:
    """PIL's PERSPECTIVE data: the output -> input map, normalised, as 8 coefficients."""
    inverse = np.linalg.inv(h)
    return tuple((inverse / inverse[2, 2]).flatten()[:8])


def _warp(image: Image.Image, h: np.ndarray, size: tuple[int, int], fill) -> Image.Image:
    return image.transform(size, Image.PERSPECTIVE, _inverse(h), Image.BICUBIC, fillcolor=fill)


def render(seed: int, split: str, index: int, cfg: GeneratorConfig = GeneratorConfig(),
           with_masks: bool = False, clean: bool = False) -> Sample:
    """One street-number crop. `clean` turns off distractors and degradations (for tests and
    figures); `with_masks` also returns each digit's warped ink, from which its box must follow."""
    rng = random.Random(sample_seed(seed, split, index))
    nrng = np.random.default_rng(sample_seed(seed, split, index) ^ 0x5EED)
    fonts = generator_fonts(cfg.font_dir)
    n = rng.randint(cfg.min_digits, cfg.max_digits)
    digits = "".join(rng.choice(DIGITS[1:] if i == 0 and rng.random() < 0.9 else DIGITS) for i in range(n))
    font_path = rng.choice(fonts)
    size = rng.randint(*cfg.font_size)
    font = _font(font_path, size)
    stroke = rng.choice([0, 0, 0, 1, 2]) if size > 34 else rng.choice([0, 0, 1])  # heavier weights
    tracking = rng.uniform(*cfg.tracking) * size

    # Glyph layout on a canvas with room for margins, distractors and the warp.
    ascent, descent = font.getmetrics()
    pad = 2 * size
    x = float(pad)
    baseline = pad + ascent
    glyph_boxes = []
    for ch in digits:
        l, t, r, b = font.getbbox(ch, anchor="ls", stroke_width=stroke)
        glyph_boxes.append((x + l, baseline + t, x + r, baseline + b))
        x += font.getlength(ch) + 2 * stroke + tracking
    ink = np.array(glyph_boxes)
    nx0, ny0, nx1, ny1 = ink[:, 0].min(), ink[:, 1].min(), ink[:, 2].max(), ink[:, 3].max()
    text_h = ny1 - ny0
    # Crop: the number plus margins; the horizontal margin varies widely, so the crop's aspect
    # ratio (and the squash of resizing it to the output) does too.
    mx0, mx1 = (rng.uniform(0.08, 0.6) * text_h for _ in range(2))
    my0, my1 = (rng.uniform(0.08, 0.35) * text_h for _ in range(2))
    crop = (nx0 - mx0, ny0 - my0, nx1 + mx1, ny1 + my1)
    canvas_w, canvas_h = int(x + pad), int(baseline + descent + pad)

    homography = _fitting_homography(crop, glyph_boxes, rng, cfg)
    # Warp to twice the output size, then box-filter down: an anti-aliased minification.
    big = np.diag([2.0, 2.0, 1.0]) @ homography
    big_size = (2 * cfg.width, 2 * cfg.height)

    # The background is made at the warped size directly (a warped texture is just a texture);
    # the plate, which frames the digits, goes through the warp.
    bg_colour, fg_colour = _contrasting_colours(rng, cfg.min_contrast)
    plate = not clean and rng.random() < cfg.plate_p
    if plate:  # a plate of its own colour behind the digits; the text contrasts with the plate
        outer_colour, bg_colour = bg_colour, _contrasting_colours(rng, cfg.min_contrast)[0]
        while abs(_luminance(bg_colour) - _luminance(fg_colour)) < cfg.min_contrast:
            bg_colour = _contrasting_colours(rng, cfg.min_contrast)[0]
        background = _background(rng, nrng, big_size, outer_colour)
        grow = rng.uniform(0.1, 0.3) * text_h
        plate_img = Image.new("L", (canvas_w, canvas_h), 0)
        ImageDraw.Draw(plate_img).rounded_rectangle(
            (nx0 - grow, ny0 - grow, nx1 + grow, ny1 + grow), radius=int(rng.uniform(0, 0.4) * text_h), fill=255)
        alpha = np.asarray(_warp(plate_img, big, big_size, 0), dtype=np.float32)[..., None] / 255
        background = background * (1 - alpha) + _background(rng, nrng, big_size, bg_colour) * alpha
    else:
        background = _background(rng, nrng, big_size, bg_colour)

    # Ink: one layer for the number; distractors draw into the same layer (no masks of theirs).
    layer = Image.new("L", (canvas_w, canvas_h), 0)
    draw = ImageDraw.Draw(layer)
    x = float(pad)
    for ch in digits:
        draw.text((x, baseline), ch, font=font, fill=255, anchor="ls", stroke_width=stroke, stroke_fill=255)
        x += font.getlength(ch) + 2 * stroke + tracking
    if not clean:
        for side in (-1, 1):
            if rng.random() >= cfg.distractor_p:
                continue
            ch = rng.choice(DIGITS)
            l, _, r, _ = font.getbbox(ch, anchor="ls", stroke_width=stroke)
            # Its nearer edge a little inside the crop, most of it outside (a neighbour's sliver),
            # and never closer to the number than a small gap.
            margin = mx0 if side < 0 else mx1
            visible = min(rng.uniform(0.1, 0.35) * (r - l), margin - 0.12 * size)
            if visible <= 1:
                continue
            gx = crop[0] + visible - r if side < 0 else crop[2] - visible - l
            draw.text((gx, baseline), ch, font=font, fill=255, anchor="ls", stroke_width=stroke, stroke_fill=255)

    alpha = np.asarray(_warp(layer, big, big_size, 0), dtype=np.float32)[..., None] / 255
    fg = fg_colour.astype(np.float32) + nrng.normal(0, 6, size=3).astype(np.float32)
    image = background * (1 - alpha) + fg * alpha
    out = Image.fromarray(image.clip(0, 255).astype(np.uint8)).resize((cfg.width, cfg.height), Image.BOX)

    if not clean:
        if rng.random() < cfg.blur_p:
            out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0)))
        if rng.random() < cfg.noise_p:
            noisy = np.asarray(out, dtype=np.float32) + nrng.normal(0, rng.uniform(2, 14), size=(cfg.height, cfg.width, 3))
            out = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        if rng.random() < cfg.jpeg_p:
            buffer = io.BytesIO()
            out.save(buffer, "JPEG", quality=rng.randint(25, 90))
            out = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    # Boxes: digit k is drawn with value k + 1, unantialiased, into a label layer that goes
    # through the same warp (nearest), so each box is the warped ink's extent, not the warped
    # glyph rectangle's (which rotation and shear would inflate).
    # Each glyph is thresholded on its own: drawing labels into one layer would blend a glyph's
    # anti-aliased edge into its neighbour's value.
    labels = np.zeros((canvas_h, canvas_w), dtype=np.uint8)
    x = float(pad)
    for k, (ch, (gx0, gy0, gx1, gy1)) in enumerate(zip(digits, glyph_boxes)):
        ox, oy = int(gx0) - 2, int(gy0) - 2
        glyph = Image.new("L", (int(gx1 - gx0) + 5, int(gy1 - gy0) + 5), 0)
        ImageDraw.Draw(glyph).text((x - ox, baseline - oy), ch, font=font, fill=255, anchor="ls",
                                   stroke_width=stroke, stroke_fill=255)
        ink = np.asarray(glyph) >= 128
        region = labels[oy : oy + ink.shape[0], ox : ox + ink.shape[1]]
        region[ink[: region.shape[0], : region.shape[1]]] = k + 1
        x += font.getlength(ch) + 2 * stroke + tracking
    warped = np.asarray(Image.fromarray(labels).transform(big_size, Image.PERSPECTIVE, _inverse(big), Image.NEAREST,
                                                          fillcolor=0))
    boxes = np.zeros((n, 4), dtype=np.float32)
    for k in range(n):
        ys, xs = np.nonzero(warped == k + 1)
        if len(xs):  # in output pixels: the big layer is twice the output size
            boxes[k] = [xs.min() / 2, ys.min() / 2, (xs.max() + 1) / 2, (ys.max() + 1) / 2]
        else:  # fully overdrawn by its neighbour (strong negative tracking): its glyph rectangle
            gx0, gy0, gx1, gy1 = glyph_boxes[k]
            corners = _apply(homography, np.array([[gx0, gy0], [gx1, gy0], [gx1, gy1], [gx0, gy1]]))
            boxes[k] = [corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()]
    boxes = boxes.clip(0, [cfg.width, cfg.height, cfg.width, cfg.height])

    masks = None
    if with_masks:
        masks = []
        x = float(pad)
        for ch in digits:
            single = Image.new("L", (canvas_w, canvas_h), 0)
            ImageDraw.Draw(single).text((x, baseline), ch, font=font, fill=255, anchor="ls", stroke_width=stroke,
                                        stroke_fill=255)
            x += font.getlength(ch) + 2 * stroke + tracking
            warped = _warp(single, big, big_size, 0).resize((cfg.width, cfg.height), Image.BOX)
            masks.append(np.asarray(warped, dtype=np.float32) / 255)
        masks = np.stack(masks)
    return Sample(np.asarray(out, dtype=np.uint8), digits, boxes, masks)


# ------------------------------------------------------------------------------------------
# Datasets on disk: data/vision/<name>/{train,dev,test}.npz and generator.json


@dataclasses.dataclass
class DigitDataset:
    """A split in memory: images (N, H, W, 3) uint8, labels as digit strings, boxes (N, 5, 4)
    float32 padded with NaN past each label's length."""

    images: np.ndarray
    labels: list[str]
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, images=self.images, labels=np.array(self.labels), boxes=self.boxes)
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> "DigitDataset":
        with np.load(path) as z:
            return cls(z["images"], [str(s) for s in z["labels"]], z["boxes"])


def generate_split(seed: int, split: str, count: int, cfg: GeneratorConfig = GeneratorConfig()) -> DigitDataset:
    images = np.empty((count, cfg.height, cfg.width, 3), dtype=np.uint8)
    boxes = np.full((count, cfg.max_digits, 4), np.nan, dtype=np.float32)
    labels = []
    for i in range(count):
        sample = render(seed, split, i, cfg)
        images[i] = sample.image
        boxes[i, : len(sample.digits)] = sample.boxes
        labels.append(sample.digits)
        if (i + 1) % 10000 == 0:
            log.info("%s: %d / %d images", split, i + 1, count)
    return DigitDataset(images, labels, boxes)


def build_dataset(out: Path, seed: int, counts: dict[str, int], cfg: GeneratorConfig = GeneratorConfig()) -> dict:
    """Write every split and generator.json (seed, counts, the generator's settings)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        generate_split(seed, split, count, cfg).save(out / f"{split}.npz")
        log.info("wrote %s (%d images)", out / f"{split}.npz", count)
    meta = {"seed": seed, "counts": counts, "generator": dataclasses.asdict(cfg), "fonts": [Path(f).name for f in generator_fonts(cfg.font_dir)]}
    (out / "generator.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def sample_grid(seed: int, split: str, count: int, path: Path, columns: int = 8, scale: int = 2,
                cfg: GeneratorConfig = GeneratorConfig(), show_boxes: bool = False) -> None:
    """A PNG of `count` samples (optionally with their digit boxes), for the docs."""
    rows = math.ceil(count / columns)
    W, H = cfg.width * scale, cfg.height * scale
    grid = Image.new("RGB", (columns * (W + 4) + 4, rows * (H + 4) + 4), (255, 255, 255))
    for i in range(count):
        sample = render(seed, split, i, cfg)
        tile = Image.fromarray(sample.image).resize((W, H), Image.NEAREST)
        if show_boxes:
            draw = ImageDraw.Draw(tile)
            for box in sample.boxes:
                draw.rectangle(tuple((box * scale).tolist()), outline=(255, 0, 0))
        grid.paste(tile, (4 + (i % columns) * (W + 4), 4 + (i // columns) * (H + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
