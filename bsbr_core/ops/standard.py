"""Standard softmax attention (SDPA), block-causal: the one definition.

Token t in chunk c sees every token of chunks 0..c, so reading a document in
pieces with a KV cache is exact. Each query chunk runs one SDPA call against
the keys up to the end of its chunk (`attend_prefix`), so no n x n mask is
ever built (the score matrix of one call is B x n). With max_length the
model reads only the first max_length tokens as one block: full
bidirectional attention (the BERT-512 baseline); the block size is then max_length.

Forms:
- `chunkwise`: the queries of a piece against all keys so far, one
  `attend_prefix` per query chunk, the loop over chunks in Python (any
  length; the torch layer) or as `torch._higher_order_ops.scan` (whole
  chunks; the ONNX graph: each iteration slices the keys up to its chunk's
  end, so the cost stays block-causal).
- `streaming`: a piece from the carried {"K", "V"} append logs.
- `naive`: each query against its allowed keys, one by one.
State per layer: K, V (b, H, T, d) after RoPE, as append logs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bsbr_core.ops.common import StateEntry, carried, nonempty_keys, valid_mask
from bsbr_core.state import AppendLog

LOOPS = ("python", "scan")


def state_layout(cfg) -> list[StateEntry]:
    H, d = cfg.num_heads, cfg.head_dim
    return [StateEntry("K", "log", (H, -1, d)), StateEntry("V", "log", (H, -1, d))]


def export_history(cfg) -> int:
    """An example history length (tokens of the KV cache) for tracing the graph."""
    return 4 * cfg.block_size + 1


def attend_prefix(q_c, K, V, key_ok, end, sdpa=F.scaled_dot_product_attention, spell_queries: bool = False):
    """Queries q_c (b, H, Lq, d) against the first `end` keys of K, V (b, H, T, d);
    key_ok (b, T) bool or None (every key real). spell_queries: the mask as
    (b, 1, Lq, end) rather than broadcast over queries (ORT's kernel for the
    ONNX Attention op (opset 23) wants the query axis spelled out)."""
    am = None
    if key_ok is not None:
        am = nonempty_keys(key_ok.narrow(1, 0, end))[:, None, None, :]
        if spell_queries:
            am = am.expand(q_c.shape[0], 1, q_c.shape[2], end)
    return sdpa(q_c, K.narrow(2, 0, end), V.narrow(2, 0, end), am)


def keys_ok(mask, b: int, T0: int, device) -> torch.Tensor:
    """(b, T0 + n): the T0 cached keys (all real) and the piece's mask (b, n)."""
    return torch.cat([torch.ones(b, T0, dtype=torch.bool, device=device), mask.to(torch.bool)], dim=1)


def chunkwise(q, K, V, key_ok, T0, chunk: int, sdpa=F.scaled_dot_product_attention, loop: str = "python"):
    """q (b, H, n, d) the piece's queries; K, V (b, H, T0 + n, d) every key so
    far (the T0 cached, then the piece's); key_ok (b, T0 + n) bool or None.
    Query chunk c sees keys [0, T0 + (c + 1) B). loop "scan" needs whole chunks
    and a T0 that may be a traced size. Returns o (b, H, n, d)."""
    b, H, n, d = q.shape
    B = chunk
    if loop == "python":
        outs = [attend_prefix(q[:, :, s:min(s + B, n)], K, V, key_ok, T0 + min(s + B, n), sdpa) for s in range(0, n, B)]
        return torch.cat(outs, dim=2) if outs else q.new_zeros(b, H, 0, d)
    if loop != "scan":
        raise ValueError(f"unknown loop {loop!r}; expected one of {LOOPS}")
    from torch._higher_order_ops.scan import scan

    C = n // B
    qc = q.view(b, H, C, B, d).permute(2, 0, 1, 3, 4)  # (C, b, H, B, d): scanned over chunks
    ends = T0 + (torch.arange(C, device=q.device) + 1) * B

    def query_chunk(carry, xs):
        q_c, end = xs
        e = end.item()
        torch._check(e >= 1)
        torch._check(e <= K.shape[2])
        return carry + 1, attend_prefix(q_c, K, V, key_ok, e, sdpa, spell_queries=True)  # carries must not alias

    _, o = scan(query_chunk, torch.zeros((), dtype=torch.int64), [qc, ends])
    return o.permute(1, 2, 0, 3, 4).reshape(b, H, n, d)


def streaming(q, k, v, chunk: int, mask, state, commit: bool, sdpa=F.scaled_dot_product_attention):
    """A piece of any length from the carried {"K", "V"} logs (None: a new
    document). Returns (o (b, H, n, d), the new state; the old one if not commit)."""
    b = q.shape[0]
    state = state if state is not None else {"K": AppendLog.empty(2), "V": AppendLog.empty(2)}
    T0 = state["K"].length
    K, K_log = state["K"].extend(k, commit)
    V, V_log = state["V"].extend(v, commit)
    key_ok = keys_ok(mask, b, T0, q.device) if mask is not None and not bool(mask.all()) else None
    o = chunkwise(q, K, V, key_ok, T0, chunk, sdpa)
    return o, ({"K": K_log, "V": V_log} if commit else state)


def naive(q, k, v, mask, state=None, pos0=0, chunk: int = 1):
    """Each query at absolute position t against every key at u with
    u // B <= t // B: the cached ones (positions 0 .. pos0-1) and the
    piece's real ones. A query with no real key to see (padding: its
    output is discarded) sees all its allowed keys."""
    b, H, n, d = q.shape
    B = chunk
    scale = 1.0 / math.sqrt(d)
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
        scores = (K @ q[:, :, i, :, None])[..., 0] * scale  # (b, H, T0 + n)
        p = torch.softmax(scores.masked_fill(~sees[:, None], float("-inf")), -1)
        out[:, :, i] = (p[..., None] * V).sum(2)
    return out, {"K": AppendLog.from_tensor(K, 2), "V": AppendLog.from_tensor(V, 2)}
