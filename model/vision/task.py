"""The image reader's task for the shared training loop (model/train.py's Trainer): shuffled
image batches, the reader's objective (cross-entropy, plus the doubly stochastic penalty or
REINFORCE), and greedy dev sequence accuracy to select the best checkpoint and stop early.

Batches of an epoch are a pure function of (seed, epoch), as for translation, so resume skips
exactly the batches already seen. Single-process only: the loss is the model's own method,
not its forward, so a DDP wrapper would not see it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from attnserve.decoding_rules import BOS_ID, EOS_ID, PAD_ID
from attnserve.model.config import Config
from attnserve.model.vision.data import DigitDataset
from attnserve.model.vision.reader import ImageReader, decode_digits, encode_digits, greedy_read, normalise

log = logging.getLogger(__name__)


def targets(labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit strings -> tgt_in (B, T) = BOS + digits, tgt_out (B, T) = digits + EOS, PAD-padded."""
    T = max(len(s) for s in labels) + 1
    tgt_in = torch.full((len(labels), T), PAD_ID, dtype=torch.long)
    tgt_out = torch.full((len(labels), T), PAD_ID, dtype=torch.long)
    for i, text in enumerate(labels):
        ids = encode_digits(text)
        tgt_in[i, : len(ids) + 1] = torch.tensor([BOS_ID] + ids)
        tgt_out[i, : len(ids) + 1] = torch.tensor(ids + [EOS_ID])
    return tgt_in, tgt_out


def pixels_of(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return normalise(torch.from_numpy(np.ascontiguousarray(images)).to(device))  # (B, C, H, W)


def read_dataset(model: ImageReader, data: DigitDataset, batch: int = 256) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Greedy readings of a split: texts, summed log-probabilities, per-image attention (T, L)."""
    device = next(model.parameters()).device
    texts, scores, attention = [], [], []
    for start in range(0, len(data), batch):
        ids, score, attn = greedy_read(model, pixels_of(data.images[start : start + batch], device))
        texts += [decode_digits(row) for row in ids]
        scores.append(score.cpu().numpy())
        attention += [a.cpu().numpy() for a in attn]
    return texts, np.concatenate(scores), attention


class ReaderTask:
    """Images and their digit strings; the interface of model/train.py's TranslationTask."""

    metric = "accuracy"  # dev sequence accuracy, in percent
    metric_label = "accuracy"

    def __init__(self, config: Config, train: DigitDataset, dev: DigitDataset):
        if config.model.arch != "reader":
            raise ValueError(f"ReaderTask needs model.arch = 'reader', got {config.model.arch!r}")
        size = (config.model.image_height, config.model.image_width, config.model.image_channels)
        if train.images.shape[1:] != size:
            raise ValueError(f"{config.train.data_dir}: images are {train.images.shape[1:]}, the model reads {size}")
        self.config, self.train, self.dev = config, train, dev

    @classmethod
    def load(cls, config: Config) -> "ReaderTask":
        data_dir = Path(config.train.data_dir)
        dev = DigitDataset.load(data_dir / "dev.npz")
        if config.train.eval_sentences:
            n = config.train.eval_sentences
            dev = DigitDataset(dev.images[:n], dev.labels[:n], dev.boxes[:n])
        return cls(config, DigitDataset.load(data_dir / "train.npz"), dev)

    def sizes(self) -> dict[str, int]:
        return {"train_images": len(self.train), "dev_images": len(self.dev)}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        tc = self.config.train
        generator = torch.Generator().manual_seed(tc.seed * 1000 + epoch)
        order = torch.randperm(len(self.train), generator=generator).tolist()
        return [order[i : i + tc.batch_images] for i in range(0, len(order), tc.batch_images)]

    def examples(self, batch: list[int]) -> list[int]:
        return batch  # indices into the training split; the images are gathered per shard

    def units(self, examples: list[int]) -> int:
        """What the loss is averaged over: emitted symbols, digits and EOS."""
        return sum(len(self.train.labels[i]) + 1 for i in examples)

    def loss(self, model: nn.Module, shard: list[int], device: torch.device, precision: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.sort(np.asarray(shard))  # np.take on sorted rows reads the array in order
        tgt_in, tgt_out = targets([self.train.labels[i] for i in index])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            result = model.loss(pixels_of(self.train.images[index], device), tgt_in.to(device), tgt_out.to(device))
        return result.objective, result.nll

    @torch.inference_mode()
    def dev_loss(self, model: nn.Module, device: torch.device) -> float:
        model.eval()
        total, symbols = 0.0, 0
        for start in range(0, len(self.dev), 256):
            labels = self.dev.labels[start : start + 256]
            tgt_in, tgt_out = targets(labels)
            logits = model(pixels_of(self.dev.images[start : start + 256], device), tgt_in.to(device))
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt_out.to(device).flatten(),
                                                       ignore_index=PAD_ID, reduction="sum").item()
            symbols += int((tgt_out != PAD_ID).sum())
        return total / max(symbols, 1)

    def evaluate(self, model: nn.Module, device: torch.device) -> tuple[float, dict[str, Any], str]:
        loss = self.dev_loss(model, device)
        texts, _, _ = read_dataset(model, self.dev)
        accuracy = 100.0 * float(np.mean([t == r for t, r in zip(texts, self.dev.labels)]))
        record = {"dev_loss": round(loss, 4), "dev_accuracy": round(accuracy, 2)}
        return accuracy, record, f"dev loss {loss:.3f}, dev accuracy {accuracy:.2f}%{{best}}"
