"""The real training loop on a small synthetic translation task: every architecture learns,
resume is exact, checkpoints are safe to load, evaluation writes its report and plot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch

from attnserve.cli import main
from attnserve.model.checkpoint import CheckpointError, load_model
from attnserve.model.config import Config, ModelConfig, TrainConfig
from attnserve.model.corpus import write_tsv
from attnserve.model.train import run_training

# A toy language pair: a word-for-word dictionary with adjectives moved after their noun, so the
# models must learn lexical translation and a local reordering.
NOUNS = {"cat": "chat", "dog": "chien", "house": "maison", "car": "voiture", "tree": "arbre", "book": "livre"}
ADJECTIVES = {"red": "rouge", "big": "grand", "old": "vieux", "green": "vert"}
VERBS = {"sees": "voit", "likes": "aime", "has": "a"}


def toy_pair(rng: random.Random) -> tuple[str, str]:
    def phrase() -> tuple[list[str], list[str]]:
        noun = rng.choice(list(NOUNS))
        if rng.random() < 0.5:
            adj = rng.choice(list(ADJECTIVES))
            return ["the", adj, noun], ["le", NOUNS[noun], ADJECTIVES[adj]]
        return ["the", noun], ["le", NOUNS[noun]]

    (s1, t1), (s2, t2) = phrase(), phrase()
    verb = rng.choice(list(VERBS))
    return " ".join(s1 + [verb] + s2), " ".join(t1 + [VERBS[verb]] + t2)


def write_toy_corpus(directory: Path, train: int, dev: int, test: int, seed: int = 0) -> Path:
    """train/dev/test.tsv of toy pairs in `directory` (made if missing), drawn in that order."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("dev", dev), ("test", test)):
        write_tsv(directory / f"{split}.tsv", [toy_pair(rng) for _ in range(count)])
    return directory


@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory) -> Path:
    return write_toy_corpus(tmp_path_factory.mktemp("toy"), train=400, dev=24, test=40)


def toy_config(corpus: Path, out: Path, **model) -> Config:
    base = dict(vocab_size=400, d_model=48, hidden=32, attn_dim=32, d_ff=96, n_heads=4,
                enc_layers=1, dec_layers=2, dropout=0.1, max_len=64)
    return Config(
        model=ModelConfig(**{**base, **model}),
        train=TrainConfig(data_dir=str(corpus), out_dir=str(out), max_tokens=600, lr=3e-3, warmup_steps=20,
                          eval_every=100, max_steps=200, seed=3, threads=1, device="cpu", precision="fp32"),
    )


def losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "train_loss" in r]


@pytest.mark.parametrize("model", [
    dict(arch="transformer"),
    dict(arch="rnn", decoder="bahdanau", attention="global", score="additive"),
    dict(arch="rnn", decoder="luong", attention="global", score="general"),
    dict(arch="rnn", decoder="luong", attention="local", score="dot", window=3),
    dict(arch="rnn", decoder="bahdanau", attention="none"),
], ids=["transformer", "bahdanau", "luong", "luong-local", "noattn"])
def test_each_architecture_fits_a_small_corpus(toy_corpus: Path, tmp_path: Path, model: dict) -> None:
    config = toy_config(toy_corpus, tmp_path / "run", **model)
    config.train.max_steps = 400
    trainer = run_training(config)
    records = list(map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()))
    dev = [r["dev_bleu"] for r in records if "dev_bleu" in r]
    # log(V) ~ 5.7 at the start; label smoothing keeps the floor near 1.
    initial = torch.log(torch.tensor(float(trainer.tokenizer.vocab_size))).item()
    assert losses(tmp_path / "run")[-1] < 0.5 * initial, losses(tmp_path / "run")
    # Random output scores ~1 BLEU; one fixed context vector learns this task more slowly.
    assert trainer.best_bleu > (12 if model.get("attention") == "none" else 20), dev


def test_bf16_autocast_on_cpu_trains(toy_corpus: Path, tmp_path: Path) -> None:
    """train.precision = bf16 on the CPU: the forward runs in bf16 (AMX where present, emulated
    elsewhere), the weights stay fp32, the loss falls and the run records what it used."""
    config = toy_config(toy_corpus, tmp_path / "run", arch="transformer")
    config.train.precision = "bf16"
    config.train.max_steps = 200
    trainer = run_training(config)
    assert trainer.precision == "bf16"
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.6 * curve[0], curve
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    weights = safetensors.torch.load_file(str(tmp_path / "run/checkpoints/last/model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    started = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert started.get("precision") == "bf16" and "cpu" in started.get("hardware", {}), started


def test_resume_is_exact(toy_corpus: Path, tmp_path: Path) -> None:
    """Stopping at step 100 and resuming to 200 gives the weights of an uninterrupted run."""
    straight = toy_config(toy_corpus, tmp_path / "straight", arch="transformer")
    run_training(straight)
    interrupted = toy_config(toy_corpus, tmp_path / "resumed", arch="transformer")
    interrupted.train.max_steps = 100
    run_training(interrupted)
    meta = json.loads((tmp_path / "resumed/checkpoints/last/meta.json").read_text())
    assert meta["step"] == 100
    interrupted.train.max_steps = 200
    trainer = run_training(interrupted)
    assert trainer.step == 200
    a = safetensors.torch.load_file(str(tmp_path / "straight/checkpoints/last/model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "resumed/checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_eval_writes_scores_buckets_and_plot(toy_corpus: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_training(toy_config(toy_corpus, run_dir, arch="rnn", decoder="bahdanau"))
    assert main(["eval", str(run_dir), "--beam", "2", "--show", "2"]) == 0
    result = json.loads((run_dir / "eval-test-beam2.json").read_text())
    assert result["sentences"] == 40 and 0 <= result["bleu"] <= 100 and result["chrf"] > 0
    assert sum(b["sentences"] for b in result["buckets"].values()) == 40
    assert (run_dir / "bleu-by-length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((run_dir / "eval-test-beam2.hyp.txt").read_text().splitlines()) == 40
    assert "reference:" in capsys.readouterr().out


def test_checkpoints_refuse_incompatible_or_missing_files(toy_corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = toy_config(toy_corpus, run_dir, arch="transformer")
    config.train.max_steps = 5
    run_training(config)
    load_model(run_dir)  # loads
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    raw = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(CheckpointError, match="checkpoint format 99"):
        load_model(run_dir)
    (run_dir / "config.json").write_text(json.dumps({**raw, "model": {**raw["model"], "d_ff": 128}}))
    with pytest.raises(Exception, match="size mismatch|does not match"):
        load_model(run_dir)
    # Trainer state is loaded with weights_only=True: a pickled object is refused.
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (run_dir / "checkpoints/last/trainer.pt").write_bytes(pickle.dumps({"optimizer": Evil()}, protocol=2))
    from attnserve.model.checkpoint import load_trainer_state

    with pytest.raises(pickle.UnpicklingError):
        load_trainer_state(run_dir / "checkpoints/last")


def test_config_files_are_typed(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[model]\narch = "rnn"\ndecoder = "luong"\n[train]\nlr = 0.002\n')
    config = Config.load(good)
    assert config.model.decoder == "luong" and config.train.lr == 0.002
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nd_modle = 3\n")
    with pytest.raises(ValueError, match="d_modle"):
        Config.load(bad)
    for shipped in Path(__file__).parent.parent.glob("configs/*.toml"):
        Config.load(shipped)


def test_checkpoint_averaging_is_the_mean_and_refuses_other_models(trained, tmp_path: Path) -> None:
    """`attnserve average`: the element-wise mean of one model's checkpoints (here its best and
    last), loadable as a run; checkpoints of another architecture are refused, nothing written."""
    from attnserve.model.checkpoint import average_checkpoints, weights_path

    run = trained["transformer"]
    best = safetensors.torch.load_file(str(weights_path(run, "best")))
    last = safetensors.torch.load_file(str(weights_path(run, "last")))
    out = tmp_path / "averaged"
    assert main(["average", str(run), str(weights_path(run, "last")), "--out", str(out)]) == 0
    mean = safetensors.torch.load_file(str(weights_path(out)))
    assert mean.keys() == best.keys()
    for name, tensor in mean.items():
        torch.testing.assert_close(tensor.float(), (best[name].float() + last[name].float()) / 2)
    model, _, config = load_model(out)
    assert config.model == load_model(run)[2].model
    assert main(["average", str(run), str(weights_path(run, "last")), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    halved = safetensors.torch.load_file(str(weights_path(tmp_path / "bf16")))
    assert {t.dtype for t in halved.values()} == {torch.bfloat16}
    for name, tensor in halved.items():
        torch.testing.assert_close(tensor.float(), mean[name].float(), rtol=1e-2, atol=1e-2)
    load_model(tmp_path / "bf16")  # loads back into the fp32 model
    with pytest.raises(CheckpointError, match="model config differs"):
        average_checkpoints([run, trained["bahdanau"]], tmp_path / "mixed")
    with pytest.raises(CheckpointError, match="at least two"):
        average_checkpoints([run], tmp_path / "one")
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "one").exists()


def test_the_linear_schedule_cools_down_to_zero_at_max_steps() -> None:
    from attnserve.model.train import lr_schedule

    factor = lr_schedule(TrainConfig(lr_schedule="linear", warmup_steps=10, max_steps=110))
    assert [factor(s) for s in (5, 10, 60, 110, 200)] == [0.5, 1.0, 0.5, 0.0, 0.0]
    assert lr_schedule(TrainConfig(warmup_steps=100))(400) == pytest.approx(0.5)  # inverse sqrt, the default
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(lr_schedule="linear", warmup_steps=10)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")
