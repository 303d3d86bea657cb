"""`attnserve eval` for image readers: sequence and per-digit accuracy, accuracy by number
length, how often the attention's peak lies in the box of the digit being emitted, and a PNG
of attention overlays (one row per image, one tile per emitted symbol), as in Xu et al.'s
figures.

    RUN/eval-<split>.json          the scores
    RUN/attention-<split>.png      overlays of the first images of the split
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from attnserve.model.checkpoint import load_weights, read_config, weights_path
from attnserve.model.vision.data import DigitDataset
from attnserve.model.vision.reader import ImageReader
from attnserve.model.vision.task import read_dataset
from attnserve.model.zoo import build_model

log = logging.getLogger(__name__)


def load_reader(run_dir: Path | str, which: str = "best", device: str = "cpu") -> ImageReader:
    config = read_config(Path(run_dir))
    model = build_model(config.model)
    load_weights(model, weights_path(run_dir, which), device)
    return model.to(device).eval()


def cell_centres(grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(L, 2) x, y image coordinates of each grid cell's centre, row-major as the encoder's."""
    (h, w), (H, W) = grid, size
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([(xs.ravel() + 0.5) * W / w, (ys.ravel() + 0.5) * H / h], axis=1)


def peak_in_box(attention: list[np.ndarray], labels: list[str], boxes: np.ndarray, grid: tuple[int, int],
                size: tuple[int, int], columns_only: bool = False) -> tuple[int, int]:
    """(hits, symbols): over every digit the reader emitted at a position the label has, whether
    the centre of the most attended cell lies inside that digit's box (columns_only: inside its
    horizontal extent, at any height; a cell's features see far above and below it, and a reader
    may look at the row over a digit and still see it)."""
    centres = cell_centres(grid, size)
    hits = total = 0
    for alpha, label, image_boxes in zip(attention, labels, boxes):
        for t in range(min(len(label), len(alpha))):
            if not alpha[t].any():  # the reader had already stopped
                break
            x, y = centres[int(alpha[t].argmax())]
            x0, y0, x1, y1 = image_boxes[t]
            hits += int(x0 <= x <= x1 and (columns_only or y0 <= y <= y1))
            total += 1
    return hits, total


def score(texts: list[str], labels: list[str]) -> dict:
    """Sequence accuracy, per-digit accuracy (position by position against the label; a missing
    or extra digit counts wrong) and sequence accuracy by number length."""
    correct = [t == r for t, r in zip(texts, labels)]
    digit_hits = sum(sum(a == b for a, b in zip(t, r)) for t, r in zip(texts, labels))
    digit_total = sum(max(len(t), len(r)) for t, r in zip(texts, labels))
    by_length = {}
    for n in sorted({len(r) for r in labels}):
        members = [c for c, r in zip(correct, labels) if len(r) == n]
        by_length[str(n)] = {"accuracy": round(100 * float(np.mean(members)), 2), "images": len(members)}
    return {"accuracy": round(100 * float(np.mean(correct)), 2),
            "digit_accuracy": round(100 * digit_hits / max(digit_total, 1), 2),
            "images": len(labels), "by_length": by_length}


def overlay(image: np.ndarray, alpha: np.ndarray, grid: tuple[int, int], scale: int = 3) -> Image.Image:
    """The image with one attention map over it: the map upsampled smoothly to the image, the
    image darkened where the map is low."""
    H, W = image.shape[:2]
    h, w = grid
    heat = Image.fromarray((alpha.reshape(h, w) / max(alpha.max(), 1e-9) * 255).astype(np.uint8))
    heat = np.asarray(heat.resize((W * scale, H * scale), Image.BILINEAR), dtype=np.float32)[..., None] / 255
    base = np.asarray(Image.fromarray(image).resize((W * scale, H * scale), Image.BICUBIC), dtype=np.float32)
    lit = base * (0.25 + 0.75 * heat) + np.array([255, 255, 255], dtype=np.float32) * 0.25 * heat
    return Image.fromarray(lit.clip(0, 255).astype(np.uint8))


def overlay_grid(images: np.ndarray, texts: list[str], attention: list[np.ndarray], grid: tuple[int, int],
                 path: Path, scale: int = 3, boxes: np.ndarray | None = None) -> None:
    """One row per image: the image, then one overlay per emitted symbol (EOS last), captioned."""
    H, W = images.shape[1] * scale, images.shape[2] * scale
    columns = 1 + max(len(t) + 1 for t in texts)
    caption = 12
    sheet = Image.new("RGB", (columns * (W + 4) + 4, len(images) * (H + caption + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (image, text, alpha) in enumerate(zip(images, texts, attention)):
        y = 4 + row * (H + caption + 4)
        tile = Image.fromarray(image).resize((W, H), Image.BICUBIC)
        if boxes is not None:
            tile_draw = ImageDraw.Draw(tile)
            for box in boxes[row]:
                if not np.isnan(box).any():
                    tile_draw.rectangle(tuple((box * scale).tolist()), outline=(255, 0, 0))
        sheet.paste(tile, (4, y))
        draw.text((4, y + H), f"read: {text}", fill=(0, 0, 0))
        symbols = list(text) + ["EOS"]
        for t, symbol in enumerate(symbols[: len(alpha)]):
            x = 4 + (t + 1) * (W + 4)
            sheet.paste(overlay(image, alpha[t], grid, scale), (x, y))
            draw.text((x, y + H), symbol, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def evaluate_reader(run_dir: Path, split_path: Path, which: str = "best", device: str = "cpu",
                    overlays: int = 8) -> dict:
    """Read a split with a run's checkpoint; writes eval-<split>.json and attention-<split>.png."""
    config = read_config(run_dir)
    model = load_reader(run_dir, which, device)
    data = DigitDataset.load(split_path)
    start = time.perf_counter()
    texts, _, attention = read_dataset(model, data)
    seconds = time.perf_counter() - start
    meta = json.loads((Path(run_dir) / "checkpoints" / which / "meta.json").read_text())
    size = (config.model.image_height, config.model.image_width)
    result = {"run": str(run_dir), "model": config.model.label, "parameters": model.num_parameters(),
              "checkpoint": which, "step": meta.get("step"), "train_seconds": meta.get("train_seconds"),
              "split": str(split_path), "decode_seconds": round(seconds, 1), **score(texts, data.labels)}
    if config.model.attention != "none":  # uniform weights have no peak
        hits, total = peak_in_box(attention, data.labels, data.boxes, model.grid, size)
        result["peak_in_box"] = round(100 * hits / max(total, 1), 2)
        result["peak_in_box_symbols"] = total
        hits, _ = peak_in_box(attention, data.labels, data.boxes, model.grid, size, columns_only=True)
        result["peak_in_columns"] = round(100 * hits / max(total, 1), 2)
    stem = Path(split_path).stem
    (Path(run_dir) / f"eval-{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (Path(run_dir) / f"eval-{stem}.txt").write_text("".join(t + "\n" for t in texts))
    if overlays:
        overlay_grid(data.images[:overlays], texts[:overlays], attention[:overlays], model.grid,
                     Path(run_dir) / f"attention-{stem}.png", boxes=data.boxes[:overlays])
    log.info("%s: sequence accuracy %.2f%%, digit accuracy %.2f%% on %s", run_dir, result["accuracy"],
             result["digit_accuracy"], split_path)
    return result
