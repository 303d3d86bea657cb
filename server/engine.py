"""Translation on onnxruntime from a model bundle: no torch.

The encoder graph runs once per batch and returns the static decoder state (cross-attention
keys/values, or the RNN memory and its attention-key projection); the step graph then runs once
per target position with the dynamic state (self-attention cache or RNN hidden state).
Decoding follows model/decode.py's greedy rules exactly, so fp32 output is token-identical to
the torch reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import sentencepiece as spm

from server.bundle import Bundle

log = logging.getLogger(__name__)


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # onnxruntime's per-node warnings are noise for users
    return options


def choose_providers(device: str = "auto") -> list[str]:
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
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
        self.encoder = ort.InferenceSession(str(bundle.graph_path(precision, "encoder")), options, providers=providers)
        self.step = ort.InferenceSession(str(bundle.graph_path(precision, "decoder_step")), options, providers=providers)
        log.info("%s %s on %s", bundle.path, precision, self.step.get_providers()[0])
        self.tokenizer = spm.SentencePieceProcessor(model_file=str(bundle.tokenizer_path))
        state = manifest["state"]
        self.static = [t["name"] for t in state["static"]]
        self.dynamic = state["dynamic"]
        self.dynamic_from_encoder = state["dynamic_from_encoder"]
        self.encoder_outputs = [o.name for o in self.encoder.get_outputs()]
        ids = manifest["special_ids"]
        self.pad, self.bos, self.eos = ids["pad"], ids["bos"], ids["eos"]
        self.max_len = manifest["max_len"]
        self.max_len_a, self.max_len_b = manifest["decoding"]["max_len_a"], manifest["decoding"]["max_len_b"]

    def _initial_state(self, src: np.ndarray) -> dict[str, np.ndarray]:
        state = dict(zip(self.encoder_outputs, self.encoder.run(None, {"src": src})))
        if not self.dynamic_from_encoder:  # empty key/value caches: (B, H, 0, Dh)
            for tensor in self.dynamic:
                shape = [src.shape[0] if a == "batch" else 0 if isinstance(a, str) else a for a in tensor["shape"]]
                state[tensor["name"]] = np.zeros(shape, dtype=tensor["dtype"])
        return state

    def greedy(self, src: np.ndarray) -> list[list[int]]:
        """src (B, S) int64, PAD-padded, each row ending in EOS -> token ids without EOS."""
        B = src.shape[0]
        state = self._initial_state(src)
        # Per-sentence length limit, computed as model/decode.py does (float32, truncated).
        lengths = (src != self.pad).sum(1).astype(np.float32)
        limits = np.minimum((np.float32(self.max_len_a) * lengths + np.float32(self.max_len_b)).astype(np.int64), self.max_len - 1)
        prev = np.full(B, self.bos, dtype=np.int64)
        finished = np.zeros(B, dtype=bool)
        out = []
        for step in range(int(limits.max())):
            feed = {"prev": prev, **{n: state[n] for n in self.static}, **{t["name"]: state[t["name"]] for t in self.dynamic}}
            results = self.step.run(None, feed)
            for tensor, value in zip(self.dynamic, results[2:]):
                state[tensor["name"]] = value
            prev = np.where(finished, self.pad, results[0].argmax(-1)).astype(np.int64)
            out.append(prev)
            finished |= (prev == self.eos) | (limits <= step + 1)
            if finished.all():
                break
        tokens = np.stack(out, 1) if out else np.zeros((B, 0), np.int64)
        hyps = []
        for row in tokens.tolist():
            end = row.index(self.eos) if self.eos in row else len(row)
            hyps.append([t for t in row[:end] if t != self.pad])
        return hyps

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids[: self.max_len - 1] + [self.eos] for ids in self.tokenizer.encode(list(texts))]

    def greedy_ids(self, sources: Sequence[list[int]], batch_size: int = 32) -> list[list[int]]:
        """Length-sorted batches, results in input order."""
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        results: list[list[int]] = [[] for _ in sources]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(sources[i]) for i in batch)
            src = np.full((len(batch), width), self.pad, dtype=np.int64)
            for row, i in enumerate(batch):
                src[row, : len(sources[i])] = sources[i]
            for i, hyp in zip(batch, self.greedy(src)):
                results[i] = hyp
        return results

    def translate(self, texts: Sequence[str], batch_size: int = 32) -> list[str]:
        return self.tokenizer.decode(self.greedy_ids(self.encode_texts(texts), batch_size))
