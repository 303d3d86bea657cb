"""Typed configuration for models and training, loadable from TOML."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Literal

ARCHITECTURES = ("transformer", "rnn")


@dataclasses.dataclass
class ModelConfig:
    arch: Literal["transformer", "rnn"] = "transformer"
    vocab_size: int = 8000
    d_model: int = 256  # embedding size (shared source/target/output embedding)
    dropout: float = 0.1
    max_len: int = 256  # longest token sequence a model accepts (positions, decoding limit)
    # Transformer
    n_heads: int = 4
    enc_layers: int = 3
    dec_layers: int = 3
    d_ff: int = 1024
    # RNN encoder-decoder
    cell: Literal["gru", "lstm"] = "gru"
    hidden: int = 256  # per direction in the encoder; the decoder state has 2 * hidden
    decoder: Literal["bahdanau", "luong"] = "bahdanau"
    attention: Literal["global", "local", "none"] = "global"
    score: Literal["additive", "dot", "general", "concat", "scaled_dot"] = "additive"
    attn_dim: int = 256
    window: int = 8  # local attention half-width D

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose from {ARCHITECTURES}")

    @property
    def label(self) -> str:
        if self.arch == "transformer":
            return f"transformer-{self.enc_layers}x{self.dec_layers}-d{self.d_model}"
        attention = "noattn" if self.attention == "none" else f"{self.attention}-{self.score}"
        return f"{self.cell}-{self.decoder}-{attention}"


@dataclasses.dataclass
class TrainConfig:
    data_dir: str = "data/en-fr"
    out_dir: str = "runs/transformer"
    src_lang: str = "en"
    tgt_lang: str = "fr"
    max_tokens: int = 6000  # per batch, source+target padded tokens counted on the larger side
    lr: float = 1e-3
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_epochs: int = 100
    max_steps: int = 0  # 0 = no limit
    time_limit_min: float = 0.0  # 0 = no limit; stops cleanly with a checkpoint
    eval_every: int = 1000  # steps between dev evaluations (and checkpoints)
    eval_sentences: int = 0  # dev sentences decoded for BLEU; 0 = the whole dev split
    patience: int = 5  # evaluations without dev BLEU improvement before stopping
    seed: int = 1
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        unknown = set(raw) - {"model", "train"}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        return cls(model=_build(ModelConfig, raw.get("model", {})), train=_build(TrainConfig, raw.get("train", {})))

    @classmethod
    def load(cls, path: Path | str) -> "Config":
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(kind: type, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
    return kind(**values)
