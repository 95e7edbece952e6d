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

from bsbr_core.attention.base import Attention, carried, nonempty_keys, valid_mask
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

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        """Each query at absolute position t against every key at u with
        u // B <= t // B: the cached ones (positions 0 .. pos0-1) and the
        piece's real ones. A query with no real key to see (padding: its
        output is discarded) sees all its allowed keys."""
        b, H, n, d = q.shape
        B = self.chunk_size
        K0 = carried(state["K"]) if state is not None else None
        V0 = carried(state["V"]) if state is not None else None
        K0 = K0 if K0 is not None else q.new_zeros(b, H, 0, d)
        V0 = V0 if V0 is not None else q.new_zeros(b, H, 0, d)
        T0 = K0.shape[2]
        if T0 != pos0:
            raise ValueError(f"a KV cache of {T0} tokens cannot precede position {pos0}")
        K, V = torch.cat([K0, k], 2), torch.cat([V0, v], 2)
        key_pos = torch.arange(T0 + n, device=q.device)
        key_real = torch.cat([torch.ones(b, T0, dtype=torch.bool, device=q.device),
                              valid_mask(mask, b, n, q.device)], dim=1)  # (b, T0 + n)
        out = torch.zeros_like(q)
        for i in range(n):
            t = pos0 + i
            allowed = (key_pos // B <= t // B)[None, :]  # (1, T0 + n)
            sees = allowed & key_real
            sees = torch.where(sees.any(-1, keepdim=True), sees, allowed)  # (b, T0 + n)
            scores = (K @ q[:, :, i, :, None])[..., 0] * self.scale  # (b, H, T0 + n)
            p = torch.softmax(scores.masked_fill(~sees[:, None], float("-inf")), -1)
            out[:, :, i] = (p[..., None] * V).sum(2)
        return out, {"K": AppendLog.from_tensor(K, 2), "V": AppendLog.from_tensor(V, 2)}
