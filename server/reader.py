"""The image reader on onnxruntime: a reader bundle (export/reader.py writes it), image
decoding with the refusals a service needs, and greedy reading over the encoder graph and the
single-step decoder graph. numpy, onnxruntime and Pillow only: no torch.

Images are decoded (PNG, JPEG, ...), checked (size, channels), converted to RGB only when they
are greyscale (a single channel is a camera's greyscale, not a mistake), stretched to the
bundle's input size, and read; each emitted symbol comes with its attention map over the
bundle's grid (rows x cols, row-major). The bundle's manifest is a ReaderManifest
(attnserve/bundle_format.py), the contract with export/reader.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from attnserve.bundle_format import (  # noqa: F401  READER_FORMAT(_VERSION): re-exported, as before
    MANIFEST_FILE, PIXELS, READER_FORMAT, READER_FORMAT_VERSION, READER_STATIC_STATE, BundleError, ImageInput,
    ReaderManifest,
)
from attnserve.decoding_rules import BOS_ID, EOS_ID
from attnserve.server.bundle import sha256_file

MAX_IMAGE_BYTES = 4 << 20  # an encoded image larger than this is refused
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """An image the reader refuses: undecodable, too large, or of the wrong channels."""


class ReaderBundleError(BundleError):
    """A reader bundle is missing, tampered with, of another format or its manifest invalid (the
    BundleError that says so is its __cause__)."""


def decode_image(data: bytes, height: int, width: int, channels: int = 3) -> np.ndarray:
    """Encoded image bytes -> (height, width, channels) uint8, stretched to the input size."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image of {len(data)} bytes is over the limit of {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageError(f"image of {image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
        image.load()
    except UnidentifiedImageError:
        raise ImageError(f"undecodable image: not in a format the reader decodes (PNG, JPEG, WebP, GIF, BMP, TIFF); "
                         f"starts with {data[:8]!r}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"undecodable image: {exc}") from None
    bands = len(image.getbands())
    if image.mode in ("1", "L", "I;16", "I", "F"):
        image = image.convert("RGB")  # greyscale: the same scene with equal channels
    elif image.mode in ("P", "CMYK", "YCbCr"):
        image = image.convert("RGBA" if image.mode == "P" and "transparency" in image.info else "RGB")
        bands = len(image.getbands())
    if image.mode in ("RGBA", "LA", "PA"):
        # Many tools save an alpha channel that is opaque everywhere: that is an RGB picture. A
        # transparent one has no background to read the digits against, so it is refused.
        if image.getchannel("A").getextrema()[0] < 255:
            raise ImageError(f"image has {bands} channels ({image.mode}) with transparency; the reader takes {channels} "
                             "(RGB or greyscale, or an opaque alpha)")
        image = image.convert("RGB")
    elif image.mode != "RGB":
        raise ImageError(f"image has {bands} channels ({image.mode}); the reader takes {channels} (RGB or greyscale)")
    return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8)


@dataclasses.dataclass
class Reading:
    text: str
    score: float  # summed log-probability of the symbols and EOS
    attention: np.ndarray  # (symbols + 1, rows * cols): one map per digit, then EOS's


class OrtReader:
    """Greedy reading over a reader bundle's two graphs."""

    def __init__(self, directory: Path | str, manifest: ReaderManifest | None = None, threads: int = 1,
                 verify: bool = True):
        """`manifest`: export passes the one it is writing (not yet on disk, nor validated);
        otherwise the bundle's own is read and verified."""
        import onnxruntime as ort

        directory = Path(directory)
        if manifest is None:
            manifest = read_manifest(directory, verify)
        self.manifest: ReaderManifest = manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        graphs = manifest.graphs
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(directory / graphs.encoder.file), options, providers=providers)
        self.step = ort.InferenceSession(str(directory / graphs.decoder_step.file), options, providers=providers)
        self.state = list(graphs.encoder.outputs)  # memory, keys, hidden[, cell]: the step's inputs after prev
        self.dynamic = [n for n in self.state if n not in READER_STATIC_STATE]  # the step returns these one step on
        self.max_symbols = manifest.max_symbols
        self.offset = manifest.digit_offset
        self.input: ImageInput = manifest.input
        self.grid = (manifest.grid.rows, manifest.grid.cols)

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.input.height, self.input.width, self.input.channels)

    def read(self, pixels: np.ndarray) -> tuple[list[list[int]], np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """pixels (B, H, W, C) uint8 -> ids without EOS, summed log-prob (B,), attention per
        step (B, L), log-probabilities per step (B, V)."""
        state = dict(zip(self.state, self.encoder.run(None, {PIXELS: pixels})))
        B = len(pixels)
        prev = np.full(B, BOS_ID, dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        scores = np.zeros(B, dtype=np.float32)
        ids, attentions, log_probs = [], [], []
        for _ in range(self.max_symbols):
            out = self.step.run(None, {"prev": prev, **state})
            logp, attention = out[0], out[1]
            state.update(zip(self.dynamic, out[2:]))
            best = logp.argmax(-1)
            scores += np.where(done, 0.0, logp[np.arange(B), best])
            ids.append(np.where(done, -1, best))
            attentions.append(np.where(done[:, None], 0.0, attention))
            log_probs.append(logp)
            done |= best == EOS_ID
            prev = best.astype(np.int64)
            if done.all():
                break
        rows = np.stack(ids, 1).tolist()
        texts = [row[: row.index(EOS_ID)] if EOS_ID in row else [i for i in row if i >= 0] for row in rows]
        return texts, scores, attentions, log_probs

    def read_images(self, images: list[bytes]) -> list[Reading]:
        """Encoded images -> readings; an ImageError names the first bad image."""
        pixels = []
        for i, data in enumerate(images):
            try:
                pixels.append(self.decode(data))
            except ImageError as exc:
                raise ImageError(f"image {i}: {exc}") from None
        ids, scores, attention, _ = self.read(np.stack(pixels))
        stacked = np.stack(attention, 1)  # (B, T, L)
        return [Reading("".join(str(i - self.offset) for i in row), float(score), stacked[b, : len(row) + 1])
                for b, (row, score) in enumerate(zip(ids, scores))]


def read_manifest(directory: Path, verify: bool = True) -> ReaderManifest:
    """A reader bundle's manifest, checked whole (ReaderManifest.read) and, with `verify`, every
    file against its sha256. Any refusal is a ReaderBundleError naming the problem(s)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ReaderBundleError(f"no {MANIFEST_FILE} in {directory}")
    try:
        manifest = ReaderManifest.read(path)  # bad JSON, another format or version, invalid records
    except BundleError as exc:
        raise ReaderBundleError(str(exc)) from exc
    if verify:
        for name, digest in manifest.files.items():
            file = Path(directory) / name
            if not file.is_file() or sha256_file(file) != digest:
                raise ReaderBundleError(f"{file}: missing or its sha256 differs from the manifest's")
    return manifest


def is_reader_bundle(directory: Path) -> bool:
    """Whether a repository version directory holds a reader bundle (not a translator's), of any
    version: one it cannot read is still a reader's, to be refused by name rather than skipped."""
    try:
        return json.loads((Path(directory) / MANIFEST_FILE).read_text()).get("format") == READER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def overlay_strip(pixels: np.ndarray, reading: Reading, grid: tuple[int, int], scale: int = 3) -> "Image.Image":
    """The image, then one tile per emitted symbol (EOS last) with its attention map over the
    image: bright where the reader looked. For `attnserve read --overlays`."""
    from PIL import Image, ImageDraw

    H, W = pixels.shape[0] * scale, pixels.shape[1] * scale
    symbols = [*reading.text, "EOS"]
    sheet = Image.new("RGB", ((len(symbols) + 1) * (W + 4) + 4, H + 18), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    base = np.asarray(Image.fromarray(pixels).resize((W, H), Image.BICUBIC), dtype=np.float32)
    sheet.paste(Image.fromarray(base.astype(np.uint8)), (4, 4))
    draw.text((4, H + 5), f"read: {reading.text}", fill=(0, 0, 0))
    for t, (symbol, alpha) in enumerate(zip(symbols, reading.attention)):
        heat = Image.fromarray((alpha.reshape(grid) / max(float(alpha.max()), 1e-9) * 255).astype(np.uint8))
        heat = np.asarray(heat.resize((W, H), Image.BILINEAR), dtype=np.float32)[..., None] / 255
        lit = base * (0.25 + 0.75 * heat) + 64 * heat
        x = 4 + (t + 1) * (W + 4)
        sheet.paste(Image.fromarray(lit.clip(0, 255).astype(np.uint8)), (x, 4))
        draw.text((x, H + 5), symbol, fill=(0, 0, 0))
    return sheet
