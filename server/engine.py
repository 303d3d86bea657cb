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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import sentencepiece as spm

from attnserve.server.bundle import Bundle, BundleError

log = logging.getLogger(__name__)

# A running batch's key/value cache is cut back to the steps its rows need once it is more than
# twice that plus this many steps wide.
TRIM_SLACK = 16


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


def session_options(threads: int = 0, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's per-node warnings are noise for users
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        # No spinning: the encoder and step sessions take turns, and one's idle workers spinning
        # for work would take the cores the other runs on (measured on 2 cores, sentences
        # joining a running batch: decoder steps 1.7x slower with spinning, and 1.8x the
        # serving throughput without).
        options = session_options(threads, spin=False)
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
        # Which axis of each state tensor runs over source positions (padded on the right when
        # sentences of different lengths share a batch) or over cached target steps (padded on
        # the left, masked out, when a sentence joins a batch that has already taken steps).
        self.source_axis = {t["name"]: t["shape"].index("src_len") for t in state["static"] if "src_len" in t["shape"]}
        self.past_axis = {t["name"]: t["shape"].index("past") for t in self.dynamic if "past" in t["shape"]}
        self.encoder_outputs = [o.name for o in self.encoder.get_outputs()]
        self.step_outputs = ["top_log_probs", "top_ids", "forced_log_probs", "attention"] + [f"new_{n}" for n in self.dynamic_names]
        missing = ({"prev", "origin", "fresh", "k", "forced", *self.static, *self.dynamic_names} - {i.name for i in self.step.get_inputs()}
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
        # Called with (graph name, seconds) after every onnxruntime run, e.g. by the server's metrics.
        self.run_observer: Callable[[str, float], None] | None = None

    def warm_up(self) -> None:
        """One short translation so that the first request does not pay for allocations."""
        self.translate_ids([[self.eos]], TranslationOptions(beam_size=2, max_len_a=0, max_len_b=2))

    # -- state -------------------------------------------------------------------------------

    def encode(self, src: np.ndarray) -> dict[str, np.ndarray]:
        """Encoder outputs, plus the initial dynamic state: from the encoder (RNN) or empty
        key/value caches (B, H, 0, Dh) (Transformer)."""
        started = time.perf_counter()
        state = dict(zip(self.encoder_outputs, self.encoder.run(None, {"src": src})))
        if self.run_observer is not None:
            self.run_observer("encoder", time.perf_counter() - started)
        if not self.dynamic_from_encoder:
            for tensor in self.dynamic:
                shape = [src.shape[0] if a == "batch" else 0 if isinstance(a, str) else a for a in tensor["shape"]]
                state[tensor["name"]] = np.zeros(shape, dtype=tensor["dtype"])
        return state

    def _ort_value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def _step(self, state: "_DecoderState", prev: np.ndarray, k: int, no_eos: np.ndarray | None, want_alignment: bool,
              forced: np.ndarray | None = None):
        """One decoder step: the k best (log-prob, token) of every row, best first, ties to the
        lower token id (EOS excluded on the rows where no_eos is set), and the alignment if
        wanted. Rows whose `forced` token is not PAD get that token as their only candidate (a
        target prefix)."""
        extra = int(no_eos is not None and no_eos.any())  # one more candidate replaces a dropped EOS
        feed = {"prev": ort.OrtValue.ortvalue_from_numpy(prev), "origin": ort.OrtValue.ortvalue_from_numpy(state.origin),
                "fresh": ort.OrtValue.ortvalue_from_numpy(np.zeros(state.fresh, dtype=np.int64)),
                "k": ort.OrtValue.ortvalue_from_numpy(np.array([k + extra], dtype=np.int64)),
                "forced": ort.OrtValue.ortvalue_from_numpy(forced if forced is not None else np.zeros_like(prev)),
                **state.static, **state.dynamic}
        started = time.perf_counter()
        top_log_probs, top_ids, forced_log_probs, alignment, *new = self.step.run_with_ort_values(self.step_outputs, feed)
        if self.run_observer is not None:
            self.run_observer("decoder_step", time.perf_counter() - started)
        state.stepped(dict(zip(self.dynamic_names, new)), len(prev))
        top_log_probs, top_ids = top_log_probs.numpy(), top_ids.numpy()
        if extra:
            top_log_probs[no_eos[:, None] & (top_ids == self.eos)] = -np.inf
            order = np.argsort(-top_log_probs, axis=1, kind="stable")[:, :k]
            top_log_probs, top_ids = np.take_along_axis(top_log_probs, order, 1), np.take_along_axis(top_ids, order, 1)
        if forced is not None:
            rows = forced != self.pad
            top_log_probs[rows] = -np.inf
            top_log_probs[rows, 0] = forced_log_probs.numpy()[rows]
            top_ids[rows, 0] = forced[rows]
        return top_log_probs, top_ids, alignment.numpy() if want_alignment else None

    def length_limit(self, source_length: int, opts: TranslationOptions, prefix: list[int] | None) -> int:
        """Max target length of one sentence (source_length: its ids, EOS included), computed as
        model/decode.py does (float32, truncated), and never shorter than a target prefix plus
        one token."""
        a = self.default_max_len_a if opts.max_len_a is None else opts.max_len_a
        b = self.default_max_len_b if opts.max_len_b is None else opts.max_len_b
        limit = min(int(np.float32(a) * np.float32(source_length) + np.float32(b)), self.max_len - 1)
        return max(limit, min(len(prefix) + 1, self.max_len - 1)) if prefix is not None else limit

    @staticmethod
    def _normalise(score: float, length: int, alpha: float) -> float:
        """GNMT length penalty, as model/decode.py applies it."""
        return score / ((5.0 + length) / 6.0) ** alpha if alpha else score

    # -- search ------------------------------------------------------------------------------

    def search(self, sources: Sequence[list[int]], opts: TranslationOptions,
               prefixes: Sequence[list[int]] | None = None) -> list[list[Hypothesis]]:
        """Decode these sources (ids ending in EOS) as one batch until every one is done."""
        batch = BeamBatch(self, opts.beam_size, opts.return_alignment)
        batch.add([SearchItem(list(src), opts, list(prefixes[i]) if prefixes is not None else None, i)
                   for i, src in enumerate(sources)])
        results: list[list[Hypothesis]] = [[] for _ in sources]
        while len(batch):
            for item, hyps in batch.step():
                results[item.tag] = hyps
        return results

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
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        results: list[list[Hypothesis]] = [[] for _ in sources]
        start = 0
        while start < len(order):
            end = start + 1
            while (end < len(order) and end - start < max_batch_sentences
                   and len(sources[order[end]]) * (end - start + 1) * opts.beam_size <= max_batch_tokens):
                end += 1
            batch = order[start:end]
            batch_prefixes = [prefixes[i] for i in batch] if prefixes is not None else None
            for i, hyps in zip(batch, self.search([sources[i] for i in batch], opts, batch_prefixes)):
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


@dataclasses.dataclass
class SearchItem:
    """One sentence to decode: source ids ending in EOS, its options, an optional target prefix
    (ids without BOS/EOS) forced at the start of every hypothesis, and the caller's tag, which
    comes back with its result."""
    src: list[int]
    opts: TranslationOptions
    prefix: list[int] | None = None
    tag: Any = None


class BeamBatch:
    """Sentences decoded together, K rows (beams) each, one decoder step at a time.

    Sentences join between steps (`add`) and leave as soon as they are done (`step` returns
    them), so a long sentence never holds short ones back and a scheduler can keep the batch
    full: continuous batching. Each sentence has its own step count, length limit, minimum
    length, length penalty and prefix; the beam size and whether alignments are kept belong to
    the batch.

    The search is model/decode.py's beam (greedy is K = 1): 2K best continuations a step, an
    EOS among the first K finishes a hypothesis, the K best others go on; a sentence is done
    with K finished hypotheses or at its length limit, and its rows leave the batch at once.
    """

    def __init__(self, engine: Engine, beam_size: int, alignment: bool = False):
        self.engine, self.K, self.alignment = engine, beam_size, alignment
        K = beam_size
        self.items: list[SearchItem] = []
        self.steps = np.zeros(0, dtype=np.int64)  # (n,) target tokens generated per sentence
        self.limits = np.zeros(0, dtype=np.int64)  # (n,) max target length per sentence
        self.min_lengths = np.zeros(0, dtype=np.int64)  # (n,)
        self.closed = np.zeros(0, dtype=bool)  # (n,) done or cancelled; rows not yet dropped
        self.finished: list[list[Hypothesis]] = []  # (n,) finished hypotheses per sentence
        self.scores = np.zeros((0, K), dtype=np.float32)  # (n, K) running log-probabilities
        self.prev = np.zeros(0, dtype=np.int64)  # (n*K,) last token of each row
        # (n*K, L): right-aligned, the last steps[b] columns of a row are its tokens
        self.history = np.zeros((0, 0), dtype=np.int64)
        self.attention = np.zeros((0, 0, 0), dtype=np.float32)  # (n*K, L, S), only with alignment
        self.state: _DecoderState | None = None
        self.beam_of = np.repeat(np.arange(K), 2 * K)[None, :]  # (1, K*2K)
        self.positions = np.arange(2 * K)[None, :]  # (1, 2K)

    def __len__(self) -> int:
        """Sentences still being decoded."""
        return int((~self.closed).sum())

    @property
    def source_tokens(self) -> int:
        """Source tokens of the sentences being decoded, times K: what a batch-size budget counts."""
        return self.K * sum(len(item.src) for item, closed in zip(self.items, self.closed) if not closed)

    def add(self, items: Sequence[SearchItem]) -> None:
        """Encode these sentences and let them join the batch at the next step."""
        if not items:
            return
        engine, K = self.engine, self.K
        self._compact()
        width = max(len(item.src) for item in items)
        src = np.full((len(items), width), engine.pad, dtype=np.int64)
        for row, item in enumerate(items):
            src[row, : len(item.src)] = item.src
        tensors = {name: np.repeat(value, K, axis=0) for name, value in engine.encode(src).items()}  # rows: n*K
        if self.state is None:
            self.state = _DecoderState(engine, tensors)
        else:
            self.state.join(tensors)
        m = len(items)
        self.items.extend(items)
        self.steps = np.concatenate([self.steps, np.zeros(m, dtype=np.int64)])
        self.limits = np.concatenate([self.limits, [engine.length_limit(len(i.src), i.opts, i.prefix) for i in items]]).astype(np.int64)
        self.min_lengths = np.concatenate([self.min_lengths, [i.opts.min_length for i in items]]).astype(np.int64)
        self.closed = np.concatenate([self.closed, np.zeros(m, dtype=bool)])
        self.finished.extend([] for _ in items)
        scores = np.full((m, K), -np.inf, dtype=np.float32)
        scores[:, 0] = 0.0  # only the first beam is alive at the start
        self.scores = np.concatenate([self.scores, scores])
        self.prev = np.concatenate([self.prev, np.full(m * K, engine.bos, dtype=np.int64)])
        self.history = np.concatenate([self.history, np.full((m * K, self.history.shape[1]), engine.pad, dtype=np.int64)])
        if self.alignment:
            old = _fit(self.attention, 2, self.state.source_width)
            self.attention = np.concatenate([old, np.zeros((m * K,) + old.shape[1:], dtype=np.float32)])

    def cancel(self, tags: set) -> int:
        """Stop decoding the sentences with these tags (no result); returns how many."""
        cancelled = 0
        for b, item in enumerate(self.items):
            if item.tag in tags and not self.closed[b]:
                self.closed[b], cancelled = True, cancelled + 1
        return cancelled

    def step(self) -> list[tuple[SearchItem, list[Hypothesis]]]:
        """One decoder step for every row; returns the sentences done at this step with their
        n-best hypotheses, best first."""
        engine, K, n = self.engine, self.K, len(self.items)
        if n == 0:
            return []
        no_eos = np.repeat(self.steps < self.min_lengths, K)
        top_log_probs, top_ids, alignment = engine._step(self.state, self.prev, 2 * K, no_eos, self.alignment, self._forced())
        if self.alignment:  # the source width may have changed since the last step (joins, narrowing)
            self.attention = np.concatenate([_fit(self.attention, 2, alignment.shape[1]), alignment[:, None, :]], axis=1)
        candidates = (self.scores.reshape(n * K, 1) + top_log_probs).reshape(n, 2 * K * K)
        tokens = top_ids.reshape(n, 2 * K * K)
        # Best first; ties go to the lower (beam, token) index, as torch.topk over (K * V).
        order = np.lexsort((self.beam_of * engine.vocab_size + tokens, -candidates), axis=1)[:, : 2 * K]
        top_scores = np.take_along_axis(candidates, order, 1)
        top_beam = order // (2 * K)
        top_token = np.take_along_axis(tokens, order, 1)
        is_eos = top_token == engine.eos
        for b, j in np.argwhere(is_eos[:, :K] & np.isfinite(top_scores[:, :K]) & ~self.closed[:, None]):
            row = b * K + top_beam[b, j]
            self.finished[b].append(self._hypothesis(b, row, top_scores[b, j], int(self.steps[b]), ended=True))
        pick = np.argsort(np.where(is_eos, self.positions + 2 * K, self.positions), axis=1, kind="stable")[:, :K]
        self.scores = np.take_along_axis(top_scores, pick, 1)
        origin = (np.take_along_axis(top_beam, pick, 1) + np.arange(n)[:, None] * K).reshape(-1)
        self.prev = np.take_along_axis(top_token, pick, 1).reshape(-1).astype(np.int64)
        self.state.reorder(origin)
        longest = int(self.steps.max()) + 1  # cached steps the next step needs, at most
        if self.engine.past_axis and self.state.past_width() > 2 * longest + TRIM_SLACK:
            self.state.trim_past(longest)
        self.history = np.concatenate([self.history[origin], self.prev[:, None]], axis=1)
        if self.alignment:
            self.attention = self.attention[origin]
        self.steps += 1
        at_limit = self.limits <= self.steps
        for b in np.flatnonzero(at_limit & ~self.closed):  # live hypotheses finish as they are
            for k in np.flatnonzero(np.isfinite(self.scores[b])):
                self.finished[b].append(self._hypothesis(b, b * K + k, self.scores[b, k], int(self.steps[b]), ended=False))
        done = ~self.closed & (at_limit | np.array([len(f) >= K for f in self.finished]))
        self.closed |= done
        results = [(self.items[b], sorted(self.finished[b], key=lambda h: -h.score)[: self.items[b].opts.nbest])
                   for b in np.flatnonzero(done)]
        self._compact()
        return results

    def _forced(self) -> np.ndarray | None:
        """The prefix token each row must take at this step (PAD: none), or None if no row has one."""
        if not any(item.prefix and step < len(item.prefix) for item, step in zip(self.items, self.steps)):
            return None
        forced = [item.prefix[step] if item.prefix and step < len(item.prefix) else self.engine.pad
                  for item, step in zip(self.items, self.steps.tolist())]
        return np.repeat(np.array(forced, dtype=np.int64), self.K)

    def _hypothesis(self, b: int, row: int, score: float, generated: int, ended: bool) -> Hypothesis:
        """A finished hypothesis of sentence b from `row`: its last `generated` tokens, plus the
        EOS just chosen if it ended (which counts in the length and has an alignment row)."""
        item = self.items[b]
        length = generated + ended
        tokens = self.history[row, self.history.shape[1] - generated:].tolist() if generated else []
        alignment = None
        if self.alignment:
            alignment = self.attention[row, self.attention.shape[1] - length:, : len(item.src)].tolist()
        return Hypothesis(tokens, Engine._normalise(float(score), length, item.opts.length_penalty), alignment)

    def _compact(self) -> None:
        """Drop the rows of closed (done or cancelled) sentences. Sentences from the end of the
        batch fill the holes, so only the rows that move are copied, and a finished sentence
        costs no further decoder work."""
        n, K = len(self.items), self.K
        closed = int(self.closed.sum())
        if not closed:
            return
        alive = n - closed
        order = np.arange(alive)
        holes = np.flatnonzero(self.closed[:alive])
        order[holes] = np.flatnonzero(~self.closed[alive:]) + alive
        rows = (order[:, None] * K + np.arange(K)).reshape(-1)
        self.items = [self.items[b] for b in order]
        self.finished = [self.finished[b] for b in order]
        self.steps, self.limits, self.min_lengths = self.steps[order], self.limits[order], self.min_lengths[order]
        self.closed, self.scores = self.closed[order], self.scores[order]
        longest = int(self.steps.max(initial=0))  # older columns belong to sentences that left
        self.prev = self.prev[rows]
        self.history = self.history[rows][:, self.history.shape[1] - longest:]
        if self.alignment:
            self.attention = self.attention[rows][:, self.attention.shape[1] - longest:]
        if not self.items:
            self.state = None
            self.history = np.zeros((0, 0), dtype=np.int64)
            self.attention = np.zeros((0, 0, 0), dtype=np.float32)
        else:
            self.state.move(rows, max(len(item.src) for item in self.items))


def _fit(array: np.ndarray, axis: int | None, width: int, left: bool = False) -> np.ndarray:
    """`array` with `axis` cut or zero-padded (False for masks) to `width`: keeping the first
    entries and padding after them, or with `left` the last ones and padding before them.
    Source axes are padded on the right (the source mask covers it), cached-step axes on the
    left (the cache mask covers it). axis None: the array as it is."""
    if axis is None or array.shape[axis] == width:
        return array
    size = array.shape[axis]
    if size > width:
        cut = slice(size - width, None) if left else slice(0, width)
        return array[(slice(None),) * axis + (cut,)]
    pad = [(0, 0)] * array.ndim
    pad[axis] = (width - size, 0) if left else (0, width - size)
    return np.pad(array, pad)


class _DecoderState:
    """The decoder state of the rows being decoded.

    Static tensors (cross-attention keys/values, RNN memory) live in host buffers with room to
    spare; the rows in use are the first `rows`, wrapped as OrtValues without a copy (CPU) or
    copied to the device once per change (CUDA). Joining rows are written after them, and rows
    leaving are replaced by rows moved from the end: both cost only the rows that change.

    The dynamic state (key/value cache, RNN hidden state) stays in the OrtValues onnxruntime
    returned, on the provider's device. The step graph gathers it by `origin`: row i continues
    row origin[i] of the previous step's state followed by `fresh` all-zero rows. That is how
    beams are reordered, finished rows dropped and (Transformer) new sentences added with
    empty caches, with no host copy. An RNN's initial state comes from the encoder, so its
    joining rows are merged on the host (the RNN state is one vector a row)."""

    def __init__(self, engine: Engine, tensors: dict[str, np.ndarray]):
        self.engine = engine
        self.rows = len(next(iter(tensors.values())))
        self.buffers = {name: np.ascontiguousarray(tensors[name]) for name in engine.static}
        self.dynamic = {name: engine._ort_value(tensors[name]) for name in engine.dynamic_names}
        self.previous_rows = self.rows  # rows of the dynamic state the next step reads
        self.origin = np.arange(self.rows, dtype=np.int64)
        self.fresh = 0
        self._wrap_static()

    def _wrap_static(self) -> None:
        self.static = {name: self.engine._ort_value(buffer[: self.rows]) for name, buffer in self.buffers.items()}

    @property
    def source_width(self) -> int:
        name, axis = next(iter(self.engine.source_axis.items()))
        return self.buffers[name].shape[axis]

    def stepped(self, dynamic: dict[str, ort.OrtValue], rows: int) -> None:
        self.dynamic = dynamic
        self.previous_rows = rows
        self.origin = np.arange(rows, dtype=np.int64)
        self.fresh = 0

    def reorder(self, origin: np.ndarray) -> None:
        """Row i continues row origin[i] (beam search)."""
        self.origin = self.origin[origin]

    def move(self, rows: np.ndarray, source_width: int) -> None:
        """Row i becomes the current row rows[i]; rows not listed leave. `source_width`: the
        longest source left; the buffers narrow to it once they are twice as wide (a long
        sentence that has left must not make every later step attend over its padding)."""
        self.origin = self.origin[rows]
        moved = np.flatnonzero(rows != np.arange(len(rows)))
        for buffer in self.buffers.values():
            buffer[moved] = buffer[rows[moved]]  # the right side is read (copied) first
        self.rows = len(rows)
        if 2 * source_width < self.source_width:
            self.buffers = {name: np.ascontiguousarray(_fit(buffer, self.engine.source_axis.get(name), source_width))
                            for name, buffer in self.buffers.items()}
        self._wrap_static()

    def join(self, new: dict[str, np.ndarray]) -> None:
        """Append the rows of freshly encoded sentences (`new`: encoder outputs and initial
        dynamic state). Source axes are padded to the widest source (masked by the source mask)."""
        engine, added = self.engine, len(next(iter(new.values())))
        width = max(self.source_width, *(new[name].shape[axis] for name, axis in engine.source_axis.items()))
        capacity = len(next(iter(self.buffers.values())))
        if width > self.source_width or self.rows + added > capacity:
            if self.rows + added > capacity:
                capacity = max(2 * capacity, self.rows + added)
            for name, buffer in self.buffers.items():
                self.buffers[name] = _resized(buffer[: self.rows], capacity, engine.source_axis.get(name), width)
        for name, buffer in self.buffers.items():
            buffer[self.rows : self.rows + added] = _fit(new[name], engine.source_axis.get(name), width)
        self.rows += added
        self._wrap_static()
        if engine.dynamic_from_encoder:
            self.dynamic = {name: engine._ort_value(np.concatenate([value.numpy()[self.origin], new[name]]))
                            for name, value in self.dynamic.items()}
            self.previous_rows, self.origin, self.fresh = self.rows, np.arange(self.rows, dtype=np.int64), 0
        else:  # all-zero initial state: the step graph appends it (see `fresh`)
            start = self.previous_rows + self.fresh
            self.origin = np.concatenate([self.origin, np.arange(start, start + added, dtype=np.int64)])
            self.fresh += added

    def past_width(self) -> int:
        widths = [value.shape()[self.engine.past_axis[name]] for name, value in self.dynamic.items() if name in self.engine.past_axis]
        return max(widths, default=0)

    def trim_past(self, keep: int) -> None:
        """Keep the last `keep` cached steps (the longest a remaining row has): a batch that
        keeps running while sentences come and go would otherwise cache steps forever."""
        dynamic = {}
        for name, value in self.dynamic.items():
            host = value.numpy()
            if self.fresh:
                host = np.concatenate([host, np.zeros((self.fresh,) + host.shape[1:], dtype=host.dtype)])
            host = host[self.origin]
            dynamic[name] = self.engine._ort_value(_fit(host, self.engine.past_axis.get(name), keep, left=True))
        self.dynamic = dynamic
        self.previous_rows, self.origin, self.fresh = self.rows, np.arange(self.rows, dtype=np.int64), 0


def _resized(array: np.ndarray, capacity: int, axis: int | None, width: int) -> np.ndarray:
    """A zeroed buffer of `capacity` rows (and `width` along the source axis) holding `array`."""
    fitted = _fit(array, axis, width)
    out = np.zeros((capacity,) + fitted.shape[1:], dtype=array.dtype)
    out[: len(array)] = fitted
    return out
