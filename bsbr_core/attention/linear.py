"""Linear attention (Katharopoulos et al. 2020), causal, chunkwise-parallel.

    phi(x) = elu(x) + 1
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t),  S_t = sum_{s<=t} phi(k_s) v_s^T,  z_t = sum_{s<=t} phi(k_s)

Chunkwise: inside a chunk the causal (B x B) product; across chunks the
running S, z of all earlier chunks (an exclusive cumulative sum over the
piece, plus the carried state). Padding tokens get phi(k) = 0 so they add
nothing to S or z. State per layer: S (b, H, d, d), z (b, H, d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bsbr_core.attention.base import Attention, pad_len, pad_seq, valid_mask

EPS = 1e-6


def feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


class LinearAttention(Attention):
    def attend(self, q, k, v, x, pos0, mask, state, commit):
        b, H, n, d = q.shape
        B = self.chunk_size
        pad = pad_len(n, B)
        C = (n + pad) // B
        real = pad_seq(valid_mask(mask, b, n, q.device), pad, dim=1, value=False)
        fq = pad_seq(feature_map(q), pad).view(b, H, C, B, d)
        fk = (pad_seq(feature_map(k), pad) * real[:, None, :, None]).view(b, H, C, B, d)
        vc = pad_seq(v, pad).view(b, H, C, B, d)
        S0 = state["S"] if state is not None else q.new_zeros(b, H, d, d)
        z0 = state["z"] if state is not None else q.new_zeros(b, H, d)
        kv = fk.transpose(-1, -2) @ vc  # (b, H, C, d, d)
        ksum = fk.sum(3)  # (b, H, C, d)
        S_before = S0[:, :, None] + kv.cumsum(2) - kv  # state before each chunk
        z_before = z0[:, :, None] + ksum.cumsum(2) - ksum
        causal = torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
        A = (fq @ fk.transpose(-1, -2)) * causal  # (b, H, C, B, B)
        num = A @ vc + fq @ S_before
        den = A.sum(-1) + (fq * z_before[:, :, :, None, :]).sum(-1)
        o = (num / (den[..., None] + EPS)).view(b, H, C * B, d)[:, :, :n]
        if not commit:
            return o, state
        return o, {"S": S0 + kv.sum(2), "z": z0 + ksum.sum(2)}

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        """The recurrence token by token from the carried S, z (pos0 does not enter)."""
        b, H, n, d = q.shape
        real = valid_mask(mask, b, n, q.device)
        fq, fk = feature_map(q), feature_map(k)
        out = torch.zeros_like(q)
        S = state["S"] if state is not None else q.new_zeros(b, H, d, d)
        z = state["z"] if state is not None else q.new_zeros(b, H, d)
        for t in range(n):
            on = real[:, t].to(q.dtype)[:, None, None]
            S = S + on[..., None] * torch.einsum("bhi,bhj->bhij", fk[:, :, t], v[:, :, t])
            z = z + on * fk[:, :, t]
            num = torch.einsum("bhi,bhij->bhj", fq[:, :, t], S)
            den = (fq[:, :, t] * z).sum(-1, keepdim=True)
            out[:, :, t] = num / (den + EPS)
        return out, {"S": S, "z": z}
