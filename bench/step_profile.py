"""One decoder step of a bundle, timed and profiled by onnxruntime, at a fixed shape: `rows`
rows (beam 4 at batch 1 is 4 rows) of one real sentence, `past` cached target positions.

It times the step graph alone (the same feed run again and again: what the engine pays per
step inside onnxruntime, without the search's Python), then runs it under onnxruntime's
profiler and sums the kernel time per op type and per node. `--graph` times another
decoder_step.onnx (a rewrite of the bundle's) on the same feed, so that a graph change is
measured against the bundle's in one run.

    python bench/step_profile.py models/repository/en-fr/1 --precision fp32 --rows 4 --past 10
    python bench/step_profile.py models/repository/en-fr/1 --graph /tmp/rewritten.onnx --json out.json
    python bench/step_profile.py models/repository/en-fr/2 --threads 2 --spin     # as Engine(spin_step=True)
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from attnserve.bundle_format import STEP_GRAPH
from attnserve.model.hardware import cpu_info
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine
from attnserve.server.runtime import session_options

log = logging.getLogger("attnserve.bench.step_profile")

SENTENCE = "Click the Cancel button to stop the download and close the window."


def feed_after(engine: Engine, sources: list[list[int]], copies: int, past: int, candidates: int) -> dict[str, ort.OrtValue]:
    """The step graph's inputs after `past` greedy steps of these sentences (ids ending in EOS),
    `copies` rows each."""
    source_ids = np.full((len(sources), max(map(len, sources))), engine.pad, dtype=np.int64)
    for row, ids in enumerate(sources):
        source_ids[row, : len(ids)] = ids
    state = engine.start_state(source_ids, copies)
    tokens = np.full(len(sources) * copies, engine.bos, dtype=np.int64)
    for _ in range(past):
        _, top_ids, _, _ = engine.decode_step(state, tokens, 1, None, False)
        tokens = top_ids[:, 0].copy()
    return engine.runtime.step_feed(state, tokens, candidates, None)


def step_feed(engine: Engine, rows: int, past: int, candidates: int) -> dict[str, ort.OrtValue]:
    """The step graph's inputs after `past` greedy steps of SENTENCE copied to `rows` rows."""
    return feed_after(engine, engine.encode_texts([SENTENCE]), rows, past, candidates)


def time_step(session: ort.InferenceSession, feed: dict[str, ort.OrtValue], repeats: int) -> dict[str, float]:
    outputs = [o.name for o in session.get_outputs()]
    for _ in range(20):
        session.run_with_ort_values(outputs, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run_with_ort_values(outputs, feed)
        times.append((time.perf_counter() - started) * 1e3)
    times.sort()
    return {"mean_ms": statistics.fmean(times), "median_ms": statistics.median(times),
            "p10_ms": times[len(times) // 10], "p90_ms": times[9 * len(times) // 10]}


def profile_step(graph: str, options: ort.SessionOptions, feed: dict[str, ort.OrtValue], repeats: int) -> dict:
    """Kernel time per op type and per node (microseconds per step), from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "step")
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        for _ in range(repeats + 20):
            session.run_with_ort_values(outputs, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_node: dict[str, float] = collections.defaultdict(float)
    op_of: dict[str, str] = {}
    runs = 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs += 1
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        by_node[node] += event["dur"]
        op_of[node] = event["args"]["op_name"]
    by_op: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for node, total in by_node.items():
        by_op[op_of[node]] += total
        count[op_of[node]] += 1
    runs = max(runs, 1)
    kernel_us = sum(by_node.values()) / runs
    return {
        "runs": runs,
        "kernel_us_per_step": kernel_us,
        "by_op": {op: {"nodes": count[op], "us_per_step": t / runs, "share": t / runs / kernel_us}
                  for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "slowest_nodes": [{"node": n, "op": op_of[n], "us_per_step": t / runs}
                          for n, t in sorted(by_node.items(), key=lambda kv: -kv[1])[:15]],
    }


def graph_report(name: str, graph: str, threads: int, feed: dict[str, ort.OrtValue], repeats: int,
                 spin: bool = False) -> dict:
    session = ort.InferenceSession(graph, session_options(threads, spin=spin), providers=["CPUExecutionProvider"])
    timing = time_step(session, feed, repeats)
    profile = profile_step(graph, session_options(threads, spin=spin), feed, repeats)
    log.info("%s: %.3f ms a step (median %.3f, p10-p90 %.3f-%.3f), kernels %.0f us", name, timing["mean_ms"],
             timing["median_ms"], timing["p10_ms"], timing["p90_ms"], profile["kernel_us_per_step"])
    for op, row in profile["by_op"].items():
        log.info("  %-28s %3d nodes %8.1f us %5.1f%%", op, row["nodes"], row["us_per_step"], 100 * row["share"])
    return {"graph": graph, "timing": timing, "profile": profile}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rows", type=int, default=4, help="rows of the step: batch x beam")
    parser.add_argument("--past", type=int, default=10, help="cached target positions")
    parser.add_argument("--candidates", type=int, default=8, help="TopK per row (the search asks 2 x beam)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--spin", action="store_true", help="let onnxruntime's workers spin between runs (spin_step)")
    parser.add_argument("--graph", action="append", default=[], help="another decoder_step.onnx to time on the same feed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = Engine(load_bundle(args.bundle), args.precision, device="cpu", threads=args.threads)
    feed = step_feed(engine, args.rows, args.past, args.candidates)
    hardware = cpu_info()
    log.info("%s, onnxruntime %s, %d thread(s); %d rows, %d cached positions", hardware["model"], ort.__version__,
             args.threads, args.rows, args.past)
    bundle_graph = str(engine.bundle.graph_files(args.precision).decoder_step)
    reports = {f"{STEP_GRAPH} ({args.precision})": graph_report(f"bundle {args.precision}", bundle_graph, args.threads,
                                                                feed, args.repeats, args.spin)}
    for graph in args.graph:
        reports[graph] = graph_report(graph, graph, args.threads, feed, args.repeats, args.spin)
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "onnxruntime": ort.__version__, "threads": args.threads,
                                         "spin": args.spin,
                                         "rows": args.rows, "past": args.past, "graphs": reports}, indent=1) + "\n")


if __name__ == "__main__":
    main()
