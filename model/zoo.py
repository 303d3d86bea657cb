"""Build any model of the zoo from its config."""

from __future__ import annotations

from attnserve.model.base import EncoderDecoder
from attnserve.model.config import ModelConfig
from attnserve.model.rnn import RNNSeq2Seq
from attnserve.model.transformer import Transformer


def build_model(cfg: ModelConfig) -> EncoderDecoder:
    if cfg.arch == "transformer":
        return Transformer(cfg)
    if cfg.arch == "rnn":
        return RNNSeq2Seq(cfg)
    if cfg.arch == "reader":
        from attnserve.model.vision.reader import ImageReader  # its own family: images, not tokens

        return ImageReader(cfg)
    raise ValueError(f"unknown architecture {cfg.arch!r}")
