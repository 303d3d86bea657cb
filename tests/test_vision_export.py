"""The reader bundle: export checks parity against torch, onnxruntime reads a generated image as
torch does, bad images are refused naming the problem, and `attnserve read` prints path<TAB>text.
Its manifest is a ReaderManifest (attnserve/bundle_format.py): it round-trips, lists every
problem of a malformed one, and another format version or a tampered graph is refused."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnserve.bundle_format import (
    MANIFEST_FILE, READER_FORMAT_VERSION, FormatVersionError, ManifestError, ReaderManifest,
)
from attnserve.cli import main
from attnserve.model.train import run_training
from attnserve.model.vision.data import generate_split, render
from attnserve.model.vision.evaluate import load_reader
from attnserve.model.vision.reader import decode_digits, greedy_read, normalise
from attnserve.server.reader import ImageError, OrtReader, ReaderBundleError, decode_image, read_manifest
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
    manifest = read_manifest(directory)
    assert directory.stat().st_mode & 0o755 == 0o755  # readable by a server that runs as another user
    assert manifest.input.kind == "image" and manifest.input.channels == 3
    assert (manifest.input.height, manifest.input.width) == (32, 64)
    assert manifest.input.normalisation.to_json() == {"mean": 127.5, "std": 64.0, "in_graph": True}
    assert (manifest.grid.rows, manifest.grid.cols) == (4, 8)
    validation = manifest.validation
    assert validation is not None and validation.identical_readings == validation.images == 48
    assert validation.max_abs_attention_diff <= 1e-4
    assert set(manifest.files) == {"fp32/encoder.onnx", "fp32/decoder_step.onnx"}
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
    opaque = np.full((10, 20, 4), 255, dtype=np.uint8)
    opaque[..., :3] = 90
    assert (decode_image(png(opaque), 32, 64) == 90).all()  # an alpha channel that is opaque everywhere too
    buffer = io.BytesIO()
    Image.new("CMYK", (20, 10), (0, 0, 0, 0)).save(buffer, "JPEG")  # a print shop's JPEG: white
    assert (decode_image(buffer.getvalue(), 32, 64) > 240).all()
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
    jpeg = tmp_path / "good.jpg"  # the same name with another extension: its own overlay file
    Image.open(good).save(jpeg, quality=95)
    overlays = tmp_path / "overlays"
    assert main(["read", str(good), str(jpeg), "--model", str(directory), "--overlays", str(overlays)]) == 0
    assert sorted(p.name for p in overlays.iterdir()) == ["good.jpg.attention.png", "good.png.attention.png"]
    assert Image.open(overlays / "good.png.attention.png").size[0] > 64 * 3  # the image, then a tile per symbol


def test_tampered_bundles_are_refused(bundle, tmp_path: Path) -> None:
    _, directory = bundle
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    with open(copy / "fp32" / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ReaderBundleError, match="encoder.onnx: missing or its sha256 differs"):
        OrtReader(copy)
    assert read_manifest(copy, verify=False).files == read_manifest(directory).files  # only the graph changed
    (copy / "fp32" / "decoder_step.onnx").unlink()
    shutil.copy(directory / "fp32" / "encoder.onnx", copy / "fp32" / "encoder.onnx")
    with pytest.raises(ReaderBundleError, match="decoder_step.onnx: missing"):
        OrtReader(copy)
    (copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ReaderBundleError, match="not valid JSON"):
        OrtReader(copy)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(ReaderBundleError, match="no manifest.json"):
        OrtReader(copy)


def test_the_reader_manifest_round_trips(bundle) -> None:
    _, directory = bundle
    path = directory / MANIFEST_FILE
    text = path.read_text()
    manifest = ReaderManifest.read(path)
    assert manifest.to_json() == json.loads(text) and manifest.dumps() == text  # what export writes, exactly
    assert list(manifest.to_json())[:3] == ["format", "format_version", "task"]
    assert ReaderManifest.from_json(manifest.to_json()) == manifest == read_manifest(directory)
    assert OrtReader(directory).manifest == manifest
    assert manifest.graphs.dynamic_state == ("hidden", "cell") and manifest.vocabulary[manifest.digit_offset] == "0"
    assert manifest.special_ids.eos == 3 and manifest.source["checkpoint"] == "best"
    with pytest.raises(TypeError):  # read-only: a manifest does not change under the reader that reads it
        manifest.files["fp32/encoder.onnx"] = "0" * 64  # type: ignore[index]


def test_a_malformed_reader_manifest_lists_every_problem(bundle, tmp_path: Path) -> None:
    _, directory = bundle
    data = json.loads((directory / MANIFEST_FILE).read_text())
    # Records that do not fit: every one is named, in one error.
    bad = json.loads(json.dumps(data))
    bad["grid"]["rows"] = "4"
    del bad["max_symbols"]
    bad["graphs"]["encoder"]["inputs"] = "pixels"
    with pytest.raises(ManifestError) as error:
        ReaderManifest.from_json(bad, "m.json")
    assert sorted(error.value.problems) == sorted(["grid.rows: int expected, got '4'", "max_symbols: missing",
                                                   "graphs.encoder.inputs: a list expected, got 'pixels'"])
    assert str(error.value).startswith("m.json: invalid manifest")
    # Records that fit but do not make a bundle: the same, from the whole check.
    bad = json.loads(json.dumps(data))
    bad["vocabulary"] = bad["vocabulary"][:-1]
    del bad["files"]["fp32/decoder_step.onnx"]
    with pytest.raises(ManifestError) as error:
        ReaderManifest.from_json(bad).validate()
    problems = error.value.problems
    assert len(problems) == 2 and problems[0].startswith("vocabulary: 13 symbols")
    assert problems[1].startswith("graphs.decoder_step.file: 'fp32/decoder_step.onnx' is not among the files")
    assert ReaderManifest.from_json(data).problems() == []
    # A server refuses such a bundle with both problems named.
    copy = tmp_path / "bad"
    shutil.copytree(directory, copy)
    (copy / MANIFEST_FILE).write_text(json.dumps(bad))
    with pytest.raises(ReaderBundleError, match="vocabulary: 13 symbols(.|\n)*decoder_step.file") as refused:
        OrtReader(copy)
    assert isinstance(refused.value.__cause__, ManifestError) and len(refused.value.__cause__.problems) == 2


def test_another_reader_format_version_is_refused_naming_both(bundle, tmp_path: Path) -> None:
    _, directory = bundle
    data = json.loads((directory / MANIFEST_FILE).read_text())
    later = READER_FORMAT_VERSION + 1
    both = rf"version {later}; this attnserve reads 'attnserve-reader' version {READER_FORMAT_VERSION}"
    with pytest.raises(FormatVersionError, match=both) as error:
        ReaderManifest.from_json({**data, "format_version": later, "grid": "another layout"})
    assert (error.value.expected_format, error.value.expected_version) == ("attnserve-reader", READER_FORMAT_VERSION)
    translator = "format 'attnserve-bundle' version 1; this attnserve reads 'attnserve-reader'"
    with pytest.raises(FormatVersionError, match=translator):
        ReaderManifest.from_json({**data, "format": "attnserve-bundle"})  # a translator's manifest
    with pytest.raises(FormatVersionError):  # nor can one be made in code
        dataclasses.replace(ReaderManifest.from_json(data), format_version=later)
    copy = tmp_path / "v2"
    shutil.copytree(directory, copy)
    (copy / MANIFEST_FILE).write_text(json.dumps({**data, "format_version": later}))
    with pytest.raises(ReaderBundleError, match=both):
        OrtReader(copy)
