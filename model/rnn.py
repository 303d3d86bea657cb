"""RNN encoder-decoders: Bahdanau et al. 2014 and Luong et al. 2015, and the no-attention baseline.

    encoder   bidirectional GRU/LSTM over source embeddings -> memory (B, S, 2H)
    bahdanau  attend with the previous state s_{i-1}; s_i = RNN([y_{i-1}; c_i], s_{i-1})
    luong     h_t = RNN([y_{t-1}; h~_{t-1}], h_{t-1}) (input feeding); attend with h_t;
              h~_t = tanh(W_c [c_t; h_t])
    none      the Bahdanau decoder with a fixed context vector instead of attention

Output projections are tied to the (joint source/target) embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnserve.model.attention import build_rnn_attention
from attnserve.model.base import EncoderDecoder, State
from attnserve.model.config import ModelConfig


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of x (B, S, C) within its own length; padding stays in place.
    This gives the backward RNN exactly the packed-sequence semantics with one gather, which
    also exports to ONNX as plain ops."""
    S = x.size(1)
    t = torch.arange(S, device=x.device).unsqueeze(0)  # (1, S)
    index = torch.where(t < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - t, t)  # (B, S)
    # expand over the feature axis only: ONNX export keeps the batch and time axes symbolic
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class RNNEncoder(nn.Module):
    """Stacked bidirectional RNN; returns every position's states and the decoder's initial state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rnn = nn.GRU if cfg.cell == "gru" else nn.LSTM
        self.forward_rnns = nn.ModuleList()
        self.backward_rnns = nn.ModuleList()
        for layer in range(cfg.enc_layers):
            size = cfg.d_model if layer == 0 else 2 * cfg.hidden
            self.forward_rnns.append(rnn(size, cfg.hidden, batch_first=True))
            self.backward_rnns.append(rnn(size, cfg.hidden, batch_first=True))
        self.dropout = nn.Dropout(cfg.dropout)
        self.init_state = nn.Linear(2 * cfg.hidden, 2 * cfg.hidden)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x (B, S, E) embedded source, lengths (B,)
        for fwd, bwd in zip(self.forward_rnns, self.backward_rnns):
            ahead, _ = fwd(x)  # (B, S, H); padding comes after the real tokens, so it is harmless
            behind, _ = bwd(reverse_padded(x, lengths))
            x = self.dropout(torch.cat([ahead, reverse_padded(behind, lengths)], dim=-1))  # (B, S, 2H)
        H = x.size(-1) // 2
        last = (lengths - 1).view(-1, 1, 1).expand(-1, 1, H)
        final_forward = ahead.gather(1, last).squeeze(1)  # (B, H) state after the last real token
        final_backward = behind[:, 0]  # not reversed back: position 0 saw the whole sentence
        init = torch.tanh(self.init_state(torch.cat([final_forward, final_backward], dim=-1)))  # (B, 2H)
        return x, init


class _RNNDecoderBase(nn.Module):
    def __init__(self, cfg: ModelConfig, input_size: int):
        super().__init__()
        self.lstm = cfg.cell == "lstm"
        size = 2 * cfg.hidden
        self.cell = nn.LSTMCell(input_size, size) if self.lstm else nn.GRUCell(input_size, size)

    def _recur(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if self.lstm:
            h, c = self.cell(x, (state["hidden"], state["cell"]))
            return h, {**state, "hidden": h, "cell": c}
        h = self.cell(x, state["hidden"])
        return h, {**state, "hidden": h}

    def init_state(self, memory: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, init: torch.Tensor) -> State:
        state = {"hidden": init, "memory": memory, "keys": keys, "src_mask": mask, "src_len": mask.sum(1)}
        if self.lstm:
            state["cell"] = torch.zeros_like(init)
        return state

    def _attend(self, query: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        context, weights = self.attention(
            query.unsqueeze(1), state["keys"], state["memory"], state["src_mask"], state["src_len"]
        )
        return context.squeeze(1), weights.squeeze(1)  # (B, M), (B, S)


class BahdanauDecoder(_RNNDecoderBase):
    """Attends with the previous state; a deep output layer combines state, context and input."""

    def __init__(self, cfg: ModelConfig):
        D = M = 2 * cfg.hidden
        super().__init__(cfg, cfg.d_model + M)
        self.attention = build_rnn_attention(cfg.attention, cfg.score, D, M, cfg.attn_dim, cfg.window,
                                             cfg.normaliser, cfg.max_len)
        self.pre_output = nn.Linear(D + M + cfg.d_model, cfg.d_model)

    def step(self, y_prev: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        # y_prev (B, E) embedded previous token
        context, weights = self._attend(state["hidden"], state)  # attend with s_{i-1}
        h, state = self._recur(torch.cat([y_prev, context], dim=-1), state)  # s_i (B, D)
        out = torch.tanh(self.pre_output(torch.cat([h, context, y_prev], dim=-1)))  # (B, E)
        return out, state, weights


class LuongDecoder(_RNNDecoderBase):
    """Attends with the current state; the attentional state h~ is fed to the next step."""

    def __init__(self, cfg: ModelConfig):
        D = M = 2 * cfg.hidden
        super().__init__(cfg, 2 * cfg.d_model)
        self.attention = build_rnn_attention(cfg.attention, cfg.score, D, M, cfg.attn_dim, cfg.window,
                                             cfg.normaliser, cfg.max_len)
        self.combine = nn.Linear(M + D, cfg.d_model, bias=False)

    def init_state(self, memory, keys, mask, init) -> State:
        state = super().init_state(memory, keys, mask, init)
        state["feed"] = init.new_zeros(init.size(0), self.combine.out_features)  # h~_0 = 0
        return state

    def step(self, y_prev: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        h, state = self._recur(torch.cat([y_prev, state["feed"]], dim=-1), state)  # h_t (B, D)
        context, weights = self._attend(h, state)  # attend with h_t
        feed = torch.tanh(self.combine(torch.cat([context, h], dim=-1)))  # h~_t (B, E)
        return feed, {**state, "feed": feed}, weights


class RNNSeq2Seq(EncoderDecoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = RNNEncoder(cfg)
        self.decoder = LuongDecoder(cfg) if cfg.decoder == "luong" else BahdanauDecoder(cfg)
        self.init_shared_embedding()  # the embedding doubles as the output projection

    def encode(self, src: torch.Tensor) -> State:
        mask = self.source_mask(src)  # (B, S)
        memory, init = self.encoder(self.dropout(self.embedding(src)), mask.sum(1))
        keys = self.decoder.attention.project_keys(memory)  # once per sentence, not per step
        return self.decoder.init_state(memory, keys, mask, init)

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dropout(out), self.embedding.weight)  # tied output projection

    def decode_step(self, prev: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        out, state, weights = self.decoder.step(self.embedding(prev), state)
        return self._logits(out), state, weights

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False):
        state = self.encode(src)
        inputs = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        outs, attns = [], []
        for t in range(tgt_in.size(1)):
            out, state, weights = self.decoder.step(inputs[:, t], state)
            outs.append(out)
            attns.append(weights)
        logits = self._logits(torch.stack(outs, dim=1))  # (B, T, V)
        return (logits, torch.stack(attns, dim=1)) if return_attention else logits
