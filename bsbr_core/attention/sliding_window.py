"""Sliding-window softmax attention layer; the math is bsbr_core.ops.sliding_window."""
from __future__ import annotations

from bsbr_core.attention.base import Attention
from bsbr_core.ops import sliding_window as ops


class SlidingWindowAttention(Attention):
    ops = ops
    export_inputs = ops.EXPORT_INPUTS

    def __init__(self, cfg):
        super().__init__(cfg)
        self.window = cfg.window

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        return ops.streaming(q, k, v, self.window, self.chunk_size, mask, state, commit, self.sdpa)

    def attend_chunks(self, q, k, v, x, mask, parts, extras=()):
        window_count, piece_length = extras
        o, K, V = ops.chunkwise(q, k, v, *parts, window_count, piece_length, self.window, self.chunk_size,
                                mask, self.sdpa)
        return o, (K, V)

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        return ops.naive(q, k, v, mask, state, pos0, self.window)
