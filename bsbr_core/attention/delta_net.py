"""DeltaNet layer (Schlag et al. 2021, chunkwise as Yang et al. 2024); the math is bsbr_core.ops.delta_net.

The layer's own part: beta_t = sigmoid(W_beta x_t + b) per head. The torch
path runs the op with the doubling inverse and a Python chunk loop over
chunks of `sub_chunk` tokens; the ONNX graph with forward substitution and
a Scan loop over the block size's chunks (the same function, another strategy).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bsbr_core.attention.base import Attention
from bsbr_core.ops import delta_net as ops
from bsbr_core.ops.delta_net import SUB_CHUNK, inv_unit_lower  # noqa: F401 - re-exported

# The ONNX graph's strategies (ops.delta_net.chunkwise): no triangular solve in ONNX, loops as Scan.
EXPORT_SOLVE, EXPORT_LOOP = "substitution", "scan"


class DeltaNetAttention(Attention):
    ops = ops

    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta_proj = nn.Linear(cfg.hidden_dim, cfg.num_heads)
        self.sub_chunk = ops.sub_chunk(cfg.block_size)  # the algorithm's chunk

    def beta(self, x):
        """x (b, n, D) -> beta (b, H, n) in (0, 1)."""
        return torch.sigmoid(self.beta_proj(x)).transpose(1, 2)

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        q, k, beta = ops.prepare(q, k, self.beta(x), mask)
        return ops.streaming(q, k, v, beta, self.chunk_size, state, commit)

    def attend_chunks(self, q, k, v, x, mask, parts, extras=()):
        q, k, beta = ops.prepare(q, k, self.beta(x), mask)
        o, S = ops.chunkwise(q, k, v, beta, self.chunk_size, parts[0], solve=EXPORT_SOLVE, loop=EXPORT_LOOP)
        return o, (S,)

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        """The delta rule token by token from the carried S (pos0 does not enter)."""
        q, k, beta = ops.prepare(q, k, self.beta(x), mask)
        return ops.naive(q, k, v, beta, state)
