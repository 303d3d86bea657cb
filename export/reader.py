"""Image reader -> ONNX: an encoder graph (uint8 pixels -> the annotation grid and the decoder's
initial state) and a single-step decoder graph, with parity against torch built in: the export
fails unless onnxruntime's greedy readings of held-out images are the torch reference's, symbol
for symbol, with log-probabilities and attention maps within tolerance.

    OUT/manifest.json        format attnserve-reader v1 (ReaderManifest, attnserve/bundle_format.py):
                             the input (an image: size, channels, dtype, layout, normalisation),
                             the grid geometry, the vocabulary, the graphs' signatures, the parity
                             results, every file's sha256
    OUT/fp32/encoder.onnx    pixels (batch, H, W, C) uint8 -> memory, keys, hidden[, cell]
    OUT/fp32/decoder_step.onnx
                             prev (batch,) int64, memory, keys, hidden[, cell]
                             -> log_probs (batch, V), attention (batch, L), new_hidden[, new_cell]

Normalisation is inside the encoder graph, so a server feeds decoded RGB pixels as they are;
the manifest still states it, for clients that want to reproduce it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.export import Dim

from attnserve.bundle_format import (
    ATTENTION, LOG_PROBS, MANIFEST_FILE, NEW_STATE_PREFIX, PIXELS, PREVIOUS_TOKENS, Grid, ImageInput, Normalisation,
    ReaderGraph, ReaderGraphs, ReaderManifest, ReaderValidation,
)
from attnserve.decoding_rules import BOS_ID, SPECIAL_IDS
from attnserve.export.specs import IR_VERSION, OPSET
from attnserve.model.checkpoint import read_config
from attnserve.model.vision.data import DigitDataset
from attnserve.model.vision.evaluate import load_reader
from attnserve.model.vision.reader import DIGIT_OFFSET, PIXEL_MEAN, PIXEL_STD, ImageReader, greedy_read, normalise
from attnserve.server.bundle import sha256_file
from attnserve.server.reader import OrtReader

log = logging.getLogger(__name__)

ATOL = 1e-4  # fp32: max abs difference of log-probabilities and attention against torch


class ReaderExportError(Exception):
    """The exported graphs disagree with torch (or the run is not an image reader)."""


class ReaderEncoderGraph(nn.Module):
    def __init__(self, model: ImageReader):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor):
        state = self.model.encode(normalise(pixels))  # pixels (B, H, W, C) uint8
        return tuple(state[name] for name in state_names(self.model))


class ReaderStepGraph(nn.Module):
    def __init__(self, model: ImageReader):
        super().__init__()
        self.model = model

    def forward(self, prev: torch.Tensor, *state: torch.Tensor):
        logits, new, attention = self.model.decode_step(prev, dict(zip(state_names(self.model), state)))
        dynamic = [new[name] for name in dynamic_names(self.model)]
        return (torch.log_softmax(logits, -1), attention, *dynamic)


def dynamic_names(model: ImageReader) -> list[str]:
    return ["hidden", "cell"] if model.lstm else ["hidden"]


def state_names(model: ImageReader) -> list[str]:
    return ["memory", "keys", *dynamic_names(model)]


def _export(module: nn.Module, inputs: tuple, input_names: list[str], output_names: list[str], path: Path) -> None:
    batch = Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in inputs)
    if len(inputs) > 1:  # ReaderStepGraph.forward(prev, *state): the state is one varargs tuple
        shapes = (shapes[0], shapes[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=shapes, optimize=True, verbose=False)
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    import onnx

    onnx.save(proto, str(path))


def parity(model: ImageReader, reader: OrtReader, images: np.ndarray, split: str, batch: int = 64) -> ReaderValidation:
    """Torch's greedy readings of `images` (from the file `split`) against onnxruntime's,
    teacher-forced on torch's symbols so that every step compares the same inputs."""
    texts_equal, max_logp, max_attention = 0, 0.0, 0.0
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        ref_ids, ref_scores, ref_attention = greedy_read(model, normalise(torch.from_numpy(chunk)))
        ids, scores, attention, _ = reader.read(chunk)
        texts_equal += sum(a == b for a, b in zip(ref_ids, ids))
        steps = min(ref_attention.size(1), len(attention))
        for t in range(steps):
            max_attention = max(max_attention, float(np.abs(ref_attention[:, t].numpy() - attention[t]).max()))
        max_logp = max(max_logp, float(np.abs(ref_scores.numpy() - scores).max()))
    return ReaderValidation(images=int(len(images)), identical_readings=int(texts_equal), max_abs_score_diff=max_logp,
                            max_abs_attention_diff=max_attention, atol=ATOL, split=split)


def export_reader(run_dir: Path, out_dir: Path, which: str = "best", validation_images: int = 512) -> dict:
    """Export a reader run to a verified directory; returns the manifest as written (its JSON
    values: ReaderManifest.to_json())."""
    config = read_config(run_dir)
    if config.model.arch != "reader":
        raise ReaderExportError(f"{run_dir} is a {config.model.arch} run, not an image reader")
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a bundle; versions are immutable, export to a new version")
    model = load_reader(run_dir, which)
    mc = config.model
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from a server running as another user
    try:
        pixels = torch.zeros(2, mc.image_height, mc.image_width, mc.image_channels, dtype=torch.uint8)
        state = model.encode(normalise(pixels))
        names = state_names(model)
        dynamic = dynamic_names(model)
        graphs = ReaderGraphs(
            encoder=ReaderGraph("fp32/encoder.onnx", (PIXELS,), tuple(names)),
            decoder_step=ReaderGraph("fp32/decoder_step.onnx", (PREVIOUS_TOKENS, *names),
                                     (LOG_PROBS, ATTENTION, *(NEW_STATE_PREFIX + n for n in dynamic))))
        _export(ReaderEncoderGraph(model), (pixels,), list(graphs.encoder.inputs), list(graphs.encoder.outputs),
                work / graphs.encoder.file)
        prev = torch.full((2,), BOS_ID, dtype=torch.long)
        _export(ReaderStepGraph(model), (prev, *(state[n] for n in names)), list(graphs.decoder_step.inputs),
                list(graphs.decoder_step.outputs), work / graphs.decoder_step.file)
        h, w = model.grid  # the annotation grid: rows x cols cells of the image
        manifest = ReaderManifest(
            task="read", model=mc.label, attention=mc.attention, parameters=model.num_parameters(),
            input=ImageInput(kind="image", height=mc.image_height, width=mc.image_width, channels=mc.image_channels,
                             colour="RGB", dtype="uint8", layout="NHWC", resize="stretch to height x width",
                             normalisation=Normalisation(mean=PIXEL_MEAN, std=PIXEL_STD, in_graph=True)),
            grid=Grid(rows=h, cols=w, cell_height=mc.image_height / h, cell_width=mc.image_width / w,
                      order="row-major"),
            vocabulary=("<pad>", "<unk>", "<s>", "</s>", *(str(d) for d in range(10))),
            special_ids=SPECIAL_IDS, digit_offset=DIGIT_OFFSET, max_symbols=mc.max_len, graphs=graphs,
            source={"run": str(run_dir), "checkpoint": which,
                    "step": json.loads((run_dir / "checkpoints" / which / "meta.json").read_text()).get("step")})
        split = Path(config.train.data_dir) / "test.npz"
        images = DigitDataset.load(split).images[:validation_images]
        result = parity(model, OrtReader(work, manifest), images, str(split))
        failures = []
        if result.identical_readings != result.images:
            failures.append(f"{result.images - result.identical_readings} of {result.images} readings differ")
        if result.max_abs_score_diff > ATOL * mc.max_len or result.max_abs_attention_diff > ATOL:
            failures.append(f"score diff {result.max_abs_score_diff:.2e}, attention diff "
                            f"{result.max_abs_attention_diff:.2e} over tolerance {ATOL:.0e}")
        if failures:
            raise ReaderExportError("; ".join(failures))
        files = {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*.onnx"))}
        # The whole check a server makes on reading it: what export writes, it must read.
        manifest = dataclasses.replace(manifest, validation=result, files=files).validate()
        (work / MANIFEST_FILE).write_text(manifest.dumps())
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("reader bundle written to %s (parity: %d/%d identical readings)", out_dir,
             result.identical_readings, result.images)
    return manifest.to_json()
