"""The Reader service, served by the translators' server from the same repository: Read answers
a generated image as the offline reader does, bad images get INVALID_ARGUMENT naming the
problem (and the server goes on), reflection, health, metrics and hot reload cover it."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from attnserve.cli import main
from attnserve.model.vision.data import render
from attnserve.server.reader import OrtReader
from attnserve.v1 import reader_pb2 as pb
from attnserve.v1 import reader_pb2_grpc as pb_grpc
from tests.test_server import requests_count, scrape, start
from tests.test_vision_export import tiny_reader_bundle


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader-service")
    _, bundle = tiny_reader_bundle(root)
    server, port = start(root / "repo")  # no translator in it: the Reader serves on its own
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, port, pb_grpc.ReaderStub(channel), bundle
    channel.close()
    server.stop(1)


def test_read_answers_generated_images_as_the_offline_reader(served) -> None:
    _, _, stub, bundle = served
    images = [png(render(11, "train", i).image) for i in range(6)]
    response = stub.Read(pb.ReadRequest(images=images), timeout=30)
    offline = OrtReader(bundle).read_images(images)
    assert response.model == "house-numbers" and response.version == "1"
    assert (response.grid.rows, response.grid.cols, response.grid.input_height, response.grid.input_width) == (4, 8, 32, 64)
    assert [r.text for r in response.readings] == [r.text for r in offline]
    assert sum(r.text == render(11, "train", i).digits for i, r in enumerate(response.readings)) >= 4
    for reading, reference in zip(response.readings, offline):
        assert [s.symbol for s in reading.symbols] == [*reading.text, "</s>"]
        maps = np.array([list(s.weights) for s in reading.symbols])
        assert maps.shape == (len(reading.text) + 1, 32) and np.allclose(maps.sum(1), 1, atol=1e-4)
        assert np.allclose(maps, reference.attention, atol=1e-5)
        assert reading.score == pytest.approx(reference.score, abs=1e-4)


INVALID, TOO_BIG = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("images, code, message", [
    ([b"definitely not an image"], INVALID, "image 0: undecodable"),
    ([png(np.zeros((8, 8, 4), dtype=np.uint8))], INVALID, "image 0: image has 4 channels"),
    ([png(np.zeros((8, 8, 3), dtype=np.uint8)), b""], INVALID, "image 1: empty image"),
    # Over max_message_bytes (4 MiB), gRPC itself refuses the message before the servicer runs.
    ([b"\x89PNG" + bytes(5 << 20)], TOO_BIG, "larger than max"),
    ([], INVALID, "no images"),
    ([png(np.zeros((8, 8, 3), dtype=np.uint8))] * 65, INVALID, "at most 64"),
])
def test_bad_images_are_refused_and_the_server_goes_on(served, images, code, message) -> None:
    _, _, stub, _ = served
    with pytest.raises(grpc.RpcError) as caught:
        stub.Read(pb.ReadRequest(images=images), timeout=30)
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert stub.Read(pb.ReadRequest(images=[png(render(11, "train", 0).image)]), timeout=30).readings[0].text


def test_unknown_reader_is_not_found(served) -> None:
    _, _, stub, _ = served
    with pytest.raises(grpc.RpcError) as caught:
        stub.Read(pb.ReadRequest(images=[png(render(11, "train", 0).image)], model="no-such"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "house-numbers" in caught.value.details()


def test_reflection_health_and_metrics_cover_the_reader(served) -> None:
    server, port, stub, _ = served
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    services = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])))
    assert "attnserve.v1.Reader" in {s.name for s in services.list_services_response.service}
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("house-numbers", "attnserve.v1.Reader"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    before = requests_count(scrape(server.metrics_port), "Read", "OK", "house-numbers")
    stub.Read(pb.ReadRequest(images=[png(render(11, "train", 1).image)]), timeout=30)
    assert requests_count(scrape(server.metrics_port), "Read", "OK", "house-numbers") == before + 1
    channel.close()


def test_hot_reload_serves_a_new_version_and_drops_a_removed_one(served) -> None:
    server, _, stub, bundle = served
    shutil.copytree(bundle, bundle.parent / "2")
    server.readers.scan()  # what the poll thread and SIGHUP do
    image = png(render(11, "train", 0).image)
    assert stub.Read(pb.ReadRequest(images=[image]), timeout=30).version == "2"
    assert stub.Read(pb.ReadRequest(images=[image], version="1"), timeout=30).version == "1"
    shutil.rmtree(bundle.parent / "2")
    server.readers.scan()
    assert stub.Read(pb.ReadRequest(images=[image]), timeout=30).version == "1"


def test_a_corrupt_bundle_is_refused_while_the_old_one_serves(served) -> None:
    server, _, stub, bundle = served
    image = png(render(11, "train", 0).image)
    expected = stub.Read(pb.ReadRequest(images=[image])).readings[0].text  # no deadline: served all the same
    broken = bundle.parent / "3"
    shutil.copytree(bundle, broken)
    (broken / "fp32" / "decoder_step.onnx").write_bytes(b"truncated")  # a new version, corrupt
    server.readers.scan()
    response = stub.Read(pb.ReadRequest(images=[image]), timeout=30)
    assert (response.version, response.readings[0].text) == ("1", expected)
    shutil.rmtree(broken)
    graph = bundle / "fp32" / "encoder.onnx"  # the served version itself, changed in place
    original = graph.read_bytes()
    try:
        graph.write_bytes(original[: len(original) // 2])
        server.readers.scan()
        assert stub.Read(pb.ReadRequest(images=[image]), timeout=30).readings[0].text == expected
    finally:
        graph.write_bytes(original)
        server.readers.scan()
    assert stub.Read(pb.ReadRequest(images=[image]), timeout=30).readings[0].text == expected


def test_read_command_with_server(served, tmp_path: Path, capsys) -> None:
    _, port, _, _ = served
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    good.write_bytes(png(render(11, "train", 0).image))
    bad.write_bytes(b"nope")
    assert main(["read", str(good), str(bad), "--server", f"127.0.0.1:{port}"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{good}\t") and out[0].split("\t")[1].isdigit()
