"""DeltaNet (Schlag et al. 2021), chunkwise with the WY/UT form (Yang et al. 2024): the one definition.

Recurrence (S is dk x dv, keys and queries L2-normalised, beta_t in (0, 1)):
    S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t
Equivalently e_t = b_t (v_t - S_{t-1}^T k_t), S_t = S_{t-1} + k_t e_t^T.
For a chunk starting from S_0, the e_t solve the unit lower-triangular system
    (I + tril(diag(b) K K^T, -1)) E = diag(b) (V - K S_0)
so with T = (I + A)^{-1}, A = tril(diag(b) K K^T, -1), W = T diag(b) K and
U = T diag(b) V (in parallel over all chunks):
    E = U - W S_0,  O = Q S_0 + tril(Q K^T) E,  S_next = (I - K^T W) S_0 + K^T U.
Only the d x d state is propagated chunk to chunk: the loop is one matmul a
chunk (S_next = M S_0 + K^T U, M = I - K^T W), and the outputs are computed
for all chunks at once from the states entering them. Padding tokens get
b = 0, k = 0, so they change nothing. State per layer: S (b, H, d, d).
(As in flash-linear-attention, queries are L2-normalised like the keys.)

Forms:
- `chunkwise`: whole chunks from a carried S, with two strategies that the
  torch layer and the ONNX graph pick between and the tests check against
  `naive`: the triangular solve (`solve`) by blockwise doubling
  (`inv_unit_lower`, batched matmuls that torch spreads over its threads; a
  batched triangular solve runs one LAPACK call per matrix, and with two
  threads on a busy 2-core machine took over ten times its one-thread CPU
  time) or by forward substitution (`solve_forward`, one ONNX Scan
  iteration per row: ONNX has no triangular solve, and the closed form
  (I + A)^-1 = prod_j (I + (-A)^(2^j)) passes through powers of A with huge
  entries that cancel, NaN at B = 128); the chunk loop (`loop`) in Python or
  as `torch._higher_order_ops.scan` (ONNX Scan).
- `streaming`: a piece of any length from the carried {"S"}; pads to whole
  chunks of `sub_chunk(block_size)` and runs `chunkwise` (doubling, Python loop).
- `naive`: the delta rule token by token.

The chunk of this algorithm is internal: the recurrence is token by token,
so any chunk length gives the same outputs and state (to round-off). The
torch layer uses the largest power of two <= min(chunk_size, 64)
(`SUB_CHUNK`, fla's chunk length): at the reference chunk_size 128 this
halves the B x B work per token, for twice as many (one-matmul) steps of the loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bsbr_core.ops.common import StateEntry, pad_len, pad_seq, valid_mask

SUB_CHUNK = 64
SOLVES = ("doubling", "substitution")
LOOPS = ("python", "scan")


def sub_chunk(block_size: int) -> int:
    """The algorithm's chunk for a block size: a power of two <= min(block_size, SUB_CHUNK)."""
    return 1 << (min(block_size, SUB_CHUNK).bit_length() - 1)


def state_layout(cfg) -> list[StateEntry]:
    H, d = cfg.num_heads, cfg.head_dim
    return [StateEntry("S", "tensor", (H, d, d))]


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


def solve_forward(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with (I + L) X = rhs, L the strictly lower triangle of A (..., B, B), rhs (..., B, e).

    Forward substitution, one row per Scan iteration: X starts as rhs and row
    i becomes rhs_i - L_i X (L_i reads only the rows before i, already solved).
    What torch.linalg.solve_triangular computes, in ops ONNX has.
    """
    from torch._higher_order_ops.scan import scan

    B = A.shape[-1]
    rows = A.tril(-1).movedim(-2, 0)  # (B, ..., B): row i of every chunk's L
    onehot = torch.eye(B, dtype=A.dtype, device=A.device)  # (B, B): where row i goes

    def substitute(X, xs):
        # size-1 axes are made here, not in the scanned inputs: the exporter
        # traces those sizes as symbols that might not broadcast
        a_i, e_i = xs
        X = X - e_i[:, None] * (a_i.unsqueeze(-2) @ X)
        return X, X.new_zeros(())

    X, _ = scan(substitute, rhs, [rows, onehot])
    return X


def solve_unit_lower(A: torch.Tensor, rhs: torch.Tensor, solve: str = "doubling") -> torch.Tensor:
    """(I + L)^-1 rhs, L the strictly lower triangle of A, by `solve` (SOLVES)."""
    if solve == "doubling":
        return inv_unit_lower(A) @ rhs
    if solve == "substitution":
        return solve_forward(A, rhs)
    raise ValueError(f"unknown solve {solve!r}; expected one of {SOLVES}")


def states_entering(M: torch.Tensor, KU: torch.Tensor, S: torch.Tensor, loop: str = "python"):
    """S_{c+1} = M_c S_c + KU_c over the chunk axis 1 of M, KU (N, C, d, d)
    from S (N, d, d). Returns (the state entering each chunk (N, C, d, d), the final state)."""
    if loop == "python":
        entering = []
        for c in range(M.shape[1]):
            entering.append(S)
            S = torch.baddbmm(KU[:, c], M[:, c], S)
        return torch.stack(entering, 1), S
    if loop == "scan":
        from torch._higher_order_ops.scan import scan

        def step(S, xs):
            M_c, KU_c = xs
            return torch.baddbmm(KU_c, M_c, S), S.clone()  # scan outputs must not alias the carry

        S, entering = scan(step, S, [M.movedim(1, 0), KU.movedim(1, 0)])
        return entering.movedim(0, 1), S
    raise ValueError(f"unknown loop {loop!r}; expected one of {LOOPS}")


def prepare(q, k, beta, mask):
    """L2-normalised q, k; padding tokens (mask False) get k = 0 and beta = 0.
    beta (b, H, n) in (0, 1); mask (b, n) bool or None (every token real)."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if mask is not None:
        real = valid_mask(mask, q.shape[0], q.shape[2], q.device)
        beta, k = beta * real[:, None, :], k * real[:, None, :, None]
    return q, k, beta


def chunkwise(q, k, v, beta, chunk: int, S0=None, solve: str = "doubling", loop: str = "python"):
    """q, k, v (b, H, n, d) as `prepare` returns them, beta (b, H, n), n a
    multiple of `chunk` (a power of two for solve="doubling"), n > 0; S0 (b, H, d, d)
    carried (None: zeros). Returns (o (b, H, n, d), S after the piece)."""
    b, H, n, d = q.shape
    B = chunk
    C = n // B
    S = S0 if S0 is not None else q.new_zeros(b, H, d, d)
    qc, kc, vc = q.view(b, H, C, B, d), k.view(b, H, C, B, d), v.view(b, H, C, B, d)
    bc = beta.view(b, H, C, B, 1)
    # Chunks as one batch of N matrices (views: no copies), so that each
    # product writes its result straight into the tensor the next one reads.
    N = b * H * C
    kt = kc.transpose(-1, -2)
    bkv = bc * torch.cat([kc, vc], dim=-1)  # diag(b) [K | V]
    # [W | U] = T diag(b) [K | V]: one T for both; the solve reads only the
    # strictly lower triangle of diag(b) K K^T, so it needs no mask.
    WU = solve_unit_lower(bkv[..., :d] @ kt, bkv, solve)
    W, U = WU[..., :d].reshape(N, B, d), WU[..., d:].reshape(N, B, d)
    kt = kt.reshape(N, d, B)
    # S_next = M S + K^T U with M = I - K^T W, for every chunk at once; the loop is one matmul a chunk.
    eye = torch.eye(d, dtype=q.dtype, device=q.device).expand(N, d, d)
    M = torch.baddbmm(eye, kt, W, alpha=-1).view(b * H, C, d, d)
    KU = torch.bmm(kt, U).view(b * H, C, d, d)
    entering, S = states_entering(M, KU, S.reshape(b * H, d, d), loop)
    S0s = entering.reshape(N, d, d)  # the state entering each chunk
    E = torch.baddbmm(U, W, S0s, alpha=-1)  # U - W S0
    qc = qc.reshape(N, B, d)
    upper = torch.ones(B, B, dtype=torch.bool, device=q.device).triu(1)
    QK = torch.bmm(qc, kt).masked_fill_(upper, 0.0)  # inclusive: o_t uses S_t
    o = torch.baddbmm(torch.bmm(qc, S0s), QK, E).view(b, H, n, d)
    return o, S.view(b, H, d, d)


def streaming(q, k, v, beta, block_size: int, state, commit: bool):
    """A piece of any length from the carried {"S"} (None: a new document); q,
    k, beta as `prepare` returns them. Returns (o, the new state; the old one if not commit)."""
    b, H, n, d = q.shape
    B = sub_chunk(block_size)
    pad = pad_len(n, B)
    S0 = state["S"] if state is not None else q.new_zeros(b, H, d, d)
    if n == 0:
        return q.new_zeros(b, H, 0, d), ({"S": S0} if commit else state)
    o, S = chunkwise(pad_seq(q, pad), pad_seq(k, pad), pad_seq(v, pad), pad_seq(beta, pad, dim=-1), B, S0)
    return o[:, :, :n], ({"S": S} if commit else state)


def naive(q, k, v, beta, state=None):
    """The delta rule token by token from the carried S; q, k, beta as `prepare` returns them."""
    b, H, n, d = q.shape
    S = state["S"] if state is not None else q.new_zeros(b, H, d, d)
    eye = torch.eye(d, dtype=q.dtype, device=q.device)
    out = torch.zeros_like(q)
    for t in range(n):
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t, None, None]
        S = (eye - bt * kt[..., :, None] * kt[..., None, :]) @ S + bt * kt[..., :, None] * vt[..., None, :]
        out[:, :, t] = (q[:, :, t, None, :] @ S)[:, :, 0]
    return out, {"S": S}
