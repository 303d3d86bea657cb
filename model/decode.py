"""Reference decoding in torch: greedy and beam search over any EncoderDecoder.

This is the reference the ONNX engine must reproduce token for token, so it is written plainly:
one decode_step per target position for the whole batch, log-softmax scores, and beams whose
finished hypotheses keep their score and stay in the beam until every beam has finished.
"""

from __future__ import annotations

import dataclasses

import torch

from model.base import EncoderDecoder
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclasses.dataclass
class DecodeOptions:
    beam_size: int = 1
    length_penalty: float = 1.0  # GNMT alpha: score / ((5 + len) / 6) ** alpha; 0 = raw log-prob
    max_len_a: float = 2.0  # max target length = a * source length + b (capped by the model)
    max_len_b: int = 10
    nbest: int = 1
    return_attention: bool = False


@dataclasses.dataclass
class Hypothesis:
    tokens: list[int]  # without BOS/EOS
    score: float  # length-normalised log-probability
    attention: list[list[float]] | None = None  # (target tokens + EOS) x source positions


def max_target_lengths(src: torch.Tensor, model: EncoderDecoder, opts: DecodeOptions) -> torch.Tensor:
    """Per-sentence limit a * source length + b (capped by the model): a sentence's output never
    depends on which other sentences share its batch."""
    lengths = (src != PAD_ID).sum(1).float()
    return (opts.max_len_a * lengths + opts.max_len_b).long().clamp(max=model.config.max_len - 1)


def _normalise(score: torch.Tensor, length: torch.Tensor, alpha: float) -> torch.Tensor:
    return score / (((5.0 + length) / 6.0) ** alpha) if alpha else score


@torch.inference_mode()
def greedy(model: EncoderDecoder, src: torch.Tensor, opts: DecodeOptions | None = None) -> list[list[Hypothesis]]:
    """Greedy decoding: src (B, S) -> one hypothesis per sentence."""
    opts = opts or DecodeOptions()
    state = model.encode(src)
    B = src.size(0)
    prev = torch.full((B,), BOS_ID, dtype=torch.long, device=src.device)
    tokens = torch.full((B, 0), PAD_ID, dtype=torch.long, device=src.device)
    score = torch.zeros(B, device=src.device)
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)
    length = torch.zeros(B, device=src.device)
    attns = []
    limits = max_target_lengths(src, model, opts)  # (B,)
    for step in range(int(limits.max())):
        logits, state, attn = model.decode_step(prev, state)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        best_logp, prev = logp.max(dim=-1)
        prev = prev.masked_fill(finished, PAD_ID)
        score += best_logp.masked_fill(finished, 0.0)
        length += (~finished).float()
        tokens = torch.cat([tokens, prev[:, None]], dim=1)
        attns.append(attn)
        finished |= (prev == EOS_ID) | (limits <= step + 1)
        if finished.all():
            break
    score = _normalise(score, length, opts.length_penalty)
    return [[_hypothesis(tokens[b], float(score[b]), attns, b, opts)] for b in range(B)]


@torch.inference_mode()
def beam_search(model: EncoderDecoder, src: torch.Tensor, opts: DecodeOptions) -> list[list[Hypothesis]]:
    """Beam search: src (B, S) -> opts.nbest hypotheses per sentence, best first.

    With beam_size 1 this is greedy decoding, token for token."""
    K = opts.beam_size
    if opts.nbest > K:
        raise ValueError(f"nbest ({opts.nbest}) cannot exceed beam_size ({K})")
    B, device = src.size(0), src.device
    state = model.encode(src)
    state = model.reorder_state(state, torch.arange(B, device=device).repeat_interleave(K))  # (B*K, ...)
    prev = torch.full((B * K,), BOS_ID, dtype=torch.long, device=device)
    tokens = torch.full((B * K, 0), PAD_ID, dtype=torch.long, device=device)
    # Only the first beam is alive at the start, so the first step expands one hypothesis.
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    length = torch.zeros(B * K, device=device)
    attns: list[torch.Tensor] = []
    limits = max_target_lengths(src, model, opts).repeat_interleave(K)  # (B*K,)
    for step in range(int(limits.max())):
        logits, state, attn = model.decode_step(prev, state)
        V = logits.size(-1)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        # A finished hypothesis can only be extended by PAD, at no cost.
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, PAD_ID] = 0.0
        logp = torch.where(finished[:, None], frozen, logp)
        candidates = (scores.view(B * K, 1) + logp).view(B, K * V)
        scores, flat = candidates.topk(K, dim=-1)  # (B, K)
        origin = (flat // V + torch.arange(B, device=device)[:, None] * K).view(-1)  # (B*K,)
        prev = (flat % V).view(-1)
        state = model.reorder_state(state, origin)
        tokens = torch.cat([tokens.index_select(0, origin), prev[:, None]], dim=1)
        attns = [a.index_select(0, origin) for a in attns] + [attn.index_select(0, origin)]
        length = length.index_select(0, origin) + (~finished.index_select(0, origin)).float()
        finished = finished.index_select(0, origin) | (prev == EOS_ID) | (limits <= step + 1)
        if finished.all():
            break
    normalised = _normalise(scores.view(-1), length, opts.length_penalty).view(B, K)
    results = []
    for b in range(B):
        order = normalised[b].argsort(descending=True)[: opts.nbest]
        results.append([_hypothesis(tokens[b * K + k], float(normalised[b, k]), attns, b * K + k, opts) for k in order.tolist()])
    return results


def _hypothesis(row: torch.Tensor, score: float, attns: list[torch.Tensor], index: int, opts: DecodeOptions) -> Hypothesis:
    ids = row.tolist()
    end = ids.index(EOS_ID) if EOS_ID in ids else len(ids)
    attention = None
    if opts.return_attention:
        steps = min(end + 1, len(attns))
        attention = [attns[t][index].tolist() for t in range(steps)]
    return Hypothesis(tokens=[t for t in ids[:end] if t != PAD_ID], score=score, attention=attention)


def decode(model: EncoderDecoder, src: torch.Tensor, opts: DecodeOptions) -> list[list[Hypothesis]]:
    if opts.beam_size == 1 and opts.nbest == 1:
        return greedy(model, src, opts)
    return beam_search(model, src, opts)
