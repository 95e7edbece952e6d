"""Sliding-window softmax attention, token t sees tokens t-w .. t: the one definition.

For each query chunk of B tokens, the keys from w positions before the chunk
to its end (w + B of them, gathered by index, a band mask inside), so cost
is O(n (w + B) d) and nothing n x n is formed.

Forms:
- `chunkwise`: whole chunks, the carried keys/values left-padded to exactly
  w slots with the count of valid ones, and the new window as the w slots
  that end at the piece's last real token. Sizes are fixed, so the ONNX
  graph runs it with `count` and `end` as tensor inputs (`EXPORT_INPUTS`);
  the torch layer runs it with ints.
- `streaming`: a piece of any length with the carried {"K", "V"} of at most
  w keys; pads, calls `chunkwise`, keeps the valid slots.
- `naive`: each query against the real keys of its window, one by one.
State per layer: the last (at most) w keys and values, K, V (b, H, <=w, d).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bsbr_core.ops.common import StateEntry, nonempty_keys, pad_len, pad_seq, valid_mask

# Scalar inputs of the exported graph (beyond ids, mask and position):
# how many of the w window slots the carried state fills, and where the
# piece's real tokens end (the caller pads the piece to whole chunks).
EXPORT_INPUTS = ("window_count", "piece_length")


def export_examples(cfg, piece_tokens: int) -> list[int]:
    """Example values of EXPORT_INPUTS for tracing (distinct; inside the window and the piece)."""
    return [min(cfg.window, 3), piece_tokens - 1]


def export_values(layer_state, piece_tokens: int) -> list[int]:
    """EXPORT_INPUTS for a piece entered with a layer's state {"K", "V"} (None: a new document)."""
    return [layer_state["K"].shape[2] if layer_state else 0, piece_tokens]


def state_layout(cfg) -> list[StateEntry]:
    H, d, w = cfg.num_heads, cfg.head_dim, cfg.window
    return [StateEntry("K", "window", (H, w, d)), StateEntry("V", "window", (H, w, d))]


def chunkwise(q, k, v, K_win, V_win, count, end, window: int, chunk: int, mask=None,
              sdpa=F.scaled_dot_product_attention):
    """q, k, v (b, H, n, d), n a multiple of `chunk`; K_win, V_win (b, H, w, d)
    the carried keys/values, valid in the last `count` slots; end: the
    number of the piece's tokens that count (the new window ends there);
    mask (b, n) bool or None (every token real). count and end are ints or
    0-d int64 tensors. Returns (o (b, H, n, d), K, V (b, H, w, d) the w slots
    ending at token `end`, valid in the last min(w, count + end))."""
    b, H, n, d = q.shape
    B, w = chunk, window
    C = n // B
    Kext = torch.cat([K_win, k], dim=2)  # (b, H, w + n, d): key timeline
    Vext = torch.cat([V_win, v], dim=2)
    carried_ok = (torch.arange(w, device=q.device) >= w - count)[None, :].expand(b, w)
    real = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
    ok = torch.cat([carried_ok, real], dim=1)
    L = w + B
    slots = (torch.arange(C, device=q.device) * B)[:, None] + torch.arange(L, device=q.device)[None, :]  # (C, L)
    Kw, Vw, okw = Kext[:, :, slots], Vext[:, :, slots], ok[:, slots]  # (b, H, C, L, d), ..., (b, C, L)
    j = torch.arange(B, device=q.device)[:, None]
    m_ = torch.arange(L, device=q.device)[None, :]
    band = (m_ >= j) & (m_ <= j + w)  # (B, L): key slot m of query j
    am = nonempty_keys(okw[:, :, None, :] & band)[:, None].expand(b, H, C, B, L).reshape(b, H * C, B, L)
    o = sdpa(q.reshape(b, H * C, B, d), Kw.reshape(b, H * C, L, d), Vw.reshape(b, H * C, L, d), am).view(b, H, n, d)
    keep = end + torch.arange(w, device=q.device)  # the w slots that end at token `end`
    return o, Kext[:, :, keep], Vext[:, :, keep]


def streaming(q, k, v, window: int, chunk: int, mask, state, commit: bool, sdpa=F.scaled_dot_product_attention):
    """A piece of any length n from the carried {"K", "V"} (None: a new
    document). Returns (o (b, H, n, d), the new state; the old one if not commit)."""
    b, H, n, d = q.shape
    w = window
    pad = pad_len(n, chunk)
    Kst = state["K"] if state is not None else q.new_zeros(b, H, 0, d)
    Vst = state["V"] if state is not None else q.new_zeros(b, H, 0, d)
    P = Kst.shape[2]  # carried keys, P <= w
    K_win = torch.cat([q.new_zeros(b, H, w - P, d), Kst], dim=2)
    V_win = torch.cat([q.new_zeros(b, H, w - P, d), Vst], dim=2)
    real = pad_seq(valid_mask(mask, b, n, q.device), pad, dim=1, value=False)
    o, K_new, V_new = chunkwise(pad_seq(q, pad), pad_seq(k, pad), pad_seq(v, pad), K_win, V_win, P, n, w, chunk, real, sdpa)
    o = o[:, :, :n]
    if not commit:
        return o, state
    keep = min(w, P + n)
    if keep == 0:
        return o, {"K": Kst, "V": Vst}
    return o, {"K": K_new[:, :, w - keep:], "V": V_new[:, :, w - keep:]}


def naive(q, k, v, mask, state=None, pos0=0, window: int = 1):
    """Each query at absolute position t against the real keys at
    t-w .. t: the carried ones (positions pos0-P .. pos0-1) and the
    piece's. A query with no real key to see (padding: its output is
    discarded) sees all the keys in its window. The final state is the
    last w keys received, padding included, as `streaming` keeps them."""
    b, H, n, d = q.shape
    w = window
    scale = 1.0 / math.sqrt(d)
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
        scores = (K @ q[:, :, i, :, None])[..., 0] * scale  # (b, H, P + n)
        p = torch.softmax(scores.masked_fill(~sees[:, None], float("-inf")), -1)
        out[:, :, i] = (p[..., None] * V).sum(2)
    keep = min(w, P + n)
    return out, {"K": K[:, :, P + n - keep:], "V": V[:, :, P + n - keep:]}
