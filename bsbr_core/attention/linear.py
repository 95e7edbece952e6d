"""Linear attention layer (Katharopoulos et al. 2020); the math is bsbr_core.ops.linear."""
from __future__ import annotations

from bsbr_core.attention.base import Attention
from bsbr_core.ops import linear as ops


class LinearAttention(Attention):
    ops = ops

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        return ops.streaming(q, k, v, self.chunk_size, mask, state, commit)

    def attend_chunks(self, q, k, v, x, mask, parts, extras=()):
        o, S, z = ops.chunkwise(q, k, v, self.chunk_size, mask, *parts)
        return o, (S, z)

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        """pos0 does not enter: the recurrence is position-free."""
        return ops.naive(q, k, v, mask, state)
