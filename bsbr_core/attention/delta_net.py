"""DeltaNet (Schlag et al. 2021), chunkwise with the WY/UT form (Yang et al. 2024).

Recurrence (S is dk x dv, keys and queries L2-normalised, beta_t in (0, 1)):
    S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t
Equivalently e_t = b_t (v_t - S_{t-1}^T k_t), S_t = S_{t-1} + k_t e_t^T.
For a chunk starting from S_0, the e_t solve the unit lower-triangular system
    (I + tril(diag(b) K K^T, -1)) E = diag(b) (V - K S_0)
so with T = (I + A)^{-1}, A = tril(diag(b) K K^T, -1), W = T diag(b) K and
U = T diag(b) V (in parallel over all chunks):
    E = U - W S_0,  O = Q S_0 + tril(Q K^T) E,  S_next = (I - K^T W) S_0 + K^T U.
Only the d x d state is propagated chunk to chunk: the loop is one matmul a
chunk, and the outputs are computed for all chunks at once from the states
entering them. Padding tokens get b = 0, k = 0, so they change nothing.
State per layer: S (b, H, d, d).
(As in flash-linear-attention, queries are L2-normalised like the keys.)

The chunk of this algorithm is internal: the recurrence is token by token,
so any chunk length gives the same outputs and state (to round-off). It is
the largest power of two <= min(chunk_size, 64) (`SUB_CHUNK`, fla's chunk
length): at the reference chunk_size 128 this halves the B x B work per
token, for twice as many (one-matmul) steps of the loop. T is built by
blockwise doubling from batched matmuls (`inv_unit_lower`), which torch
spreads over its threads: the batched triangular solve it replaces runs one
LAPACK call per matrix, and with two threads on a busy 2-core machine it
took over ten times its one-thread CPU time.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbr_core.attention.base import Attention, pad_len, pad_seq, valid_mask

SUB_CHUNK = 64


def inv_unit_lower(A: torch.Tensor) -> torch.Tensor:
    """T = (I + L)^-1 where L is the strictly lower triangle of A (..., s, s), s a power of two.

    Blockwise doubling: the inverse of [[I + L1, 0], [L21, I + L2]] is
    [[T1, 0], [-T2 L21 T1, T2]], from 1 x 1 blocks up to s x s, each level one
    batched product pair over all blocks. Only the blocks below the diagonal
    blocks are read, so A's diagonal and upper triangle may hold anything.
    Stable (no powers of L are formed), unlike the product (I - L)(I + L^2)(I + L^4)...
    """
    *batch, s, _ = A.shape
    if s & (s - 1):
        raise ValueError(f"inv_unit_lower needs a power-of-two size, got {s}")
    T = A.new_ones(*batch, s, 1, 1)  # s diagonal blocks of 1 x 1
    w = 1
    while w < s:
        m = s // (2 * w)  # pairs of w x w diagonal blocks at this level
        T = T.view(*batch, m, 2, w, w)
        T1, T2 = T[..., 0, :, :], T[..., 1, :, :]
        # L21 of pair i: rows of block 2i + 1, columns of block 2i
        L21 = A.reshape(*batch, m, 2, w, m, 2, w).diagonal(dim1=-6, dim2=-3)[..., 1, :, 0, :, :].movedim(-1, -3)
        X = -(T2 @ (L21 @ T1))
        T = torch.cat([torch.cat([T1, torch.zeros_like(T1)], -1), torch.cat([X, T2], -1)], -2)
        w *= 2
    return T.view(*batch, s, s)


class DeltaNetAttention(Attention):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta_proj = nn.Linear(cfg.hidden_dim, cfg.num_heads)
        # the algorithm's chunk: a power of two <= min(chunk_size, SUB_CHUNK)
        self.sub_chunk = 1 << (min(cfg.block_size, SUB_CHUNK).bit_length() - 1)

    def _inputs(self, q, k, x, mask):
        """Normalised q, k and beta (b, H, n); padding tokens get k = 0, beta = 0."""
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if mask is not None:
            real = valid_mask(mask, q.shape[0], q.shape[2], q.device)
            beta, k = beta * real[:, None, :], k * real[:, None, :, None]
        return q, k, beta

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        b, H, n, d = q.shape
        B = self.sub_chunk
        q, k, beta = self._inputs(q, k, x, mask)
        pad = pad_len(n, B)
        C = (n + pad) // B
        S = state["S"] if state is not None else q.new_zeros(b, H, d, d)
        if C == 0:
            return q.new_zeros(b, H, 0, d), ({"S": S} if commit else state)
        qc = pad_seq(q, pad).view(b, H, C, B, d)
        kc = pad_seq(k, pad).view(b, H, C, B, d)
        vc = pad_seq(v, pad).view(b, H, C, B, d)
        bc = pad_seq(beta, pad, dim=-1).view(b, H, C, B, 1)
        # Chunks as one batch of N matrices (views: no copies), so that each
        # product writes its result straight into the tensor the next one reads.
        N = b * H * C
        kt = kc.transpose(-1, -2)
        bkv = bc * torch.cat([kc, vc], dim=-1)  # diag(b) [K | V]
        # [W | U] = T diag(b) [K | V]: one T for both; inv_unit_lower reads only
        # the strictly lower triangle of diag(b) K K^T, so it needs no mask.
        WU = inv_unit_lower(bkv[..., :d] @ kt) @ bkv
        W, U = WU[..., :d].reshape(N, B, d), WU[..., d:].reshape(N, B, d)
        kt = kt.reshape(N, d, B)
        # S_next = M S + K^T U with M = I - K^T W, for every chunk at once; the loop is one matmul a chunk.
        eye = torch.eye(d, dtype=q.dtype, device=q.device).expand(N, d, d)
        M = torch.baddbmm(eye, kt, W, alpha=-1).view(b * H, C, d, d)
        KU = torch.bmm(kt, U).view(b * H, C, d, d)
        S = S.reshape(b * H, d, d)
        entering = []
        for c in range(C):
            entering.append(S)
            S = torch.baddbmm(KU[:, c], M[:, c], S)
        S0 = torch.stack(entering, 1).view(N, d, d)  # the state entering each chunk
        E = torch.baddbmm(U, W, S0, alpha=-1)  # U - W S0
        qc = qc.reshape(N, B, d)
        upper = torch.ones(B, B, dtype=torch.bool, device=q.device).triu(1)
        QK = torch.bmm(qc, kt).masked_fill_(upper, 0.0)  # inclusive: o_t uses S_t
        o = torch.baddbmm(torch.bmm(qc, S0), QK, E).view(b, H, C * B, d)[:, :, :n]
        return o, ({"S": S.view(b, H, d, d)} if commit else state)

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
