"""The decoding rules that the torch reference (attnserve.model) and the onnxruntime engine
(attnserve.server) must apply identically, written once.

    special ids       pad=0 unk=1 bos=2 eos=3, fixed for every model, tokenizer and bundle
    source ids        a source is cut to max_len - 1 tokens and gets EOS appended
    length limit      a sentence may generate int(a * source length + b) target tokens (EOS
                      counted), in float32 arithmetic, capped at max_len - 1
    length penalty    GNMT: log-probability / ((5 + length) / 6) ** alpha, length counting EOS

fp32 output of the engine is token-identical to the reference only because both sides use
these functions. Pure Python (no torch, numpy or onnxruntime), so that both packages may import
it without importing each other.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids with a fixed meaning in every vocabulary (the SentencePiece trainer is told
    these, and a bundle's manifest records them)."""

    pad: int = 0
    unk: int = 1
    bos: int = 2
    eos: int = 3


SPECIAL_IDS = SpecialIds()
PAD_ID, UNK_ID, BOS_ID, EOS_ID = SPECIAL_IDS.pad, SPECIAL_IDS.unk, SPECIAL_IDS.bos, SPECIAL_IDS.eos


@dataclasses.dataclass(frozen=True)
class LengthLimit:
    """Max target length = max_len_a * source length + max_len_b (source length counting its
    EOS), per sentence, so that a sentence's output never depends on its batch. These defaults
    are the reference's and go into every bundle's manifest ("decoding")."""

    max_len_a: float = 2.0
    max_len_b: int = 10


DEFAULT_LENGTH_LIMIT = LengthLimit()


def max_source_tokens(max_len: int) -> int:
    """Source tokens a model of `max_len` positions reads, before the EOS it appends."""
    return max_len - 1


def source_ids(ids: Sequence[int], max_len: int, eos: int = EOS_ID) -> list[int]:
    """A tokenised source as the model reads it: cut to max_source_tokens, then EOS."""
    return list(ids[: max_source_tokens(max_len)]) + [eos]


def _float32(value: float) -> float:
    # Round to the nearest float32. Each float32 product or sum of float32 operands, computed
    # in float64 and rounded once to float32, equals the float32 operation exactly (53 >= 2*24+2
    # bits), so this reproduces torch's float32 arithmetic in model/decode.py.
    return struct.unpack("f", struct.pack("f", value))[0]


def max_target_length(source_length: int, max_len: int, limit: LengthLimit = DEFAULT_LENGTH_LIMIT) -> int:
    """Target tokens one sentence may generate (EOS counted), source_length counting its EOS:
    int(a * source_length + b) in float32, truncated, capped at max_len - 1."""
    product = _float32(_float32(limit.max_len_a) * _float32(source_length))
    return min(int(_float32(product + _float32(limit.max_len_b))), max_len - 1)


def length_normalised(score: float, length: int, alpha: float) -> float:
    """GNMT length penalty: `score` (a log-probability) / ((5 + length) / 6) ** alpha, `length`
    counting the EOS a hypothesis ended with; alpha 0 leaves the raw log-probability."""
    return score / ((5.0 + length) / 6.0) ** alpha if alpha else score
