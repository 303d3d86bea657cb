"""Typed configuration for models and training, loadable from TOML."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Literal

ARCHITECTURES = ("transformer", "rnn", "reader")
NORMALISERS = ("softmax", "sparsemax", "crf")  # model/normalisers.py (this module stays free of torch)


@dataclasses.dataclass
class ModelConfig:
    arch: Literal["transformer", "rnn", "reader"] = "transformer"
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
    attention: Literal["global", "local", "none", "soft", "hard"] = "global"  # reader: soft | hard | none
    score: Literal["additive", "dot", "general", "concat", "scaled_dot"] = "additive"
    attn_dim: int = 256
    window: int = 8  # local attention half-width D
    # Scores -> attention weights (model/normalisers.py): softmax; sparsemax (Martins & Astudillo
    # 2016, exact zeros); crf (Kim et al. 2017, marginals of a linear-chain CRF over the source,
    # normalised to sum to 1). Non-softmax: RNN global attention only.
    normaliser: Literal["softmax", "sparsemax", "crf"] = "softmax"
    # Image reader (arch = "reader", model/vision/): a CNN's grid of annotation vectors read by
    # an attending GRU/LSTM (Xu et al. 2015). It reuses cell, hidden (the decoder state size),
    # attention (soft | hard | none), score, attn_dim, d_model (symbol embedding) and dropout.
    image_height: int = 32
    image_width: int = 64
    image_channels: int = 3
    conv_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 128])  # stages; 2x2 pool between
    alpha_reg: float = 0.02  # soft: the doubly stochastic penalty lambda * sum_i (1 - sum_t alpha_ti)^2
    entropy_bonus: float = 0.01  # hard: lambda_e, weight of the attention entropy
    baseline_decay: float = 0.9  # hard: moving-average baseline b <- decay * b + (1 - decay) * reward
    hard_expectation_p: float = 0.5  # hard: share of images trained on the expectation instead of a sample
    # hard: over the first this many updates the share falls linearly from 1 (all soft) to
    # hard_expectation_p. Sampled from a near-uniform alpha at the start, the context is a random
    # cell, the decoder learns to ignore it and REINFORCE then has no signal (docs/vision.md).
    hard_expectation_warmup: int = 0
    # hard: the REINFORCE reward of step t's location. "sequence" is Xu et al.'s, the whole
    # sequence's log-likelihood; "to_go", the mean per-symbol log-likelihood from step t on,
    # drops the earlier symbols (which t's location cannot change) and the number's length
    # (which dominates a sequence's log-likelihood), two sources of variance (docs/vision.md).
    hard_reward: Literal["sequence", "to_go"] = "to_go"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose from {ARCHITECTURES}")
        if self.normaliser not in NORMALISERS:
            raise ValueError(f"unknown attention normaliser {self.normaliser!r}; choose from {NORMALISERS}")
        if self.normaliser != "softmax" and (self.arch != "rnn" or self.attention != "global"):
            raise ValueError(f"the {self.normaliser!r} normaliser is for RNN global attention only "
                             f"(arch 'rnn', attention 'global'); got arch {self.arch!r}, attention {self.attention!r}")

    @property
    def label(self) -> str:
        if self.arch == "transformer":
            return f"transformer-{self.enc_layers}x{self.dec_layers}-d{self.d_model}"
        if self.arch == "reader":
            return f"reader-{self.cell}-{self.attention}"
        attention = "noattn" if self.attention == "none" else f"{self.attention}-{self.score}"
        normaliser = "" if self.normaliser == "softmax" else f"-{self.normaliser}"
        return f"{self.cell}-{self.decoder}-{attention}{normaliser}"


@dataclasses.dataclass
class TrainConfig:
    data_dir: str = "data/en-fr"
    out_dir: str = "runs/transformer"
    src_lang: str = "en"
    tgt_lang: str = "fr"
    max_tokens: int = 6000  # per batch, source+target padded tokens counted on the larger side
    batch_images: int = 64  # image reader (model.arch = "reader"): images per batch; translation ignores it
    lr: float = 1e-3
    warmup_steps: int = 1000
    # After warm-up: "inverse_sqrt" (Vaswani et al. 2017), or "linear" to zero at max_steps (a
    # cool-down, e.g. for the last stretch of a run continued from a checkpoint: init_from).
    lr_schedule: Literal["inverse_sqrt", "linear"] = "inverse_sqrt"
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
    threads: int = 0  # torch intra-op threads on CPU (per process); 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda
    # bf16 autocast (weights, optimiser state and the loss stay fp32). auto: bf16 where the
    # hardware multiplies bf16 natively (CUDA with bf16; CPUs with AMX or AVX512-BF16), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile the training forward/backward (dynamic shapes)
    log_every: int = 100  # steps between train-loss records (the only host syncs of the loop)
    # Warm start: a run directory (its best checkpoint) or a .safetensors file whose weights
    # initialise the model; a run directory also supplies its SentencePiece model.
    init_from: str = ""
    tokenizer: str = ""  # an existing spm.model to use instead of training one
    extra_dev: list[str] = dataclasses.field(default_factory=list)  # more dev TSVs: BLEU logged, not used for stopping

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"unknown precision {self.precision!r}; choose from auto, fp32, bf16")
        if self.log_every < 1 or self.eval_every < 1:
            raise ValueError("log_every and eval_every must be at least 1")
        if self.lr_schedule not in ("inverse_sqrt", "linear"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose from inverse_sqrt, linear")
        if self.lr_schedule == "linear" and self.max_steps <= self.warmup_steps:
            raise ValueError("lr_schedule 'linear' decays to zero at max_steps: set max_steps above warmup_steps")


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        unknown = set(raw) - {"model", "train"}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        train = dict(raw.get("train", {}))
        # Before `precision`, `amp = true` meant bf16 autocast on CUDA only; `amp = false`, fp32.
        if "amp" in train:
            amp = train.pop("amp")
            if not amp:
                train.setdefault("precision", "fp32")
        return cls(model=_build(ModelConfig, raw.get("model", {})), train=_build(TrainConfig, train))

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
