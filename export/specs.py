"""What gets exported for each architecture: one spec per graph (inputs, outputs, dynamic axes,
opset, tolerance), in the manner of Optimum's OnnxConfig.

A decoder state is split into
    static   computed once by the encoder graph, read by every step (cross-attention keys and
             values, RNN memory and its attention-key projection, source mask and lengths);
    dynamic  carried from step to step (self-attention key/value cache, RNN hidden state).
The step graph takes prev token + static + dynamic state and returns log-probabilities, the
alignment row and the new dynamic state (named new_<name>).
"""

from __future__ import annotations

import dataclasses

from attnserve.model.base import EncoderDecoder
from attnserve.model.config import ModelConfig

OPSET = 23
# onnxruntime 1.31 reads IR versions up to 13 while onnx 1.23 writes 14; IR 10 is what opset 23
# needs, and every onnxruntime that has the opset-23 Attention kernel reads it.
IR_VERSION = 10


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    axes: tuple[str | int, ...]  # symbolic names for dynamic axes, ints for fixed ones

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.axes)}


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem: encoder / decoder_step
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 1e-4  # fp32 max abs difference allowed against torch
    opset: int = OPSET


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    arch: str
    static: tuple[TensorSpec, ...]
    dynamic: tuple[TensorSpec, ...]
    dynamic_from_encoder: bool  # RNN: the encoder gives the initial state; Transformer: empty cache

    @property
    def encoder(self) -> GraphSpec:
        outputs = self.static + (self.dynamic if self.dynamic_from_encoder else ())
        return GraphSpec("encoder", (TensorSpec("src", "int64", ("batch", "src_len")),), outputs)

    @property
    def step_dynamic_inputs(self) -> tuple[TensorSpec, ...]:
        """The dynamic state as the step graph takes it: rows of the previous step, which the
        step first gathers by `origin` (beam reordering and finished rows leaving happen inside
        the graph, so the state can stay where onnxruntime put it)."""
        return tuple(TensorSpec(t.name, t.dtype, ("prev_batch",) + t.axes[1:]) for t in self.dynamic)

    @property
    def decoder_step(self) -> GraphSpec:
        inputs = ((TensorSpec("prev", "int64", ("batch",)), TensorSpec("origin", "int64", ("batch",)),
                   TensorSpec("fresh", "int64", ("fresh",)))
                  + self.static + self.step_dynamic_inputs)
        outputs = (
            TensorSpec("log_probs", "float32", ("batch", "vocab")),
            TensorSpec("attention", "float32", ("batch", "src_len")),
        ) + tuple(TensorSpec(f"new_{t.name}", t.dtype, _grown(t.axes)) for t in self.dynamic)
        return GraphSpec("decoder_step", inputs, outputs)

    @property
    def graphs(self) -> tuple[GraphSpec, GraphSpec]:
        return self.encoder, self.decoder_step


def _grown(axes: tuple) -> tuple:
    return tuple("past_plus_1" if a == "past" else a for a in axes)


class UnsupportedArchitecture(ValueError):
    pass


def architecture_spec(model: EncoderDecoder) -> ArchitectureSpec:
    cfg: ModelConfig = model.config
    if cfg.arch == "transformer":
        head_dim = cfg.d_model // cfg.n_heads
        cross = tuple(TensorSpec(f"cross_{kv}{i}", "float32", ("batch", cfg.n_heads, "src_len", head_dim))
                      for i in range(cfg.dec_layers) for kv in "kv")
        cache = tuple(TensorSpec(f"self_{kv}{i}", "float32", ("batch", cfg.n_heads, "past", head_dim))
                      for i in range(cfg.dec_layers) for kv in "kv")
        positions = (TensorSpec("tgt_pos", "int64", ("batch",)), TensorSpec("self_mask", "bool", ("batch", "past")))
        return ArchitectureSpec("transformer", (TensorSpec("src_mask", "bool", ("batch", "src_len")),) + cross,
                                cache + positions, dynamic_from_encoder=False)
    if cfg.arch == "rnn":
        keys_dim = model.decoder.attention.project_keys(_probe(model)).size(-1)
        static = (
            TensorSpec("memory", "float32", ("batch", "src_len", 2 * cfg.hidden)),
            TensorSpec("keys", "float32", ("batch", "src_len", keys_dim)),
            TensorSpec("src_mask", "bool", ("batch", "src_len")),
            TensorSpec("src_len", "int64", ("batch",)),
        )
        dynamic = [TensorSpec("hidden", "float32", ("batch", 2 * cfg.hidden))]
        if cfg.cell == "lstm":
            dynamic.append(TensorSpec("cell", "float32", ("batch", 2 * cfg.hidden)))
        if cfg.decoder == "luong":
            dynamic.append(TensorSpec("feed", "float32", ("batch", cfg.d_model)))
        return ArchitectureSpec("rnn", static, tuple(dynamic), dynamic_from_encoder=True)
    raise UnsupportedArchitecture(f"no export spec for architecture {cfg.arch!r}")


def _probe(model: EncoderDecoder):
    import torch

    return torch.zeros(1, 1, 2 * model.config.hidden)
