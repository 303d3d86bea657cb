"""Checkpoint -> verified model bundle.

    1. export the encoder and decoder-step graphs (fp32) from the torch model;
    2. derive the other precisions: int8 (dynamic quantisation, CPU), fp16 (CUDA);
    3. validate every precision against torch, collecting every failure;
    4. only if all pass, write graphs, tokenizer and manifest (with sha256 of every file) and
       move the finished directory into place. A failed export writes nothing.

The manifest is the bundle format's typed Manifest (attnserve/bundle_format.py), which the
engine reads back.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from attnserve.bundle_format import (
    ENCODER_GRAPH, MANIFEST_FILE, STEP_GRAPH, GraphFiles, Languages, Manifest, PrecisionRecord,
)
from attnserve.decoding_rules import DEFAULT_LENGTH_LIMIT, SPECIAL_IDS
from attnserve.export.graphs import example_inputs, export_graph, node_types
from attnserve.export.specs import IR_VERSION, OPSET, ArchitectureSpec, architecture_spec
from attnserve.export.validate import ExportValidationError, TorchReference, validate_precision
from attnserve.model.checkpoint import FORMAT_VERSION, load_model
from attnserve.server.bundle import sha256_file

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "fp16")


def untie_shared_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give every MatMul/Gemm its own copy of a weight that a Gather also reads.

    The tied embedding is both the lookup table (Gather) and the output projection; the
    quantiser rewrites a weight in place for its MatMul, which would corrupt the lookup. In the
    int8 graph the table stays fp32 and the projection gets its own int8 copy."""
    initializers = {init.name: init for init in proto.graph.initializer}
    gathered = {node.input[0] for node in proto.graph.node if node.op_type == "Gather" and node.input[0] in initializers}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for i, name in enumerate(node.input):
            if name in gathered:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = f"{name}.{node.name}"
                proto.graph.initializer.append(copy)
                node.input[i] = copy.name
    return proto


class _DropQuantiserWarnings(logging.Filter):
    """Drops the records below ERROR that onnxruntime's quantisation package logs through the
    root logger; a filter on the root logger sees only records logged on it, so nothing that
    other code logs through its own loggers is touched."""

    def __init__(self) -> None:
        super().__init__()
        import onnxruntime.quantization

        self.package = str(Path(onnxruntime.quantization.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.package)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the MatMul/Gemm weights (activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    untied = target.with_suffix(".untied.onnx")
    onnx.save(untie_shared_weights(onnx.load(str(source))), str(untied))
    # The quantiser logs a generic "consider pre-processing" warning through the root logger
    # (logging.warning); the graph is already cleaned (clean_graph), so that advice does not
    # apply here. A filter on the root logger drops only the quantiser's records, for the
    # quantisation only: the root logger's level and every other record are left alone.
    root = logging.getLogger()
    quiet = _DropQuantiserWarnings()
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(untied), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.removeFilter(quiet)
        untied.unlink()
    proto = onnx.load(str(target))
    proto.ir_version = IR_VERSION
    onnx.save(proto, str(target))


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and activations, inputs/outputs kept fp32 so callers need not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    proto.ir_version = IR_VERSION
    onnx.save(proto, str(target))


def attention_description(cfg) -> str:
    if cfg.arch == "transformer":
        return "multi-head scaled dot-product"
    if cfg.attention == "none":
        return "none (fixed context)"
    normaliser = "" if cfg.normaliser == "softmax" else f" {cfg.normaliser}"  # softmax: unnamed, as before
    return f"{cfg.attention} {cfg.score}{normaliser}"


def export_bundle(
    run_dir: Path,
    out_dir: Path,
    precisions: tuple[str, ...] = ("fp32", "int8"),
    which: str = "best",
    validation_sentences: int = 0,
    command: str | None = None,
) -> Manifest:
    """Export a training run to a bundle directory; returns the manifest."""
    unknown = set(precisions) - set(PRECISIONS)
    if unknown or "fp32" not in precisions:
        raise ValueError(f"precisions must include fp32 and come from {PRECISIONS}; got {precisions}")
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a bundle; versions are immutable, export to a new version")
    model, tokenizer, config = load_model(run_dir, which)
    arch = architecture_spec(model)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from a server running as another user
    try:
        manifest = _build(model, tokenizer, config, arch, run_dir, work, precisions, which, validation_sentences)
        files = sorted(p for p in work.rglob("*") if p.is_file())  # the manifest is not written yet: not itself
        manifest = dataclasses.replace(manifest, command=command or " ".join(["attnserve", *sys.argv[1:]]),
                                       files={str(p.relative_to(work)): sha256_file(p) for p in files})
        (work / MANIFEST_FILE).write_text(manifest.dumps())
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("bundle written to %s", out_dir)
    return manifest


def _build(model, tokenizer, config, arch: ArchitectureSpec, run_dir: Path, work: Path,
           precisions, which: str, validation_sentences: int) -> Manifest:
    cfg, tc = config.model, config.train
    inputs = example_inputs(model, arch)
    (work / "fp32").mkdir()
    graphs: dict[str, PrecisionRecord] = {}
    unfused: dict[str, dict[str, int]] = {}
    for spec in arch.graphs:
        proto = export_graph(model, arch, spec, inputs[spec.name])
        onnx.checker.check_model(proto)
        onnx.save(proto, str(work / "fp32" / f"{spec.name}.onnx"))
        if cfg.arch == "transformer":
            unfused[spec.name] = node_types(export_graph(model, arch, spec, inputs[spec.name], fused=False))
    for precision in precisions:
        (work / precision).mkdir(exist_ok=True)
        for spec in arch.graphs:
            source, target = work / "fp32" / f"{spec.name}.onnx", work / precision / f"{spec.name}.onnx"
            if precision == "int8":
                quantize_int8(source, target)
            elif precision == "fp16":
                convert_fp16(source, target)
        graph_files = GraphFiles(encoder=f"{precision}/{ENCODER_GRAPH}.onnx", decoder_step=f"{precision}/{STEP_GRAPH}.onnx")
        graphs[precision] = PrecisionRecord(
            files=graph_files,
            node_types={spec.name: node_types(onnx.load(str(work / precision / f"{spec.name}.onnx"))) for spec in arch.graphs},
        )
    shutil.copy(run_dir / "spm.model", work / "spm.model")
    manifest = Manifest(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        architecture=cfg.arch,
        attention=attention_description(cfg),
        label=cfg.label,
        model_config=dataclasses.asdict(cfg),
        parameters=model.num_parameters(),
        languages=Languages(source=tc.src_lang, target=tc.tgt_lang),
        vocab_size=cfg.vocab_size,
        special_ids=SPECIAL_IDS,
        max_len=cfg.max_len,
        decoding=DEFAULT_LENGTH_LIMIT,  # the reference's (model/decode.py DecodeOptions) defaults
        opset=OPSET,
        ir_version=IR_VERSION,
        state=arch.state,
        tokenizer="spm.model",
        precisions=graphs,  # validation records added below
        # Node counts of the same graphs exported without fused attention (opset 18), so the
        # fusion is visible: every MatMul/Softmax/MatMul chain became one Attention node.
        unfused_node_types=unfused,
        source_checkpoint={"run": str(run_dir), "checkpoint": which, "checkpoint_format": FORMAT_VERSION,
                           **json.loads((Path(run_dir) / "checkpoints" / which / "meta.json").read_text())},
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                  "attnserve": importlib.metadata.version("attnserve")},
    )
    failures: list[str] = []
    reference = TorchReference(model, tokenizer, config, validation_sentences)
    validated: dict[str, PrecisionRecord] = {}
    for precision in precisions:
        report = validate_precision(reference, arch, work, manifest, precision)
        validated[precision] = dataclasses.replace(graphs[precision], validation=report.record)
        failures += [f"{precision}: {f}" for f in report.failures]
    if failures:
        raise ExportValidationError(failures)
    return dataclasses.replace(manifest, precisions=validated)


def summary(manifest: Manifest) -> str:
    """Node types per graph and precision, and the validation results, as text."""
    lines = [f"{manifest.label} ({manifest.attention} attention), {manifest.parameters:,} parameters"]
    for graph, counts in manifest.unfused_node_types.items():
        lines.append(f"  unfused {graph:13s} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for precision, record in manifest.precisions.items():
        for graph, counts in record.node_types.items():
            lines.append(f"  {precision:5s} {graph:13s} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        validation = record.validation.to_json() if record.validation is not None else {}
        lines.append(f"  {precision:5s} validation    {json.dumps(validation)}")
    return "\n".join(lines)
