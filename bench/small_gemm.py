"""Single-kernel timings behind docs/performance.md, "Where the batch-1 step goes": one
onnxruntime MatMul at each shape of a beam-4, batch-1 decoder step (4 rows), with the engine's
session options (server/runtime.py: 1 thread, no spinning), against torch and numpy for the
output projection, the same 256 x 256 product alone and as 74 distinct ones (a fp32 step's weight bytes), and the
cost of a session run with one Identity node.

    python bench/small_gemm.py
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
import onnx
from onnx import TensorProto, helper, numpy_helper

from attnserve.export.specs import IR_VERSION
from attnserve.model.hardware import cpu_info
from attnserve.server.runtime import session_options

log = logging.getLogger("attnserve.bench.small_gemm")

ROWS = 4  # beam 4, batch 1
# (K, N): the output projection, then attention (one projection, packed QKV), FFN in and out
SHAPES = [(256, 8000), (256, 256), (256, 768), (256, 1024), (1024, 256)]


def session_of(nodes: list[onnx.NodeProto], width: int, initializers: list[onnx.TensorProto]) -> ort.InferenceSession:
    """A session with the engine's options over `nodes`, from input "x" (ROWS, width) to output "y"."""
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    return ort.InferenceSession(model.SerializeToString(), session_options(threads=1, spin=False),
                                providers=["CPUExecutionProvider"])


def one_node_session(node: onnx.NodeProto, width: int, weights: np.ndarray | None = None) -> ort.InferenceSession:
    """A session over one node reading input "x" (ROWS, width) and, if given, initializer "W"."""
    initializers = [numpy_helper.from_array(weights, "W")] if weights is not None else []
    return session_of([node], width, initializers)


def chain_session(weights: list[np.ndarray]) -> ort.InferenceSession:
    """x (ROWS, 256) through len(weights) MatMuls, each with its own 256 x 256 initializer: a
    step's worth of distinct weights, which no cache level holds from one run to the next."""
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"W{i}"], ["y" if i == len(weights) - 1 else f"h{i + 1}"])
             for i in range(len(weights))]
    return session_of(nodes, 256, [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(weights)])


def microseconds(call: Callable[[], object], repeats: int = 2000, warm_up: int = 50) -> float:
    for _ in range(warm_up):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%s, onnxruntime %s, torch %s", cpu_info()["model"], ort.__version__, torch.__version__)
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    for k, n in SHAPES:
        weights = rng.standard_normal((k, n), dtype=np.float32) * 0.05
        x = rng.standard_normal((ROWS, k), dtype=np.float32)
        session = one_node_session(helper.make_node("MatMul", ["x", "W"], ["y"]), k, weights)
        log.info("onnxruntime MatMul fp32 %dx%dx%d (%.2f MB of weights): %.1f us", ROWS, k, n, weights.nbytes / 1e6,
                 microseconds(lambda: session.run(None, {"x": x})))
        if n == 8000:  # the output projection: the same product in torch (fp32, bf16) and numpy
            xt, wt = torch.from_numpy(x), torch.from_numpy(weights)
            xb, wb = xt.bfloat16(), wt.bfloat16()
            log.info("  torch fp32 %.1f us, torch bf16 %.1f us, numpy fp32 %.1f us", microseconds(lambda: xt @ wt),
                     microseconds(lambda: xb @ wb), microseconds(lambda: x @ weights))
    x = rng.standard_normal((ROWS, 256), dtype=np.float32)
    # The same 4 x 256 x 256 product, once alone (its 256 KB of weights stay in L2 between
    # runs) and as 74 distinct ones (19.4 MB, a fp32 step's weights): the second is what a
    # product costs inside the step graph, where the other 73 evict it.
    for count in (1, 8, 74):
        weights = [rng.standard_normal((256, 256), dtype=np.float32) * 0.05 for _ in range(count)]
        chain = chain_session(weights)
        total = microseconds(lambda: chain.run(None, {"x": x}), max(50, 2000 // count), 10)
        log.info("onnxruntime, %d distinct 4x256x256 MatMuls in one graph (%.1f MB of weights): %.1f us, %.1f us each, "
                 "%.1f GB/s", count, count * 0.262144, total, total / count, count * 0.262144e6 / total / 1e3)
    identity = one_node_session(helper.make_node("Identity", ["x"], ["y"]), 256)
    log.info("onnxruntime, one Identity node (the cost of a session run): %.1f us",
             microseconds(lambda: identity.run(None, {"x": x}), 5000))


if __name__ == "__main__":
    main()
