"""What sharing a sentence's cross-attention keys and values across its beams gains, measured on a
bundle exported before the exporter did it.

Such a bundle gives every beam row of a sentence its own copy of the sentence's cross-attention
keys and values (the static state, (rows, heads, source, head dim)). This rewrites its step graph
as the exporter now writes it (export/graphs.py share_static_state): the static state has one row
per sentence, and each cross-attention node attends the sentence's K query rows to that one copy.
It then times both graphs on the same decoder state, taking turns, and compares their outputs.
Bundles exported since then share already, and are refused.

    python -m attnserve.bench.shared_cross_attention build/repo/en-fr/2 --precision int8 --sentences 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from attnserve.bench.step_profile import feed_after, time_step
from attnserve.bundle_format import BATCH_AXIS, SENTENCES_AXIS
from attnserve.export.graphs import share_static_state
from attnserve.export.specs import ArchitectureSpec
from attnserve.model.hardware import cpu_info
from attnserve.server.bundle import Bundle, load_bundle
from attnserve.server.engine import Engine
from attnserve.server.runtime import session_options

log = logging.getLogger("attnserve.bench.shared_cross_attention")

def per_sentence_graph(bundle: Bundle, precision: str) -> onnx.ModelProto:
    """The bundle's step graph rewritten as the exporter now writes it (export/graphs.py
    share_static_state), with its static inputs one row per sentence."""
    signature = bundle.manifest.state
    if signature.static_per_sentence:
        raise ValueError(f"{bundle.path} already takes its static state per sentence: nothing to compare")
    arch = ArchitectureSpec(bundle.manifest.architecture, dataclasses.replace(
        signature, static=tuple(t.renamed_axis(BATCH_AXIS, SENTENCES_AXIS) for t in signature.static)))
    return share_static_state(onnx.load(str(bundle.graph_files(precision).decoder_step)), arch)


def per_sentence(feed: dict[str, ort.OrtValue], static: set[str], beam: int) -> dict[str, ort.OrtValue]:
    """The same feed with its static inputs one row per sentence (each sentence's first row)."""
    return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[::beam])) if name in static else value
            for name, value in feed.items()}


def compare(bundle: Path, precision: str, sources: list[list[int]], beam: int, past: int, rounds: int,
            runs: int = 10, threads: int = 1) -> dict[str, Any]:
    engine = Engine(load_bundle(bundle), precision, device="cpu", threads=threads)
    graph_path = engine.bundle.graph_files(precision).decoder_step
    shared = per_sentence_graph(engine.bundle, precision)
    feed = feed_after(engine, sources, beam, past, 2 * beam)
    sessions = {"per row": (ort.InferenceSession(str(graph_path), session_options(threads, spin=False),
                                                 providers=["CPUExecutionProvider"]), feed),
                "per sentence": (ort.InferenceSession(shared.SerializeToString(), session_options(threads, spin=False),
                                                      providers=["CPUExecutionProvider"]),
                                 per_sentence(feed, set(engine.bundle.manifest.state.static_names), beam))}
    names = [o.name for o in sessions["per row"][0].get_outputs()]
    outputs = {key: [v.numpy() for v in session.run_with_ort_values(names, values)] for key, (session, values) in sessions.items()}
    differences = {name: float(np.abs(a.astype(np.float64) - b).max()) for name, a, b in
                   zip(names, outputs["per row"], outputs["per sentence"]) if a.dtype != bool and a.size}
    medians: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):  # the two graphs take turns, so that the VM's drift hits both
        for key, (session, values) in sessions.items():
            medians[key].append(time_step(session, values, runs)["median_ms"])
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
