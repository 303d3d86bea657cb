"""What gets exported for each architecture: one spec per graph (inputs, outputs, dynamic axes,
opset, tolerance), in the manner of Optimum's OnnxConfig.

The decoder state is the bundle format's StepSignature (attnserve/bundle_format.py), split into
    static   computed once by the encoder graph, read by every step (cross-attention keys and
             values, RNN memory and its attention-key projection, source mask and lengths);
    dynamic  carried from step to step (self-attention key/value cache, RNN hidden state).
The step graph takes the previous tokens + static + dynamic state and returns log-probabilities,
the alignment row and the new dynamic state (TensorSignature.output_name); every graph input and
output name comes from the bundle format, which the engine reads too.
"""

from __future__ import annotations

import dataclasses

from attnserve.bundle_format import (
    ATTENTION, BATCH_AXIS, ENCODER_GRAPH, GROWN_PAST_AXIS, LOG_PROBS, PARENT_ROWS, PAST_AXIS, PREVIOUS_BATCH_AXIS, PREVIOUS_TOKENS,
    SENTENCES_AXIS, SOURCE_AXIS, SOURCE_IDS, STEP_GRAPH, VOCAB_AXIS, ZERO_ROWS, ZERO_ROWS_AXIS, StepSignature,
    TensorSignature,
)
from attnserve.model.base import EncoderDecoder
from attnserve.model.config import ModelConfig

OPSET = 23
# onnxruntime 1.31 reads IR versions up to 13 while onnx 1.23 writes 14; IR 10 is what opset 23
# needs, and every onnxruntime that has the opset-23 Attention kernel reads it.
IR_VERSION = 10


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem: ENCODER_GRAPH / STEP_GRAPH
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    atol: float = 1e-4  # fp32: max abs difference of every output against torch (export/validate.py)
    opset: int = OPSET


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    arch: str
    state: StepSignature  # RNN: the encoder gives the initial dynamic state; Transformer: an empty cache

    @property
    def static(self) -> tuple[TensorSignature, ...]:
        return self.state.static

    @property
    def dynamic(self) -> tuple[TensorSignature, ...]:
        return self.state.dynamic

    @property
    def encoder(self) -> GraphSpec:
        outputs = self.static + (self.dynamic if self.state.dynamic_from_encoder else ())
        return GraphSpec(ENCODER_GRAPH, (TensorSignature(SOURCE_IDS, "int64", (BATCH_AXIS, SOURCE_AXIS)),), outputs)

    @property
    def step_dynamic_inputs(self) -> tuple[TensorSignature, ...]:
        """The dynamic state as the step graph takes it: rows of the previous step, which the
        step first gathers by PARENT_ROWS (beam reordering and finished rows leaving happen
        inside the graph, so the state can stay where onnxruntime put it)."""
        return tuple(t.renamed_axis(BATCH_AXIS, PREVIOUS_BATCH_AXIS) for t in self.dynamic)

    @property
    def decoder_step(self) -> GraphSpec:
        """Before export/graphs.py's add_search_outputs appends CANDIDATE_COUNT / FORCED_TOKENS
        and the TopK outputs."""
        inputs = ((TensorSignature(PREVIOUS_TOKENS, "int64", (BATCH_AXIS,)),
                   TensorSignature(PARENT_ROWS, "int64", (BATCH_AXIS,)),
                   TensorSignature(ZERO_ROWS, "int64", (ZERO_ROWS_AXIS,)))
                  + self.static + self.step_dynamic_inputs)
        outputs = (
            TensorSignature(LOG_PROBS, "float32", (BATCH_AXIS, VOCAB_AXIS)),
            TensorSignature(ATTENTION, "float32", (BATCH_AXIS, SOURCE_AXIS)),
        ) + tuple(dataclasses.replace(t.renamed_axis(PAST_AXIS, GROWN_PAST_AXIS), name=t.output_name) for t in self.dynamic)
        return GraphSpec(STEP_GRAPH, inputs, outputs)

    @property
    def graphs(self) -> tuple[GraphSpec, GraphSpec]:
        return self.encoder, self.decoder_step


class UnsupportedArchitecture(ValueError):
    pass


def architecture_spec(model: EncoderDecoder) -> ArchitectureSpec:
    cfg: ModelConfig = model.config
    # The state tensors' names are the model's own (its encode / decode_step state dicts).
    batch, source, past = BATCH_AXIS, SOURCE_AXIS, PAST_AXIS
    if cfg.arch == "transformer":
        head_dim = cfg.d_model // cfg.n_heads
        # The source mask and the cross-attention keys and values are the same for every beam of
        # a sentence: the step graph takes them once per sentence (graphs.share_static_state).
        sentences = SENTENCES_AXIS
        cross = tuple(TensorSignature(f"cross_{kv}{i}", "float32", (sentences, cfg.n_heads, source, head_dim))
                      for i in range(cfg.dec_layers) for kv in "kv")
        cache = tuple(TensorSignature(f"self_{kv}{i}", "float32", (batch, cfg.n_heads, past, head_dim))
                      for i in range(cfg.dec_layers) for kv in "kv")
        positions = (TensorSignature("tgt_pos", "int64", (batch,)), TensorSignature("self_mask", "bool", (batch, past)))
        static = (TensorSignature("src_mask", "bool", (sentences, source)),) + cross
        return ArchitectureSpec("transformer", StepSignature(static, cache + positions, dynamic_from_encoder=False))
    if cfg.arch == "rnn":
        keys_dim = model.decoder.attention.project_keys(_probe(model)).size(-1)
        static = (
            TensorSignature("memory", "float32", (batch, source, 2 * cfg.hidden)),
            TensorSignature("keys", "float32", (batch, source, keys_dim)),
            TensorSignature("src_mask", "bool", (batch, source)),
            TensorSignature("src_len", "int64", (batch,)),
        )
        dynamic = [TensorSignature("hidden", "float32", (batch, 2 * cfg.hidden))]
        if cfg.cell == "lstm":
            dynamic.append(TensorSignature("cell", "float32", (batch, 2 * cfg.hidden)))
        if cfg.decoder == "luong":
            dynamic.append(TensorSignature("feed", "float32", (batch, cfg.d_model)))
        return ArchitectureSpec("rnn", StepSignature(static, tuple(dynamic), dynamic_from_encoder=True))
    raise UnsupportedArchitecture(f"no export spec for architecture {cfg.arch!r}")


def _probe(model: EncoderDecoder):
    import torch

    return torch.zeros(1, 1, 2 * model.config.hidden)
