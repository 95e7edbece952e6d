"""Linear attention (Katharopoulos et al. 2020), causal: the one definition.

    phi(x) = elu(x) + 1
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t),  S_t = sum_{s<=t} phi(k_s) v_s^T,  z_t = sum_{s<=t} phi(k_s)

Forms (q, k, v (b, H, n, d) per head, after RoPE):
- `chunkwise`: whole chunks with the carried (S, z) as tensors: inside a
  chunk the causal (B x B) product, across chunks the running S, z of all
  earlier chunks (an exclusive cumulative sum, plus the carried state).
  Padding tokens get phi(k) = 0 so they add nothing to S or z. The torch
  layer and the ONNX graph both run it.
- `streaming`: a piece of any length with the carried state as a dict
  ({"S", "z"}); pads to whole chunks and calls `chunkwise`.
- `naive`: the recurrence token by token (the reference of the tests).
State per layer: S (b, H, d, d), z (b, H, d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bsbr_core.ops.common import StateEntry, pad_len, pad_seq, padded_mask, valid_mask

EPS = 1e-6


def feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def state_layout(cfg) -> list[StateEntry]:
    H, d = cfg.num_heads, cfg.head_dim
    return [StateEntry("S", "tensor", (H, d, d)), StateEntry("z", "tensor", (H, d))]


def chunkwise(q, k, v, chunk: int, mask=None, S0=None, z0=None):
    """q, k, v (b, H, n, d), n a multiple of `chunk`; mask (b, n) bool (None:
    every token real); S0 (b, H, d, d), z0 (b, H, d) carried (None: zeros).
    Returns (o (b, H, n, d), S, z after the piece)."""
    b, H, n, d = q.shape
    B = chunk
    C = n // B
    fq = feature_map(q).view(b, H, C, B, d)
    fk = feature_map(k)
    if mask is not None:
        fk = fk * mask[:, None, :, None]
    fk = fk.view(b, H, C, B, d)
    vc = v.view(b, H, C, B, d)
    S0 = S0 if S0 is not None else q.new_zeros(b, H, d, d)
    z0 = z0 if z0 is not None else q.new_zeros(b, H, d)
    kv = fk.transpose(-1, -2) @ vc  # (b, H, C, d, d)
    ksum = fk.sum(3)  # (b, H, C, d)
    S_before = S0[:, :, None] + kv.cumsum(2) - kv  # state before each chunk
    z_before = z0[:, :, None] + ksum.cumsum(2) - ksum
    causal = torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
    A = (fq @ fk.transpose(-1, -2)) * causal  # (b, H, C, B, B)
    num = A @ vc + fq @ S_before
    den = A.sum(-1) + (fq * z_before[:, :, :, None, :]).sum(-1)
    o = (num / (den[..., None] + EPS)).view(b, H, n, d)
    return o, S0 + kv.sum(2), z0 + ksum.sum(2)


def streaming(q, k, v, chunk: int, mask, state, commit: bool):
    """A piece of any length n from the carried state {"S", "z"} (None: a new
    document). Returns (o (b, H, n, d), the new state; the old one if not commit)."""
    b, n = q.shape[0], q.shape[2]
    pad = pad_len(n, chunk)
    real = padded_mask(mask, b, n, pad, q.device)
    S0 = state["S"] if state is not None else None
    z0 = state["z"] if state is not None else None
    o, S, z = chunkwise(pad_seq(q, pad), pad_seq(k, pad), pad_seq(v, pad), chunk, real, S0, z0)
    o = o[:, :, :n]
    return o, ({"S": S, "z": z} if commit else state)


def naive(q, k, v, mask, state=None):
    """The recurrence token by token from the carried S, z."""
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
