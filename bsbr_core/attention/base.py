"""Shared frame of every attention mechanism: projections, RoPE, the registry's declarations.

The math lives in bsbr_core.ops.<mech> (defined once); each mechanism
subclasses `Attention`, holds its parameters and implements
- `attend(q, k, v, x, pos0, mask, state, commit)`: the parallel form over a
  piece that starts at absolute position pos0 (a multiple of the chunk size)
  given the state carried from earlier pieces (the op's `streaming`).
  One-shot inference is this with state=None over the whole sequence;
  streaming is the same over each piece, so both run the same code.
- `attend_chunks(q, k, v, x, mask, parts, extras)`: the same over whole
  chunks with the carried state as the flat tensors of `state_layout` (the
  op's `chunkwise`): what the ONNX graph runs.
- `naive(q, k, v, x, mask, state=None, pos0=0)`: the op's obviously-correct,
  slow loop over the same piece entered with the same carried state, used
  only by tests. It returns (outputs, final state): the state in `attend`'s
  layout (the same keys; append-log entries as `AppendLog`s), as `attend`
  returns it with commit=True. Mechanisms whose math depends on absolute
  positions (standard, sliding_window, bsbr) check that the state is that of
  the pos0 tokens before the piece.
and declares, for the registry (bsbr_core.attention.MECHANISMS), what the
export, the ONNX runtime and the state checks need to know about it:
`ops` (its op module, whose `state_layout(cfg)` says what it carries),
`export_inputs` (scalar graph inputs beyond ids, mask and position, with
`export_examples` to trace them) and `export_history(cfg)` (an example
history length for tracing).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbr_core.config import ModelConfig
from bsbr_core.ops.common import StateEntry, carried  # noqa: F401 - carried: re-exported for the tests
from bsbr_core.rope import apply_rope, rope_cos_sin


class Attention(nn.Module):
    """Multi-head attention frame: x (b, n, D) -> (b, n, D)."""

    ops = None  # the mechanism's module in bsbr_core.ops
    export_inputs: tuple[str, ...] = ()  # scalar inputs of the exported graph, in order

    @classmethod
    def state_layout(cls, cfg: ModelConfig) -> list[StateEntry]:
        """Per layer: the StateEntry (name, kind, shape after batch) of each carried tensor."""
        return cls.ops.state_layout(cfg)

    @classmethod
    def export_history(cls, cfg: ModelConfig) -> int:
        """An example length of the "log" entries' history, for tracing (0: the mechanism has none)."""
        fn = getattr(cls.ops, "export_history", None)
        return fn(cfg) if fn is not None else 0

    @classmethod
    def export_values(cls, layer_state: dict | None, piece_tokens: int) -> list[int]:
        """Values of `export_inputs` for a piece of piece_tokens tokens entered
        with a layer's carried state (None: a new document)."""
        return cls.ops.export_values(layer_state, piece_tokens) if cls.export_inputs else []

    @classmethod
    def export_examples(cls, cfg: ModelConfig, piece_tokens: int) -> list[int]:
        """Example values of `export_inputs` for tracing a piece of piece_tokens tokens."""
        return cls.ops.export_examples(cfg, piece_tokens) if cls.export_inputs else []

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

    def attend_chunks(self, q, k, v, x, mask, parts, extras=()):  # pragma: no cover - abstract
        """Whole chunks: q, k, v (b, H, C*B, d), x (b, C*B, D), mask (b, C*B) bool,
        parts this layer's carried tensors in `state_layout` order, extras the
        `export_inputs`. Returns (o (b, H, C*B, d), the new parts: a log's new
        entries, a tensor's replacement, a window's w slots)."""
        raise NotImplementedError

    def naive(self, q, k, v, x, mask, state=None, pos0=0):  # pragma: no cover - abstract
        raise NotImplementedError

    def sdpa(self, q, k, v, attn_mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
