"""Rotary position embedding at absolute positions.

Angles are computed in float64 because positions reach 10^7 (a long document
read page by page): float32 would lose the low bits of pos * inv_freq.
There is no maximum length: angles are computed for the positions asked.
"""
from __future__ import annotations

import torch


def rope_cos_sin(pos0: int, n: int, head_dim: int, base: float, device: torch.device | str = "cpu"):
    """cos, sin of shape (n, head_dim // 2), float32, for positions pos0 .. pos0 + n - 1."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=device) / max(half, 1))
    pos = torch.arange(pos0, pos0 + n, dtype=torch.float64, device=device)
    angles = pos[:, None] * inv_freq[None, :]  # (n, half) in float64
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + half]) of x (..., n, d) by the angles (n, half).

    With an odd head_dim the last feature is left unrotated.
    """
    half = cos.shape[-1]
    if half == 0:
        return x
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rest.shape[-1]:
        out.append(rest)
    return torch.cat(out, dim=-1)
