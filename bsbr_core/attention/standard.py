"""Standard softmax attention (torch SDPA), block-causal.

Token t in chunk c sees every token of chunks 0..c, so reading a document in
pieces with a KV cache is exact. Each query chunk runs one SDPA call against
the keys up to the end of its chunk, so no n x n mask is ever built (the
score matrix of one call is B x n). With max_length the model reads only the
first max_length tokens as one block: full bidirectional attention (the
BERT-512 baseline); the block size is then max_length (see ModelConfig).

State per layer: K, V (b, H, T, d) after RoPE, as append logs.
"""
from __future__ import annotations

import torch

from bsbr_core.attention.base import Attention, nonempty_keys, valid_mask
from bsbr_core.state import AppendLog


class StandardAttention(Attention):
    def attend(self, q, k, v, x, pos0, mask, state, commit):
        b, H, n, d = q.shape
        B = self.chunk_size
        state = state if state is not None else {"K": AppendLog.empty(2), "V": AppendLog.empty(2)}
        T0 = state["K"].length
        K, K_log = state["K"].extend(k, commit)
        V, V_log = state["V"].extend(v, commit)
        key_ok = None
        if mask is not None and not bool(mask.all()):
            key_ok = torch.cat([torch.ones(b, T0, dtype=torch.bool, device=q.device), mask.to(torch.bool)], dim=1)
        outs = []
        for s in range(0, n, B):
            e = min(s + B, n)
            am = None
            if key_ok is not None:
                am = nonempty_keys(key_ok[:, : T0 + e])[:, None, None, :]
            outs.append(self.sdpa(q[:, :, s:e], K[:, :, : T0 + e], V[:, :, : T0 + e], am))
        o = torch.cat(outs, dim=2) if outs else q.new_zeros(b, H, 0, d)
        return o, ({"K": K_log, "V": V_log} if commit else state)

    def naive(self, q, k, v, x, mask):
        b, H, n, d = q.shape
        B = self.chunk_size
        chunk = torch.arange(n, device=q.device) // B
        allowed = chunk[None, :] <= chunk[:, None]  # (n, n): key chunk <= query chunk
        real = valid_mask(mask, b, n, q.device)
        m = allowed[None] & real[:, None, :]
        m = m | ~m.any(-1, keepdim=True)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~m[:, None], float("-inf"))
        return torch.softmax(scores, -1) @ v
