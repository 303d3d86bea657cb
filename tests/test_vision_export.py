"""The reader bundle: export checks parity against torch, onnxruntime reads a generated image as
torch does, bad images are refused naming the problem, and `attnserve read` prints path<TAB>text."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnserve.cli import main
from attnserve.model.train import run_training
from attnserve.model.vision.data import generate_split, render
from attnserve.model.vision.evaluate import load_reader
from attnserve.model.vision.reader import decode_digits, greedy_read, normalise
from attnserve.server.reader import ImageError, OrtReader, ReaderBundleError, decode_image
from tests.test_vision import reader_config


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def tiny_reader_bundle(root: Path) -> tuple[Path, Path]:
    """A small soft-attention reader fitted to 48 generated images (seed 11, train split 0-47),
    exported to ROOT/repo/house-numbers/1: (run directory, bundle directory)."""
    data = generate_split(11, "train", 48)
    for split in ("train", "dev", "test"):
        data.save(root / f"{split}.npz")
    config = reader_config("soft", str(root), str(root / "run"), max_steps=150)
    run_training(config)
    assert main(["export", str(root / "run"), "--out", str(root / "repo/house-numbers/1"), "--validation-sentences", "48"]) == 0
    return root / "run", root / "repo/house-numbers/1"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_reader_bundle(tmp_path_factory.mktemp("reader"))


def test_export_records_parity_and_the_image_input(bundle) -> None:
    run, directory = bundle
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["input"]["kind"] == "image" and manifest["input"]["channels"] == 3
    assert (manifest["input"]["height"], manifest["input"]["width"]) == (32, 64)
    assert manifest["input"]["normalisation"] == {"mean": 127.5, "std": 64.0, "in_graph": True}
    assert (manifest["grid"]["rows"], manifest["grid"]["cols"]) == (4, 8)
    validation = manifest["validation"]
    assert validation["identical_readings"] == validation["images"] == 48
    assert validation["max_abs_attention_diff"] <= 1e-4
    assert set(manifest["files"]) == {"fp32/encoder.onnx", "fp32/decoder_step.onnx"}
    assert main(["export", str(run), "--out", str(directory)]) == 2  # versions are immutable


def test_onnxruntime_reads_a_generated_image_as_torch_does(bundle) -> None:
    run, directory = bundle
    reader = OrtReader(directory)
    model = load_reader(run)
    images = [render(11, "train", i).image for i in range(6)]  # the images it was trained on
    readings = reader.read_images([png(image) for image in images])
    ids, scores, attention = greedy_read(model, normalise(torch.from_numpy(np.stack(images))))
    assert [r.text for r in readings] == [decode_digits(row) for row in ids]
    assert sum(r.text == render(11, "train", i).digits for i, r in enumerate(readings)) >= 4
    for b, reading in enumerate(readings):
        assert reading.attention.shape == (len(reading.text) + 1, 32)
        assert np.allclose(reading.attention.sum(-1), 1, atol=1e-5)
        assert np.allclose(reading.attention, attention[b, : len(reading.text) + 1].numpy(), atol=1e-4)
        assert reading.score == pytest.approx(float(scores[b]), abs=1e-4)


def test_bad_images_are_refused_with_the_problem_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="undecodable"):
        decode_image(b"not an image at all", 32, 64)
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", 32, 64)
    with pytest.raises(ImageError, match="4 channels"):
        decode_image(png(np.zeros((10, 20, 4), dtype=np.uint8)), 32, 64)
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(b"\x89PNG" + bytes(5 << 20), 32, 64)
    grey = decode_image(png(np.full((10, 20), 200, dtype=np.uint8)), 32, 64)  # greyscale is fine
    assert grey.shape == (32, 64, 3) and (grey == 200).all()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 90, 3), dtype=np.uint8)).save(buffer, "JPEG")
    assert decode_image(buffer.getvalue(), 32, 64).shape == (32, 64, 3)


def test_read_command_prints_path_and_text_and_refuses_bad_files(bundle, tmp_path: Path, capsys) -> None:
    _, directory = bundle
    good = tmp_path / "good.png"
    good.write_bytes(png(render(11, "train", 0).image))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert main(["read", str(good), "--model", str(directory)]) == 0
    line = capsys.readouterr().out.strip()
    path, text = line.split("\t")
    assert path == str(good) and text.isdigit()
    assert main(["read", str(bad), str(good), "--model", str(directory)]) == 1  # reports the bad one, reads on
    assert capsys.readouterr().out.count("\t") == 1


def test_tampered_bundles_are_refused(bundle, tmp_path: Path) -> None:
    _, directory = bundle
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    with open(copy / "fp32" / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ReaderBundleError, match="sha256"):
        OrtReader(copy)
