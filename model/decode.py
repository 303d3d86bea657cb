"""Reference decoding in torch: greedy and beam search over any EncoderDecoder.

This is the reference the ONNX engine must reproduce token for token, so it is written plainly:
one decode_step per target position for the whole batch, log-softmax scores, per-sentence
length limits, and the usual NMT beam (finished hypotheses leave the beam; see beam_search).
"""

from __future__ import annotations

import dataclasses

import torch

from attnserve.decoding_rules import (
    BOS_ID, DEFAULT_LENGTH_LIMIT, EOS_ID, PAD_ID, LengthLimit, length_normalised, max_target_length,
)
from attnserve.model.base import EncoderDecoder


@dataclasses.dataclass
class DecodeOptions:
    beam_size: int = 1
    length_penalty: float = 1.0  # GNMT alpha: score / ((5 + len) / 6) ** alpha; 0 = raw log-prob
    max_len_a: float = DEFAULT_LENGTH_LIMIT.max_len_a  # max target length = a * source length + b (capped by the model)
    max_len_b: int = DEFAULT_LENGTH_LIMIT.max_len_b
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
    limit = LengthLimit(opts.max_len_a, opts.max_len_b)
    lengths = (src != PAD_ID).sum(1).tolist()
    return torch.tensor([max_target_length(n, model.config.max_len, limit) for n in lengths], device=src.device)


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
    ended = (tokens == EOS_ID).any(1).tolist()
    return [[_hypothesis(tokens[b], attns, b, float(score[b]), int(length[b]), ended[b], opts)] for b in range(B)]


@torch.inference_mode()
def beam_search(model: EncoderDecoder, src: torch.Tensor, opts: DecodeOptions) -> list[list[Hypothesis]]:
    """Beam search: src (B, S) -> opts.nbest hypotheses per sentence, best first.

    The usual NMT beam (as in fairseq): each step takes the 2K best continuations of a
    sentence's K live hypotheses; an EOS among the first K ends a hypothesis, which leaves the
    beam for the finished list; the K best others form the next beam. A sentence is done when
    it has K finished hypotheses, or at its length limit (its live ones then count as finished).
    Finished hypotheses are ranked by length-normalised score. With beam_size 1 this is greedy
    decoding, token for token."""
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
    attns: list[torch.Tensor] = []
    limits = max_target_lengths(src, model, opts).tolist()
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    offsets = torch.arange(B, device=device)[:, None] * K
    for step in range(max(limits)):
        logits, state, attn = model.decode_step(prev, state)
        attns.append(attn)
        V = logits.size(-1)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        candidates = (scores.view(B * K, 1) + logp).view(B, K * V)
        top_scores, top = candidates.topk(2 * K, dim=-1)  # (B, 2K), best first
        top_beam, top_token = top // V, top % V
        is_eos = top_token == EOS_ID
        # An EOS among the first K candidates finishes that hypothesis.
        for b, j in (is_eos[:, :K] & torch.isfinite(top_scores[:, :K])).nonzero().tolist():
            if not done[b]:
                row = b * K + int(top_beam[b, j])
                finished[b].append(_hypothesis(tokens[row], attns, row, float(top_scores[b, j]), step + 1, True, opts))
        # The K best non-EOS candidates form the next beam (there are at least K among 2K).
        positions = torch.arange(2 * K, device=device).expand(B, -1)
        pick = torch.where(is_eos, positions + 2 * K, positions).argsort(-1)[:, :K]  # (B, K), in order
        scores = torch.gather(top_scores, 1, pick)
        origin = (torch.gather(top_beam, 1, pick) + offsets).view(-1)
        prev = torch.gather(top_token, 1, pick).view(-1)
        state = model.reorder_state(state, origin)
        tokens = torch.cat([tokens.index_select(0, origin), prev[:, None]], dim=1)
        attns = [a.index_select(0, origin) for a in attns]
        for b in range(B):
            if done[b]:
                continue
            if step + 1 >= limits[b]:  # the limit: live hypotheses finish as they are
                for k in range(K):
                    if torch.isfinite(scores[b, k]):
                        finished[b].append(_hypothesis(tokens[b * K + k], attns, b * K + k, float(scores[b, k]), step + 1, False, opts))
            done[b] = len(finished[b]) >= K or step + 1 >= limits[b]
        if all(done):
            break
    return [sorted(hyps, key=lambda h: -h.score)[: opts.nbest] for hyps in finished]


def _hypothesis(row: torch.Tensor, attns: list[torch.Tensor], index: int, score: float, length: int,
                ended: bool, opts: DecodeOptions) -> Hypothesis:
    """A finished hypothesis of `length` target tokens (its EOS included if it ended with one);
    `row` starts with its tokens; attns[t][index] is its alignment at step t."""
    ids = row.tolist()[: length - ended]
    attention = [attns[t][index].tolist() for t in range(length)] if opts.return_attention else None
    return Hypothesis(tokens=ids, score=length_normalised(score, length, opts.length_penalty), attention=attention)


def decode(model: EncoderDecoder, src: torch.Tensor, opts: DecodeOptions) -> list[list[Hypothesis]]:
    if opts.beam_size == 1 and opts.nbest == 1:
        return greedy(model, src, opts)
    return beam_search(model, src, opts)
