"""Transformer encoder-decoder (Vaswani et al. 2017), pre-norm, in the order of the paper.

    embeddings (shared source/target/output, scaled by sqrt(d)) + sinusoidal positions
    encoder layer: x + SelfAttn(LN(x)); x + FFN(LN(x))
    decoder layer: x + CausalSelfAttn(LN(x)); x + CrossAttn(LN(x), memory); x + FFN(LN(x))

Every attention is one F.scaled_dot_product_attention call (MultiHeadAttention), so the exporter
can emit it as one fused node. Incremental decoding keeps a key/value cache: self-attention
keys/values grow by one position per step, cross-attention keys/values are computed once.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnserve.model.attention import MultiHeadAttention
from attnserve.model.base import EncoderDecoder, State
from attnserve.model.config import ModelConfig


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)  # (L, 1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe, persistent=False)  # (L, C)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        return x + self.pe[start : start + x.size(1)]  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x (B, S, C); mask (B, 1, 1, S)
        h = self.ln1(x)
        x = x + self.dropout(self.self_attn(h, *self.self_attn.project_kv(h), mask)[0])
        return x + self.dropout(self.ff(self.ln2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln3 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, self_kv, cross_kv, memory_mask, causal, need_weights=False, self_mask=None):
        # x (B, T, C); self_kv: keys/values of all target positions so far, 2 x (B, H, T', Dh)
        # cross_kv: 2 x (B, H, S, Dh); memory_mask (B, 1, 1, S); self_mask (B, 1, 1, T') or None
        x = x + self.dropout(self.self_attn(self.ln1(x), *self_kv, self_mask, causal=causal)[0])
        y, weights = self.cross_attn(self.ln2(x), *cross_kv, memory_mask, need_weights=need_weights)
        x = x + self.dropout(y)
        return x + self.dropout(self.ff(self.ln3(x))), weights


class Transformer(EncoderDecoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.positions = PositionalEncoding(cfg.d_model, cfg.max_len)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.encoder_norm = nn.LayerNorm(cfg.d_model)
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(cfg.d_model)
        self.scale = math.sqrt(cfg.d_model)
        self.init_shared_embedding()

    def embed(self, tokens: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        return self.dropout(self.positions(self.embedding(tokens) * self.scale, start))  # (B, T, C)

    def run_encoder(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.source_mask(src)[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed(src)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), mask  # (B, S, C)

    def encode(self, src: torch.Tensor) -> State:
        memory, mask = self.run_encoder(src)
        state: State = {"src_mask": mask[:, 0, 0]}  # (B, S)
        B, H = src.size(0), self.config.n_heads
        for i, layer in enumerate(self.decoder_layers):
            state[f"cross_k{i}"], state[f"cross_v{i}"] = layer.cross_attn.project_kv(memory)  # once
            empty = memory.new_zeros(B, H, 0, self.config.d_model // H)
            state[f"self_k{i}"], state[f"self_v{i}"] = empty, empty
        # Each row carries its own target position and a mask over its cache entries, so rows
        # that started decoding at different times can share a batch (continuous batching): a
        # row that joins late has its cache padded on the left with masked-out entries.
        state["tgt_pos"] = torch.zeros(B, dtype=torch.long, device=src.device)  # (B,)
        state["self_mask"] = torch.zeros(B, 0, dtype=torch.bool, device=src.device)  # (B, T')
        return state

    def decode_step(self, prev: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        position = state["tgt_pos"]  # (B,) target position of each row
        x = self.dropout(self.embedding(prev) * self.scale + self.positions.pe[position]).unsqueeze(1)  # (B, 1, C)
        mask = state["src_mask"][:, None, None, :]
        self_mask = torch.cat([state["self_mask"], torch.ones_like(prev, dtype=torch.bool)[:, None]], dim=1)  # (B, t+1)
        new_state: State = {"src_mask": state["src_mask"], "tgt_pos": position + 1, "self_mask": self_mask}
        weights = None
        for i, layer in enumerate(self.decoder_layers):
            k_new, v_new = layer.self_attn.project_kv(layer.ln1(x))
            k = torch.cat([state[f"self_k{i}"], k_new], dim=2)  # (B, H, t+1, Dh)
            v = torch.cat([state[f"self_v{i}"], v_new], dim=2)
            cross = (state[f"cross_k{i}"], state[f"cross_v{i}"])
            last = i == len(self.decoder_layers) - 1
            x, weights = layer(x, (k, v), cross, mask, causal=False, need_weights=last, self_mask=self_mask[:, None, None, :])
            new_state.update({f"self_k{i}": k, f"self_v{i}": v, f"cross_k{i}": cross[0], f"cross_v{i}": cross[1]})
        logits = F.linear(self.decoder_norm(x[:, 0]), self.embedding.weight)  # (B, V)
        return logits, new_state, weights.mean(1)[:, 0]  # alignment: heads averaged (B, S)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False):
        memory, mask = self.run_encoder(src)
        x = self.embed(tgt_in)  # (B, T, C)
        weights = None
        for i, layer in enumerate(self.decoder_layers):
            h = layer.ln1(x)
            last = i == len(self.decoder_layers) - 1
            x, weights = layer(
                x, layer.self_attn.project_kv(h), layer.cross_attn.project_kv(memory), mask,
                causal=True, need_weights=return_attention and last,
            )
        logits = F.linear(self.decoder_norm(x), self.embedding.weight)  # (B, T, V)
        return (logits, weights.mean(1)) if return_attention else logits
