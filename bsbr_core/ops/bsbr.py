"""BSBR: softmax attention inside chunks + retrieval of earlier chunks' states: the one definition.

Per head, chunk c = positions [cB, cB + B) (docs/architecture.md 1.1):
    O_loc[c] = softmax(Q_c K_c^T / sqrt(d) + M) V_c
    F_c      = (1/|c|) sum_{s in c} k~_s v~_s^T             (dk x dv)
    h_c      = W_h mean_{s in c} x_s,  r_c = W_r mean_{s in c} x_s
               (causal: r_c from chunk c-1's mean)
    a_{c,j}  = softmax_{j<c}(r_c . h_j / sqrt(d)),  S_c = sum_{j<c} a_{c,j} F_j
    o_t      = O_loc_t + g * U (q~_t S_c)

Compression (factor f): k~ = P_k^T k, q~ = P_k^T q (dk dims), v~ = P_v^T v
(dv dims) with dk * dv = d*d/f, and U (dv -> d) maps the retrieved value
back. dk = d / 2^ceil(log2(f)/2), dv = d / 2^floor(log2(f)/2): f=2 halves
dk, f=4 halves both, and so on. With f=1 there is no projection at all.

Forms (the weights as `Params`):
- `chunkwise`: whole chunks with the carried F, h (and r_last) as tensors;
  the ONNX graph runs it. It is `summarize` (what a piece computes without
  its history: local attention, F_new, h_new, r_new, q~), the history
  appended, and `retrieve`.
- `streaming`: a piece of any length with the carried append logs; pads,
  runs `summarize`, extends the logs in place (AppendLog) and `retrieve`.
- `naive`: chunk by chunk, token by token.
Cost per head: O(n B d) local + O(n dk dv) states + O(C^2 dk dv) retrieval;
nothing n x n is formed. State carried per layer: F (b, H, C, dk, dv) and
h (b, H, C, d) as append logs, plus r of the last chunk when causal.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bsbr_core.ops.common import (
    StateEntry,
    carried,
    nonempty_keys,
    pad_len,
    pad_seq,
    padded_mask,
    valid_mask,
)
from bsbr_core.state import AppendLog


class Params(NamedTuple):
    """A BSBR layer's retrieval weights. meta_key W_h and meta_query W_r
    (D, D); gate (H,); proj_k, proj_v (H, d, dk), (H, d, dv) and unproj_v
    (H, dv, d), or None without compression."""

    meta_key: torch.Tensor
    meta_query: torch.Tensor
    gate: torch.Tensor
    proj_k: torch.Tensor | None
    proj_v: torch.Tensor | None
    unproj_v: torch.Tensor | None
    causal: bool


def compressed_dims(d: int, f: int) -> tuple[int, int]:
    """(dk, dv) of compression factor f for head dim d (no compression: use (d, d))."""
    e = int(round(math.log2(f)))
    return max(1, d >> ((e + 1) // 2)), max(1, d >> (e // 2))


def state_dims(cfg) -> tuple[int, int]:
    """(dk, dv) of the chunk states F of a config."""
    d = cfg.head_dim
    return compressed_dims(d, cfg.compression_factor) if cfg.compression_factor > 1 else (d, d)


def state_layout(cfg) -> list[StateEntry]:
    H, d = cfg.num_heads, cfg.head_dim
    dk, dv = state_dims(cfg)
    layout = [StateEntry("F", "log", (H, -1, dk, dv)), StateEntry("h", "log", (H, -1, d))]
    if cfg.causal:
        layout.append(StateEntry("r_last", "tensor", (H, 1, d)))
    return layout


def export_history(cfg) -> int:
    """An example history length (committed chunks) for tracing the graph."""
    return 5


# --- pieces shared by every form ---------------------------------------------------

def compress(t: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    """t (b, H, m, d) x proj (H, d, e) -> (b, H, m, e); proj None: t itself."""
    return t if proj is None else torch.einsum("bhmd,hde->bhme", t, proj)


def meta(xbar: torch.Tensor, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """xbar (b, C, D) chunk means -> meta keys h and queries r, each (b, H, C, d)."""
    b, C, D = xbar.shape
    H = p.gate.shape[0]
    h = F.linear(xbar, p.meta_key).view(b, C, H, D // H).transpose(1, 2)
    r = F.linear(xbar, p.meta_query).view(b, C, H, D // H).transpose(1, 2)
    return h, r


def mean_weights(real: torch.Tensor, dtype) -> torch.Tensor:
    """real (b, C, B) bool -> (b, C, B): 1/|c| on chunk c's real tokens, 0 elsewhere."""
    count = real.sum(-1).clamp(min=1)  # (b, C)
    return real.to(dtype) / count[..., None].to(dtype)


def chunk_means(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (b, C*B, D) whole chunks, w from mean_weights -> chunk means over real tokens (b, C, D)."""
    b, C, B = w.shape
    return (x.view(b, C, B, x.shape[-1]) * w[..., None]).sum(2)


def used_queries(r_new: torch.Tensor, r_last: torch.Tensor | None, causal: bool):
    """The meta query each chunk retrieves with (causal: chunk c-1's, the
    carried r_last (None: zeros) before the first) and the r_last to carry on (None if not causal)."""
    if not causal:
        return r_new, None
    prev_r = r_last if r_last is not None else torch.zeros_like(r_new[:, :, :1])
    return torch.cat([prev_r, r_new[:, :, :-1]], dim=2), r_new[:, :, -1:]


def retrieval_probs(r_used: torch.Tensor, h_all: torch.Tensor, Cp) -> torch.Tensor:
    """a_{c,j} (b, H, C, Ct): the piece's C chunks (document chunks Cp ..)
    over all Ct chunks so far, softmax over j < c and exactly 0 elsewhere."""
    C, Ct = r_used.shape[2], h_all.shape[2]
    scores = (r_used @ h_all.transpose(-1, -2)) * (1.0 / math.sqrt(r_used.shape[-1]))  # (b, H, C, Ct)
    allowed = torch.arange(Ct, device=r_used.device)[None, :] < (Cp + torch.arange(C, device=r_used.device))[:, None]
    # finfo.min rather than -inf keeps chunk 0 (nothing to retrieve) free of NaN, in gradients too.
    return torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1) * allowed


def summarize(p: Params, q, k, v, x, chunk: int, mask=None, sdpa=F.scaled_dot_product_attention):
    """What a piece of whole chunks computes without its history.

    q, k, v (b, H, n, d), x (b, n, D) the layer's normalised input, n a
    multiple of `chunk`; mask (b, n) bool or None (every token real).
    Returns (o_loc (b, H, C, B, d) local attention, F_new (b, H, C, dk, dv),
    h_new, r_new (b, H, C, d), q~ (b, H, C, B, dk))."""
    b, H, n, d = q.shape
    B = chunk
    C = n // B
    real = mask.view(b, C, B) if mask is not None else torch.ones(b, C, B, dtype=torch.bool, device=q.device)
    qc, kc, vc = q.view(b, H, C, B, d), k.view(b, H, C, B, d), v.view(b, H, C, B, d)
    # Local softmax attention inside each chunk: (b, H*C, B, d) batches of SDPA.
    attn_mask = None
    if mask is not None or p.causal:
        m = nonempty_keys(real)[:, None, :, None, :].expand(b, H, C, B, B)
        if p.causal:
            m = m & torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
        attn_mask = m.reshape(b, H * C, B, B)
    o_loc = sdpa(qc.reshape(b, H * C, B, d), kc.reshape(b, H * C, B, d), vc.reshape(b, H * C, B, d), attn_mask)
    o_loc = o_loc.view(b, H, C, B, d)
    # Chunk states F_c = mean over real tokens of k~ v~^T: (b, H, C, dk, dv).
    w = mean_weights(real, q.dtype)  # (b, C, B)
    kt = compress(k, p.proj_k)
    kt = kt.view(b, H, C, B, kt.shape[-1])
    vt = compress(v, p.proj_v)
    vt = vt.view(b, H, C, B, vt.shape[-1])
    F_new = (kt * w[:, None, :, :, None]).transpose(-1, -2) @ vt
    # Meta keys and queries from chunk means of the layer input.
    h_new, r_new = meta(chunk_means(x, w), p)
    qt = compress(q, p.proj_k)
    return o_loc, F_new, h_new, r_new, qt.view(b, H, C, B, qt.shape[-1])


def retrieve(p: Params, o_loc, qt, r_used, h_all, F_all, Cp) -> torch.Tensor:
    """o_loc + g * U (q~ S_c) with S_c the retrieval over the Cp + C chunks so
    far (h_all, F_all: the history, then the piece's). Returns o (b, H, C*B, d)."""
    b, H, C, B, d = o_loc.shape
    dk, dv = F_all.shape[-2:]
    Ct = h_all.shape[2]
    a = retrieval_probs(r_used, h_all, Cp)  # (b, H, C, Ct)
    S = (a @ F_all.reshape(b, H, Ct, dk * dv)).view(b, H, C, dk, dv)
    o_ret = qt @ S  # (b, H, C, B, dv)
    if p.unproj_v is not None:
        o_ret = torch.einsum("bhcte,hed->bhctd", o_ret, p.unproj_v)
    o = o_loc + p.gate.view(1, H, 1, 1, 1) * o_ret
    return o.view(b, H, C * B, d)


# --- the forms -------------------------------------------------------------------

def chunkwise(p: Params, q, k, v, x, chunk: int, F_prev, h_prev, r_last=None, mask=None,
              sdpa=F.scaled_dot_product_attention):
    """Whole chunks from the carried F_prev (b, H, Cp, dk, dv), h_prev (b, H,
    Cp, d) and, causal, r_last (b, H, 1, d) (None: zeros). Returns (o (b, H,
    n, d), F_new, h_new of the piece's chunks, the r_last to carry (None if not causal))."""
    o_loc, F_new, h_new, r_new, qt = summarize(p, q, k, v, x, chunk, mask, sdpa)
    r_used, r_next = used_queries(r_new, r_last, p.causal)
    Cp = h_prev.shape[2]
    o = retrieve(p, o_loc, qt, r_used, torch.cat([h_prev, h_new], dim=2), torch.cat([F_prev, F_new], dim=2), Cp)
    return o, F_new, h_new, r_next


def streaming(p: Params, q, k, v, x, chunk: int, mask, state, commit: bool, sdpa=F.scaled_dot_product_attention):
    """A piece of any length n from the carried {"F", "h"(, "r_last")} (None:
    a new document). Returns (o (b, H, n, d), the new state; the old one if not commit)."""
    b, n = q.shape[0], q.shape[2]
    pad = pad_len(n, chunk)
    real = padded_mask(mask, b, n, pad, q.device)
    o_loc, F_new, h_new, r_new, qt = summarize(p, pad_seq(q, pad), pad_seq(k, pad), pad_seq(v, pad),
                                               pad_seq(x, pad, dim=1), chunk, real, sdpa)
    new_state = dict(state) if state is not None else {"F": AppendLog.empty(2), "h": AppendLog.empty(2)}
    r_used, r_next = used_queries(r_new, state.get("r_last") if state is not None else None, p.causal)
    if p.causal:
        new_state["r_last"] = r_next
    # Retrieval over strictly earlier chunks (committed history + this piece).
    Cp = new_state["h"].length
    h_all, h_log = new_state["h"].extend(h_new, commit)
    F_all, F_log = new_state["F"].extend(F_new, commit)
    o = retrieve(p, o_loc, qt, r_used, h_all, F_all, Cp)[:, :, :n]
    if not commit:
        return o, state
    new_state["h"], new_state["F"] = h_log, F_log
    return o, new_state


def retrieval_weights(p: Params, x, chunk: int, mask=None) -> torch.Tensor:
    """The retrieval softmax a_{c,j} of a document read one-shot from
    position 0. x (b, n, D) is the layer's normalised input, mask (b, n) its
    real tokens (right-padded). Returns (b, H, C, C): row c is chunk c's
    distribution over chunks j < c (row 0, which retrieves nothing, is all zero)."""
    b, n, _ = x.shape
    B = chunk
    pad = pad_len(n, B)
    C = (n + pad) // B
    real = pad_seq(valid_mask(mask, b, n, x.device), pad, dim=1, value=False).view(b, C, B)
    h, r = meta(chunk_means(pad_seq(x, pad, dim=1), mean_weights(real, x.dtype)), p)
    return retrieval_probs(used_queries(r, None, p.causal)[0], h, 0)


def naive(p: Params, q, k, v, x, mask, state=None, pos0=0, chunk: int = 1):
    """Chunk by chunk, token by token. The carried F_j, h_j are the chunks
    before pos0 (so there are pos0 / B of them), and r_last is the meta
    query of the last of them (causal). The piece's chunks start at pos0;
    the last may be partial. Returns the outputs and F, h (and r_last)
    over every chunk so far, as `streaming` commits them."""
    b, H, n, d = q.shape
    B = chunk
    scale = 1.0 / math.sqrt(d)
    compressed = p.proj_k is not None
    dk = p.proj_k.shape[-1] if compressed else d
    dv = p.proj_v.shape[-1] if compressed else d
    Fh = carried(state["F"]) if state is not None else None
    hh = carried(state["h"]) if state is not None else None
    Cp = 0 if hh is None else hh.shape[2]
    if pos0 != Cp * B:
        raise ValueError(f"{Cp} carried chunks of {B} tokens cannot precede position {pos0}")
    real = valid_mask(mask, b, n, q.device)
    out = torch.zeros_like(q)
    Fb, hb, rb = [], [], []  # per batch row: final F, h, r_last
    for bi in range(b):
        starts = list(range(0, n, B))
        # History: every chunk j < Cp by its F_j (H, dk, dv) and h_j (H, d).
        Fs = [Fh[bi, :, j] for j in range(Cp)]
        hs = [hh[bi, :, j] for j in range(Cp)]
        r_prev = q.new_zeros(H, d)  # meta query of the chunk before (causal)
        if p.causal and state is not None and "r_last" in state:
            r_prev = state["r_last"][bi, :, 0]
        r_used = []
        for s in starts:
            e = min(s + B, n)
            idx = [t for t in range(s, e) if real[bi, t]]
            xbar = x[bi, idx].mean(0) if idx else x.new_zeros(x.shape[-1])
            hc, rc = meta(xbar.view(1, 1, -1), p)
            hs.append(hc[0, :, 0])  # (H, d)
            r_used.append(r_prev if p.causal else rc[0, :, 0])
            r_prev = rc[0, :, 0]
            F_c = []
            for h in range(H):
                kk = compress(k[bi : bi + 1, h : h + 1, idx], p.proj_k[h : h + 1] if compressed else None)[0, 0]
                vv = compress(v[bi : bi + 1, h : h + 1, idx], p.proj_v[h : h + 1] if compressed else None)[0, 0]
                acc = q.new_zeros(dk, dv)
                for j in range(len(idx)):
                    acc = acc + torch.outer(kk[j], vv[j])
                F_c.append(acc / max(len(idx), 1))
            Fs.append(torch.stack(F_c))  # (H, dk, dv)
        for ci, s in enumerate(starts):
            c = Cp + ci  # the chunk's index in the document
            e = min(s + B, n)
            for h in range(H):
                for t in range(s, e):
                    keys = [u for u in range(s, e) if (real[bi, u] or not real[bi, s:e].any()) and (not p.causal or u <= t)]
                    sc = torch.stack([q[bi, h, t] @ k[bi, h, u] for u in keys]) * scale
                    loc = (torch.softmax(sc, 0)[:, None] * v[bi, h, keys]).sum(0)
                    if c > 0:
                        r = r_used[ci][h]
                        a = torch.softmax(torch.stack([r @ hs[j][h] for j in range(c)]) * scale, 0)
                        S = sum(a[j] * Fs[j][h] for j in range(c))
                        qt = q[bi, h, t] if not compressed else q[bi, h, t] @ p.proj_k[h]
                        ret = qt @ S
                        if compressed:
                            ret = ret @ p.unproj_v[h]
                        loc = loc + p.gate[h] * ret
                    out[bi, h, t] = loc
        Fb.append(torch.stack(Fs, 1) if Fs else q.new_zeros(H, 0, dk, dv))
        hb.append(torch.stack(hs, 1) if hs else q.new_zeros(H, 0, d))
        rb.append(r_prev[:, None])
    new_state = {"F": AppendLog.from_tensor(torch.stack(Fb), 2), "h": AppendLog.from_tensor(torch.stack(hb), 2)}
    if p.causal:
        new_state["r_last"] = torch.stack(rb)
    return out, new_state
