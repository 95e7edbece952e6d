"""BSBR layer: softmax attention inside chunks + retrieval of earlier chunks'
states; the math is bsbr_core.ops.bsbr (docs/architecture.md 1.1).

Parameters per head: d*(dk + dv) + dv*d with compression (proj_k, proj_v,
unproj_v), i.e. O(d^2); meta_key W_h and meta_query W_r (D x D) shared by
the heads; the gate g, one learned scalar per head, initialised to 1/sqrt(d)
so the retrieved term starts on the scale of a softmax score's inputs
(q.k/sqrt(d)) instead of dominating the local term.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from bsbr_core.attention.base import Attention
from bsbr_core.ops import bsbr as ops
from bsbr_core.ops.bsbr import compressed_dims  # noqa: F401 - re-exported


class BSBRAttentionCore(Attention):
    ops = ops

    def __init__(self, cfg):
        super().__init__(cfg)
        H, d, D = cfg.num_heads, cfg.head_dim, cfg.hidden_dim
        self.causal = cfg.causal
        self.meta_key = nn.Linear(D, D, bias=False)    # W_h
        self.meta_query = nn.Linear(D, D, bias=False)  # W_r
        self.gate = nn.Parameter(torch.full((H,), 1.0 / math.sqrt(d)))
        self.compressed = cfg.compression_factor > 1
        self.dk, self.dv = ops.state_dims(cfg)
        if self.compressed:
            self.proj_k = nn.Parameter(torch.randn(H, d, self.dk) / math.sqrt(d))
            self.proj_v = nn.Parameter(torch.randn(H, d, self.dv) / math.sqrt(d))
            self.unproj_v = nn.Parameter(torch.randn(H, self.dv, d) / math.sqrt(self.dv))

    def params(self) -> ops.Params:
        """This layer's weights as the op takes them."""
        c = self.compressed
        return ops.Params(self.meta_key.weight, self.meta_query.weight, self.gate,
                          self.proj_k if c else None, self.proj_v if c else None, self.unproj_v if c else None,
                          self.causal)

    def retrieval_weights(self, x, mask=None):
        """The retrieval softmax a_{c,j} (b, H, C, C) of a document read
        one-shot from position 0 (ops.bsbr.retrieval_weights); x (b, n, D)
        is the layer's normalised input, mask (b, n) its real tokens."""
        return ops.retrieval_weights(self.params(), x, self.chunk_size, mask)

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        return ops.streaming(self.params(), q, k, v, x, self.chunk_size, mask, state, commit, self.sdpa)

    def attend_chunks(self, q, k, v, x, mask, parts, extras=()):
        F_prev, h_prev, *r_last = parts
        o, F_new, h_new, r_next = ops.chunkwise(self.params(), q, k, v, x, self.chunk_size, F_prev, h_prev,
                                                r_last[0] if r_last else None, mask, self.sdpa)
        return o, (F_new, h_new) + ((r_next,) if self.causal else ())

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        return ops.naive(self.params(), q, k, v, x, mask, state, pos0, self.chunk_size)
