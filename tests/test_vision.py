"""The house-number reader: the generator is deterministic and its boxes are right, attention
over the grid is a distribution (hard attention picks one cell), every variant fits a tiny set
through the shared training loop, and `attnserve eval` reports and draws it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attnserve.cli import main
from attnserve.model.config import Config, ModelConfig, TrainConfig
from attnserve.model.train import run_training
from attnserve.model.vision.data import GeneratorConfig, generate_split, render
from attnserve.model.vision.evaluate import peak_in_box, score
from attnserve.model.vision.reader import VOCAB_SIZE, ImageReader, decode_digits, encode_digits, greedy_read
from attnserve.model.vision.task import targets


def test_generator_is_deterministic_per_seed_split_and_index() -> None:
    a, b = render(7, "test", 3), render(7, "test", 3)
    assert np.array_equal(a.image, b.image) and a.digits == b.digits and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(render(7, "test", 4).image, a.image)
    assert not np.array_equal(render(8, "test", 3).image, a.image)
    assert not np.array_equal(render(7, "train", 3).image, a.image)
    first, again = generate_split(7, "dev", 12), generate_split(7, "dev", 20)
    assert np.array_equal(first.images, again.images[:12]) and first.labels == again.labels[:12]  # prefix-stable


def test_generator_covers_lengths_and_records_one_box_per_digit() -> None:
    data = generate_split(3, "train", 200)
    lengths = {len(label) for label in data.labels}
    assert lengths == {1, 2, 3, 4, 5}
    assert data.images.shape == (200, 32, 64, 3) and data.images.dtype == np.uint8
    for label, boxes in zip(data.labels, data.boxes):
        assert label.isdigit()
        assert not np.isnan(boxes[: len(label)]).any() and np.isnan(boxes[len(label):]).all()
        inside = boxes[: len(label)]
        assert (inside[:, 0] < inside[:, 2]).all() and (inside[:, 1] < inside[:, 3]).all()
        assert (inside[:, 0] >= 0).all() and (inside[:, 2] <= 64).all() and (inside[:, 3] <= 32).all()
        centres = (inside[:, 0] + inside[:, 2]) / 2
        assert (np.diff(centres) > 0).all(), "digits are left to right"


@pytest.mark.parametrize("index", range(12))
def test_each_box_is_the_extent_of_its_digits_ink(index: int) -> None:
    """The boxes come from a thresholded label layer; the masks from each digit's anti-aliased
    ink warped on its own: two paths that must agree."""
    sample = render(5, "test", index, with_masks=True)
    assert sample.masks.shape == (len(sample.digits), 32, 64)
    for mask, box in zip(sample.masks, sample.boxes):
        ys, xs = np.nonzero(mask > 0.5)
        ink_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(ink_box - box).max() <= 1.5, (sample.digits, box, ink_box)
        # All the ink but its faint anti-aliased fringe: inside the box grown by one pixel.
        x0, y0 = (np.floor(box[:2]).astype(int) - 1).clip(0).tolist()
        x1, y1 = (np.ceil(box[2:]).astype(int) + 1).tolist()
        assert mask[y0:y1, x0:x1].sum() >= 0.99 * mask.sum()


def test_clean_samples_have_exactly_the_labelled_ink() -> None:
    """With no distractors, no ink lies outside the union of the boxes."""
    sample = render(2, "dev", 1, with_masks=True, clean=True)
    outside = np.ones((32, 64), dtype=bool)
    for x0, y0, x1, y1 in sample.boxes:
        outside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = False
    assert sample.masks.sum(0)[outside].max() < 0.5


def reader_config(attention: str, data: str = "", out: str = "", **train) -> Config:
    model = ModelConfig(arch="reader", attention=attention, cell="lstm", vocab_size=VOCAB_SIZE, d_model=32, hidden=64,
                        attn_dim=32, dropout=0.0, max_len=7, conv_channels=[8, 16, 32, 48])
    return Config(model=model, train=TrainConfig(data_dir=data, out_dir=out, batch_images=16, lr=3e-3, warmup_steps=20,
                                                 eval_every=100, patience=100, seed=1, threads=1, device="cpu",
                                                 precision="fp32", log_every=20, max_epochs=1000,
                                                 **train))


@pytest.mark.parametrize("attention", ["soft", "hard", "none"])
def test_attention_over_the_grid_is_a_distribution(attention: str) -> None:
    torch.manual_seed(0)
    model = ImageReader(reader_config(attention).model)
    assert model.grid == (4, 8)
    pixels = torch.randn(5, 3, 32, 64)
    tgt_in, _ = targets(["1", "23", "456", "7890", "12345"])
    _, alpha = model(pixels, tgt_in, return_attention=True)  # (B, T, L)
    assert alpha.shape == (5, 6, 32)
    assert torch.allclose(alpha.sum(-1), torch.ones(5, 6), atol=1e-5) and (alpha >= 0).all()
    if attention == "none":
        assert torch.allclose(alpha, torch.full_like(alpha, 1 / 32))
    if attention == "hard":  # one sampled location per image and step
        state = model.encode(pixels)
        mask = torch.ones(5, 32, dtype=torch.bool)
        query = state["hidden"].unsqueeze(1)
        z, weights, one_hot = model.attention(query, state["keys"], state["memory"], mask, sample=True)
        assert torch.equal(one_hot.sum(-1), torch.ones(5, 1)) and torch.equal((one_hot > 0).sum(-1), torch.ones(5, 1))
        picked = one_hot.squeeze(1).argmax(-1)
        assert torch.allclose(z.squeeze(1), state["memory"][torch.arange(5), picked])
        torch.manual_seed(1)
        draws = torch.stack([model.attention(query, state["keys"], state["memory"], mask, sample=True)[2]
                             for _ in range(400)]).mean(0)  # the samples follow alpha
        assert torch.allclose(draws, weights, atol=0.08)


@pytest.mark.parametrize("reward", ["sequence", "to_go"])
def test_hard_attention_baseline_tracks_the_reward(reward: str) -> None:
    torch.manual_seed(0)
    cfg = reader_config("hard").model
    cfg.hard_expectation_p = 0.0
    cfg.hard_reward = reward
    model = ImageReader(cfg)
    pixels = torch.randn(8, 3, 32, 64)
    tgt_in, tgt_out = targets(["12", "3", "456", "78", "9", "10", "11", "12"])
    first = model.loss(pixels, tgt_in, tgt_out)
    # The batch's value of the reward: an image's log-likelihood ("sequence", Xu et al.) or a
    # symbol's ("to_go"). The first batch sets b to it, later ones move it by 1 - decay.
    per = 8 if reward == "sequence" else first.symbols
    assert torch.isclose(model.baseline, -first.nll / per, rtol=1e-4)
    second = model.loss(pixels, tgt_in, tgt_out)
    assert torch.isclose(model.baseline, 0.9 * (-first.nll / per) + 0.1 * (-second.nll / per), rtol=1e-4)
    assert "baseline" in model.state_dict()  # a buffer: checkpointed, so resume continues it


def test_digits_encode_and_greedy_reading_stops() -> None:
    assert decode_digits(encode_digits("40917")) == "40917"
    model = ImageReader(reader_config("soft").model).eval()
    ids, scores, attention = greedy_read(model, torch.randn(3, 3, 32, 64))
    assert len(ids) == 3 and scores.shape == (3,) and attention.shape[0] == 3 and attention.shape[2] == 32
    assert all(len(row) <= 7 for row in ids)


def test_scores_count_digits_by_position_and_lengths() -> None:
    result = score(["12", "345", "6", "789"], ["12", "346", "6", "78"])
    assert result["accuracy"] == 50.0
    assert result["digit_accuracy"] == round(100 * 7 / 9, 2)  # 2 + 2 of 3 + 1 + 2 of 3
    assert result["by_length"]["3"] == {"accuracy": 0.0, "images": 1} and result["by_length"]["1"]["accuracy"] == 100.0
    alpha = np.zeros((2, 32))
    alpha[0, 0], alpha[1, 7] = 1, 1  # cells (0, 0) and (0, 7): centres (4, 4) and (60, 4)
    boxes = np.array([[[0, 0, 10, 10], [50, 0, 64, 8], [np.nan] * 4]])
    assert peak_in_box([alpha], ["12"], boxes, (4, 8), (32, 64)) == (2, 2)
    boxes[0, 1] = [0, 20, 10, 30]
    assert peak_in_box([alpha], ["12"], boxes, (4, 8), (32, 64)) == (1, 2)
    assert peak_in_box([alpha], ["12"], boxes, (4, 8), (32, 64), columns_only=True) == (1, 2)
    boxes[0, 1] = [50, 20, 64, 30]  # the peak (60, 4) is above this box: in its columns, not in it
    assert peak_in_box([alpha], ["12"], boxes, (4, 8), (32, 64)) == (1, 2)
    assert peak_in_box([alpha], ["12"], boxes, (4, 8), (32, 64), columns_only=True) == (2, 2)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("digits")
    data = generate_split(11, "train", 48, GeneratorConfig())
    data.save(directory / "train.npz")
    data.save(directory / "dev.npz")  # fitting the training set is the point here
    data.save(directory / "test.npz")
    return directory


@pytest.mark.parametrize("attention", ["soft", "hard", "none"])
def test_each_reader_fits_a_tiny_set(tiny_set: Path, tmp_path: Path, attention: str, capsys) -> None:
    config = reader_config(attention, str(tiny_set), str(tmp_path / "run"), max_steps=600)
    trainer = run_training(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < 0.25 * losses[0], losses
    assert trainer.best_bleu >= 90.0, [r for r in records if "dev_accuracy" in r]  # the task's score: accuracy
    assert json.loads((tmp_path / "run/checkpoints/best/meta.json").read_text())["best_dev_accuracy"] >= 90.0
    assert main(["eval", str(tmp_path / "run"), "--show", "4"]) == 0
    result = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    assert result["accuracy"] >= 90.0 and set(result["by_length"]) <= {"1", "2", "3", "4", "5"}
    assert ("peak_in_box" in result) == (attention != "none")
    assert (tmp_path / "run" / "attention-test.png").stat().st_size > 1000
    assert "sequence" in capsys.readouterr().out


def test_hard_attention_anneals_from_the_expectation_to_sampling() -> None:
    cfg = reader_config("hard").model
    cfg.hard_expectation_p, cfg.hard_expectation_warmup = 0.5, 10
    model = ImageReader(cfg).train()
    assert model.expectation_share() == 1.0  # every image on the expectation at the start
    tgt_in, tgt_out = targets(["12", "3"])
    for _ in range(5):
        model.loss(torch.randn(2, 3, 32, 64), tgt_in, tgt_out)
    assert int(model.updates) == 5 and model.expectation_share() == pytest.approx(0.75)
    model.updates.fill_(40)
    assert model.expectation_share() == pytest.approx(0.5)  # then the paper's share, constant
    model.eval()
    model.loss(torch.randn(2, 3, 32, 64), tgt_in, tgt_out)
    assert int(model.updates) == 40  # evaluation does not advance the schedule
    assert "updates" in model.state_dict()


def test_font_directory_adds_faces_that_draw_digits(tmp_path: Path) -> None:
    from attnserve.model.vision.data import GeneratorConfig, dejavu_fonts, generator_fonts
    from attnserve.model.vision.fonts import fonts_in, renders_digits

    face = dejavu_fonts()[0]
    (tmp_path / "pkg").mkdir()
    shutil.copyfile(face, tmp_path / "pkg" / "Extra-Regular.ttf")
    (tmp_path / "pkg" / "Broken.otf").write_bytes(b"not a font")  # refused, not fatal
    assert renders_digits(face) and not renders_digits(str(tmp_path / "pkg" / "Broken.otf"))
    assert fonts_in(tmp_path) == (str(tmp_path / "pkg" / "Extra-Regular.ttf"),)
    fonts = generator_fonts(str(tmp_path))
    assert fonts[: len(dejavu_fonts())] == dejavu_fonts() and fonts[-1].endswith("Extra-Regular.ttf")
    sample = render(3, "train", 0, GeneratorConfig(font_dir=str(tmp_path)))
    assert sample.image.shape == (32, 64, 3) and sample.digits.isdigit()
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "Broken.ttf").write_bytes(b"\0" * 64)
    with pytest.raises(RuntimeError, match="draws the ten digits"):
        fonts_in(only_broken)


def test_hard_reader_resume_is_exact(tiny_set: Path, tmp_path: Path) -> None:
    """Hard attention draws samples, an expectation mask and a baseline: stopping at step 20 and
    resuming to 40 still gives the weights, baseline and schedule of an uninterrupted run."""
    import safetensors.torch

    def config(out: str, steps: int) -> Config:
        c = reader_config("hard", str(tiny_set), out, max_steps=steps)
        c.train.eval_every, c.model.hard_expectation_warmup = 15, 30  # resumed in the middle of the schedule
        return c

    run_training(config(str(tmp_path / "straight"), 40))
    run_training(config(str(tmp_path / "resumed"), 20))
    assert json.loads((tmp_path / "resumed/checkpoints/last/meta.json").read_text())["step"] == 20
    assert run_training(config(str(tmp_path / "resumed"), 40)).step == 40
    a = safetensors.torch.load_file(str(tmp_path / "straight/checkpoints/last/model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "resumed/checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys() and {"baseline", "updates"} <= set(a)
    assert int(a["updates"]) == 40
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
