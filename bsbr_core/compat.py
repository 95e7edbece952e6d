"""Drop-in names of the `bsbr` 0.1.x package, on this package's correct BSBR.

Same constructor arguments as bsbr 0.1.x; forwards take (hidden_states |
input_ids, attention_mask) and return hidden states (batch, seq, hidden_dim).
Unlike 0.1.x, tokens never see later chunks, attention_mask is honoured,
and cost is linear in the sequence length.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bsbr_core.config import ModelConfig
from bsbr_core.model import Block, Encoder


def _config(hidden_dim, num_heads, chunk_size, dropout, compression_factor, ff_dim=None, vocab_size=1, num_layers=1):
    return ModelConfig(
        arch="bsbr", vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
        ff_dim=ff_dim or 4 * hidden_dim, chunk_size=chunk_size, compression_factor=compression_factor or 1,
        dropout=dropout, labels=["_"],
    )


def _mask(attention_mask):
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    return None if bool(mask.all()) else mask


class BSBRAttention(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, dropout: float = 0.1,
                 compression_factor: int | None = None):
        super().__init__()
        self.config = _config(hidden_dim, num_heads, chunk_size, dropout, compression_factor)
        from bsbr_core.attention.bsbr import BSBRAttentionCore

        self.core = BSBRAttentionCore(self.config)
        self.drop = nn.Dropout(dropout)

    def forward(self, hidden_states, attention_mask=None):
        y, _ = self.core(hidden_states, 0, _mask(attention_mask), None, False)
        return self.drop(y)


class BSBRLayer(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, ff_dim: int, dropout: float = 0.1,
                 compression_factor: int | None = None):
        super().__init__()
        self.block = Block(_config(hidden_dim, num_heads, chunk_size, dropout, compression_factor, ff_dim))

    def forward(self, hidden_states, attention_mask=None):
        y, _ = self.block(hidden_states, 0, _mask(attention_mask), None, False)
        return y


class BSBRModel(nn.Module):
    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, chunk_size: int,
                 ff_dim: int, dropout: float = 0.1, compression_factor: int | None = None):
        super().__init__()
        self.config = _config(hidden_dim, num_heads, chunk_size, dropout, compression_factor, ff_dim,
                              vocab_size, num_layers)
        self.encoder = Encoder(self.config)

    def forward(self, input_ids, attention_mask=None):
        y, _ = self.encoder(input_ids, 0, _mask(attention_mask), None, False)
        return y
