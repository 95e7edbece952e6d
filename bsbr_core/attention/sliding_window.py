"""Sliding-window softmax attention: token t sees tokens t-w .. t.

Parallel form: for each query chunk of B tokens, the keys from w positions
before the chunk to its end (w + B of them, gathered with `unfold`, a band
mask inside), so cost is O(n (w + B) d) and nothing n x n is formed.
State per layer: the last (at most) w keys and values, K, V (b, H, <=w, d).
"""
from __future__ import annotations

import torch

from bsbr_core.attention.base import Attention, nonempty_keys, pad_len, pad_seq, valid_mask


class SlidingWindowAttention(Attention):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.window = cfg.window

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        b, H, n, d = q.shape
        B, w = self.chunk_size, self.window
        pad = pad_len(n, B)
        C = (n + pad) // B
        Kst = state["K"] if state is not None else q.new_zeros(b, H, 0, d)
        Vst = state["V"] if state is not None else q.new_zeros(b, H, 0, d)
        P = Kst.shape[2]  # carried keys, P <= w
        real = valid_mask(mask, b, n, q.device)
        # Key timeline: [w - P invalid slots | P carried | n new | pad invalid].
        Kext = torch.cat([q.new_zeros(b, H, w - P, d), Kst, k, q.new_zeros(b, H, pad, d)], dim=2)
        Vext = torch.cat([q.new_zeros(b, H, w - P, d), Vst, v, q.new_zeros(b, H, pad, d)], dim=2)
        ok = torch.cat([
            torch.zeros(b, w - P, dtype=torch.bool, device=q.device),
            torch.ones(b, P, dtype=torch.bool, device=q.device),
            real,
            torch.zeros(b, pad, dtype=torch.bool, device=q.device),
        ], dim=1)
        L = w + B
        Kw = Kext.unfold(2, L, B).transpose(-1, -2)  # (b, H, C, L, d)
        Vw = Vext.unfold(2, L, B).transpose(-1, -2)
        okw = ok.unfold(1, L, B)  # (b, C, L)
        j = torch.arange(B, device=q.device)[:, None]
        m_ = torch.arange(L, device=q.device)[None, :]
        band = (m_ >= j) & (m_ <= j + w)  # (B, L): key slot m of query j
        am = nonempty_keys(okw[:, :, None, :] & band)  # (b, C, B, L)
        am = am[:, None].expand(b, H, C, B, L).reshape(b, H * C, B, L)
        qc = pad_seq(q, pad).view(b, H * C, B, d)
        o = self.sdpa(qc, Kw.reshape(b, H * C, L, d), Vw.reshape(b, H * C, L, d), am)
        o = o.view(b, H, C * B, d)[:, :, :n]
        if not commit:
            return o, state
        keep = min(w, P + n)
        if keep == 0:
            return o, {"K": Kst, "V": Vst}
        return o, {"K": torch.cat([Kst, k[:, :, -w:]], 2)[:, :, -keep:],
                   "V": torch.cat([Vst, v[:, :, -w:]], 2)[:, :, -keep:]}

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        """Each query at absolute position t against the real keys at
        t-w .. t: the carried ones (positions pos0-P .. pos0-1) and the
        piece's. A query with no real key to see (padding: its output is
        discarded) sees all the keys in its window. The final state is the
        last w keys received, padding included, as `attend` keeps them."""
        b, H, n, d = q.shape
        w = self.window
        K0 = state["K"] if state is not None else q.new_zeros(b, H, 0, d)
        V0 = state["V"] if state is not None else q.new_zeros(b, H, 0, d)
        P = K0.shape[2]
        if P != min(w, pos0):
            raise ValueError(f"{P} carried keys cannot be the window before position {pos0}")
        K, V = torch.cat([K0, k], 2), torch.cat([V0, v], 2)
        key_pos = torch.arange(pos0 - P, pos0 + n, device=q.device)
        key_real = torch.cat([torch.ones(b, P, dtype=torch.bool, device=q.device),
                              valid_mask(mask, b, n, q.device)], dim=1)  # (b, P + n)
        out = torch.zeros_like(q)
        for i in range(n):
            t = pos0 + i
            allowed = ((key_pos >= t - w) & (key_pos <= t))[None, :]
            sees = allowed & key_real
            sees = torch.where(sees.any(-1, keepdim=True), sees, allowed)
            scores = (K @ q[:, :, i, :, None])[..., 0] * self.scale  # (b, H, P + n)
            p = torch.softmax(scores.masked_fill(~sees[:, None], float("-inf")), -1)
            out[:, :, i] = (p[..., None] * V).sum(2)
        keep = min(w, P + n)
        return out, {"K": K[:, :, P + n - keep:], "V": V[:, :, P + n - keep:]}
