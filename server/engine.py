"""Translation on onnxruntime from a model bundle: no torch.

The encoder graph runs once per batch and returns the static decoder state (cross-attention
keys/values, or the RNN memory and its attention-key projection); the step graph then runs once
per target position with the dynamic state (self-attention cache or RNN hidden state).

Greedy and beam search follow model/decode.py's rules exactly (per-sentence length limits,
finished hypotheses leave the beam, GNMT length penalty on finished ones), so fp32 output is
token-identical to the torch reference. Unlike the reference, finished sentences leave the
batch, and beams only reorder the dynamic state (the static state is the same for every beam
of a sentence).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import sentencepiece as spm

from server.bundle import Bundle, BundleError

log = logging.getLogger(__name__)

# Finished rows leave the batch once they are at least 1/COMPACT_FRACTION of it: copying the
# state (cross-attention keys/values included) for every single finished row costs more than
# the steps it saves.
COMPACT_FRACTION = 4


@dataclasses.dataclass
class TranslationOptions:
    beam_size: int = 1
    length_penalty: float = 1.0  # GNMT alpha; 0 = raw log-probability
    nbest: int = 1
    max_len_a: float | None = None  # None: the bundle's default (manifest "decoding")
    max_len_b: int | None = None
    min_length: int = 0  # EOS is not allowed before this many target tokens
    return_alignment: bool = False

    def validate(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"nbest must be between 1 and beam_size ({self.beam_size}), got {self.nbest}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")


@dataclasses.dataclass
class Hypothesis:
    tokens: list[int]  # target ids without BOS/EOS (a target prefix, if given, included)
    score: float  # length-normalised log-probability
    alignment: list[list[float]] | None = None  # per target token (and EOS): weights over source positions
    text: str = ""


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's per-node warnings are noise for users
    return options


def choose_providers(device: str = "auto") -> list[str]:
    """CUDA when asked for (or, with "auto", when this onnxruntime has it and the machine has an
    NVIDIA device), else CPU. onnxruntime-gpu lists CUDAExecutionProvider even on machines
    without a GPU and then logs errors falling back, hence the device check."""
    available = ort.get_available_providers()
    has_gpu = Path("/dev/nvidiactl").exists() or Path("/dev/dxg").exists()
    if device == "cuda" or (device == "auto" and has_gpu):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda":
            raise RuntimeError(f"CUDA requested but onnxruntime offers only {available}")
    return ["CPUExecutionProvider"]


class Engine:
    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "auto", threads: int = 0):
        self.bundle, self.precision = bundle, precision
        manifest = bundle.manifest
        providers = choose_providers(device)
        options = session_options(threads)
        try:
            self.encoder = ort.InferenceSession(str(bundle.graph_path(precision, "encoder")), options, providers=providers)
            self.step = ort.InferenceSession(str(bundle.graph_path(precision, "decoder_step")), options, providers=providers)
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph) as exc:
            raise BundleError(f"{bundle.path}: onnxruntime cannot load its {precision} graphs: {exc}") from exc
        self.provider = self.step.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError("CUDA requested but onnxruntime could not create the CUDA provider (see its log above)")
        log.info("loaded %s (%s) on %s", bundle.path, precision, self.provider)
        self.tokenizer = spm.SentencePieceProcessor(model_file=str(bundle.tokenizer_path))
        state = manifest["state"]
        self.static = [t["name"] for t in state["static"]]
        self.dynamic = state["dynamic"]
        self.dynamic_names = [t["name"] for t in self.dynamic]
        self.dynamic_from_encoder = state["dynamic_from_encoder"]
        self.encoder_outputs = [o.name for o in self.encoder.get_outputs()]
        self.step_outputs = ["top_log_probs", "top_ids", "forced_log_probs", "attention"] + [f"new_{n}" for n in self.dynamic_names]
        missing = ({"prev", "origin", "k", "forced", *self.static, *self.dynamic_names} - {i.name for i in self.step.get_inputs()}
                   | set(self.step_outputs) - {o.name for o in self.step.get_outputs()})
        if missing:
            raise BundleError(f"{bundle.path}: the decoder_step graph lacks {sorted(missing)}; "
                              "it was exported by another version: export it again")
        self.vocab_size = manifest["vocab_size"]
        self.device_type = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        ids = manifest["special_ids"]
        self.pad, self.bos, self.eos = ids["pad"], ids["bos"], ids["eos"]
        self.max_len = manifest["max_len"]
        self.default_max_len_a = manifest["decoding"]["max_len_a"]
        self.default_max_len_b = manifest["decoding"]["max_len_b"]

    def warm_up(self) -> None:
        """One short translation so that the first request does not pay for allocations."""
        self.translate_ids([[self.eos]], TranslationOptions(beam_size=2, max_len_a=0, max_len_b=2))

    # -- state -------------------------------------------------------------------------------

    def encode(self, src: np.ndarray) -> dict[str, np.ndarray]:
        """Encoder outputs, plus the initial dynamic state: from the encoder (RNN) or empty
        key/value caches (B, H, 0, Dh) (Transformer)."""
        state = dict(zip(self.encoder_outputs, self.encoder.run(None, {"src": src})))
        if not self.dynamic_from_encoder:
            for tensor in self.dynamic:
                shape = [src.shape[0] if a == "batch" else 0 if isinstance(a, str) else a for a in tensor["shape"]]
                state[tensor["name"]] = np.zeros(shape, dtype=tensor["dtype"])
        return state

    def _ort_value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def _step(self, state: "_DecoderState", prev: np.ndarray, k: int, no_eos: bool, want_alignment: bool,
              forced: np.ndarray | None = None):
        """One decoder step: the k best (log-prob, token) of every row, best first, ties to the
        lower token id (EOS excluded while no_eos), and the alignment if wanted. Rows whose
        `forced` token is not PAD get that token as their only candidate (a target prefix)."""
        feed = {"prev": ort.OrtValue.ortvalue_from_numpy(prev), "origin": ort.OrtValue.ortvalue_from_numpy(state.origin),
                "k": ort.OrtValue.ortvalue_from_numpy(np.array([k + no_eos], dtype=np.int64)),
                "forced": ort.OrtValue.ortvalue_from_numpy(forced if forced is not None else np.zeros_like(prev)),
                **state.static, **state.dynamic}
        top_log_probs, top_ids, forced_log_probs, alignment, *new = self.step.run_with_ort_values(self.step_outputs, feed)
        state.stepped(dict(zip(self.dynamic_names, new)), len(prev))
        top_log_probs, top_ids = top_log_probs.numpy(), top_ids.numpy()
        if no_eos:
            top_log_probs[top_ids == self.eos] = -np.inf
            order = np.argsort(-top_log_probs, axis=1, kind="stable")[:, :k]
            top_log_probs, top_ids = np.take_along_axis(top_log_probs, order, 1), np.take_along_axis(top_ids, order, 1)
        if forced is not None:
            rows = forced != self.pad
            top_log_probs[rows] = -np.inf
            top_log_probs[rows, 0] = forced_log_probs.numpy()[rows]
            top_ids[rows, 0] = forced[rows]
        return top_log_probs, top_ids, alignment.numpy() if want_alignment else None

    def _forced(self, prefixes: list[list[int]] | None, rows: np.ndarray, step: int) -> np.ndarray | None:
        """The prefix token each row must take at this step (PAD: none), or None if no row has one."""
        if prefixes is None or step >= max((len(p) for p in prefixes), default=0):
            return None
        return np.array([prefixes[r][step] if step < len(prefixes[r]) else self.pad for r in rows], dtype=np.int64)

    def _limits(self, src: np.ndarray, opts: TranslationOptions, prefixes: list[list[int]] | None) -> np.ndarray:
        """Per-sentence max target length, computed as model/decode.py does (float32, truncated),
        and never shorter than a target prefix plus one token."""
        a = self.default_max_len_a if opts.max_len_a is None else opts.max_len_a
        b = self.default_max_len_b if opts.max_len_b is None else opts.max_len_b
        lengths = (src != self.pad).sum(1).astype(np.float32)
        limits = np.minimum((np.float32(a) * lengths + np.float32(b)).astype(np.int64), self.max_len - 1)
        if prefixes is not None:
            limits = np.maximum(limits, np.array([min(len(p) + 1, self.max_len - 1) for p in prefixes]))
        return limits

    @staticmethod
    def _normalise(score: float, length: int, alpha: float) -> float:
        """GNMT length penalty, as model/decode.py applies it."""
        return score / ((5.0 + length) / 6.0) ** alpha if alpha else score

    # -- search ------------------------------------------------------------------------------

    def greedy(self, src: np.ndarray, opts: TranslationOptions, prefixes: list[list[int]] | None = None) -> list[list[Hypothesis]]:
        """src (B, S) int64, PAD-padded, rows ending in EOS. Finished rows leave the batch."""
        B = src.shape[0]
        state = _DecoderState(self, self.encode(src))
        limits = self._limits(src, opts, prefixes)
        rows = np.arange(B)  # original row of each active row
        prev = np.full(B, self.bos, dtype=np.int64)
        tokens: list[list[int]] = [[] for _ in range(B)]
        scores = np.zeros(B, dtype=np.float32)
        alignments: list[list[list[float]]] = [[] for _ in range(B)]
        done = np.zeros(B, dtype=bool)  # per active row; done rows are dropped in bulk
        for step in range(int(limits.max())):
            top_log_probs, top_ids, alignment = self._step(state, prev, 1, step < opts.min_length, opts.return_alignment,
                                                           self._forced(prefixes, rows, step))
            prev = top_ids[:, 0]
            scores[rows] += np.where(done, 0.0, top_log_probs[:, 0])
            for i in np.flatnonzero(~done).tolist():
                tokens[rows[i]].append(int(prev[i]))
                if opts.return_alignment:
                    alignments[rows[i]].append(alignment[i].tolist())
            done |= (prev == self.eos) | (limits[rows] <= step + 1)
            if done.all():
                break
            if done.sum() * COMPACT_FRACTION >= len(rows):
                keep = np.flatnonzero(~done)
                rows, prev, done = rows[keep], prev[keep], done[keep]
                state.keep(keep)
        results = []
        for row in range(B):
            ids = tokens[row]
            length = len(ids)
            score = self._normalise(float(scores[row]), length, opts.length_penalty)
            body = ids[:-1] if ids and ids[-1] == self.eos else ids
            results.append([Hypothesis(body, score, alignments[row] if opts.return_alignment else None)])
        return results

    def beam_search(self, src: np.ndarray, opts: TranslationOptions, prefixes: list[list[int]] | None = None) -> list[list[Hypothesis]]:
        """The beam of model/decode.py: 2K best continuations a step, an EOS among the first K
        finishes a hypothesis, the K best others go on; a sentence is done with K finished
        hypotheses or at its length limit, and leaves the batch (in bulk, see COMPACT_FRACTION)."""
        B, K = src.shape[0], opts.beam_size
        state = _DecoderState(self, {name: np.repeat(value, K, axis=0) for name, value in self.encode(src).items()})
        limits = self._limits(src, opts, prefixes)
        sentences = np.arange(B)  # original sentence of each active sentence
        closed = np.zeros(B, dtype=bool)  # per active sentence: done, waiting to leave the batch
        prev = np.full(B * K, self.bos, dtype=np.int64)
        scores = np.full((B, K), -np.inf, dtype=np.float32)
        scores[:, 0] = 0.0  # only the first beam is alive at the start
        history = np.zeros((B * K, 0), dtype=np.int64)
        attention_history: list[np.ndarray] = []  # per step (rows, S), rows follow the beams
        finished: list[list[Hypothesis]] = [[] for _ in range(B)]
        beam_of = np.repeat(np.arange(K), 2 * K)[None, :]  # (1, K*2K)
        positions = np.arange(2 * K)[None, :]
        for step in range(int(limits.max())):
            n = len(sentences)
            # The 2K best continuations of each beam contain the 2K best of the sentence.
            forced = self._forced(prefixes, np.repeat(sentences, K), step)
            top_log_probs, top_ids, alignment = self._step(state, prev, 2 * K, step < opts.min_length,
                                                           opts.return_alignment, forced)
            if opts.return_alignment:
                attention_history.append(alignment)
            candidates = (scores.reshape(n * K, 1) + top_log_probs).reshape(n, 2 * K * K)
            tokens = top_ids.reshape(n, 2 * K * K)
            # Best first; ties go to the lower (beam, token) index, as torch.topk over (K * V).
            order = np.lexsort((beam_of * self.vocab_size + tokens, -candidates), axis=1)[:, : 2 * K]
            top_scores = np.take_along_axis(candidates, order, 1)
            top_beam = order // (2 * K)
            top_token = np.take_along_axis(tokens, order, 1)
            is_eos = top_token == self.eos
            for b, j in np.argwhere(is_eos[:, :K] & np.isfinite(top_scores[:, :K]) & ~closed[:, None]):
                row = b * K + top_beam[b, j]
                finished[sentences[b]].append(self._hypothesis(history[row], attention_history, row, top_scores[b, j], step + 1, True, opts))
            pick = np.argsort(np.where(is_eos, positions + 2 * K, positions), axis=1, kind="stable")[:, :K]
            scores = np.take_along_axis(top_scores, pick, 1)
            origin = (np.take_along_axis(top_beam, pick, 1) + np.arange(n)[:, None] * K).reshape(-1)
            prev = np.take_along_axis(top_token, pick, 1).reshape(-1).astype(np.int64)
            state.reorder(origin)
            history = np.concatenate([history[origin], prev[:, None]], axis=1)
            attention_history = [a[origin] for a in attention_history]
            at_limit = limits[sentences] <= step + 1
            for b in np.flatnonzero(at_limit & ~closed):  # live hypotheses finish as they are
                for k in np.flatnonzero(np.isfinite(scores[b])):
                    finished[sentences[b]].append(self._hypothesis(history[b * K + k], attention_history, b * K + k, scores[b, k], step + 1, False, opts))
            closed |= at_limit | np.array([len(finished[s]) >= K for s in sentences])
            if closed.all():
                break
            if closed.sum() * COMPACT_FRACTION >= n:
                keep = np.flatnonzero(~closed)
                rows = (keep[:, None] * K + np.arange(K)).reshape(-1)
                sentences, scores, closed = sentences[keep], scores[keep], closed[keep]
                prev, history = prev[rows], history[rows]
                attention_history = [a[rows] for a in attention_history]
                state.keep(rows)
        return [sorted(hyps, key=lambda h: -h.score)[: opts.nbest] for hyps in finished]

    def _hypothesis(self, row: np.ndarray, attention_history: list[np.ndarray], index: int, score: float,
                    length: int, ended: bool, opts: TranslationOptions) -> Hypothesis:
        """A finished hypothesis of `length` target tokens (its EOS included if it ended with
        one); `row` starts with its tokens; attention_history[t][index] is its alignment at t."""
        alignment = [attention_history[t][index].tolist() for t in range(length)] if opts.return_alignment else None
        return Hypothesis(row[: length - ended].tolist(), self._normalise(float(score), length, opts.length_penalty), alignment)

    # -- batching and text -------------------------------------------------------------------

    def translate_ids(self, sources: Sequence[list[int]], opts: TranslationOptions | None = None,
                      max_batch_tokens: int = 4096, max_batch_sentences: int = 64,
                      prefixes: Sequence[list[int]] | None = None) -> list[list[Hypothesis]]:
        """Sources (ids ending in EOS) in length-sorted batches of at most max_batch_tokens padded
        source tokens; results in input order. A target prefix (ids, no BOS/EOS) per source, if
        given, is forced at the start of every hypothesis."""
        opts = opts or TranslationOptions()
        opts.validate()
        if prefixes is not None:
            if len(prefixes) != len(sources):
                raise ValueError(f"{len(prefixes)} target prefixes for {len(sources)} sources")
            if any(self.eos in p or self.pad in p or len(p) >= self.max_len - 1 for p in prefixes):
                raise ValueError(f"a target prefix may not contain EOS or PAD, nor exceed {self.max_len - 2} tokens")
        search = self.greedy if opts.beam_size == 1 and opts.nbest == 1 else self.beam_search
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        results: list[list[Hypothesis]] = [[] for _ in sources]
        start = 0
        while start < len(order):
            end = start + 1
            while (end < len(order) and end - start < max_batch_sentences
                   and len(sources[order[end]]) * (end - start + 1) * opts.beam_size <= max_batch_tokens):
                end += 1
            batch = order[start:end]
            src = np.full((len(batch), len(sources[batch[-1]])), self.pad, dtype=np.int64)
            for row, i in enumerate(batch):
                src[row, : len(sources[i])] = sources[i]
            batch_prefixes = [list(prefixes[i]) for i in batch] if prefixes is not None else None
            for i, hyps in zip(batch, search(src, opts, batch_prefixes)):
                results[i] = hyps
            start = end
        return results

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids[: self.max_len - 1] + [self.eos] for ids in self.tokenizer.encode(list(texts))]

    def translate(self, texts: Sequence[str], opts: TranslationOptions | None = None,
                  prefixes: Sequence[str] | None = None, **batching) -> list[list[Hypothesis]]:
        prefix_ids = self.tokenizer.encode(list(prefixes)) if prefixes is not None else None
        results = self.translate_ids(self.encode_texts(texts), opts, prefixes=prefix_ids, **batching)
        for hyps in results:
            for hyp, text in zip(hyps, self.tokenizer.decode([h.tokens for h in hyps])):
                hyp.text = text
        return results

    def translate_text(self, texts: Sequence[str], opts: TranslationOptions | None = None) -> list[str]:
        """Best translation of each text."""
        return [hyps[0].text for hyps in self.translate(texts, opts)]


class _DecoderState:
    """The decoder state of one batch being decoded.

    Static tensors (cross-attention keys/values, RNN memory) are wrapped as OrtValues once per
    batch, on the execution provider's device. The dynamic state (key/value cache, RNN hidden
    state) stays in the OrtValues onnxruntime returned, on that device too: it is never copied
    to numpy. `origin` tells the next step which previous row each row continues; the step graph
    applies it (Gather), which is how beams are reordered and finished rows dropped."""

    def __init__(self, engine: Engine, tensors: dict[str, np.ndarray]):
        self.engine = engine
        self.static_host = {name: tensors[name] for name in engine.static}
        self.static = {name: engine._ort_value(value) for name, value in self.static_host.items()}
        self.dynamic = {name: engine._ort_value(tensors[name]) for name in engine.dynamic_names}
        self.origin = np.arange(len(next(iter(self.static_host.values()))), dtype=np.int64)

    def stepped(self, dynamic: dict[str, ort.OrtValue], rows: int) -> None:
        self.dynamic = dynamic
        self.origin = np.arange(rows, dtype=np.int64)

    def reorder(self, origin: np.ndarray) -> None:
        """Row i continues row origin[i] (beam search)."""
        self.origin = self.origin[origin]

    def keep(self, rows: np.ndarray) -> None:
        """Only these rows go on; the static tensors are compacted on the host."""
        self.origin = self.origin[rows]
        self.static_host = {name: value[rows] for name, value in self.static_host.items()}
        self.static = {name: self.engine._ort_value(value) for name, value in self.static_host.items()}
