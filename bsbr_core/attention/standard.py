"""Standard softmax attention layer (SDPA), block-causal; the math is bsbr_core.ops.standard."""
from __future__ import annotations

import torch

from bsbr_core.attention.base import Attention
from bsbr_core.ops import standard as ops


class StandardAttention(Attention):
    ops = ops

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        return ops.streaming(q, k, v, self.chunk_size, mask, state, commit, self.sdpa)

    def attend_chunks(self, q, k, v, x, mask, parts, extras=()):
        K_prev, V_prev = parts
        T0 = K_prev.shape[2]
        K, V = torch.cat([K_prev, k], dim=2), torch.cat([V_prev, v], dim=2)
        key_ok = ops.keys_ok(mask, q.shape[0], T0, q.device)
        return ops.chunkwise(q, K, V, key_ok, T0, self.chunk_size, self.sdpa, loop="scan"), (k, v)

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        return ops.naive(q, k, v, mask, state, pos0, self.chunk_size)
