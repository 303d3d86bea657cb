"""The attention mechanisms of the NMT literature, one small module each.

Every mechanism maps a query (B, T, Dq) and a source memory (B, S, Dk) with its padding mask
(B, S) to a context (B, T, Dv) and weights (B, T, S). Weights sum to 1 over the unmasked source
positions and are exactly 0 on padding (masked scores are -inf before the softmax). Global
attention can replace the softmax by another normaliser (model/normalisers.py: sparsemax, the
CRF marginals of structured attention).

Scores are split into `project_keys` (done once per sentence: e.g. W_k h_s for additive
attention) and `forward` (done for every decoder step), because that is how a decoder uses
them and how the exported step graph must compute them.

    additive      Bahdanau et al. 2014    v^T tanh(W_q q + W_k k)
    dot           Luong et al. 2015       q^T k
    general       Luong et al. 2015       q^T W k
    concat        Luong et al. 2015       v^T tanh(W [q; k])
    scaled_dot    Vaswani et al. 2017     q^T k / sqrt(d)
    multi-head    Vaswani et al. 2017     see MultiHeadAttention
    local-p       Luong et al. 2015       window around a predicted position, Gaussian-weighted
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnserve.model.normalisers import build_normaliser


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where mask is True; exactly 0 where it is False."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


# ------------------------------------------------------------------------------------------
# Score functions: (query (B, T, Dq), projected keys) -> scores (B, T, S)


class AdditiveScore(nn.Module):
    """Bahdanau: v^T tanh(W_q q + W_k k)."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int):
        super().__init__()
        self.w_q = nn.Linear(query_dim, attn_dim, bias=False)
        self.w_k = nn.Linear(key_dim, attn_dim, bias=True)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.w_k(keys)  # (B, S, A)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.w_q(query).unsqueeze(2) + keys.unsqueeze(1))  # (B, T, S, A)
        return self.v(hidden).squeeze(-1)  # (B, T, S)


class ConcatScore(nn.Module):
    """Luong concat: v^T tanh(W [q; k]); W is split into its query and key halves so that the
    key half is applied once per sentence instead of once per step."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int):
        super().__init__()
        self.query_dim = query_dim
        self.w = nn.Linear(query_dim + key_dim, attn_dim, bias=False)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return F.linear(keys, self.w.weight[:, self.query_dim:])  # (B, S, A)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = F.linear(query, self.w.weight[:, : self.query_dim])  # (B, T, A)
        return self.v(torch.tanh(q.unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)  # (B, T, S)


class DotScore(nn.Module):
    """Luong dot: q^T k (query and key sizes must match)."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int = 0):
        super().__init__()
        if query_dim != key_dim:
            raise ValueError(f"dot attention needs equal query and key sizes, got {query_dim} and {key_dim}")

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return keys

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return query @ keys.transpose(1, 2)  # (B, T, S)


class ScaledDotScore(DotScore):
    """Vaswani: q^T k / sqrt(d), which keeps softmax out of saturation for large d."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int = 0):
        super().__init__(query_dim, key_dim)
        self.scale = 1.0 / math.sqrt(key_dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return (query @ keys.transpose(1, 2)) * self.scale


class GeneralScore(nn.Module):
    """Luong general (multiplicative): q^T W k, with W k computed once per sentence."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int = 0):
        super().__init__()
        self.w = nn.Linear(key_dim, query_dim, bias=False)

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.w(keys)  # (B, S, Dq)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return query @ keys.transpose(1, 2)  # (B, T, S)


SCORES: dict[str, type[nn.Module]] = {
    "additive": AdditiveScore,
    "dot": DotScore,
    "general": GeneralScore,
    "concat": ConcatScore,
    "scaled_dot": ScaledDotScore,
}


# ------------------------------------------------------------------------------------------
# Global and local attention over an RNN encoder's states


class GlobalAttention(nn.Module):
    """Attend to every source position (Bahdanau; Luong's global attention). `normaliser` turns
    the scores into weights: softmax (no parameters, so softmax checkpoints are unchanged),
    sparsemax, or crf (owns its 2x2 transition parameter); max_len bounds the source length for
    the CRF's exported scan."""

    def __init__(self, score: nn.Module, normaliser: str = "softmax", max_len: int = 256):
        super().__init__()
        self.score = score
        self.normaliser = build_normaliser(normaliser, max_len)

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.score.project_keys(memory)

    def forward(self, query, keys, memory, mask, src_len=None):
        # query (B, T, Dq), keys (B, S, *), memory (B, S, Dv), mask (B, S) bool, src_len (B,)
        weights = self.normaliser(self.score(query, keys), mask.unsqueeze(1))  # (B, T, S)
        return weights @ memory, weights  # (B, T, Dv), (B, T, S)


class LocalAttention(GlobalAttention):
    """Luong's local-p attention: predict an aligned position p_t = (len-1) sigmoid(v_p^T
    tanh(W_p h_t)), attend only within [p_t - D, p_t + D], and favour positions near p_t with
    a Gaussian of sigma D/2. The Gaussian is applied as a log-prior on the scores, so the
    weights are renormalised: they still sum to 1 (and are 0 outside the window and on pad)."""

    def __init__(self, score: nn.Module, query_dim: int, window: int = 8, attn_dim: int = 128):
        super().__init__(score)
        self.window = window
        self.sigma = window / 2
        self.w_p = nn.Linear(query_dim, attn_dim, bias=False)
        self.v_p = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, query, keys, memory, mask, src_len=None):
        if src_len is None:
            src_len = mask.sum(-1)
        last = (src_len - 1).to(query.dtype)  # (B,)
        p_t = last[:, None] * torch.sigmoid(self.v_p(torch.tanh(self.w_p(query)))).squeeze(-1)  # (B, T)
        positions = torch.arange(mask.size(1), device=query.device, dtype=query.dtype)  # (S,)
        distance = positions[None, None, :] - p_t.unsqueeze(-1)  # (B, T, S)
        in_window = distance.abs() <= self.window
        # The position nearest p_t is always in the window and inside the sentence, so no row
        # is fully masked.
        nearest = (distance.abs() == distance.abs().amin(-1, keepdim=True))
        window_mask = mask.unsqueeze(1) & (in_window | nearest)  # (B, T, S)
        scores = self.score(query, keys) - distance.pow(2) / (2 * self.sigma**2)
        weights = masked_softmax(scores, window_mask)
        return weights @ memory, weights


class FixedContext(nn.Module):
    """No attention: one context vector per sentence (the mean of the encoder states), the
    same at every decoder step. Its 'weights' are uniform over the source for inspection."""

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return memory[:, :0]  # nothing to precompute

    def forward(self, query, keys, memory, mask, src_len=None):
        weights = mask.to(memory.dtype) / mask.sum(-1, keepdim=True)  # (B, S)
        weights = weights.unsqueeze(1).expand(-1, query.size(1), -1)  # (B, T, S)
        return weights @ memory, weights


def build_rnn_attention(kind: str, score: str, query_dim: int, key_dim: int, attn_dim: int, window: int,
                        normaliser: str = "softmax", max_len: int = 256):
    """'global' | 'local' | 'none' attention with one of the SCORES; global attention with one
    of the normalisers (model/normalisers.py NORMALISERS)."""
    if normaliser != "softmax" and kind != "global":
        # local-p's Gaussian is a log-prior on softmax scores; 'none' has no scores at all
        raise ValueError(f"the {normaliser!r} normaliser needs global attention; {kind!r} attention is softmax-only")
    if kind == "none":
        return FixedContext()
    if score not in SCORES:
        raise ValueError(f"unknown attention score {score!r}; choose from {sorted(SCORES)}")
    scorer = SCORES[score](query_dim, key_dim, attn_dim)
    if kind == "global":
        return GlobalAttention(scorer, normaliser, max_len)
    if kind == "local":
        return LocalAttention(scorer, query_dim, window, attn_dim)
    raise ValueError(f"unknown attention kind {kind!r}; choose from global, local, none")


# ------------------------------------------------------------------------------------------
# Multi-head attention (Transformer)


@torch.library.custom_op("attnserve::attention_with_weights", mutates_args=())
def attention_with_weights(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention that also returns its weights, for alignments.

    q (B, H, T, Dh), k and v (B, H, S, Dh), mask (B, 1, T, S) bool -> (B, H, T, Dh), (B, H, T, S).
    One op rather than MatMul/Softmax/MatMul so that the exporter can emit it as one fused
    attention node that returns its softmax weights too (ONNX Attention, qk_matmul_output_mode=3).
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    weights = masked_softmax(scores, mask)
    return weights @ v, weights


@attention_with_weights.register_fake
def _(q, k, v, mask):
    return q.new_empty(q.shape), q.new_empty((*q.shape[:-1], k.size(-2)))


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention on F.scaled_dot_product_attention.

    Keys and values are projected by `project_kv` so a decoder can compute the cross-attention
    keys/values once per sentence and cache its self-attention keys/values step by step. The
    core is one SDPA call, which the exporter turns into one fused attention node.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))  # 2 x (B, H, S, Dh)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x (B, T, C); k, v (B, H, S, Dh); mask broadcastable to (B, H, T, S), True = attend
        B, T, C = x.shape
        q = self._heads(self.q_proj(x))  # (B, H, T, Dh)
        if causal:
            S = k.size(2)
            causal_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            mask = causal_mask if mask is None else mask & causal_mask
        if mask is not None and mask.dim() == 4:
            # Spell the mask out over the query length: onnxruntime's CPU kernel for the fused
            # ONNX Attention op rejects a mask that broadcasts over queries.
            mask = mask.expand(-1, -1, T, -1)
        weights = None
        if need_weights:  # for inspection only: no gradient flows through the weights path
            if mask is None:
                mask = torch.ones(1, 1, T, k.size(2), dtype=torch.bool, device=x.device)
            y, weights = attention_with_weights(q, k, v, mask.expand(B, 1, T, -1))  # (B, H, T, S)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
            )  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y), weights
