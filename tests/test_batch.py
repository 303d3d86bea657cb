"""Offline batch translation: exactly-once output across a SIGKILL, shards, order, odd lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnserve.cli import main
from attnserve.server.batch import BatchError, BatchTranslator, shard_range
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine, TranslationOptions
from tests.interrupt import sigkill_after_lines
from tests.test_training import toy_pair


def toy_lines(n: int, seed: int = 5) -> list[str]:
    import random

    rng = random.Random(seed)
    return [toy_pair(rng)[0] for _ in range(n)]


@pytest.fixture(scope="module")
def engine(bundles) -> Engine:
    return Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu", threads=1)


def test_order_empty_and_long_lines(engine: Engine, tmp_path: Path) -> None:
    lines = toy_lines(30)
    lines[3] = ""
    lines[10] = "   "
    lines[17] = " ".join(["the big old red green cat"] * 40)  # far beyond max_len tokens
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    opts = TranslationOptions()
    summary = BatchTranslator(engine, opts, chunk_lines=8).run(tmp_path / "in.txt", tmp_path / "out.txt", progress=False)
    out = (tmp_path / "out.txt").read_text().split("\n")[:-1]
    assert len(out) == 30 and out[3] == "" and out[10] == ""
    expected = engine.translate_text([lines[i] for i in range(30) if i not in (3, 10, 17)], opts)
    assert [out[i] for i in range(30) if i not in (3, 10, 17)] == expected
    assert summary.empty == 2 and summary.truncated == 1 and summary.translated == 28
    summary = BatchTranslator(engine, opts, long_lines="report").run(tmp_path / "in.txt", tmp_path / "out2.txt", progress=False)
    out2 = (tmp_path / "out2.txt").read_text().split("\n")[:-1]
    assert out2[17] == "" and summary.refused == 1 and len(out2) == 30
    with pytest.raises(BatchError, match="exists"):
        BatchTranslator(engine, opts).run(tmp_path / "in.txt", tmp_path / "out.txt", progress=False)


def test_jsonl_keeps_fields_and_reports_bad_lines(engine: Engine, tmp_path: Path) -> None:
    records = [json.dumps({"id": i, "text": t}) for i, t in enumerate(toy_lines(5))]
    records.insert(2, "{broken json")
    records.insert(4, json.dumps({"id": "no-text"}))
    (tmp_path / "in.jsonl").write_text("\n".join(records) + "\n")
    assert main(["translate", "--model", str(engine.bundle.path), str(tmp_path / "in.jsonl"), "-o",
                 str(tmp_path / "out.jsonl"), "--beam", "1", "--quiet"]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 7
    assert "error" in out[2] and "error" in out[4]
    assert [o["id"] for o in out if "translation" in o] == [0, 1, 2, 3, 4]


def test_shards_cover_every_line_once(engine: Engine, tmp_path: Path) -> None:
    lines = toy_lines(23)
    (tmp_path / "in.txt").write_text("\n".join(lines))  # no final newline: the last line still counts
    for n in (1, 4, 30):
        covered = [i for k in range(n) for i in range(*shard_range(23, k, n))]
        assert covered == list(range(23))
    opts = TranslationOptions()
    parts = []
    for k in range(3):
        BatchTranslator(engine, opts, chunk_lines=4).run(tmp_path / "in.txt", tmp_path / f"out.{k}", (k, 3), progress=False)
        parts += (tmp_path / f"out.{k}").read_text().splitlines()
    assert parts == engine.translate_text(lines, opts)
    assert main(["translate", "--model", str(engine.bundle.path), str(tmp_path / "in.txt"), "-o", str(tmp_path / "x"),
                 "--shard", "3/3"]) == 2


def test_resume_after_sigkill_gives_every_line_exactly_once(engine: Engine, tmp_path: Path) -> None:
    lines = toy_lines(1500, seed=9)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.txt"
    partial = tmp_path / "out.txt.partial"
    command = [sys.executable, "-m", "attnserve.cli", "translate", "--model", str(engine.bundle.path), str(source),
               "-o", str(output), "--beam", "1", "--chunk-lines", "50", "--threads", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    sigkill_after_lines(command, env, partial, lines=200, timeout_s=120)
    done = partial.read_bytes().count(b"\n")
    assert 200 <= done < 1500 and not output.exists(), "the run was not interrupted mid-way"
    with open(partial, "ab") as f:  # a torn write, as a kill during write() leaves
        f.write("le chat à moit".encode())
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not partial.exists()
    out = output.read_text().split("\n")
    assert out[-1] == "" and len(out) - 1 == 1500
    assert out[:-1] == engine.translate_text(lines, TranslationOptions())
