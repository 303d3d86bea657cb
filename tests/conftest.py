"""Shared fixtures: small models trained once per test session on the toy task."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnserve.model.train import run_training
from attnserve.server.config import SHIPPED_REPOSITORY
from tests.test_training import toy_config, write_toy_corpus


def newest_version(model_dir: Path) -> Path:
    """The newest version folder (the largest number) of a repository model: what the server serves."""
    return max((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


# The shipped en-fr bundle, whichever version that is.
SHIPPED_BUNDLE = newest_version(SHIPPED_REPOSITORY / "en-fr")

ARCHITECTURES = {
    "transformer": dict(arch="transformer"),
    "bahdanau": dict(arch="rnn", decoder="bahdanau", attention="global", score="additive"),
    "luong": dict(arch="rnn", decoder="luong", attention="global", score="general", cell="lstm"),
    "luong-local": dict(arch="rnn", decoder="luong", attention="local", score="concat", window=3),
}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Run directories of every architecture, trained 150 steps on the toy corpus."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_toy_corpus(root / "corpus", train=400, dev=40, test=200)  # BLEU deltas need some test size
    runs = {}
    for name, model in ARCHITECTURES.items():
        config = toy_config(corpus, root / name, **model)
        config.train.max_steps = 150
        run_training(config)
        runs[name] = root / name
    return runs


@pytest.fixture(scope="session")
def bundles(trained: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """fp32 bundles of the trained toy models."""
    from attnserve.export.exporter import export_bundle

    repo = tmp_path_factory.mktemp("repo")
    out = {}
    for name, run in trained.items():
        out[name] = repo / name / "1"
        export_bundle(run, out[name], precisions=("fp32",))
    return out
