"""DeltaNet (Schlag et al. 2021), chunkwise with the WY/UT form (Yang et al. 2024).

Recurrence (S is dk x dv, keys and queries L2-normalised, beta_t in (0, 1)):
    S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t
Equivalently e_t = b_t (v_t - S_{t-1}^T k_t), S_t = S_{t-1} + k_t e_t^T.
For a chunk starting from S_0, the e_t solve the unit lower-triangular system
    (I + tril(diag(b) K K^T, -1)) E = diag(b) (V - K S_0)
so with W = T K, U = T V, T = (I + A)^{-1} diag(b) (one triangular solve per
chunk, in parallel over all chunks):
    E = U - W S_0,  O = Q S_0 + tril(Q K^T) E,  S_next = S_0 + K^T E.
Only the d x d state is propagated chunk to chunk. Padding tokens get
b = 0, k = 0, so they change nothing. State per layer: S (b, H, d, d).
(As in flash-linear-attention, queries are L2-normalised like the keys.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbr_core.attention.base import Attention, pad_len, pad_seq, valid_mask


class DeltaNetAttention(Attention):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta_proj = nn.Linear(cfg.hidden_dim, cfg.num_heads)

    def _inputs(self, q, k, x, mask):
        b, H, n, d = q.shape
        real = valid_mask(mask, b, n, q.device)
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2) * real[:, None, :]  # (b, H, n)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1) * real[:, None, :, None], beta

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        b, H, n, d = q.shape
        B = self.chunk_size
        q, k, beta = self._inputs(q, k, x, mask)
        pad = pad_len(n, B)
        C = (n + pad) // B
        qc = pad_seq(q, pad).view(b, H, C, B, d)
        kc = pad_seq(k, pad).view(b, H, C, B, d)
        vc = pad_seq(v, pad).view(b, H, C, B, d)
        bc = pad_seq(beta, pad, dim=-1).view(b, H, C, B, 1)
        eye = torch.eye(B, dtype=q.dtype, device=q.device)
        A = (bc * (kc @ kc.transpose(-1, -2))).tril(-1)
        IA = A + eye
        W = torch.linalg.solve_triangular(IA, bc * kc, upper=False, unitriangular=True)
        U = torch.linalg.solve_triangular(IA, bc * vc, upper=False, unitriangular=True)
        QK = (qc @ kc.transpose(-1, -2)).tril()  # inclusive: o_t uses S_t
        S = state["S"] if state is not None else q.new_zeros(b, H, d, d)
        outs = []
        for c in range(C):
            E = U[:, :, c] - W[:, :, c] @ S
            outs.append(qc[:, :, c] @ S + QK[:, :, c] @ E)
            S = S + kc[:, :, c].transpose(-1, -2) @ E
        o = torch.stack(outs, 2).view(b, H, C * B, d)[:, :, :n] if outs else q.new_zeros(b, H, 0, d)
        return o, ({"S": S} if commit else state)

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        """The delta rule token by token from the carried S (pos0 does not enter)."""
        b, H, n, d = q.shape
        q, k, beta = self._inputs(q, k, x, mask)
        S = state["S"] if state is not None else q.new_zeros(b, H, d, d)
        eye = torch.eye(d, dtype=q.dtype, device=q.device)
        out = torch.zeros_like(q)
        for t in range(n):
            kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t, None, None]
            S = (eye - bt * kt[..., :, None] * kt[..., None, :]) @ S + bt * kt[..., :, None] * vt[..., None, :]
            out[:, :, t] = (q[:, :, t, None, :] @ S)[:, :, 0]
        return out, {"S": S}
