"""onnxruntime for one bundle precision: the execution provider, the encoder and decoder-step
sessions, and every move of an array into or out of onnxruntime (OrtValues).

Steps run with `run_with_ort_values`: the dynamic state a step returns stays in the OrtValues
onnxruntime allocated, on the provider's device, and is fed back as it is (see state.py); only
the small per-step inputs and the search outputs (candidates, alignment row) cross to the host.
The graphs' input and output names come from the bundle format (attnserve/bundle_format.py),
checked against the sessions at load, so a bundle exported by another version is refused then
and not in the middle of a request.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from attnserve.bundle_format import (
    BATCH_AXIS, CANDIDATE_COUNT, ENCODER_GRAPH, FORCED_TOKENS, PARENT_ROWS, PREVIOUS_TOKENS, SOURCE_IDS, STEP_GRAPH,
    ZERO_ROWS, StepSignature,
)
from attnserve.server.bundle import Bundle, BundleError

if TYPE_CHECKING:
    from attnserve.server.state import DecoderState

log = logging.getLogger(__name__)

# Called with (graph name: ENCODER_GRAPH or STEP_GRAPH, seconds) after every onnxruntime run,
# e.g. by the server's metrics.
RunObserver = Callable[[str, float], None]


def session_options(threads: int = 0, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's per-node warnings are noise for users
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
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


def host_value(array: np.ndarray) -> ort.OrtValue:
    """A host OrtValue over a contiguous host array, without a copy (the small per-step inputs)."""
    return ort.OrtValue.ortvalue_from_numpy(array)


# The step's constant inputs, made once per size and shared by every runtime (host values, read
# only): a batch-1 step is short enough that making them every step showed in its profile. A
# batch has at most a few hundred rows, so the bound only guards against a runaway caller.
@functools.lru_cache(maxsize=512)
def int64_zeros(size: int) -> ort.OrtValue:
    return host_value(np.zeros(size, dtype=np.int64))


@functools.lru_cache(maxsize=512)
def candidate_count(candidates: int) -> ort.OrtValue:
    return host_value(np.array([candidates], dtype=np.int64))


class _ClosedSession:
    """Stands in for a released session: a closed engine says so instead of failing obscurely."""

    def __init__(self, what: str):
        self.what = what

    def __getattr__(self, name: str):
        raise RuntimeError(f"{self.what}: the engine was closed; its onnxruntime sessions are released")


class OnnxRuntime:
    """The encoder and decoder-step sessions of one precision of a bundle."""

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "auto", threads: int = 0,
                 run_observer: RunObserver | None = None, spin_step: bool = False):
        self.signature: StepSignature = bundle.manifest.state
        self.run_observer = run_observer
        self.description = f"{bundle.path} ({precision})"
        providers = choose_providers(device)
        # No spinning by default: the encoder and step sessions take turns, and one's idle
        # workers spinning for work would take the cores the other runs on (measured on 2
        # cores, sentences joining a running batch: decoder steps 1.7x slower with both
        # spinning, and 1.8x the serving throughput without). `spin_step` lets the step
        # session's workers alone spin between its many short runs: with 2 threads at batch 1
        # a worker that sleeps after every node costs more than the second core gives back
        # (`attnserve bench`, Intel AMX VM, beam 4, batch 1, fp32: 48.1 sentences/s without,
        # 63.3 with, 52.0 on one thread; docs/performance.md).
        files = bundle.graph_files(precision)
        try:
            self.encoder_session = ort.InferenceSession(files.encoder, session_options(threads, spin=False),
                                                        providers=providers)
            self.step_session = ort.InferenceSession(files.decoder_step, session_options(threads, spin=spin_step),
                                                     providers=providers)
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph) as exc:
            raise BundleError(f"{bundle.path}: onnxruntime cannot load its {precision} graphs: {exc}") from exc
        self.provider: str = self.step_session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError("CUDA requested but onnxruntime could not create the CUDA provider (see its log above)")
        self.device_type = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.encoder_outputs = list(self.signature.encoder_outputs)
        self.search_outputs = list(self.signature.search_outputs)  # a list: what run_with_ort_values takes
        self._check_graphs(bundle)
        # The dynamic state of a Transformer starts as zeros: no cached steps (an empty cache).
        self._zero_initial_dynamic = () if self.signature.dynamic_from_encoder else self.signature.dynamic

    def _check_graphs(self, bundle: Bundle) -> None:
        """Every name this runtime feeds or fetches must be in the graphs."""
        encoder_inputs = {i.name for i in self.encoder_session.get_inputs()}
        encoder_outputs = {o.name for o in self.encoder_session.get_outputs()}
        step_inputs = {i.name for i in self.step_session.get_inputs()}
        step_outputs = {o.name for o in self.step_session.get_outputs()}
        missing = (({SOURCE_IDS} - encoder_inputs) | (set(self.encoder_outputs) - encoder_outputs)
                   | (set(self.signature.step_inputs) - step_inputs) | (set(self.search_outputs) - step_outputs))
        if missing:
            raise BundleError(f"{bundle.path}: the encoder or decoder_step graph lacks {sorted(missing)}; "
                              "it was exported by another version: export it again")

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        """An OrtValue on the provider's device holding `array` (no copy on CPU when contiguous)."""
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def encode(self, source_ids: np.ndarray) -> dict[str, np.ndarray]:
        """source_ids (B, S) -> the static decoder state and the initial dynamic state, on the
        host: from the encoder (RNN) or zeros with empty cache axes (B, H, 0, Dh) (Transformer)."""
        started = time.perf_counter()
        state = dict(zip(self.encoder_outputs, self.encoder_session.run(self.encoder_outputs, {SOURCE_IDS: source_ids})))
        if self.run_observer is not None:
            self.run_observer(ENCODER_GRAPH, time.perf_counter() - started)
        for tensor in self._zero_initial_dynamic:
            shape = [len(source_ids) if a == BATCH_AXIS else 0 if isinstance(a, str) else a for a in tensor.shape]
            state[tensor.name] = np.zeros(shape, dtype=tensor.dtype)
        return state

    @staticmethod
    def step_feed(state: DecoderState, previous_tokens: np.ndarray, candidates: int,
                  forced_tokens: np.ndarray | None) -> dict[str, ort.OrtValue]:
        """The step graph's inputs for one step of every row of `state` (decode_step's arguments)."""
        return {PREVIOUS_TOKENS: host_value(previous_tokens), PARENT_ROWS: host_value(state.parent_rows),
                ZERO_ROWS: int64_zeros(state.zero_rows), CANDIDATE_COUNT: candidate_count(candidates),
                FORCED_TOKENS: (host_value(forced_tokens) if forced_tokens is not None
                                else int64_zeros(len(previous_tokens))),
                **state.static, **state.dynamic}

    def decode_step(self, state: DecoderState, previous_tokens: np.ndarray, candidates: int,
                    forced_tokens: np.ndarray | None, want_alignment: bool,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One decoder step of every row of `state`, which it moves one step on.

        previous_tokens (B,) int64; candidates: how many best continuations per row; forced_tokens
        (B,) int64 or None: a token per row whose log-probability to return. Returns
        top_log_probs (B, candidates) float32 and top_ids (B, candidates) int64, best first;
        forced_log_probs (B,) if forced_tokens was given; the alignment row (B, S) if wanted."""
        feed = self.step_feed(state, previous_tokens, candidates, forced_tokens)
        started = time.perf_counter()
        top_log_probs, top_ids, forced_log_probs, alignment, *new_dynamic = self._run_step(feed)
        if self.run_observer is not None:
            self.run_observer(STEP_GRAPH, time.perf_counter() - started)
        state.stepped(new_dynamic, len(previous_tokens))
        return (top_log_probs.numpy(), top_ids.numpy(), forced_log_probs.numpy() if forced_tokens is not None else None,
                alignment.numpy() if want_alignment else None)

    def _run_step(self, feed: dict[str, ort.OrtValue]) -> list[ort.OrtValue]:
        """The step session run on `feed`: its search outputs, then the new dynamic state.

        This is InferenceSession.run_with_ort_values less two costs that show in a batch-1
        step: its output list is made by iterating onnxruntime's C++ vector of outputs, which
        takes ~80 µs for the step's 12 (indexing it takes ~1 µs an output), and its input
        checks are for WebGPU buffers and for missing inputs, which _check_graphs ruled out at
        load. An execution-provider failure goes through the public method, which falls back
        to the CPU provider as onnxruntime does."""
        try:
            outputs = self.step_session._sess.run_with_ort_values(
                {name: value._get_c_value() for name, value in feed.items()}, self.search_outputs, None)
        except ort.capi.onnxruntime_pybind11_state.EPFail:
            return self.step_session.run_with_ort_values(self.search_outputs, feed)
        return [ort.OrtValue(outputs[i]) for i in range(len(outputs))]

    def close(self) -> None:
        """Release both sessions (their weights and arenas) now rather than when the garbage
        collector finds them; the runtime cannot be used afterwards."""
        self.encoder_session = self.step_session = _ClosedSession(self.description)  # type: ignore[assignment]
