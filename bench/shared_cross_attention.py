"""What sharing a sentence's cross-attention keys and values across its beams would gain, measured
before the bundle format changes for it.

Today every beam row of a sentence carries its own copy of the sentence's cross-attention keys
and values (the static state, (rows, heads, source, head dim)). This rewrites a bundle's step
graph so that the static state has one row per sentence: each cross-attention node attends the
sentence's K query rows to that one copy, as a (sentences, heads, K, head dim) query, and its
output is laid out as before. It then times both graphs on the same decoder state, taking turns,
and compares their outputs.

It is a probe: the engine does not run such a graph. Shipping it needs a bundle format version
(static tensors per sentence), the exporter to emit it from the model, and the engine's state to
keep static rows per sentence (docs/performance.md, "the batch-32 profile").

    python -m attnserve.bench.shared_cross_attention build/repo/en-fr/2 --precision int8 --sentences 32
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort

from attnserve.model.hardware import cpu_info
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine
from attnserve.server.runtime import session_options

log = logging.getLogger("attnserve.bench.shared_cross_attention")

SOURCE_MASK = "src_mask"
CROSS_PREFIX = "cross_"  # cross_k{layer}, cross_v{layer}: the static keys and values


def is_cross_attention(node: onnx.NodeProto) -> bool:
    return node.op_type == "Attention" and node.input[1].startswith(CROSS_PREFIX + "k")


def rewrite_step_graph(graph: onnx.ModelProto, beam: int, heads: int, head_dim: int) -> onnx.ModelProto:
    """The step graph with its static inputs one row per sentence (the rows of a sentence, `beam`
    of them, consecutive): query (B, H, 1, Dh) -> (n, H, K, Dh) before each cross-attention node,
    its output (and attention weights) back to (B, H, 1, ...) after it."""
    g = graph.graph
    unsqueezed_mask = next(n.output[0] for n in g.node if n.op_type == "Unsqueeze" and n.input[0] == SOURCE_MASK)
    g.initializer.extend([
        onnx.numpy_helper.from_array(np.array([-1, beam, heads, head_dim], np.int64), "shared_query_shape"),
        onnx.numpy_helper.from_array(np.array([-1, heads, 1, head_dim], np.int64), "shared_output_shape"),
        onnx.numpy_helper.from_array(np.array([-1, heads, 1], np.int64), "shared_weights_shape_head"),
        onnx.numpy_helper.from_array(np.array([1, 1, beam, 1], np.int64), "shared_mask_shape"),
    ])
    make = onnx.helper.make_node
    nodes: list[onnx.NodeProto] = []
    mask_added = False
    for node in g.node:
        if not is_cross_attention(node):
            nodes.append(node)
            continue
        if not mask_added:  # (n, 1, 1, S) -> (n, 1, K, S): onnxruntime wants the query length there
            nodes.append(make("Expand", [unsqueezed_mask, "shared_mask_shape"], ["shared_mask"], name="shared_mask"))
            mask_added = True
        name, query = node.name, node.input[0]
        nodes += [make("Reshape", [query, "shared_query_shape"], [f"{name}_q_nkhd"], name=f"{name}_q_reshape"),
                  make("Transpose", [f"{name}_q_nkhd"], [f"{name}_q_nhkd"], perm=[0, 2, 1, 3], name=f"{name}_q_transpose")]
        node.input[0], node.input[3] = f"{name}_q_nhkd", "shared_mask"
        output, node.output[0] = node.output[0], f"{name}_y_nhkd"
        after = [make("Transpose", [f"{name}_y_nhkd"], [f"{name}_y_nkhd"], perm=[0, 2, 1, 3], name=f"{name}_y_transpose"),
                 make("Reshape", [f"{name}_y_nkhd", "shared_output_shape"], [output], name=f"{name}_y_reshape")]
        if len(node.output) > 3 and node.output[3]:  # the attention weights, for alignments
            weights, node.output[3] = node.output[3], f"{name}_w_nhks"
            after += [make("Transpose", [f"{name}_w_nhks"], [f"{name}_w_nkhs"], perm=[0, 2, 1, 3], name=f"{name}_w_transpose"),
                      make("Shape", [f"{name}_w_nkhs"], [f"{name}_w_source"], start=3, name=f"{name}_w_source"),
                      make("Concat", ["shared_weights_shape_head", f"{name}_w_source"], [f"{name}_w_shape"], axis=0,
                           name=f"{name}_w_shape"),
                      make("Reshape", [f"{name}_w_nkhs", f"{name}_w_shape"], [weights], name=f"{name}_w_reshape")]
        nodes += [node, *after]
    outputs = {o.name for o in g.output}
    while True:  # drop what nothing reads any more: the old per-row mask expansions
        read = {x for n in nodes for x in n.input} | outputs
        alive = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del g.node[:]
    g.node.extend(nodes)
    for value in g.input:
        if value.name == SOURCE_MASK or value.name.startswith(CROSS_PREFIX):
            value.type.tensor_type.shape.dim[0].dim_param = "sentences"
    return graph


def decoder_feed(engine: Engine, sources: list[list[int]], beam: int, past: int) -> dict[str, ort.OrtValue]:
    """The step graph's inputs after `past` greedy steps of these sentences, `beam` rows each."""
    width = max(map(len, sources))
    source_ids = np.full((len(sources), width), engine.pad, dtype=np.int64)
    for row, ids in enumerate(sources):
        source_ids[row, : len(ids)] = ids
    state = engine.start_state(source_ids, beam)
    tokens = np.full(len(sources) * beam, engine.bos, dtype=np.int64)
    for _ in range(past):
        _, top_ids, _, _ = engine.decode_step(state, tokens, 1, None, False)
        tokens = top_ids[:, 0].copy()
    return engine.runtime.step_feed(state, tokens, 2 * beam, None)


def per_sentence(feed: dict[str, ort.OrtValue], beam: int) -> dict[str, ort.OrtValue]:
    """The same feed with its static inputs one row per sentence (each sentence's first row)."""
    return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[::beam]))
            if name == SOURCE_MASK or name.startswith(CROSS_PREFIX) else value for name, value in feed.items()}


def compare(bundle: Path, precision: str, sources: list[list[int]], beam: int, past: int, rounds: int,
            runs: int = 10, threads: int = 1) -> dict[str, Any]:
    engine = Engine(load_bundle(bundle), precision, device="cpu", threads=threads)
    graph_path = engine.bundle.graph_files(precision).decoder_step
    signature = {t.name: t.shape for t in engine.bundle.manifest.state.static}
    heads, head_dim = signature[f"{CROSS_PREFIX}k0"][1], signature[f"{CROSS_PREFIX}k0"][3]
    shared = rewrite_step_graph(onnx.load(str(graph_path)), beam, heads, head_dim)
    feed = decoder_feed(engine, sources, beam, past)
    sessions = {"per row": (ort.InferenceSession(str(graph_path), session_options(threads, spin=False),
                                                 providers=["CPUExecutionProvider"]), feed),
                "per sentence": (ort.InferenceSession(shared.SerializeToString(), session_options(threads, spin=False),
                                                      providers=["CPUExecutionProvider"]), per_sentence(feed, beam))}
    names = [o.name for o in sessions["per row"][0].get_outputs()]
    outputs = {key: [v.numpy() for v in session.run_with_ort_values(names, values)] for key, (session, values) in sessions.items()}
    differences = {name: float(np.abs(a.astype(np.float64) - b).max()) for name, a, b in
                   zip(names, outputs["per row"], outputs["per sentence"]) if a.dtype != bool and a.size}
    medians: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):  # the two graphs take turns, so that the VM's drift hits both
        for key, (session, values) in sessions.items():
            for _ in range(3):
                session.run_with_ort_values(names, values)
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                session.run_with_ort_values(names, values)
                times.append((time.perf_counter() - started) * 1e3)
            medians[key].append(statistics.median(times))
    return {"precision": precision, "sentences": len(sources), "beam": beam, "rows": len(sources) * beam,
            "source_width": max(map(len, sources)), "past": past, "threads": threads,
            "ms_per_step": {key: statistics.median(values) for key, values in medians.items()},
            "round_medians_ms": medians, "max_abs_difference": differences,
            "same_top_ids": bool(np.array_equal(outputs["per row"][names.index("top_ids")],
                                                outputs["per sentence"][names.index("top_ids")]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--split", type=Path, default=Path("data/en-fr/test.tsv"), help="TSV: source, tab, target")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--source", type=int, nargs=2, default=(15, 20), metavar=("MIN", "MAX"),
                        help="source ids (EOS included) of the sentences taken")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--past", type=int, default=15, help="cached target positions")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = Engine(load_bundle(args.bundle), args.precision, device="cpu", threads=args.threads)
    texts = [line.split("\t")[0] for line in args.split.read_text(encoding="utf-8").splitlines()]
    low, high = args.source
    sources = [ids for ids in engine.encode_texts(texts) if low <= len(ids) <= high][: args.sentences]
    if not sources:
        raise SystemExit(f"no sentence of {args.split} has {low} to {high} source ids")
    engine.close()
    hardware = cpu_info()
    result = compare(args.bundle, args.precision, sources, args.beam, args.past, args.rounds, threads=args.threads)
    log.info("%s, onnxruntime %s; %s, %d rows (%d sentences x beam %d), source %d, %d cached: per row %.3f ms, "
             "per sentence %.3f ms a step; same top ids: %s; largest difference %.2g", hardware["model"], ort.__version__,
             args.precision, result["rows"], result["sentences"], args.beam, result["source_width"], args.past,
             result["ms_per_step"]["per row"], result["ms_per_step"]["per sentence"], result["same_top_ids"],
             max(result["max_abs_difference"].values()))
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "onnxruntime": ort.__version__, **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
