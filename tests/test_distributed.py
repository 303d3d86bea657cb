"""Data-parallel training: `torchrun --nproc-per-node 2 attnserve train` (DDP over gloo, one
thread per process) follows the single-process run on the same global batches, through a resume,
and only rank 0 writes."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from attnserve.model.config import Config
from attnserve.model.corpus import write_tsv
from attnserve.model.train import run_training
from tests.test_training import toy_config, toy_pair

STEPS = 8


def to_toml(config: Config) -> str:
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        return "[" + ", ".join(value(x) for x in v) + "]"

    return "".join(f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in dataclasses.asdict(part).items())
                   for section, part in (("model", config.model), ("train", config.train)))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def torchrun_train(config_path: Path, max_steps: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "attnserve.cli", "train", "--config", str(config_path), "--max-steps", str(max_steps)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.timeout(150)
def test_two_processes_match_one_on_the_same_global_batches(tmp_path: Path) -> None:
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_tsv(corpus / "train.tsv", [toy_pair(rng) for _ in range(400)])
    write_tsv(corpus / "dev.tsv", [toy_pair(rng) for _ in range(16)])

    def config(out: Path) -> Config:
        c = toy_config(corpus, out, arch="transformer", dropout=0.0)  # no dropout: the RNGs differ per rank
        c.train.max_steps, c.train.log_every, c.train.eval_every = STEPS, 1, 4
        return c

    single = tmp_path / "single"
    run_training(config(single))
    # Two processes, stopped half-way and resumed (the tokenizer comes from the single run so
    # that both see the same ids).
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    (ddp / "spm.model").write_bytes((single / "spm.model").read_bytes())
    toml = tmp_path / "ddp.toml"
    toml.write_text(to_toml(config(ddp)))
    torchrun_train(toml, STEPS // 2)
    assert json.loads((ddp / "checkpoints/last/meta.json").read_text())["step"] == STEPS // 2
    torchrun_train(toml, STEPS)

    ddp_records, single_records = records(ddp), records(single)
    starts = [r for r in ddp_records if r.get("event") == "start"]
    assert [(r["world_size"], r["resumed"]) for r in starts] == [(2, False), (2, True)]  # rank 0 only
    loss = {kind: {r["step"]: r["train_loss"] for r in recs if "train_loss" in r}
            for kind, recs in (("single", single_records), ("ddp", ddp_records))}
    assert sorted(loss["ddp"]) == list(range(1, STEPS + 1))  # one record per step: no rank writes twice
    assert len([r for r in ddp_records if "train_loss" in r]) == STEPS
    for step in range(1, STEPS + 1):
        assert loss["ddp"][step] == pytest.approx(loss["single"][step], abs=2e-3), step
    dev = {kind: [r["dev_loss"] for r in recs if "dev_loss" in r] for kind, recs in (("single", single_records), ("ddp", ddp_records))}
    assert len(dev["ddp"]) == 2 and dev["ddp"] == pytest.approx(dev["single"], abs=2e-3)

    a = safetensors.torch.load_file(str(single / "checkpoints/last/model.safetensors"))
    b = safetensors.torch.load_file(str(ddp / "checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys()
    worst = {}
    for name in a:
        if name.endswith("k_proj.bias"):
            # Adding one bias to every key moves all of a query's scores together, which the
            # softmax ignores: the gradient is zero up to rounding, and Adam turns that rounding
            # noise into full-size steps in either run.
            continue
        worst[name] = (b[name] - a[name]).abs().max().item()
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    print("largest parameter difference", max(worst.values()), max(worst, key=worst.get))
    trainer = torch.load(ddp / "checkpoints/last/trainer.pt", weights_only=True)
    assert trainer["step"] == STEPS and len(trainer["rng_per_rank"]) == 2
