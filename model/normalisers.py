"""Attention-weight normalisers: scores (B, T, S) and a padding mask -> weights (B, T, S) that sum
to 1 over the unmasked source positions and are exactly 0 on padding.

    softmax    Bahdanau et al. 2014        p = exp(s) / sum exp(s)
    sparsemax  Martins & Astudillo 2016    p = argmin_{p in simplex} ||p - s||^2 = max(s - tau, 0),
                                           tau such that sum max(s - tau, 0) = 1
    crf        Kim et al. 2017             p_i = m_i / sum_j m_j, m_i = P(z_i = 1) under the chain CRF
                                           P(z) ~ exp(sum_i s_i z_i + sum_i W[z_i, z_i+1]), z in {0,1}^S

Softmax gives every position some weight; sparsemax gives exact zeros (a sparse, readable
alignment) for a sort, O(S log S); the CRF lets neighbouring positions share the
decision to be attended (a learned 2x2 transition W), so it prefers contiguous source segments.

Each one is a plain function of (scores, mask) plus an nn.Module wrapper, NORMALISERS, that
GlobalAttention holds. Every op here is a plain torch op (sort, cumsum, gather, clamp, maximum,
exp, log1p, cat, flip), so the ONNX exporter emits plain ONNX ops for them, and the CRF's
forward-backward is a scan of fixed depth (log2 max_len), not a loop over the dynamic source
length; gradients come from autograd.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# A finite stand-in for log(0) in the CRF's log-space identity matrices. Finite so that no
# log-add-exp ever sees only -inf (-inf - -inf is NaN, in the value or its gradient); far below any log-potential a
# sentence can add up (|score| * max_len), so exp(NEG - anything real) is exactly 0 in fp32.
NEG = -1e30


def softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` where mask is True; exactly 0 where it is False (masked scores are
    -inf before the softmax: attention.masked_softmax, the zoo's default)."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)


def sparsemax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The Euclidean projection of the scores onto the probability simplex (Martins & Astudillo
    2016): p = max(s - tau, 0) with the threshold

        k(s) = max{k : 1 + k s_(k) > sum_{j<=k} s_(j)}     (s_(1) >= s_(2) >= ... sorted)
        tau  = (sum_{j<=k(s)} s_(j) - 1) / k(s)

    so every position scored more than 1 below the best one gets exactly 0, and the weights are
    piecewise linear in the scores. Masked positions are exactly 0: the scores are first shifted
    so that the best valid one is 0 (sparsemax is shift-invariant), then masked ones are set to
    -1e4, far below tau >= -1, so they never enter the support and clamp to 0. No inf, no NaN.
    A row with no valid position gets uniform weights (softmax would give NaN); rows always have
    one (the EOS). The gradient is autograd's through sort/cumsum/gather, which is the sparsemax
    Jacobian diag(s) - s s^T / |s| on the support s.
    """
    scores, mask = scores.movedim(dim, -1), mask.movedim(dim, -1)
    shift = scores.detach().masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)  # best valid score
    z = (scores - shift).masked_fill(~mask, -1e4)  # (..., S) valid in [-inf, 0], masked -1e4
    z_sorted, _ = torch.sort(z, dim=-1, descending=True)  # (..., S)
    k = torch.arange(1, z.size(-1) + 1, device=z.device, dtype=z.dtype)  # (S,) 1..S
    cumulative = z_sorted.cumsum(-1)  # (..., S)
    support = (1 + k * z_sorted > cumulative).sum(-1, keepdim=True)  # (..., 1) k(z) >= 1
    tau = (cumulative.gather(-1, support - 1) - 1) / support.to(z.dtype)  # (..., 1)
    weights = torch.clamp(z - tau, min=0)  # (..., S)
    return weights.movedim(-1, dim)


def _logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(e^x + e^y), stable: torch.logaddexp exports as Log(Exp + Exp), which overflows in
    fp32 once a chain's log-potentials pass ~88. The gap is capped at 80 (e^-80 adds nothing to
    an fp32 sum) because exp is ~3x slower on CPU when its result underflows."""
    return torch.maximum(x, y) + torch.log1p(torch.exp(-(x - y).abs().clamp(max=80.0)))


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log sigmoid(x), stable in the exported graph too (F.logsigmoid exports as Log(Sigmoid))."""
    return torch.minimum(x, torch.zeros_like(x)) - torch.log1p(torch.exp(-x.abs().clamp(max=80.0)))


def _log_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2x2 matrix products in the log semiring, one per position: a, b (..., 2, 2, S) ->
    c[i, k] = log(e^(a[i, 0] + b[0, k]) + e^(a[i, 1] + b[1, k])). The source axis is last, so
    every op runs over contiguous memory (a logsumexp over a middle axis of size 2 is ~10x slower)."""
    return _logaddexp(a[..., :, 0:1, :] + b[..., 0:1, :, :], a[..., :, 1:2, :] + b[..., 1:2, :, :])


def _incoming(unary: torch.Tensor, pairwise: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """alpha_i(b) = log sum over the labels of the valid positions j < i of their unary
    potentials, the transitions between them and the transition into z_i = b (0 when no valid
    position precedes i: alpha_0 = 0). unary (..., 2, S), mask (..., S) -> (..., 2, S).

    alpha_i = 0^T (x) M_0 (x) ... (x) M_{i-1} with M_j[a, b] = u_j(a) + W[a, b] for a valid j and
    the log-space identity for a masked j (which takes it out of the chain). The prefix products
    come from a Hillis-Steele scan: `steps` doublings, 2^steps >= S, each one a few whole-tensor
    ops, instead of a Python loop of S steps (which neither vectorises nor exports)."""
    S = unary.size(-1)
    eye = NEG * (1 - torch.eye(2, dtype=unary.dtype, device=unary.device)).unsqueeze(-1)  # (2, 2, 1) log I
    m = torch.where(mask[..., None, None, :], unary.unsqueeze(-2) + pairwise.unsqueeze(-1), eye)  # (..., 2, 2, S)
    for step in range(steps):  # after it, m_i = M_{i - 2^(step+1) + 1} (x) ... (x) M_i
        d = 1 << step
        before = torch.cat([eye.expand(*m.shape[:-1], d), m], dim=-1)[..., :S]  # m_{i-d}, I for i < d
        m = _log_matmul(before, m)
    exclusive = torch.cat([eye.expand(*m.shape[:-1], 1), m], dim=-1)[..., :S]  # M_0 (x) .. (x) M_{i-1}
    return _logaddexp(exclusive[..., 0, :, :], exclusive[..., 1, :, :])  # 0^T (x) ...: (..., 2, S)


def crf_marginals(unary: torch.Tensor, pairwise: torch.Tensor, mask: torch.Tensor,
                  max_len: int | None = None) -> torch.Tensor:
    """Attention weights from a linear-chain CRF over the source positions (Kim et al. 2017's
    segmentation attention). Each valid position i has a binary z_i (attended or not) and

        P(z) ~ exp(sum_i unary_i z_i + sum_i pairwise[z_i, z_{i+1}])

    over the valid positions in order (masked positions are taken out of the chain, so the
    neighbours of a gap are consecutive). unary_i is the log-potential of z_i = 1 (that of
    z_i = 0 is 0, which loses nothing: only the difference between a position's two label
    potentials matters); pairwise[a, b] is the log-potential of z_i = a followed by z_{i+1} = b,
    the same 2x2 for every pair.

    Marginals m_i = P(z_i = 1) come from forward-backward in log space (a stable log-add-exp;
    both directions in one prefix scan of 2x2 log-matrices, see _incoming), as the sigmoid of
    the log-odds alpha_i + u_i + beta_i of label 1 against label 0. Kim et al. use
    the m_i directly as weights, which need not sum to 1; this zoo's attention interface needs a
    distribution over positions, so the weights are m_i / sum_j m_j over the valid positions,
    computed as a masked softmax of log m_i (stable even when every m_i underflows, and exactly
    0 on padding). With pairwise = 0 the z_i are independent and the weights are
    sigmoid(s_i) / sum_j sigmoid(s_j).

    unary (..., S), pairwise (2, 2), mask broadcastable to unary -> weights (..., S).
    max_len bounds S for a traced graph (the scan's depth must not depend on the dynamic source
    length there; a longer source would be silently wrong, and none is: the engine and training
    cut sources to the model's max_len); eager calls leave it None and scan just deep enough for S.
    """
    mask = mask.expand_as(unary)
    S = unary.size(-1)
    steps = max((max_len if max_len is not None else S) - 1, 1).bit_length()  # 2^steps >= S
    u = torch.stack([torch.zeros_like(unary), unary], dim=-2)  # (..., 2, S) log-potentials of z_i = 0, 1
    # alpha (everything left of i, into z_i) and beta (everything right of i, out of z_i) in one
    # scan: beta is alpha of the reversed chain, whose transitions are the transposed ones.
    directions = torch.stack([pairwise, pairwise.t()]).reshape(2, *[1] * (u.dim() - 2), 2, 2)  # (2, 1.., 2, 2)
    alpha, beta = _incoming(torch.stack([u, u.flip(-1)]), directions, torch.stack([mask, mask.flip(-1)]), steps)
    beta = beta.flip(-1)  # (..., 2, S), as alpha
    belief = alpha + u + beta  # (..., 2, S) log P(z_i = b) + log Z
    log_marginal = _log_sigmoid(belief[..., 1, :] - belief[..., 0, :])  # (..., S) log P(z_i = 1)
    return softmax(log_marginal, mask)  # m_i / sum_j m_j over the valid positions


# ------------------------------------------------------------------------------------------
# Modules: what GlobalAttention holds (weights (B, T, S) from scores (B, T, S), mask (B, 1, S))


class Normaliser(nn.Module):
    """scores (B, T, S), mask broadcastable to them (True = attend) -> weights (B, T, S)."""

    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Softmax(Normaliser):
    """No parameters and no buffers: a softmax model's checkpoint is the same as before."""

    def forward(self, scores, mask):
        return softmax(scores, mask)


class Sparsemax(Normaliser):
    def forward(self, scores, mask):
        return sparsemax(scores, mask)


class CRFMarginals(Normaliser):
    """Owns the 2x2 transition log-potentials W[z_i, z_{i+1}], zeros at the start (independent
    positions). Only differences between entries matter: adding one constant to all four changes
    nothing. max_len: the longest source the model reads, the depth bound of traced graphs."""

    def __init__(self, max_len: int = 256):
        super().__init__()
        self.max_len = max_len
        self.transition = nn.Parameter(torch.zeros(2, 2))

    def forward(self, scores, mask):
        # a traced graph (ONNX export, torch.compile) gets the fixed depth of max_len
        traced = torch.compiler.is_exporting() or torch.compiler.is_compiling()
        bound = self.max_len if traced else None
        return crf_marginals(scores, self.transition.to(scores.dtype), mask, bound)


NORMALISERS: dict[str, type[Normaliser]] = {
    "softmax": Softmax,
    "sparsemax": Sparsemax,
    "crf": CRFMarginals,
}


def build_normaliser(name: str, max_len: int = 256) -> Normaliser:
    if name not in NORMALISERS:
        raise ValueError(f"unknown attention normaliser {name!r}; choose from {sorted(NORMALISERS)}")
    return CRFMarginals(max_len) if name == "crf" else NORMALISERS[name]()
