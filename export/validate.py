"""Validation of exported graphs against the torch model. Every check runs; failures are
collected and raised together as one ExportValidationError.

    step parity   encoder outputs, then decoder steps along the torch greedy path, on random
                  and on real (dev) sentences: log-probabilities, alignments and the new state.
                  fp32: max abs difference <= the graph's atol (1e-4); fp16: relative error <= 1e-2.
    decoding      tokens of greedy decoding through onnxruntime vs torch on the dev split
                  (fp32: 100% identical, and for beam 4 too); int8/fp16 report the share
                  identical and test BLEU, which must be within 0.5 of torch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch

from attnserve.export.specs import ArchitectureSpec
from attnserve.model.batching import pad
from attnserve.model.corpus import load_tsv
from attnserve.model.decode import DecodeOptions
from attnserve.model.evaluate import translate_texts
from attnserve.server.bundle import Bundle
from attnserve.server.engine import Engine, TranslationOptions

log = logging.getLogger(__name__)

FP16_RTOL = 1e-2
BEAM_CHECK = 4
MAX_BLEU_DROP = 0.5


class ExportValidationError(Exception):
    """The exported graphs do not match the torch model; lists every failed check."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__("export refused, the ONNX graphs do not match torch:\n  " + "\n  ".join(failures))


@dataclasses.dataclass
class ValidationReport:
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)


def _difference(reference: np.ndarray, value: np.ndarray) -> tuple[float, float]:
    if reference.dtype == bool or np.issubdtype(reference.dtype, np.integer):
        return float((reference != value).sum()), 0.0
    finite = np.isfinite(reference)
    if not np.array_equal(finite, np.isfinite(value)):
        return float("inf"), float("inf")
    diff = np.abs(reference[finite] - value[finite])
    if diff.size == 0:
        return 0.0, 0.0
    return float(diff.max()), float(diff.max() / max(np.abs(reference[finite]).max(), 1e-6))


def step_parity(model, engine: Engine, arch: ArchitectureSpec, src: torch.Tensor, steps: int = 8) -> tuple[float, float]:
    """Max abs and relative difference over encoder outputs and `steps` decoder steps."""
    worst_abs = worst_rel = 0.0

    def track(reference: torch.Tensor, value: np.ndarray) -> None:
        nonlocal worst_abs, worst_rel
        a, r = _difference(reference.detach().double().numpy(), np.asarray(value, dtype=np.float64))
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)

    with torch.inference_mode():
        state = model.encode(src)
        onnx_state = engine.encode(src.numpy())
        for name in engine.encoder_outputs:
            track(state[name], onnx_state[name])
        prev = torch.full((src.size(0),), 2, dtype=torch.long)
        for _ in range(steps):
            logits, state, attention = model.decode_step(prev, state)
            feed = {"prev": prev.numpy(), "origin": np.arange(src.size(0)), "fresh": np.zeros(0, dtype=np.int64), "k": np.array([1]), "forced": prev.numpy(),
                    **{n: onnx_state[n] for n in engine.static}, **{n: onnx_state[n] for n in engine.dynamic_names}}
            results = engine.step.run(None, feed)
            track(torch.log_softmax(logits.float(), -1), results[0])
            track(attention, results[1])
            for tensor, value in zip(arch.dynamic, results[2:]):
                track(state[tensor.name], value)
                onnx_state[tensor.name] = value
            prev = logits.argmax(-1)  # follow the torch path
    return worst_abs, worst_rel


class TorchReference:
    """The dev/test splits and the torch model's decoding of them, computed once per export and
    shared by every precision's validation (torch decoding is the slow part of validation)."""

    def __init__(self, model, tokenizer, config, sentences: int = 0):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.data_dir = Path(config.train.data_dir)
        splits = {}
        for name in ("dev", "test"):
            path = self.data_dir / f"{name}.tsv"
            rows = load_tsv(path) if path.is_file() else []
            splits[name] = rows[:sentences] if sentences else rows
        self.dev, self.test = splits["dev"], splits["test"]
        self._tokens: dict[tuple[str, int], list[list[int]]] = {}

    def tokens(self, split: str, beam_size: int = 1) -> list[list[int]]:
        """Best hypothesis of each source of the split, decoded by torch (cached)."""
        key = (split, beam_size)
        if key not in self._tokens:
            sources = [s for s, _ in getattr(self, split)]
            hyps = translate_texts(self.model, self.tokenizer, sources, DecodeOptions(beam_size=beam_size))
            self._tokens[key] = [h[0].tokens for h in hyps]
        return self._tokens[key]


def _share_identical(reference: list[list[int]], engine: Engine, rows, opts: TranslationOptions) -> float:
    onnx_tokens = [h[0].tokens for h in engine.translate_ids(engine.encode_texts([s for s, _ in rows]), opts)]
    return sum(a == b for a, b in zip(reference, onnx_tokens)) / len(rows)


def validate_precision(reference: TorchReference, arch: ArchitectureSpec, work: Path, manifest: dict,
                       precision: str) -> ValidationReport:
    report = ValidationReport()
    model, config, dev, test = reference.model, reference.config, reference.dev, reference.test
    # fp16 is meant for CUDA; where there is none, its numerics are checked on the CPU provider
    # (the manifest records which one).
    device = "auto" if precision == "fp16" else "cpu"
    engine = Engine(Bundle(work, manifest), precision, device=device, threads=0)
    report.results["provider"] = engine.step.get_providers()[0]

    # 1. Step parity on random and real inputs.
    g = torch.Generator().manual_seed(1)
    random_src = torch.randint(4, config.model.vocab_size, (4, 11), generator=g)
    random_src[1, 7:] = 0
    random_src[3, 3:] = 0
    random_src[torch.arange(4), (random_src != 0).sum(1) - 1] = 3  # EOS last, as real inputs
    batches = {"random": random_src}
    if dev:
        batches["dev"] = pad(engine.encode_texts([s for s, _ in dev[:16]]))
    atol = 1e-4
    for name, src in batches.items():
        worst_abs, worst_rel = step_parity(model, engine, arch, src)
        report.results[f"max_abs_diff_{name}"] = float(f"{worst_abs:.3g}")
        report.results[f"max_rel_diff_{name}"] = float(f"{worst_rel:.3g}")
        if precision == "fp32" and not worst_abs <= atol:
            report.failures.append(f"{name} inputs: max abs difference {worst_abs:.3g} > {atol}")
        if precision == "fp16" and not worst_rel <= FP16_RTOL:
            report.failures.append(f"{name} inputs: relative error {worst_rel:.3g} > {FP16_RTOL}")

    # 2. Greedy decoding: tokens identical to torch on the dev split.
    if not dev:
        report.failures.append(f"no dev split in {reference.data_dir} to validate greedy decoding on")
        return report
    identical = _share_identical(reference.tokens("dev"), engine, dev, TranslationOptions())
    report.results["dev_sentences"] = len(dev)
    report.results["greedy_identical"] = round(identical, 4)
    if precision == "fp32" and identical < 1.0:
        report.failures.append(f"greedy tokens identical on {identical:.2%} of {len(dev)} dev sentences, need 100%")
    if precision == "fp32":  # beam search too: the engine must reproduce the reference exactly
        identical = _share_identical(reference.tokens("dev", BEAM_CHECK), engine, dev, TranslationOptions(beam_size=BEAM_CHECK))
        report.results[f"beam{BEAM_CHECK}_identical"] = round(identical, 4)
        if identical < 1.0:
            report.failures.append(f"beam-{BEAM_CHECK} tokens identical on {identical:.2%} of {len(dev)} dev sentences, need 100%")
    if test:  # every precision: the test BLEU goes into the manifest
        sources, references = [s for s, _ in test], [t for _, t in test]
        torch_hyps = reference.tokenizer.decode(reference.tokens("test"))
        onnx_hyps = engine.translate_text(sources)
        torch_bleu = sacrebleu.corpus_bleu(torch_hyps, [references]).score
        onnx_bleu = sacrebleu.corpus_bleu(onnx_hyps, [references]).score
        report.results.update(test_sentences=len(test), test_bleu_torch=round(torch_bleu, 2),
                              test_bleu=round(onnx_bleu, 2), bleu_difference=round(onnx_bleu - torch_bleu, 2))
        if torch_bleu - onnx_bleu > MAX_BLEU_DROP:
            report.failures.append(f"test BLEU {onnx_bleu:.2f} is {torch_bleu - onnx_bleu:.2f} below torch ({torch_bleu:.2f}); at most {MAX_BLEU_DROP}")
    log.info("%s validation: %s", precision, report.results)
    return report
