"""The encoder as one exportable graph: the same weights and the same math as
`bsbr_core.model.Encoder`, written so that `torch.export` can capture one graph
for every piece length, batch size and history length.

Nothing here is specific to a mechanism: each layer's attention runs its
`attend_chunks` (the op's `chunkwise` in bsbr_core.ops, the function the
torch layer runs too), and the carried state and the extra scalar inputs
are what the mechanism declares (`state_layout`, `export_inputs`). What
differs from the torch path, and why:
- A piece is whole chunks (the caller pads it and masks the padding), so
  every size in the graph is a product of the chunk count and constants,
  and the mask is always given (the torch path skips it when nothing is
  padded); the results agree to float32 round-off.
- The position of the piece's first token is a tensor input (`position`), so
  RoPE angles are computed in the graph, in float64 as in `bsbr_core.rope`.
- The carried state is a flat tuple of tensors (`state_layout`) instead of
  dicts of AppendLogs; history that grows (kind "log") goes in whole and
  only the piece's new entries come out, so the caller appends them with
  the same AppendLog code as the torch backend.
- Where a loop over chunks or a triangular solve cannot be traced, the op
  takes a strategy that becomes ONNX Scan or forward substitution (see the
  op modules); a "window" state is padded to its fixed size with a count.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bsbr_core.attention import mechanism
from bsbr_core.attention import state_layout  # noqa: F401 - the layout the graph's I/O follows
from bsbr_core.config import ModelConfig
from bsbr_core.rope import apply_rope


def _rope(position: torch.Tensor, n, inv_freq: torch.Tensor):
    """cos, sin (n, half) float32 at positions position .. position + n - 1 (float64 angles)."""
    pos = position.to(torch.float64) + torch.arange(n, dtype=torch.float64, device=inv_freq.device)
    angles = pos[:, None] * inv_freq[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


# --- graphs ----------------------------------------------------------------------

class SegmentEncoder(nn.Module):
    """Whole chunks of a document through the encoder, given the carried state.

    forward(input_ids (b, C*B) int64, attention_mask (b, C*B) int64, position () int64,
            *export_inputs () int64 (the mechanism's, e.g. sliding_window's
            window_count and piece_length), *state)
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
        spec = mechanism(self.cfg.arch)
        self.per_layer = len(spec.state_layout(self.cfg))
        self.num_extra = len(spec.export_inputs)

    def forward(self, input_ids, attention_mask, position, *rest):
        enc = self.encoder
        extras, state = rest[: self.num_extra], rest[self.num_extra :]
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
            o, parts = attn.attend_chunks(q, k, v, xn, mask, layer_state, extras)
            x = x + block.drop(attn.out(o.transpose(1, 2).reshape(b, n, H * d)))
            x = x + block.drop(block.ff(block.norm_ff(x)))
            new_state.extend(parts)
        return (enc.norm(x), *new_state)
