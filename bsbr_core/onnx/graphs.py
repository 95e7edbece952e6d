"""Export-friendly twins of the encoder: the same weights and the same math as
`bsbr_core.model.Encoder`, written so that `torch.export` can capture one graph
for every piece length, batch size and history length.

What differs from the torch modules, and why:
- A piece is whole chunks (the caller pads it and masks the padding), so
  every size in the graph is a product of the chunk count and constants:
  the torch code pads inside and skips masks when nothing is padded, and a
  branch on a symbolic size would pin the graph to one case. Masks are
  always applied; the results agree to float32 round-off.
- The position of the piece's first token is a tensor input (`position`), so
  RoPE angles are computed in the graph, in float64 as in `bsbr_core.rope`.
- The carried state is a flat tuple of tensors (`state_layout`) instead of
  dicts of AppendLogs; history that grows (BSBR's F and h, the standard KV
  cache) goes in whole and only the piece's new entries come out, so the
  caller appends them with the same AppendLog code as the torch backend.
- Loops over chunks become ONNX Scan (`torch._higher_order_ops.scan`):
  delta_net's state recurrence, and standard attention's one SDPA per query
  chunk (each iteration slices the keys up to its chunk's end, so the cost
  stays block-causal, B x T per chunk, and nothing n x n is formed).
- delta_net's triangular solve (no ONNX op) becomes forward substitution,
  one Scan iteration per row of the chunk (B iterations, each a batched
  (1 x B) @ (B x 2d) product over all chunks). Closed forms are unstable: the
  product (I + A)^-1 = prod_j (I + (-A)^(2^j)) passes through powers of A
  with huge entries that cancel, and gives NaN at B = 128.
- sliding_window's carried keys are left-padded to exactly `window` slots
  with a count of the valid ones, so that input has a fixed size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan

from bsbr_core.attention.base import nonempty_keys
from bsbr_core.attention.linear import EPS, feature_map
from bsbr_core.config import ModelConfig
from bsbr_core.rope import apply_rope


# --- carried state as flat tensors -------------------------------------------

def state_layout(cfg: ModelConfig) -> list[tuple[str, str, tuple]]:
    """Per layer: (name, kind, shape after batch) of each carried tensor.

    kind "log": history along dim 2 (the AppendLogs of the torch state); the
        graph takes all of it and returns the piece's new entries only.
    kind "tensor": fixed size; the graph returns the replacement.
    kind "window": sliding_window's last keys/values, padded on the left to
        `window` slots (shape given); the valid count is the `window_count` input.
    Shapes use -1 for the growing axis.
    """
    H, d = cfg.num_heads, cfg.head_dim
    if cfg.arch == "bsbr":
        from bsbr_core.attention.bsbr import compressed_dims

        dk, dv = compressed_dims(d, cfg.compression_factor) if cfg.compression_factor > 1 else (d, d)
        layout = [("F", "log", (H, -1, dk, dv)), ("h", "log", (H, -1, d))]
        if cfg.causal:
            layout.append(("r_last", "tensor", (H, 1, d)))
        return layout
    if cfg.arch == "standard":
        return [("K", "log", (H, -1, d)), ("V", "log", (H, -1, d))]
    if cfg.arch == "linear":
        return [("S", "tensor", (H, d, d)), ("z", "tensor", (H, d))]
    if cfg.arch == "sliding_window":
        return [("K", "window", (H, cfg.window, d)), ("V", "window", (H, cfg.window, d))]
    if cfg.arch == "delta_net":
        return [("S", "tensor", (H, d, d))]
    raise ValueError(f"no ONNX layout for arch {cfg.arch!r}")


# --- helpers -------------------------------------------------------------------

def _rope(position: torch.Tensor, n, inv_freq: torch.Tensor):
    """cos, sin (n, half) float32 at positions position .. position + n - 1 (float64 angles)."""
    pos = position.to(torch.float64) + torch.arange(n, dtype=torch.float64, device=inv_freq.device)
    angles = pos[:, None] * inv_freq[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


# --- mechanisms ------------------------------------------------------------------
# Each takes (attn module, q, k, v (b, H, C*B, d), x (b, C*B, D) normalised input,
# mask (b, C*B) bool, this layer's state tuple) and returns (o (b, H, C*B, d), new parts).

def _bsbr(attn, q, k, v, x, mask, state):
    b, H, n, d = q.shape
    B, dk, dv = attn.chunk_size, attn.dk, attn.dv
    C = n // B
    F_prev, h_prev = state[0], state[1]  # (b, H, Cp, dk, dv), (b, H, Cp, d)
    real = mask.view(b, C, B)
    qc, kc, vc = q.view(b, H, C, B, d), k.view(b, H, C, B, d), v.view(b, H, C, B, d)

    m = nonempty_keys(real)[:, None, :, None, :].expand(b, H, C, B, B)
    if attn.causal:
        m = m & torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
    o_loc = F.scaled_dot_product_attention(
        qc.reshape(b, H * C, B, d), kc.reshape(b, H * C, B, d), vc.reshape(b, H * C, B, d), m.reshape(b, H * C, B, B)
    ).view(b, H, C, B, d)

    count = real.sum(-1).clamp(min=1)
    w = real.to(q.dtype) / count[..., None].to(q.dtype)  # (b, C, B)
    kt = attn._compress(k, attn.proj_k if attn.compressed else None).view(b, H, C, B, dk)
    vt = attn._compress(v, attn.proj_v if attn.compressed else None).view(b, H, C, B, dv)
    F_new = (kt * w[:, None, :, :, None]).transpose(-1, -2) @ vt  # (b, H, C, dk, dv)

    xbar = (x.view(b, C, B, -1) * w[..., None]).sum(2)
    h_new, r_new = attn._meta(xbar)
    if attn.causal:
        r_used = torch.cat([state[2], r_new[:, :, :-1]], dim=2)
        extra = (r_new[:, :, -1:],)
    else:
        r_used, extra = r_new, ()

    Cp = h_prev.shape[2]
    h_all = torch.cat([h_prev, h_new], dim=2)
    F_all = torch.cat([F_prev, F_new], dim=2)
    scores = (r_used @ h_all.transpose(-1, -2)) * attn.scale  # (b, H, C, Cp + C)
    allowed = torch.arange(Cp + C, device=q.device)[None, :] < (Cp + torch.arange(C, device=q.device))[:, None]
    a = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1) * allowed
    S = (a @ F_all.reshape(b, H, Cp + C, dk * dv)).view(b, H, C, dk, dv)
    qt = attn._compress(q, attn.proj_k if attn.compressed else None).view(b, H, C, B, dk)
    o_ret = qt @ S
    if attn.compressed:
        o_ret = torch.einsum("bhcte,hed->bhctd", o_ret, attn.unproj_v)
    o = o_loc + attn.gate.view(1, H, 1, 1, 1) * o_ret
    return o.view(b, H, n, d), (F_new, h_new, *extra)


def _standard(attn, q, k, v, x, mask, state):
    b, H, n, d = q.shape
    B = attn.chunk_size
    C = n // B
    K_prev, V_prev = state
    T0 = K_prev.shape[2]
    K = torch.cat([K_prev, k], dim=2)  # (b, H, T0 + n, d)
    V = torch.cat([V_prev, v], dim=2)
    key_ok = torch.cat([torch.ones(b, T0, dtype=torch.bool, device=q.device), mask], dim=1)
    qc = q.view(b, H, C, B, d).permute(2, 0, 1, 3, 4)  # (C, b, H, B, d): scanned over chunks
    # Query chunk c sees keys [0, T0 + (c + 1) B): block-causal, as in StandardAttention.
    ends = T0 + (torch.arange(C, device=q.device) + 1) * B

    def query_chunk(carry, xs):
        q_c, end = xs
        e = end.item()
        torch._check(e >= 1)
        torch._check(e <= K.shape[2])
        # (b, 1, B, e), not broadcast over queries: ORT's kernel for the ONNX
        # Attention op (opset 23) wants the mask's query axis spelled out.
        am = nonempty_keys(key_ok.narrow(1, 0, e))[:, None, None, :].expand(b, 1, B, e)
        o_c = F.scaled_dot_product_attention(q_c, K.narrow(2, 0, e), V.narrow(2, 0, e), am)
        return carry + 1, o_c  # scan carries must not alias their input

    _, o = scan(query_chunk, torch.zeros((), dtype=torch.int64), [qc, ends])
    return o.permute(1, 2, 0, 3, 4).reshape(b, H, n, d), (k, v)


def _linear(attn, q, k, v, x, mask, state):
    b, H, n, d = q.shape
    B = attn.chunk_size
    C = n // B
    S0, z0 = state
    fq = feature_map(q).view(b, H, C, B, d)
    fk = (feature_map(k) * mask[:, None, :, None]).view(b, H, C, B, d)
    vc = v.view(b, H, C, B, d)
    kv = fk.transpose(-1, -2) @ vc
    ksum = fk.sum(3)
    S_before = S0[:, :, None] + kv.cumsum(2) - kv
    z_before = z0[:, :, None] + ksum.cumsum(2) - ksum
    causal = torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
    A = (fq @ fk.transpose(-1, -2)) * causal
    num = A @ vc + fq @ S_before
    den = A.sum(-1) + (fq * z_before[:, :, :, None, :]).sum(-1)
    o = (num / (den[..., None] + EPS)).view(b, H, n, d)
    return o, (S0 + kv.sum(2), z0 + ksum.sum(2))


def _sliding_window(attn, q, k, v, x, mask, state, window_count, piece_length):
    b, H, n, d = q.shape
    B, w = attn.chunk_size, attn.window
    C = n // B
    K_prev, V_prev = state  # (b, H, w, d), valid in the last `window_count` slots
    Kext = torch.cat([K_prev, k], dim=2)  # (b, H, w + n, d)
    Vext = torch.cat([V_prev, v], dim=2)
    carried_ok = (torch.arange(w, device=q.device) >= w - window_count)[None, :].expand(b, w)
    ok = torch.cat([carried_ok, mask], dim=1)
    L = w + B
    slots = (torch.arange(C, device=q.device) * B)[:, None] + torch.arange(L, device=q.device)[None, :]  # (C, L)
    Kw, Vw, okw = Kext[:, :, slots], Vext[:, :, slots], ok[:, slots]  # (b, H, C, L, d), ..., (b, C, L)
    j = torch.arange(B, device=q.device)[:, None]
    m_ = torch.arange(L, device=q.device)[None, :]
    band = (m_ >= j) & (m_ <= j + w)  # key slot m of query j
    am = nonempty_keys(okw[:, :, None, :] & band)[:, None].expand(b, H, C, B, L).reshape(b, H * C, B, L)
    o = F.scaled_dot_product_attention(
        q.view(b, H * C, B, d), Kw.reshape(b, H * C, L, d), Vw.reshape(b, H * C, L, d), am
    ).view(b, H, n, d)
    # The w slots that end at the piece's last real token; the caller keeps the valid ones.
    keep = piece_length + torch.arange(w, device=q.device)
    return o, (Kext[:, :, keep], Vext[:, :, keep])


def _solve_unit_lower(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with (I + A) X = rhs, A (..., B, B) strictly lower-triangular, rhs (..., B, e).

    Forward substitution, one row per Scan iteration: X starts as rhs and row
    i becomes rhs_i - A_i X (A_i reads only the rows before i, already solved).
    What torch.linalg.solve_triangular computes, in ops ONNX has.
    """
    B = A.shape[-1]
    rows = A.movedim(-2, 0)  # (B, ..., B): row i of every chunk's A
    onehot = torch.eye(B, dtype=A.dtype, device=A.device)  # (B, B): where row i goes

    def substitute(X, xs):
        # size-1 axes are made here, not in the scanned inputs: the exporter
        # traces those sizes as symbols that might not broadcast
        a_i, e_i = xs
        X = X - e_i[:, None] * (a_i.unsqueeze(-2) @ X)
        return X, X.new_zeros(())

    X, _ = scan(substitute, rhs, [rows, onehot])
    return X


def _delta_net(attn, q, k, v, x, mask, state):
    b, H, n, d = q.shape
    B = attn.chunk_size
    C = n // B
    (S0,) = state
    q, k, beta = attn._inputs(q, k, x, mask)
    qc, kc, vc = q.view(b, H, C, B, d), k.view(b, H, C, B, d), v.view(b, H, C, B, d)
    bc = beta.view(b, H, C, B, 1)
    A = (bc * (kc @ kc.transpose(-1, -2))).tril(-1)
    WU = _solve_unit_lower(A, torch.cat([bc * kc, bc * vc], dim=-1))
    W, U = WU[..., :d], WU[..., d:]
    QK = (qc @ kc.transpose(-1, -2)).tril()

    def chunk(S, xs):
        q_c, k_c, W_c, U_c, QK_c = xs
        E = U_c - W_c @ S
        return S + k_c.transpose(-1, -2) @ E, q_c @ S + QK_c @ E

    per_chunk = [t.permute(2, 0, 1, 3, 4) for t in (qc, kc, W, U, QK)]  # chunk axis first
    S, o = scan(chunk, S0, per_chunk)
    return o.permute(1, 2, 0, 3, 4).reshape(b, H, n, d), (S,)


ATTEND = {"bsbr": _bsbr, "standard": _standard, "linear": _linear, "delta_net": _delta_net}


# --- graphs ----------------------------------------------------------------------

class SegmentEncoder(nn.Module):
    """Whole chunks of a document through the encoder, given the carried state.

    forward(input_ids (b, C*B) int64, attention_mask (b, C*B) int64, position () int64,
            [window_count () int64, piece_length () int64,]  *state)
        -> (hidden (b, C*B, D) final-normalised, *new state parts)

    The piece is whole chunks (B = block size); a caller with a shorter piece
    pads it and masks the padding. New state parts per layer follow
    state_layout: a log's new entries (of all C chunks), a tensor's
    replacement, a window's `window` slots ending at token `piece_length`.
    Shares its parameters with the DocumentClassifier it wraps.
    """

    def __init__(self, model):
        super().__init__()
        self.cfg: ModelConfig = model.config
        self.encoder = model.encoder
        half = self.cfg.head_dim // 2
        inv_freq = self.cfg.rope_base ** (-torch.arange(half, dtype=torch.float64) / max(half, 1))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.per_layer = len(state_layout(self.cfg))

    def forward(self, input_ids, attention_mask, position, *rest):
        cfg, enc = self.cfg, self.encoder
        window = rest[:2] if cfg.arch == "sliding_window" else ()
        state = rest[len(window):]
        mask = attention_mask.to(torch.bool)
        x = enc.drop(enc.embed(input_ids))
        b, n = input_ids.shape
        cos, sin = _rope(position, n, self.inv_freq)
        new_state = []
        for i, block in enumerate(enc.blocks):
            attn = block.attn
            layer_state = state[i * self.per_layer : (i + 1) * self.per_layer]
            xn = block.norm_attn(x)
            H, d = attn.num_heads, attn.head_dim
            q, k, v = attn.qkv(xn).view(b, n, 3, H, d).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cfg.arch == "sliding_window":
                o, parts = _sliding_window(attn, q, k, v, xn, mask, layer_state, *window)
            else:
                o, parts = ATTEND[cfg.arch](attn, q, k, v, xn, mask, layer_state)
            x = x + block.drop(attn.out(o.transpose(1, 2).reshape(b, n, H * d)))
            x = x + block.drop(block.ff(block.norm_ff(x)))
            new_state.extend(parts)
        return (enc.norm(x), *new_state)
