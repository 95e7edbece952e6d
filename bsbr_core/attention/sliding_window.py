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

    def naive(self, q, k, v, x, mask):
        b, H, n, d = q.shape
        t = torch.arange(n, device=q.device)
        allowed = (t[None, :] <= t[:, None]) & (t[None, :] >= t[:, None] - self.window)
        real = valid_mask(mask, b, n, q.device)
        m = allowed[None] & real[:, None, :]
        m = m | ~m.any(-1, keepdim=True)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        return torch.softmax(scores.masked_fill(~m[:, None], float("-inf")), -1) @ v
