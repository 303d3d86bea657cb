"""torch -> ONNX for one graph: wrappers with flat tensor signatures, the dynamo exporter at
opset 23 (every F.scaled_dot_product_attention becomes one fused `Attention` node), and the fused
attention-with-weights node for alignments, which the exporter emits directly."""

from __future__ import annotations

import collections
import logging
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from onnxscript import opset18 as op18
from onnxscript import opset23 as op23
from torch.export import Dim

from attnserve.bundle_format import (
    BATCH_AXIS, CANDIDATE_COUNT, CANDIDATES_AXIS, ENCODER_GRAPH, FORCED_LOG_PROBS, FORCED_TOKENS, LOG_PROBS, PAST_AXIS,
    SENTENCES_AXIS, STEP_GRAPH, TOP_IDS, TOP_LOG_PROBS, ZERO_ROWS_AXIS,
)
from attnserve.export.specs import IR_VERSION, ArchitectureSpec, GraphSpec
from attnserve.model.attention import attention_with_weights
from attnserve.model.base import EncoderDecoder

log = logging.getLogger(__name__)


def _attention_with_weights(q, k, v, mask):
    """attnserve::attention_with_weights as one ONNX Attention node that also returns its
    softmax weights (qk_matmul_output_mode=3) instead of a MatMul/Softmax/MatMul chain."""
    y, _, _, weights = op23.Attention(q, k, v, mask, qk_matmul_output_mode=3)
    return y, weights


def _attention_with_weights_unfused(q, k, v, mask):
    """The same computation as a MatMul/Softmax/MatMul chain (opset 18): only for showing what
    fusion replaces, in the manifest's before/after node counts."""
    scale = op18.Sqrt(op18.CastLike(op18.Shape(q, start=-1), q))
    scores = op18.Div(op18.MatMul(q, op18.Transpose(k, perm=[0, 1, 3, 2])), scale)
    weights = op18.Softmax(op18.Where(mask, scores, op18.CastLike(-float("inf"), scores)), axis=-1)
    return op18.MatMul(weights, v), weights


CUSTOM_TRANSLATIONS = {attention_with_weights._opoverload: _attention_with_weights}
UNFUSED_OPSET = 18  # before the ONNX Attention op: scaled_dot_product_attention is decomposed
UNFUSED_TRANSLATIONS = {attention_with_weights._opoverload: _attention_with_weights_unfused}


class EncoderGraph(torch.nn.Module):
    def __init__(self, model: EncoderDecoder, outputs: list[str]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, src: torch.Tensor):
        state = self.model.encode(src)
        return tuple(state[name] for name in self.outputs)


class DecoderStepGraph(torch.nn.Module):
    def __init__(self, model: EncoderDecoder, static: list[str], dynamic: list[str], masked_cache: set[str]):
        super().__init__()
        self.model, self.static, self.dynamic, self.masked_cache = model, static, dynamic, masked_cache

    def forward(self, previous_tokens: torch.Tensor, parent_rows: torch.Tensor, zero_rows: torch.Tensor,
                *tensors: torch.Tensor):
        # previous_tokens (B,); parent_rows (B,): the row each row continues, of the previous
        # step's dynamic state (P rows) followed by F all-zero rows, F = len(zero_rows) (values
        # unused): a sentence joining a running Transformer batch starts from zeros (empty,
        # masked cache; position 0), so the server never copies the batch's cache to add it.
        state = dict(zip(self.static + self.dynamic, tensors))
        for name in self.dynamic:
            previous = state[name]  # (P, ...)
            if name in self.masked_cache:
                # A cached key/value is read only where the cache mask is set, and a joining
                # row's mask starts all unset: it may start as a copy of any row (the last),
                # which saves appending F zero rows, i.e. copying the whole cache, every step.
                # P > 0 whenever F > 0 (DecoderState.join).
                state[name] = previous.index_select(0, parent_rows.clamp(max=previous.size(0) - 1))  # (B, ...)
                continue
            zeros = previous.new_zeros((zero_rows.size(0),) + tuple(previous.shape[1:]))  # (F, ...)
            state[name] = torch.cat([previous, zeros]).index_select(0, parent_rows)  # (B, ...)
        logits, new_state, attention = self.model.decode_step(previous_tokens, state)
        return (torch.log_softmax(logits.float(), dim=-1), attention, *(new_state[name] for name in self.dynamic))


def masked_cache_names(arch: ArchitectureSpec) -> set[str]:
    """The dynamic tensors read only where the cache mask is set: a Transformer's cached keys
    and values (floats over the past axis; the mask itself, a bool over it, is not one)."""
    if arch.state.dynamic_from_encoder:
        return set()
    return {t.name for t in arch.dynamic if PAST_AXIS in t.shape and t.dtype.startswith("float")}


def example_inputs(model: EncoderDecoder, arch: ArchitectureSpec) -> dict[str, tuple[torch.Tensor, ...]]:
    """Tracing inputs: a padded batch, and a decoder state one step in (non-empty cache) whose
    previous step had a different number of rows (4) than this one (3), as when rows leave."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, model.config.vocab_size, (4, 7), generator=g)
    src[1, 5:] = 0
    src[2, 2:] = 0
    with torch.inference_mode():
        state = model.encode(src)
        _, state, _ = model.decode_step(torch.full((4,), 2), state)
    parent_rows = torch.tensor([3, 0, 5])  # 5: the second of two all-zero rows
    static = [state[t.name][torch.tensor([3, 0, 1])].clone() for t in arch.static]
    dynamic = [state[t.name].clone() for t in arch.dynamic]
    zero_rows = torch.zeros(2, dtype=torch.long)
    return {ENCODER_GRAPH: (src,), STEP_GRAPH: (torch.tensor([5, 6, 7]), parent_rows, zero_rows, *static, *dynamic)}


def _dynamic_shapes(spec: GraphSpec) -> tuple:
    # Named dims, one per axis name: torch.export then fails loudly if tracing would specialise
    # an axis to the example's size (Dim.DYNAMIC would specialise silently).
    dims = {axis: Dim(axis, min=1) if axis not in (PAST_AXIS, ZERO_ROWS_AXIS) else Dim(axis, min=0)
            for t in spec.inputs for axis in t.shape if isinstance(axis, str) and axis != SENTENCES_AXIS}
    # torch traces the step with its static state per row (the model knows no beams); the graph
    # takes it per sentence only after share_static_state, so here the two axes are one.
    dims[SENTENCES_AXIS] = dims.get(BATCH_AXIS, Dim(BATCH_AXIS, min=1))
    shapes = tuple({i: dims[axis] for i, axis in enumerate(t.shape) if isinstance(axis, str)} for t in spec.inputs)
    # DecoderStepGraph.forward(previous_tokens, parent_rows, zero_rows, *state)
    return shapes if spec.name == ENCODER_GRAPH else (shapes[0], shapes[1], shapes[2], shapes[3:])


def clean_graph(proto: onnx.ModelProto, spec: GraphSpec) -> onnx.ModelProto:
    """Drop the exporter's intermediate shape annotations (some are stale, which trips onnx
    shape inference in quantisation), write the spec's symbolic dims on inputs and outputs,
    and set the IR version onnxruntime reads."""
    del proto.graph.value_info[:]
    for values, specs in ((proto.graph.input, spec.inputs), (proto.graph.output, spec.outputs)):
        for value, tensor in zip(values, specs):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for axis in tensor.shape:
                dim = dims.add()
                if isinstance(axis, str):
                    dim.dim_param = axis
                else:
                    dim.dim_value = axis
    proto.ir_version = IR_VERSION
    return proto


def export_graph(model: EncoderDecoder, arch: ArchitectureSpec, spec: GraphSpec, inputs: tuple,
                 fused: bool = True) -> onnx.ModelProto:
    """One graph at opset 23 with fused attention; fused=False exports the unfused opset-18
    equivalent, used only to count what fusion removed."""
    if spec.name == ENCODER_GRAPH:
        module = EncoderGraph(model, [t.name for t in spec.outputs])
    else:
        module = DecoderStepGraph(model, [t.name for t in arch.static], [t.name for t in arch.dynamic],
                                  masked_cache_names(arch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), inputs, dynamo=True, opset_version=spec.opset if fused else UNFUSED_OPSET,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=_dynamic_shapes(spec),
            custom_translation_table=CUSTOM_TRANSLATIONS if fused else UNFUSED_TRANSLATIONS,
            optimize=True, verbose=False,
        )
    proto = clean_graph(program.model_proto, spec)
    got = [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    want = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    if got != want:
        raise RuntimeError(f"{spec.name}: exported graph has inputs/outputs {got}, spec says {want}")
    if spec.name != STEP_GRAPH or not fused:
        return proto
    proto = add_search_outputs(proto)
    return share_static_state(proto, arch) if arch.state.static_per_sentence else proto


def add_search_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Append what a search needs from the step's log-probabilities, so that it never copies
    out a (batch, vocab) array:
        inputs  CANDIDATE_COUNT (1,) int64, FORCED_TOKENS (batch,) int64
        outputs TOP_LOG_PROBS, TOP_IDS (batch, k): the k best, best first (TopK);
                FORCED_LOG_PROBS (batch,): the log-probability of each row's forced token, for
                decoding a given target prefix."""
    graph, INT64, FLOAT = proto.graph, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    graph.input.append(onnx.helper.make_tensor_value_info(CANDIDATE_COUNT, INT64, [1]))
    graph.input.append(onnx.helper.make_tensor_value_info(FORCED_TOKENS, INT64, [BATCH_AXIS]))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "search_axis_1"))
    graph.node.extend([
        onnx.helper.make_node("TopK", [LOG_PROBS, CANDIDATE_COUNT], [TOP_LOG_PROBS, TOP_IDS], name="top_k",
                              axis=-1, largest=1, sorted=1),
        onnx.helper.make_node("Unsqueeze", [FORCED_TOKENS, "search_axis_1"], ["forced_column"], name="forced_column"),
        onnx.helper.make_node("GatherElements", [LOG_PROBS, "forced_column"], ["forced_log_probs_column"],
                              name="forced_gather", axis=1),
        onnx.helper.make_node("Squeeze", ["forced_log_probs_column", "search_axis_1"], [FORCED_LOG_PROBS],
                              name="forced_squeeze"),
    ])
    graph.output.append(onnx.helper.make_tensor_value_info(TOP_LOG_PROBS, FLOAT, [BATCH_AXIS, CANDIDATES_AXIS]))
    graph.output.append(onnx.helper.make_tensor_value_info(TOP_IDS, INT64, [BATCH_AXIS, CANDIDATES_AXIS]))
    graph.output.append(onnx.helper.make_tensor_value_info(FORCED_LOG_PROBS, FLOAT, [BATCH_AXIS]))
    return proto


class SharingError(RuntimeError):
    """The step graph reads its static state in a way share_static_state does not rewrite."""


def share_static_state(proto: onnx.ModelProto, arch: ArchitectureSpec) -> onnx.ModelProto:
    """Let the step graph take its static state (source mask, cross-attention keys and values)
    once per sentence instead of once per beam row: the rows of a sentence are consecutive and
    every sentence has K of them, K = rows / sentences, read from the shapes (K = 1 is the
    layout of one row per sentence, which is also how older engines feed it).

    Each cross-attention node then attends the sentence's K query rows to its one copy:
        query (rows, H, 1, Dh) -> (sentences, K, H, Dh) -> (sentences, H, K, Dh)
        mask (sentences, 1, 1, S) -> (sentences, 1, K, S)
        output (sentences, H, K, Dh) -> (sentences, K, H, Dh) -> (rows, H, 1, Dh), as before
    and its attention weights likewise. A batch-32 step reads K times fewer key/value bytes, and
    the engine stops copying the encoder's output K times (docs/performance.md measures it).
    Anything else that reads the static state raises SharingError: the rewrite covers only the
    reads it knows."""
    graph, make = proto.graph, onnx.helper.make_node
    static = {t.name: t for t in arch.static}
    masks = [t.name for t in arch.static if t.dtype == "bool"]
    keys = [t for t in arch.static if t.dtype != "bool"]
    if len(masks) != 1 or not keys:
        raise SharingError(f"expected one source mask and cross-attention keys in the static state, got {sorted(static)}")
    heads, head_dim = keys[0].shape[1], keys[0].shape[3]
    initializers = {i.name: i for i in graph.initializer}
    unsqueezes = [n for n in graph.node if n.op_type == "Unsqueeze" and n.input[0] == masks[0]]
    if len(unsqueezes) != 1 or onnx.numpy_helper.to_array(initializers[unsqueezes[0].input[1]]).tolist() != [1, 2]:
        raise SharingError(f"{masks[0]} is not read through one Unsqueeze to (sentences, 1, 1, source)")
    mask_4d = unsqueezes[0].output[0]
    graph.initializer.extend(onnx.numpy_helper.from_array(np.array(value, dtype=np.int64), name) for name, value in (
        ("shared_query_tail", [-1, heads, head_dim]), ("shared_ones", [1, 1]), ("shared_one", [1]),
        ("shared_rows_shape", [-1, heads, 1, head_dim]), ("shared_weights_head", [-1, heads, 1])))
    nodes: list[onnx.NodeProto] = []
    first = True  # the query shape and the mask are made once, at the first cross-attention
    for node in graph.node:
        if not (node.op_type == "Attention" and node.input[1] in static):
            nodes.append(node)
            continue
        name, key = node.name, node.input[1]
        if first:
            nodes += [make("Shape", [key], ["shared_sentences"], end=1, name="shared_sentences"),
                      make("Concat", ["shared_sentences", "shared_query_tail"], ["shared_query_shape"], axis=0,
                           name="shared_query_shape")]
        nodes += [make("Reshape", [node.input[0], "shared_query_shape"], [f"{name}_query_nkhd"], name=f"{name}_query_nkhd"),
                  make("Transpose", [f"{name}_query_nkhd"], [f"{name}_query_nhkd"], perm=[0, 2, 1, 3],
                       name=f"{name}_query_nhkd")]
        if first:  # (sentences, 1, K, S): onnxruntime wants K there
            first = False
            nodes += [make("Shape", [f"{name}_query_nkhd"], ["shared_beams"], start=1, end=2, name="shared_beams"),
                      make("Concat", ["shared_ones", "shared_beams", "shared_one"], ["shared_mask_shape"], axis=0,
                           name="shared_mask_shape"),
                      make("Expand", [mask_4d, "shared_mask_shape"], ["shared_mask"], name="shared_mask")]
        node.input[0], node.input[3] = f"{name}_query_nhkd", "shared_mask"
        output, node.output[0] = node.output[0], f"{name}_output_nhkd"
        after = [make("Transpose", [f"{name}_output_nhkd"], [f"{name}_output_nkhd"], perm=[0, 2, 1, 3], name=f"{name}_output_nkhd"),
                 make("Reshape", [f"{name}_output_nkhd", "shared_rows_shape"], [output], name=f"{name}_output_rows")]
        if len(node.output) > 3 and node.output[3]:  # the attention weights (alignments)
            weights, node.output[3] = node.output[3], f"{name}_weights_nhks"
            after += [make("Transpose", [f"{name}_weights_nhks"], [f"{name}_weights_nkhs"], perm=[0, 2, 1, 3],
                           name=f"{name}_weights_nkhs"),
                      make("Shape", [f"{name}_weights_nkhs"], [f"{name}_source"], start=3, name=f"{name}_source"),
                      make("Concat", ["shared_weights_head", f"{name}_source"], [f"{name}_weights_shape"], axis=0,
                           name=f"{name}_weights_shape"),
                      make("Reshape", [f"{name}_weights_nkhs", f"{name}_weights_shape"], [weights], name=f"{name}_weights_rows")]
        nodes += [node, *after]
    outputs = {o.name for o in graph.output}
    while True:  # drop what nothing reads any more: the per-row expansions of the mask
        read = {x for n in nodes for x in n.input} | outputs
        alive = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    allowed = {"Attention", "Shape"}
    for n in nodes:
        reads_static = [x for x in n.input if x in static or x == mask_4d]
        if reads_static and n is not unsqueezes[0] and not (n.op_type in allowed or n.name == "shared_mask"):
            raise SharingError(f"{n.op_type} node {n.name} reads {reads_static}, which share_static_state does not rewrite")
        if n.op_type == "Attention" and n.input[0] in static:
            raise SharingError(f"{n.name} takes a static tensor as its query")
    del graph.node[:]
    graph.node.extend(nodes)
    for value in graph.input:  # as clean_graph names them from the spec
        if value.name in static:
            value.type.tensor_type.shape.dim[0].dim_param = SENTENCES_AXIS
    return proto


def node_types(proto: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(
        f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in proto.graph.node
    )
    return dict(counts.most_common())
