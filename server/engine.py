"""Translation on onnxruntime from a model bundle: no torch.

The engine is three rooms behind one facade:

    runtime.py   the execution provider, the encoder and decoder-step sessions, OrtValues
    state.py     the decoder state of a batch on the device: growing buffers, joins, compaction,
                 cache trimming
    search.py    greedy and beam search (BeamBatch) over the public step interface
                 (search.DecoderStep), which Engine implements: start_state, join_state,
                 decode_step

and this module: the bundle's manifest read into those, tokenisation, the length policy of the
bundle, and translation of whole lists in length-sorted batches. The scheduler drives BeamBatch
directly (continuous batching); the batch tool and export validation use translate_ids.

The encoder graph runs once per batch (or per join) and returns the static decoder state; the
step graph then runs once per target position with the dynamic state. fp32 output is
token-identical to the torch reference (model/decode.py): both apply attnserve/decoding_rules.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from attnserve.decoding_rules import LengthLimit, SpecialIds, max_source_tokens, source_ids
from attnserve.server.bundle import Bundle
from attnserve.server.runtime import OnnxRuntime, RunObserver, choose_providers, session_options
from attnserve.server.search import (
    BeamBatch, Constraint, DecoderStep, Hypothesis, SearchItem, TranslationOptions, decode_together,
)
from attnserve.server.state import DecoderState, StateLayout

log = logging.getLogger(__name__)

# What callers import from here; the engine's rooms are importable on their own too.
__all__ = ["BeamBatch", "Constraint", "DecoderStep", "Engine", "Hypothesis", "SearchItem", "TranslationOptions", "choose_providers",
           "session_options"]


class Engine:
    """One precision of a bundle on one execution provider; implements search.DecoderStep."""

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "auto", threads: int = 0,
                 run_observer: RunObserver | None = None, spin_step: bool = False):
        self.bundle, self.precision = bundle, precision
        manifest = bundle.manifest
        self.runtime = OnnxRuntime(bundle, precision, device, threads, run_observer, spin_step)
        self.provider = self.runtime.provider
        log.info("loaded %s (%s) on %s", bundle.path, precision, self.provider)
        self.tokenizer = spm.SentencePieceProcessor(model_file=str(bundle.tokenizer_path))
        self._piece_texts: list[str] | None = None
        self.layout = StateLayout.of(manifest.state)
        # search.DecoderStep
        self.special_ids: SpecialIds = manifest.special_ids
        self.vocab_size: int = manifest.vocab_size
        self.max_len: int = manifest.max_len
        self.default_length_limit: LengthLimit = manifest.decoding
        self.pad, self.bos, self.eos = self.special_ids.pad, self.special_ids.bos, self.special_ids.eos

    @property
    def max_source_tokens(self) -> int:
        """Source tokens a sentence may have before its EOS (longer ones are cut or refused)."""
        return max_source_tokens(self.max_len)

    def warm_up(self) -> None:
        """One short translation so that the first request does not pay for allocations."""
        self.translate_ids([[self.eos]], TranslationOptions(beam_size=2, max_len_a=0, max_len_b=2))

    def close(self) -> None:
        """Release the onnxruntime sessions now (a retired model version); idempotent. The
        engine cannot translate afterwards."""
        self.runtime.close()

    # -- the step interface (search.DecoderStep) -----------------------------------------------

    def encode(self, source_ids: np.ndarray) -> dict[str, np.ndarray]:
        """source_ids (B, S) -> encoder outputs plus the initial dynamic state, on the host."""
        return self.runtime.encode(source_ids)

    def _encoded_rows(self, source_ids: np.ndarray, copies: int) -> dict[str, np.ndarray]:
        """The encoder's state for n sentences of `copies` rows each: the dynamic state n*copies
        rows; the static state n rows if the step graph shares it by sentence, else n*copies."""
        shared = set(self.layout.static_names) if self.layout.static_per_sentence else set()
        return {name: value if name in shared else np.repeat(value, copies, axis=0)
                for name, value in self.runtime.encode(source_ids).items()}

    def start_state(self, source_ids: np.ndarray, copies: int) -> DecoderState:
        return DecoderState(self.layout, self.runtime.to_device, self._encoded_rows(source_ids, copies), copies)

    def join_state(self, state: DecoderState, source_ids: np.ndarray, copies: int) -> None:
        state.join(self._encoded_rows(source_ids, copies))

    def decode_step(self, state: DecoderState, previous_tokens: np.ndarray, candidates: int,
                    forced_tokens: np.ndarray | None, want_alignment: bool,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        return self.runtime.decode_step(state, previous_tokens, candidates, forced_tokens, want_alignment)

    # -- batching and text -------------------------------------------------------------------

    def translate_ids(self, sources: Sequence[list[int]], opts: TranslationOptions | None = None,
                      max_batch_tokens: int = 4096, max_batch_sentences: int = 64,
                      prefixes: Sequence[list[int]] | None = None,
                      constraints: Sequence[list[Constraint] | None] | None = None) -> list[list[Hypothesis]]:
        """Sources (ids ending in EOS) in length-sorted batches of at most max_batch_tokens padded
        source tokens; results in input order. A target prefix (ids, no BOS/EOS) per source, if
        given, is forced at the start of every hypothesis; constraints (target id sequences per
        source) are made to appear in it (search.py)."""
        opts = opts or TranslationOptions()
        opts.validate()
        if prefixes is not None:
            if len(prefixes) != len(sources):
                raise ValueError(f"{len(prefixes)} target prefixes for {len(sources)} sources")
            if any(self.eos in p or self.pad in p or len(p) >= self.max_len - 1 for p in prefixes):
                raise ValueError(f"a target prefix may not contain EOS or PAD, nor exceed {self.max_len - 2} tokens")
        if constraints is not None:
            if len(constraints) != len(sources):
                raise ValueError(f"{len(constraints)} constraint lists for {len(sources)} sources")
            if any(self.eos in c.tokens or self.pad in c.tokens or self.bos in c.tokens
                   for terms in constraints for c in terms or ()):
                raise ValueError("a constraint may not contain BOS, EOS or PAD")
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
            batch_constraints = [constraints[i] for i in batch] if constraints is not None else None
            for i, hyps in zip(batch, decode_together(self, [sources[i] for i in batch], opts, batch_prefixes,
                                                      batch_constraints)):
                results[i] = hyps
            start = end
        return results

    def encode_constraints(self, terms: Sequence[Any]) -> list[Constraint] | None:
        """Target strings as the subword ids they are after a space, as in a sentence. A term
        is a string, or has `.target` (the string: the text pipeline's TermConstraint)."""
        if not terms:
            return None
        targets = [getattr(term, "target", term) for term in terms]
        return [Constraint(tuple(ids), target.casefold()) for target, ids in zip(targets, self.tokenizer.encode(targets))]

    def piece_texts(self) -> list[str]:
        """Id -> the text its piece adds (▁ as a space; special ids add nothing): what the
        search reads to see a constraint written in other subwords. Built once."""
        if self._piece_texts is None:
            special = {self.pad, self.bos, self.eos}
            self._piece_texts = ["" if i in special or self.tokenizer.is_unknown(i) else
                                 self.tokenizer.id_to_piece(i).replace("\u2581", " ")
                                 for i in range(self.tokenizer.get_piece_size())]
        return self._piece_texts

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> source ids as the model reads them (cut to max_len - 1, EOS appended)."""
        return [source_ids(ids, self.max_len, self.eos) for ids in self.tokenizer.encode(list(texts))]

    def translate(self, texts: Sequence[str], opts: TranslationOptions | None = None,
                  prefixes: Sequence[str] | None = None, constraints: Sequence[Sequence[Any]] | None = None,
                  **batching) -> list[list[Hypothesis]]:
        """Texts -> n-best hypotheses with their text; `constraints`: per text, the target
        strings (glossary translations) every hypothesis contains, in order (see
        encode_constraints)."""
        prefix_ids = self.tokenizer.encode(list(prefixes)) if prefixes is not None else None
        constraint_ids = [self.encode_constraints(terms) for terms in constraints] if constraints is not None else None
        results = self.translate_ids(self.encode_texts(texts), opts, prefixes=prefix_ids, constraints=constraint_ids,
                                     **batching)
        for hyps in results:
            for hyp, text in zip(hyps, self.tokenizer.decode([h.tokens for h in hyps])):
                hyp.text = text
        return results

    def translate_text(self, texts: Sequence[str], opts: TranslationOptions | None = None) -> list[str]:
        """Best translation of each text."""
        return [hyps[0].text for hyps in self.translate(texts, opts)]
