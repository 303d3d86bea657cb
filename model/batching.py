"""Token-based batches of length-bucketed sentence pairs, and padding to tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnserve.model.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

Example = tuple[list[int], list[int]]  # (source ids + EOS, target ids without BOS/EOS)


def encode_pairs(tokenizer: Tokenizer, rows: Sequence[tuple[str, str]], max_len: int) -> list[Example]:
    """Tokenise (src, tgt) pairs; sequences are cut to fit max_len with their EOS/BOS."""
    srcs = tokenizer.encode([s for s, _ in rows])
    tgts = tokenizer.encode([t for _, t in rows])
    return [(s[: max_len - 1] + [EOS_ID], t[: max_len - 1]) for s, t in zip(srcs, tgts)]


def token_batches(lengths: Sequence[int], max_tokens: int, seed: int | None = None) -> list[list[int]]:
    """Group example indices into batches of at most max_tokens padded tokens.

    Examples are sorted by length so a batch holds similar lengths (little padding); with a
    seed, ties are broken randomly and the batch order is shuffled, deterministically for the
    same seed, so a resumed run sees exactly the batches it would have seen."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    noise = torch.rand(len(lengths), generator=generator) if generator else torch.zeros(len(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], float(noise[i])))
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if batch and longest_if_added * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, longest_if_added = [], lengths[i]
        batch.append(i)
        longest = longest_if_added
    if batch:
        batches.append(batch)
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def pad(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad with PAD into (B, T)."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), PAD_ID, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> src (B, S), tgt_in (B, T) = BOS + y, tgt_out (B, T) = y + EOS."""
    src = pad([s for s, _ in examples])
    tgt_in = pad([[BOS_ID] + t for _, t in examples])
    tgt_out = pad([t + [EOS_ID] for _, t in examples])
    return src, tgt_in, tgt_out
