"""Joint SentencePiece vocabulary for source and target (the Transformer shares its embeddings).

Special ids are fixed so that every model, the exporter and the server agree on them without
reading the model: pad=0, unk=1, bos=2, eos=3 (attnserve/decoding_rules.py).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from attnserve.decoding_rules import BOS_ID, EOS_ID, PAD_ID, UNK_ID

log = logging.getLogger(__name__)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "PLACEHOLDER_PIECES", "Tokenizer", "train_tokenizer"]

# printf conversions are common in software messages and must be copied through intact:
# keeping the frequent ones as single pieces makes that trivial for the model.
PLACEHOLDER_PIECES = ["%s", "%d", "%u", "%i", "%c", "%x", "%lu", "%ld", "%llu", "%zu", "%f", "%%",
                      "%1$s", "%2$s", "%3$s", "%1$d", "%2$d"]


def train_tokenizer(texts: Iterable[str], model_path: Path, vocab_size: int = 8000) -> None:
    """Train a unigram SentencePiece model on texts and write it to model_path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,  # unseen characters become bytes, never <unk>
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=PLACEHOLDER_PIECES,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=2,
        hard_vocab_limit=False,  # small corpora get the vocabulary they can support
        minloglevel=2,
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    log.info("tokenizer with %d pieces written to %s", vocab_size, model_path)


class Tokenizer:
    """Thin wrapper: text <-> ids without bos/eos (the models add those themselves)."""

    def __init__(self, model_path: Path | str):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        if (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{self.path}: special ids differ from pad=0 bos=2 eos=3")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode(ids)
