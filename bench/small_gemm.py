"""Single-kernel timings behind docs/performance.md, "Where the batch-1 step goes": one
onnxruntime MatMul at the shapes of a beam-4, batch-1 decoder step (4 rows), 1 thread, no
spinning, against torch and numpy, and the cost of one session run with one Identity node.

    python bench/small_gemm.py
"""
import logging, time, numpy as np, onnx, onnxruntime as ort, torch
from onnx import helper, TensorProto, numpy_helper
log = logging.getLogger("attnserve.bench.small_gemm").info


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    M, K, N = 4, 256, 8000
    rng = np.random.default_rng(0)
    W = rng.standard_normal((K, N), dtype=np.float32) * 0.05
    x = rng.standard_normal((M, K), dtype=np.float32)
    def session(node, inits, inputs):
        g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 9
        o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
    def bench(f, n=2000):
        for _ in range(50): f()
        t = time.perf_counter()
        for _ in range(n): f()
        return (time.perf_counter() - t) / n * 1e6
    s = session(helper.make_node("MatMul", ["x", "W"], ["y"]), [numpy_helper.from_array(W, "W")],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])])
    log(f"ORT MatMul fp32 {M}x{K}x{N}: {bench(lambda: s.run(None, {'x': x})):.0f} us  ({W.nbytes/1e6:.1f} MB weights)")
    torch.set_num_threads(1); xt, Wt = torch.from_numpy(x), torch.from_numpy(W)
    log(f"torch fp32: {bench(lambda: xt @ Wt):.0f} us")
    Wb = Wt.bfloat16(); xb = xt.bfloat16()
    log(f"torch bf16: {bench(lambda: xb @ Wb):.0f} us")
    log(f"numpy fp32: {bench(lambda: x @ W):.0f} us")
    for (k, n) in [(256, 256), (256, 768), (256, 1024), (1024, 256)]:
        W2 = rng.standard_normal((k, n), dtype=np.float32)
        s2 = session(helper.make_node("MatMul", ["x", "W"], ["y"]), [numpy_helper.from_array(W2, "W")],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, k])])
        x2 = rng.standard_normal((M, k), dtype=np.float32)
        log(f"ORT MatMul fp32 {M}x{k}x{n}: {bench(lambda: s2.run(None, {'x': x2}), 5000):.1f} us")
    e = session(helper.make_node("Identity", ["x"], ["y"]), [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])])
    log(f"ORT one Identity node (session.run overhead): {bench(lambda: e.run(None, {'x': x}), 5000):.1f} us")


if __name__ == "__main__":
    main()
