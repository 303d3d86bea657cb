"""The model repository without gRPC: model states are an Enum, engines get the metrics' run
observer at construction, and a retired version's engines release their sessions."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from attnserve.server.metrics import Metrics
from attnserve.server.repository import EngineConfig, ModelRepository, ModelState
from attnserve.server.scheduler import BatchingConfig


def _wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def _closed(engine) -> bool:
    try:
        engine.runtime.step_session.get_providers()
    except RuntimeError:
        return True
    return False


def test_a_retired_version_closes_its_engines(bundles, tmp_path: Path) -> None:
    root = tmp_path / "repository"
    shutil.copytree(bundles["transformer"], root / "toy" / "1")
    metrics = Metrics()
    repository = ModelRepository(root, EngineConfig(device="cpu", threads=2, instances=2), BatchingConfig(), metrics)
    repository.scan()
    first = repository.get("toy")
    assert first.state is ModelState.READY and first.state == "READY"  # the API's state names
    engines = first.scheduler.engines
    assert len(engines) == 2 and all(engine.runtime.run_observer is not None for engine in engines)
    shutil.copytree(bundles["transformer"], root / "toy" / "2")
    repository.scan()
    assert repository.get("toy").version == "2" and first.state is ModelState.UNLOADED
    assert _wait_for(lambda: all(_closed(engine) for engine in engines))
    with pytest.raises(RuntimeError, match="engine was closed"):
        engines[0].translate(["the cat"])
    second = repository.get("toy").scheduler.engines
    assert second[0].translate_text(["the cat"])[0]  # the new version serves
    repository.close(10)
    assert all(_closed(engine) for engine in second)


def test_a_version_that_fails_to_load_is_failed(bundles, tmp_path: Path) -> None:
    root = tmp_path / "repository"
    shutil.copytree(bundles["transformer"], root / "toy" / "1")
    (root / "toy" / "1" / "spm.model").write_bytes(b"not a tokenizer")
    repository = ModelRepository(root, EngineConfig(device="cpu", threads=1, instances=1), BatchingConfig())
    repository.scan()
    (version,) = repository.versions()
    assert version.state is ModelState.FAILED and "sha256" in version.reason
    repository.close(10)
