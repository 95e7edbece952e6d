"""BSBR: softmax attention inside chunks + retrieval of earlier chunks' states.

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
dk, f=4 halves both, and so on. Parameters per head: d*(dk + dv) + dv*d,
i.e. O(d^2). With f=1 there is no projection at all (k~ = k, v~ = v).

The gate g is one learned scalar per head, initialised to 1/sqrt(d) so the
retrieved term starts on the scale of a softmax score's inputs (q.k/sqrt(d))
instead of dominating the local term.

Cost per head: O(n B d) local + O(n dk dv) states + O(C^2 dk dv) retrieval;
nothing n x n is formed. State carried per layer: F (b, H, C, dk, dv) and
h (b, H, C, d) as append logs, plus r of the last chunk when causal.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from bsbr_core.attention.base import Attention, carried, nonempty_keys, pad_len, pad_seq, valid_mask
from bsbr_core.state import AppendLog


def compressed_dims(d: int, f: int) -> tuple[int, int]:
    e = int(round(math.log2(f)))
    return max(1, d >> ((e + 1) // 2)), max(1, d >> (e // 2))


class BSBRAttentionCore(Attention):
    def __init__(self, cfg):
        super().__init__(cfg)
        H, d, D = cfg.num_heads, cfg.head_dim, cfg.hidden_dim
        self.causal = cfg.causal
        self.meta_key = nn.Linear(D, D, bias=False)    # W_h
        self.meta_query = nn.Linear(D, D, bias=False)  # W_r
        self.gate = nn.Parameter(torch.full((H,), 1.0 / math.sqrt(d)))
        self.compressed = cfg.compression_factor > 1
        self.dk, self.dv = compressed_dims(d, cfg.compression_factor) if self.compressed else (d, d)
        if self.compressed:
            self.proj_k = nn.Parameter(torch.randn(H, d, self.dk) / math.sqrt(d))
            self.proj_v = nn.Parameter(torch.randn(H, d, self.dv) / math.sqrt(d))
            self.unproj_v = nn.Parameter(torch.randn(H, self.dv, d) / math.sqrt(self.dv))

    # --- pieces shared by the fast and the naive form ---------------------------

    def _compress(self, t, proj):  # (..., H, m, d) x (H, d, e) -> (..., H, m, e)
        return t if not self.compressed else torch.einsum("bhmd,hde->bhme", t, proj)

    def _meta(self, xbar):
        """xbar (b, C, D) chunk means -> h, r each (b, H, C, d)."""
        b, C, _ = xbar.shape
        H, d = self.num_heads, self.head_dim
        h = self.meta_key(xbar).view(b, C, H, d).transpose(1, 2)
        r = self.meta_query(xbar).view(b, C, H, d).transpose(1, 2)
        return h, r

    @staticmethod
    def _mean_weights(real, dtype):
        """real (b, C, B) bool -> (b, C, B): 1/|c| on chunk c's real tokens, 0 elsewhere."""
        count = real.sum(-1).clamp(min=1)  # (b, C)
        return real.to(dtype) / count[..., None].to(dtype)

    @staticmethod
    def _chunk_means(x, w, pad):
        """x (b, n, D), w from _mean_weights -> chunk means of x over real tokens (b, C, D)."""
        b, C, B = w.shape
        return (pad_seq(x, pad, dim=1).view(b, C, B, x.shape[-1]) * w[..., None]).sum(2)

    def _used_queries(self, r_new, state):
        """The meta query each chunk retrieves with (causal: chunk c-1's, the
        carried r_last before the first) and the r_last to carry on."""
        if not self.causal:
            return r_new, None
        prev_r = state["r_last"] if state is not None and "r_last" in state else torch.zeros_like(r_new[:, :, :1])
        return torch.cat([prev_r, r_new[:, :, :-1]], dim=2), r_new[:, :, -1:]

    def _retrieval_probs(self, r_used, h_all, Cp):
        """a_{c,j} (b, H, C, Ct): the piece's C chunks (document chunks Cp ..)
        over all Ct chunks so far, softmax over j < c and exactly 0 elsewhere."""
        C, Ct = r_used.shape[2], h_all.shape[2]
        scores = (r_used @ h_all.transpose(-1, -2)) * self.scale  # (b, H, C, Ct)
        allowed = torch.arange(Ct, device=r_used.device)[None, :] < (Cp + torch.arange(C, device=r_used.device))[:, None]
        # finfo.min rather than -inf keeps chunk 0 (nothing to retrieve) free of NaN, in gradients too.
        return torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1) * allowed

    def retrieval_weights(self, x, mask=None):
        """The retrieval softmax a_{c,j} of a document read one-shot from
        position 0, recomputed from this layer's meta projections with the
        same functions `attend` uses. x (b, n, D) is the layer's normalised
        input, mask (b, n) its real tokens (right-padded). Returns
        (b, H, C, C): row c is chunk c's distribution over chunks j < c
        (row 0, which retrieves nothing, is all zero)."""
        b, n, _ = x.shape
        B = self.chunk_size
        pad = pad_len(n, B)
        C = (n + pad) // B
        real = pad_seq(valid_mask(mask, b, n, x.device), pad, dim=1, value=False).view(b, C, B)
        h, r = self._meta(self._chunk_means(x, self._mean_weights(real, x.dtype), pad))
        return self._retrieval_probs(self._used_queries(r, None)[0], h, 0)

    # --- parallel form (one-shot and streaming) -------------------------------

    def attend(self, q, k, v, x, pos0, mask, state, commit):
        b, H, n, d = q.shape
        B = self.chunk_size
        pad = pad_len(n, B)
        C = (n + pad) // B
        real = pad_seq(valid_mask(mask, b, n, q.device), pad, dim=1, value=False).view(b, C, B)
        qc = pad_seq(q, pad).view(b, H, C, B, d)
        kc = pad_seq(k, pad).view(b, H, C, B, d)
        vc = pad_seq(v, pad).view(b, H, C, B, d)

        # Local softmax attention inside each chunk: (b, H*C, B, d) batches of SDPA.
        key_ok = nonempty_keys(real)  # (b, C, B)
        attn_mask = None
        if pad or mask is not None or self.causal:
            m = key_ok[:, None, :, None, :].expand(b, H, C, B, B)
            if self.causal:
                m = m & torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
            attn_mask = m.reshape(b, H * C, B, B)
        o_loc = self.sdpa(qc.view(b, H * C, B, d), kc.view(b, H * C, B, d), vc.view(b, H * C, B, d), attn_mask)
        o_loc = o_loc.view(b, H, C, B, d)

        # Chunk states F_c = mean over real tokens of k~ v~^T: (b, H, C, dk, dv).
        w = self._mean_weights(real, q.dtype)  # (b, C, B)
        kt = self._compress(kc.view(b, H, C * B, d), self.proj_k if self.compressed else None).view(b, H, C, B, self.dk)
        vt = self._compress(vc.view(b, H, C * B, d), self.proj_v if self.compressed else None).view(b, H, C, B, self.dv)
        F_new = (kt * w[:, None, :, :, None]).transpose(-1, -2) @ vt

        # Meta keys and queries from chunk means of the layer input.
        h_new, r_new = self._meta(self._chunk_means(x, w, pad))  # each (b, H, C, d)
        new_state = dict(state) if state is not None else {"F": AppendLog.empty(2), "h": AppendLog.empty(2)}
        r_used, r_last = self._used_queries(r_new, state)
        if self.causal:
            new_state["r_last"] = r_last

        # Retrieval over strictly earlier chunks (committed history + this piece).
        Cp = new_state["h"].length
        h_all, h_log = new_state["h"].extend(h_new, commit)
        F_all, F_log = new_state["F"].extend(F_new, commit)
        Ct = Cp + C
        a = self._retrieval_probs(r_used, h_all, Cp)  # (b, H, C, Ct)
        S = (a @ F_all.reshape(b, H, Ct, self.dk * self.dv)).view(b, H, C, self.dk, self.dv)
        qt = self._compress(qc.view(b, H, C * B, d), self.proj_k if self.compressed else None).view(b, H, C, B, self.dk)
        o_ret = qt @ S  # (b, H, C, B, dv)
        if self.compressed:
            o_ret = torch.einsum("bhcte,hed->bhctd", o_ret, self.unproj_v)
        o = o_loc + self.gate.view(1, H, 1, 1, 1) * o_ret
        if commit:
            new_state["h"], new_state["F"] = h_log, F_log
            return o.view(b, H, C * B, d)[:, :, :n], new_state
        return o.view(b, H, C * B, d)[:, :, :n], state

    # --- naive reference -------------------------------------------------------

    def naive(self, q, k, v, x, mask, state=None, pos0=0):
        """Chunk by chunk, token by token. The carried F_j, h_j are the chunks
        before pos0 (so there are pos0 / B of them), and r_last is the meta
        query of the last of them (causal). The piece's chunks start at pos0;
        the last may be partial. Returns the outputs and F, h (and r_last)
        over every chunk so far, as `attend` commits them."""
        b, H, n, d = q.shape
        B = self.chunk_size
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
            if self.causal and state is not None and "r_last" in state:
                r_prev = state["r_last"][bi, :, 0]
            r_used = []
            for s in starts:
                e = min(s + B, n)
                idx = [t for t in range(s, e) if real[bi, t]]
                xbar = x[bi, idx].mean(0) if idx else x.new_zeros(x.shape[-1])
                hc, rc = self._meta(xbar.view(1, 1, -1))
                hs.append(hc[0, :, 0])  # (H, d)
                r_used.append(r_prev if self.causal else rc[0, :, 0])
                r_prev = rc[0, :, 0]
                F_c = []
                for h in range(H):
                    kk = self._compress(k[bi : bi + 1, h : h + 1, idx], self.proj_k[h : h + 1] if self.compressed else None)[0, 0]
                    vv = self._compress(v[bi : bi + 1, h : h + 1, idx], self.proj_v[h : h + 1] if self.compressed else None)[0, 0]
                    acc = q.new_zeros(self.dk, self.dv)
                    for j in range(len(idx)):
                        acc = acc + torch.outer(kk[j], vv[j])
                    F_c.append(acc / max(len(idx), 1))
                Fs.append(torch.stack(F_c))  # (H, dk, dv)
            for ci, s in enumerate(starts):
                c = Cp + ci  # the chunk's index in the document
                e = min(s + B, n)
                for h in range(H):
                    for t in range(s, e):
                        keys = [u for u in range(s, e) if (real[bi, u] or not real[bi, s:e].any()) and (not self.causal or u <= t)]
                        sc = torch.stack([q[bi, h, t] @ k[bi, h, u] for u in keys]) * self.scale
                        loc = (torch.softmax(sc, 0)[:, None] * v[bi, h, keys]).sum(0)
                        if c > 0:
                            r = r_used[ci][h]
                            a = torch.softmax(torch.stack([r @ hs[j][h] for j in range(c)]) * self.scale, 0)
                            S = sum(a[j] * Fs[j][h] for j in range(c))
                            qt = q[bi, h, t] if not self.compressed else q[bi, h, t] @ self.proj_k[h]
                            ret = qt @ S
                            if self.compressed:
                                ret = ret @ self.unproj_v[h]
                            loc = loc + self.gate[h] * ret
                        out[bi, h, t] = loc
            Fb.append(torch.stack(Fs, 1) if Fs else q.new_zeros(H, 0, self.dk, self.dv))
            hb.append(torch.stack(hs, 1) if hs else q.new_zeros(H, 0, d))
            rb.append(r_prev[:, None])
        new_state = {"F": AppendLog.from_tensor(torch.stack(Fb), 2), "h": AppendLog.from_tensor(torch.stack(hb), 2)}
        if self.causal:
            new_state["r_last"] = torch.stack(rb)
        return out, new_state
