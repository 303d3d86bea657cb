"""Export every architecture from a small trained checkpoint: fused attention, parity with
torch, a verified bundle, and refusal of tampered bundles and bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from attnserve.cli import main
from attnserve.export.exporter import export_bundle
from attnserve.model.checkpoint import load_model
from attnserve.model.evaluate import translate_best
from attnserve.server.bundle import BundleError, load_bundle
from attnserve.server.engine import Engine
from tests.conftest import ARCHITECTURES


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_export_matches_torch(trained: dict[str, Path], tmp_path: Path, name: str) -> None:
    out = tmp_path / "repo" / name / "1"
    manifest = export_bundle(trained[name], out, precisions=("fp32", "int8")).to_json()
    fp32 = manifest["precisions"]["fp32"]["validation"]
    assert fp32["max_abs_diff_random"] <= 1e-4 and fp32["max_abs_diff_dev"] <= 1e-4
    assert fp32["greedy_identical"] == 1.0 and fp32["beam4_identical"] == 1.0
    int8 = manifest["precisions"]["int8"]["validation"]
    assert abs(int8["bleu_difference"]) <= 0.5 or int8["test_bleu"] >= int8["test_bleu_torch"]
    bundle = load_bundle(out)
    assert bundle.manifest.to_json() == manifest == json.loads((out / "manifest.json").read_text())  # typed round trip
    assert set(manifest["files"]) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert out.stat().st_mode & 0o755 == 0o755  # readable by a server that runs as another user
    engine = Engine(bundle, "fp32", device="cpu")
    model, tokenizer, _ = load_model(trained[name])
    sources = ["the red cat sees the dog", "the old house has the big green car"]
    assert engine.translate_text(sources) == translate_best(model, tokenizer, sources)


def test_transformer_attention_is_fused_in_every_precision(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t" / "1"
    manifest = export_bundle(trained["transformer"], out, precisions=("fp32", "fp16", "int8")).to_json()
    fp16 = manifest["precisions"]["fp16"]["validation"]
    assert fp16["max_rel_diff_dev"] <= 1e-2 and abs(fp16["bleu_difference"]) <= 0.5
    assert load_bundle(out).manifest.to_json() == manifest  # typed round trip, every precision
    cfg = manifest["model_config"]
    for precision in ("fp32", "fp16", "int8"):
        for graph, expected in (("encoder", cfg["enc_layers"]), ("decoder_step", 2 * cfg["dec_layers"])):
            ops = [n.op_type for n in onnx.load(str(out / precision / f"{graph}.onnx")).graph.node]
            assert ops.count("Attention") == expected, (precision, graph, ops)
            assert "Softmax" not in ops, (precision, graph)
            assert ops.count("LogSoftmax") == (graph == "decoder_step"), (precision, graph)  # the output log-probs
    alignment = [n for n in onnx.load(str(out / "fp32/decoder_step.onnx")).graph.node
                 if n.op_type == "Attention" and any(a.name == "qk_matmul_output_mode" and a.i == 3 for a in n.attribute)]
    assert len(alignment) == 1  # the last cross-attention returns its weights from the fused node


def test_tampered_or_incomplete_bundles_are_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "b" / "1"
    export_bundle(trained["bahdanau"], out, precisions=("fp32",))
    load_bundle(out)
    graph = out / "fp32" / "decoder_step.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder_step.onnx does not match its sha256"):
        load_bundle(out)
    (out / "spm.model").unlink()
    with pytest.raises(BundleError, match="spm.model is missing"):
        load_bundle(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(out)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)


def test_bad_checkpoints_write_nothing(trained: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained["transformer"], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "arch": "mamba"}}))
    assert main(["export", str(run), "--out", str(tmp_path / "repo/m/1")]) == 2
    (run / "config.json").write_text(json.dumps({**config, "format_version": 0}))
    assert main(["export", str(run), "--out", str(tmp_path / "repo/m/1")]) == 2
    (run / "config.json").write_text(json.dumps(config))
    (run / "spm.model").unlink()
    assert main(["export", str(run), "--out", str(tmp_path / "repo/m/1")]) == 2
    assert not (tmp_path / "repo/m/1").exists()
    assert not [p for p in (tmp_path / "repo/m").glob("*")] if (tmp_path / "repo/m").exists() else True


def test_engine_refuses_a_bundle_from_another_export_version(bundles, tmp_path: Path) -> None:
    """A bundle whose step graph lacks what this engine feeds is refused at load, not mid-run."""
    from attnserve.server.bundle import sha256_file

    copy = tmp_path / "old"
    shutil.copytree(bundles["bahdanau"], copy)
    graph = onnx.load(str(copy / "fp32/decoder_step.onnx"))
    forced = [i for i in graph.graph.input if i.name == "forced"][0]
    graph.graph.input.remove(forced)
    for node in [n for n in graph.graph.node if n.name in ("forced_column", "forced_gather", "forced_squeeze")]:
        graph.graph.node.remove(node)
    graph.graph.output.remove([o for o in graph.graph.output if o.name == "forced_log_probs"][0])
    onnx.save(graph, str(copy / "fp32/decoder_step.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["fp32/decoder_step.onnx"] = sha256_file(copy / "fp32/decoder_step.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lacks .*forced.*export it again"):
        Engine(load_bundle(copy), "fp32", device="cpu")


def test_int8_quantisation_leaves_the_root_logger_alone(bundles, tmp_path: Path) -> None:
    """The quantiser's advice is dropped, by a filter on its own records only: the root logger's
    level never changes, and every other record still goes through."""
    import logging

    from attnserve.export.exporter import _DropQuantiserWarnings, quantize_int8

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    root, keep = logging.getLogger(), Keep()
    level = root.level
    root.addHandler(keep)
    try:
        quantize_int8(bundles["transformer"] / "fp32" / "encoder.onnx", tmp_path / "encoder.onnx")
    finally:
        root.removeHandler(keep)
    assert root.level == level and not root.filters
    assert not any("pre-processing" in r.getMessage() for r in keep.records)
    assert onnx.load(str(tmp_path / "encoder.onnx")).ir_version == 10
    quiet = _DropQuantiserWarnings()
    ours = logging.LogRecord("attnserve.export", logging.WARNING, __file__, 1, "ours", None, None)
    theirs = logging.LogRecord("root", logging.WARNING, quiet.package + "/quantize.py", 1, "advice", None, None)
    failure = logging.LogRecord("root", logging.ERROR, quiet.package + "/quantize.py", 1, "failure", None, None)
    assert quiet.filter(ours) and not quiet.filter(theirs) and quiet.filter(failure)


def _step_outputs(session, feed: dict) -> list:
    names = [o.name for o in session.get_outputs()]
    return [value.numpy() for value in session.run_with_ort_values(names, feed)]


def test_a_transformer_step_takes_its_static_state_once_per_sentence(bundles) -> None:
    """A Transformer bundle's step graph reads the source mask and cross-attention keys and
    values once per sentence, shared by the sentence's beam rows: the engine's state holds one
    static row per sentence, and the graph gives the same outputs when the static state comes
    one row per beam row instead, as an engine that does not share it would feed it."""
    import numpy as np
    import onnxruntime as ort

    bundle = load_bundle(bundles["transformer"])
    assert bundle.manifest.state.static_per_sentence
    engine = Engine(bundle, "fp32", device="cpu")
    sources = engine.encode_texts(["the red cat sees the dog", "the book"])
    source_ids = np.array([ids + [engine.pad] * (max(map(len, sources)) - len(ids)) for ids in sources])
    state = engine.start_state(source_ids, 3)
    tokens = np.full(6, engine.bos, dtype=np.int64)
    for _ in range(2):
        _, top_ids, _, _ = engine.decode_step(state, tokens, 1, None, False)
        tokens = top_ids[:, 0].copy()
    feed = engine.runtime.step_feed(state, tokens, 4, None)
    assert feed["cross_k0"].shape()[0] == feed["src_mask"].shape()[0] == 2 and feed["self_k0"].shape()[0] == 6
    per_row = {name: ort.OrtValue.ortvalue_from_numpy(np.repeat(value.numpy(), 3, axis=0)) if name in state.static else value
               for name, value in feed.items()}
    session = engine.runtime.step_session
    for shared, row in zip(_step_outputs(session, feed), _step_outputs(session, per_row)):
        np.testing.assert_allclose(shared, row, atol=1e-5)
    with pytest.raises(ValueError, match="whole sentences"):
        state.keep_rows(np.array([0, 1, 3]), source_ids.shape[1])


def test_sharing_the_static_state_is_refused_where_the_graph_reads_it_otherwise() -> None:
    """share_static_state on a step graph exported before it (the shipped v2 bundle, static
    state per row) gives that graph's outputs from per-sentence static state; a graph with
    another reader of a static tensor is refused, not rewritten wrongly."""
    import copy
    import dataclasses

    import numpy as np
    import onnxruntime as ort

    from attnserve.bundle_format import BATCH_AXIS, SENTENCES_AXIS
    from attnserve.export.graphs import SharingError, share_static_state
    from attnserve.export.specs import ArchitectureSpec
    from tests.conftest import SHIPPED_BUNDLE

    engine = Engine(load_bundle(SHIPPED_BUNDLE), "fp32", device="cpu")
    signature = engine.bundle.manifest.state
    assert not signature.static_per_sentence  # shipped before the change: it must keep loading
    arch = ArchitectureSpec("transformer", dataclasses.replace(
        signature, static=tuple(t.renamed_axis(BATCH_AXIS, SENTENCES_AXIS) for t in signature.static)))
    graph = onnx.load(str(SHIPPED_BUNDLE / "fp32" / "decoder_step.onnx"))
    shared = ort.InferenceSession(share_static_state(copy.deepcopy(graph), arch).SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    sources = engine.encode_texts(["Open the file.", "Save it"])
    source_ids = np.array([ids + [engine.pad] * (max(map(len, sources)) - len(ids)) for ids in sources])
    state = engine.start_state(source_ids, 2)  # per row: two rows a sentence
    tokens = np.full(4, engine.bos, dtype=np.int64)
    feed = engine.runtime.step_feed(state, tokens, 4, None)
    per_sentence = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[::2])) if name in state.static
                    else value for name, value in feed.items()}
    for got, want in zip(_step_outputs(shared, per_sentence), _step_outputs(engine.runtime.step_session, feed)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    graph.graph.node.append(onnx.helper.make_node("Identity", ["cross_k0"], ["leaked_keys"]))
    graph.graph.output.append(onnx.helper.make_tensor_value_info("leaked_keys", onnx.TensorProto.FLOAT, None))
    with pytest.raises(SharingError, match="Identity"):
        share_static_state(graph, arch)
