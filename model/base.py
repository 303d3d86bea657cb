"""The interface every encoder-decoder implements; decoding, training and export rely on it.

A decoder state is a flat dict of tensors whose first dimension is the batch, so beam search can
reorder any architecture's state with one index_select and the exporter can name every tensor.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnserve.model.config import ModelConfig
from attnserve.model.tokenizer import PAD_ID

State = dict[str, torch.Tensor]


class EncoderDecoder(nn.Module):
    """Every model has `config`, one `embedding` shared by source, target and output projection
    (vocab_size x d_model, PAD row zero) and a `dropout`; subclasses build the rest, then call
    init_shared_embedding()."""

    config: ModelConfig

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(cfg.dropout)

    def encode(self, src: torch.Tensor) -> State:
        """src (B, S) token ids, PAD-padded -> the initial decoder state."""
        raise NotImplementedError

    def decode_step(self, prev: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        """prev (B,) last target token -> logits (B, V), next state, cross-attention (B, S)."""
        raise NotImplementedError

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False):
        """Teacher forcing: src (B, S), tgt_in (B, T) starting with BOS -> logits (B, T, V)
        [and cross-attention (B, T, S) when return_attention]."""
        raise NotImplementedError

    @staticmethod
    def reorder_state(state: State, index: torch.Tensor) -> State:
        return {name: tensor.index_select(0, index) for name, tensor in state.items()}

    @staticmethod
    def source_mask(src: torch.Tensor) -> torch.Tensor:
        return src != PAD_ID  # (B, S) True on real tokens

    def init_shared_embedding(self) -> None:
        """Initialise `self.embedding`, the joint source/target embedding that doubles as the
        output projection: a small N(0, 1/d) keeps the first logits near uniform (N(0, 1) would
        start the loss at twice log(V)), and the PAD row is zero. Called at the end of a model's
        __init__, after every layer has drawn its own initial weights."""
        embedding: nn.Embedding = self.embedding
        nn.init.normal_(embedding.weight, std=self.config.d_model**-0.5)
        with torch.no_grad():
            embedding.weight[PAD_ID].zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
