"""Shared frame of every attention mechanism: projections, RoPE, chunk padding.

Each mechanism subclasses `Attention` and implements
- `attend(q, k, v, x, pos0, mask, state, commit)`: the parallel form over a
  piece that starts at absolute position pos0 (a multiple of the chunk size)
  given the state carried from earlier pieces. One-shot inference is this
  with state=None over the whole sequence; streaming is the same over each
  piece, so both run the same code.
- `naive(q, k, v, x, mask, state=None, pos0=0)`: an obviously-correct, slow
  loop over the same piece entered with the same carried state, used only by
  tests. It returns (outputs, final state): the state in `attend`'s layout
  (the same keys; append-log entries as `AppendLog`s), as `attend` returns it
  with commit=True. Mechanisms whose math depends on absolute positions
  (standard, sliding_window, bsbr) check that the state is that of the pos0
  tokens before the piece.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbr_core.config import ModelConfig
from bsbr_core.rope import apply_rope, rope_cos_sin
from bsbr_core.state import AppendLog


def pad_len(n: int, block: int) -> int:
    return (-n) % block


def pad_seq(t: torch.Tensor, pad: int, dim: int = -2, value: float = 0.0) -> torch.Tensor:
    """Right-pad t along `dim` by `pad` entries."""
    if pad == 0:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def valid_mask(mask: torch.Tensor | None, b: int, n: int, device) -> torch.Tensor:
    """(b, n) bool: True for real tokens."""
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    return mask.to(torch.bool)


def nonempty_keys(key_ok: torch.Tensor) -> torch.Tensor:
    """Where a query would see no key at all (a block that is all padding),
    let it see every key: its output is discarded, and this avoids NaN."""
    return key_ok | ~key_ok.any(dim=-1, keepdim=True)


def carried(value) -> torch.Tensor | None:
    """A carried state entry as a tensor: an AppendLog's entries, or the tensor itself."""
    return value.view if isinstance(value, AppendLog) else value


class Attention(nn.Module):
    """Multi-head attention frame: x (b, n, D) -> (b, n, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.chunk_size = cfg.block_size
        self.qkv = nn.Linear(cfg.hidden_dim, 3 * cfg.hidden_dim)
        self.out = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _heads(self, qkv, pos0: int):
        """Projected (b, n, 3D) -> q, k, v each (b, H, n, d), RoPE at positions pos0.."""
        b, n, _ = qkv.shape
        H, d = self.num_heads, self.head_dim
        q, k, v = qkv.view(b, n, 3, H, d).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(pos0, n, d, self.cfg.rope_base, qkv.device)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, pos0: int = 0, mask=None, state=None, commit: bool = True, impl: str = "fast"):
        """x (b, n, D) normalised layer input; mask (b, n) bool or None.

        Returns (y (b, n, D), new layer state; the old one if not commit).
        """
        b, n, _ = x.shape
        H, d = self.num_heads, self.head_dim
        if n == 0:  # an empty piece changes nothing
            return x.new_zeros(b, 0, H * d), state
        q, k, v = self._heads(self.qkv(x), pos0)
        if impl == "naive":
            o, new_state = self.naive(q, k, v, x, mask, state, pos0)
            new_state = new_state if commit else state
        elif impl == "fast":
            o, new_state = self.attend(q, k, v, x, pos0, mask, state, commit)
        else:
            raise ValueError(f"unknown impl {impl!r}")
        y = self.out(o.transpose(1, 2).reshape(b, n, H * d))
        return y, new_state

    def forward_ragged(self, x, spans, states, commit: bool):
        """Several documents' pieces packed in one row: x (1, N, D).

        spans: per document (start, end, pos0) in the packed row; states: its
        carried state. The projections run once over all N tokens; only the
        attention proper runs per document. Returns (y (1, N, D), new states).
        """
        qkv = self.qkv(x)
        outs, new_states = [], []
        for (s, e, pos0), state in zip(spans, states):
            q, k, v = self._heads(qkv[:, s:e], pos0)
            o, st = self.attend(q, k, v, x[:, s:e], pos0, None, state, commit)
            outs.append(o.transpose(1, 2).reshape(1, e - s, -1))
            new_states.append(st)
        return self.out(torch.cat(outs, dim=1)), new_states

    def attend(self, q, k, v, x, pos0, mask, state, commit):  # pragma: no cover - abstract
        raise NotImplementedError

    def naive(self, q, k, v, x, mask, state=None, pos0=0):  # pragma: no cover - abstract
        raise NotImplementedError

    def sdpa(self, q, k, v, attn_mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
