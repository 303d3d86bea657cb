"""Validation of exported graphs against the torch model. Every check runs; failures are
collected and raised together as one ExportValidationError.

    step parity   encoder outputs, then decoder steps along the torch greedy path, on random
                  and on real (dev) sentences: log-probabilities, alignments and the new state.
                  fp32: max abs difference of each graph's outputs <= that graph's GraphSpec.atol
                  (1e-4); fp16: relative error <= 1e-2.
    decoding      tokens of greedy decoding through onnxruntime vs torch on the dev split
                  (fp32: 100% identical, and for beam 4 too); int8/fp16 report the share
                  identical and test BLEU, which must be within 0.5 of torch.

The results go into the manifest as the bundle format's ValidationRecord.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import sacrebleu
import torch

from attnserve.bundle_format import (
    ATTENTION, CANDIDATE_COUNT, FORCED_TOKENS, LOG_PROBS, PARENT_ROWS, PREVIOUS_TOKENS, ZERO_ROWS, Manifest,
    ValidationRecord,
)
from attnserve.decoding_rules import BOS_ID, EOS_ID, PAD_ID
from attnserve.export.specs import ArchitectureSpec, GraphSpec
from attnserve.model.batching import pad
from attnserve.model.corpus import load_tsv
from attnserve.model.decode import DecodeOptions
from attnserve.model.evaluate import translate_texts
from attnserve.server.bundle import Bundle
from attnserve.server.engine import Engine, TranslationOptions

log = logging.getLogger(__name__)

FP16_RTOL = 1e-2
BEAM_CHECK = 4  # the beam size of ValidationRecord.beam4_identical
MAX_BLEU_DROP = 0.5


class ExportValidationError(Exception):
    """The exported graphs do not match the torch model; lists every failed check."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__("export refused, the ONNX graphs do not match torch:\n  " + "\n  ".join(failures))


@dataclasses.dataclass
class ValidationReport:
    record: ValidationRecord
    failures: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Difference:
    """The largest absolute and relative difference seen so far."""
    absolute: float = 0.0
    relative: float = 0.0

    def track(self, reference: np.ndarray, value: np.ndarray) -> None:
        absolute, relative = _difference(reference, value)
        self.absolute, self.relative = max(self.absolute, absolute), max(self.relative, relative)


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


def step_parity(model, engine: Engine, arch: ArchitectureSpec, src: torch.Tensor,
                steps: int = 8) -> dict[str, Difference]:
    """Max abs and relative difference of each graph's outputs (by graph name): the encoder's,
    and the decoder step's over `steps` steps along the torch greedy path."""
    encoder, decoder_step = Difference(), Difference()

    def as_array(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().double().numpy()

    signature = arch.state
    step_outputs = [LOG_PROBS, ATTENTION, *signature.new_state_outputs]
    with torch.inference_mode():
        state = model.encode(src)
        onnx_state = engine.encode(src.numpy())
        for name in signature.encoder_outputs:
            encoder.track(as_array(state[name]), np.asarray(onnx_state[name], dtype=np.float64))
        prev = torch.full((src.size(0),), BOS_ID, dtype=torch.long)
        for _ in range(steps):
            logits, state, attention = model.decode_step(prev, state)
            feed = {PREVIOUS_TOKENS: prev.numpy(), PARENT_ROWS: np.arange(src.size(0)), ZERO_ROWS: np.zeros(0, dtype=np.int64),
                    CANDIDATE_COUNT: np.array([1]), FORCED_TOKENS: prev.numpy(),
                    **{name: onnx_state[name] for name in signature.static_names + signature.dynamic_names}}
            log_probs, alignment, *new_state = engine.runtime.step_session.run(step_outputs, feed)
            decoder_step.track(as_array(torch.log_softmax(logits.float(), -1)), np.asarray(log_probs, dtype=np.float64))
            decoder_step.track(as_array(attention), np.asarray(alignment, dtype=np.float64))
            for tensor, value in zip(signature.dynamic, new_state):
                decoder_step.track(as_array(state[tensor.name]), np.asarray(value, dtype=np.float64))
                onnx_state[tensor.name] = value
            prev = logits.argmax(-1)  # follow the torch path
    return {arch.encoder.name: encoder, arch.decoder_step.name: decoder_step}


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


def _parity_failures(differences: dict[str, Difference], graphs: dict[str, GraphSpec], inputs: str,
                     precision: str) -> list[str]:
    """fp32: each graph within its own atol; fp16: within FP16_RTOL relative error."""
    failures = []
    for graph, difference in differences.items():
        atol = graphs[graph].atol
        if precision == "fp32" and not difference.absolute <= atol:
            failures.append(f"{inputs} inputs: {graph} max abs difference {difference.absolute:.3g} > {atol}")
        if precision == "fp16" and not difference.relative <= FP16_RTOL:
            failures.append(f"{inputs} inputs: {graph} relative error {difference.relative:.3g} > {FP16_RTOL}")
    return failures


def _rounded(value: float) -> float:
    return float(f"{value:.3g}")


def validate_precision(reference: TorchReference, arch: ArchitectureSpec, work: Path, manifest: Manifest,
                       precision: str) -> ValidationReport:
    # fp16 is meant for CUDA; where there is none, its numerics are checked on the CPU provider
    # (the manifest records which one).
    device = "auto" if precision == "fp16" else "cpu"
    engine = Engine(Bundle(work, manifest), precision, device=device, threads=0)
    try:
        return _validate(reference, arch, engine, precision)
    finally:
        engine.close()


def _validate(reference: TorchReference, arch: ArchitectureSpec, engine: Engine, precision: str) -> ValidationReport:
    model, config, dev, test = reference.model, reference.config, reference.dev, reference.test
    failures: list[str] = []
    graphs = {spec.name: spec for spec in arch.graphs}

    # 1. Step parity on random and real inputs.
    g = torch.Generator().manual_seed(1)
    random_src = torch.randint(4, config.model.vocab_size, (4, 11), generator=g)
    random_src[1, 7:] = PAD_ID
    random_src[3, 3:] = PAD_ID
    random_src[torch.arange(4), (random_src != PAD_ID).sum(1) - 1] = EOS_ID  # EOS last, as real inputs
    random = step_parity(model, engine, arch, random_src)
    failures += _parity_failures(random, graphs, "random", precision)
    record = ValidationRecord(provider=engine.provider,
                              max_abs_diff_random=_rounded(max(d.absolute for d in random.values())),
                              max_rel_diff_random=_rounded(max(d.relative for d in random.values())))
    if dev:
        real = step_parity(model, engine, arch, pad(engine.encode_texts([s for s, _ in dev[:16]])))
        failures += _parity_failures(real, graphs, "dev", precision)
        record = dataclasses.replace(record, max_abs_diff_dev=_rounded(max(d.absolute for d in real.values())),
                                     max_rel_diff_dev=_rounded(max(d.relative for d in real.values())))

    # 2. Greedy decoding: tokens identical to torch on the dev split.
    if not dev:
        failures.append(f"no dev split in {reference.data_dir} to validate greedy decoding on")
        return ValidationReport(record, failures)
    identical = _share_identical(reference.tokens("dev"), engine, dev, TranslationOptions())
    record = dataclasses.replace(record, dev_sentences=len(dev), greedy_identical=round(identical, 4))
    if precision == "fp32" and identical < 1.0:
        failures.append(f"greedy tokens identical on {identical:.2%} of {len(dev)} dev sentences, need 100%")
    if precision == "fp32":  # beam search too: the engine must reproduce the reference exactly
        identical = _share_identical(reference.tokens("dev", BEAM_CHECK), engine, dev, TranslationOptions(beam_size=BEAM_CHECK))
        record = dataclasses.replace(record, beam4_identical=round(identical, 4))
        if identical < 1.0:
            failures.append(f"beam-{BEAM_CHECK} tokens identical on {identical:.2%} of {len(dev)} dev sentences, need 100%")
    if test:  # every precision: the test BLEU goes into the manifest
        sources, references = [s for s, _ in test], [t for _, t in test]
        torch_hyps = reference.tokenizer.decode(reference.tokens("test"))
        onnx_hyps = engine.translate_text(sources)
        torch_bleu = sacrebleu.corpus_bleu(torch_hyps, [references]).score
        onnx_bleu = sacrebleu.corpus_bleu(onnx_hyps, [references]).score
        record = dataclasses.replace(record, test_sentences=len(test), test_bleu_torch=round(torch_bleu, 2),
                                     test_bleu=round(onnx_bleu, 2), bleu_difference=round(onnx_bleu - torch_bleu, 2))
        if torch_bleu - onnx_bleu > MAX_BLEU_DROP:
            failures.append(f"test BLEU {onnx_bleu:.2f} is {torch_bleu - onnx_bleu:.2f} below torch ({torch_bleu:.2f}); at most {MAX_BLEU_DROP}")
    log.info("%s validation: %s", precision, record.to_json())
    return ValidationReport(record, failures)
