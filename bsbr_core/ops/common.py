"""Helpers every mechanism's ops share: padding to whole chunks, masks, carried entries."""
from __future__ import annotations

from typing import NamedTuple

import torch

from bsbr_core.state import AppendLog


class StateEntry(NamedTuple):
    """One tensor a mechanism carries per layer (see bsbr_core.ops: state layouts).

    kind "log": history along dim 2 that grows with the document (an AppendLog
        in the torch state); shape has -1 on that axis.
    kind "tensor": a fixed-size tensor, replaced by every piece.
    kind "window": the last `window` keys/values (at most that many in the
        torch state; the export pads them on the left to exactly that many).
    shape: the shape after the batch axis.
    """

    name: str
    kind: str
    shape: tuple


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


def padded_mask(mask: torch.Tensor | None, b: int, n: int, pad: int, device) -> torch.Tensor | None:
    """The real tokens of a piece right-padded by `pad` (b, n + pad) bool, or
    None when every token is real (no mask given, nothing padded)."""
    if mask is None and pad == 0:
        return None
    return pad_seq(valid_mask(mask, b, n, device), pad, dim=1, value=False)


def nonempty_keys(key_ok: torch.Tensor) -> torch.Tensor:
    """Where a query would see no key at all (a block that is all padding),
    let it see every key: its output is discarded, and this avoids NaN."""
    return key_ok | ~key_ok.any(dim=-1, keepdim=True)


def carried(value) -> torch.Tensor | None:
    """A carried state entry as a tensor: an AppendLog's entries, or the tensor itself."""
    return value.view if isinstance(value, AppendLog) else value
