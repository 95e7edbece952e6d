"""Pooling of the final hidden states into one document vector, in pieces.

A document is read in pieces (whole segments, committed chunks, the pending
tail), so a pooling is a monoid over pieces: `summarize` a piece's hidden
states into an accumulator, `combine` two accumulators, `readout` the
document vector. Streaming keeps the accumulator of the committed tokens in
`State.pool_sum`, so reading a document in any split gives the one-shot
vector (docs/architecture.md 1.4).

- mean:      acc = sum_t h_t (b, D); readout acc / count. The shipped models.
- attention: softmax-weighted mean with a learned score s_t = w . h_t + c:
             acc = [sum_t softmax(s)_t h_t, logsumexp_t s_t] (b, D + 1);
             two accumulators merge with a running log-sum-exp, exactly.
             It lets a classifier read its answer off a few tokens (a query
             at the end of a long document) instead of 1/n of each.
- last:      the last real token's hidden state: acc = [h_last, has_token]
             (b, D + 1); a later non-empty piece replaces an earlier one.
             For tasks that end in a question (the long-range recall task).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bsbr_core.config import POOLINGS
# Log-normaliser of an empty piece: finite, so merging two empty ones gives no NaN.
_EMPTY_LSE = -1e30


class MeanPool(nn.Module):
    """Masked mean over real tokens; accumulator (b, D) = running sum."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim

    def empty(self, b: int, device) -> torch.Tensor:
        return torch.zeros(b, self.hidden_dim, device=device)

    def summarize(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (b, n, D), mask (b, n) bool or None -> accumulator (b, D)."""
        return h.sum(1) if mask is None else (h * mask[..., None].to(h.dtype)).sum(1)

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def readout(self, acc: torch.Tensor, count) -> torch.Tensor:
        """count: real tokens behind acc, an int or a (b, 1) tensor."""
        if torch.is_tensor(count):
            return acc / count.clamp(min=1).to(acc.dtype)
        return acc / max(int(count), 1)


class AttentionPool(MeanPool):
    """Softmax-weighted mean with a learned score; accumulator (b, D + 1) =
    [weighted mean, log-normaliser]."""

    def __init__(self, hidden_dim: int):
        super().__init__(hidden_dim)
        self.score = nn.Linear(hidden_dim, 1)

    def empty(self, b: int, device) -> torch.Tensor:
        acc = torch.zeros(b, self.hidden_dim + 1, device=device)
        acc[:, -1] = _EMPTY_LSE
        return acc

    def summarize(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = h.shape
        if n == 0:
            return self.empty(b, h.device).to(h.dtype)
        s = self.score(h).squeeze(-1)  # (b, n)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=1, keepdim=True)  # (b, 1); -inf for a row without real tokens
        empty = torch.isinf(lse)
        lse = torch.where(empty, torch.full_like(lse, _EMPTY_LSE), lse)
        w = torch.exp(s - lse).masked_fill(empty, 0.0)  # (b, n)
        return torch.cat([(w[..., None] * h).sum(1), lse], dim=1)

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        la, lb = a[:, -1:], b[:, -1:]
        lse = torch.logaddexp(la, lb)
        return torch.cat([torch.exp(la - lse) * a[:, :-1] + torch.exp(lb - lse) * b[:, :-1], lse], dim=1)

    def readout(self, acc: torch.Tensor, count) -> torch.Tensor:
        return acc[:, :-1]


class LastPool(MeanPool):
    """The last real token; accumulator (b, D + 1) = [h_last, 1 if any token else 0]."""

    def empty(self, b: int, device) -> torch.Tensor:
        return torch.zeros(b, self.hidden_dim + 1, device=device)

    def summarize(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = h.shape
        if n == 0:
            return self.empty(b, h.device).to(h.dtype)
        if mask is None:
            return torch.cat([h[:, -1], h.new_ones(b, 1)], dim=1)
        count = mask.sum(1)  # right-padded: the last real token is at count - 1
        last = h[torch.arange(b, device=h.device), (count - 1).clamp(min=0)]
        present = (count > 0).to(h.dtype)[:, None]
        return torch.cat([last * present, present], dim=1)

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(b[:, -1:] > 0, b, a)

    def readout(self, acc: torch.Tensor, count) -> torch.Tensor:
        return acc[:, :-1]


def build_pooling(name: str, hidden_dim: int) -> MeanPool:
    if name == "mean":
        return MeanPool(hidden_dim)
    if name == "attention":
        return AttentionPool(hidden_dim)
    if name == "last":
        return LastPool(hidden_dim)
    raise ValueError(f"unknown pooling {name!r}; expected one of {POOLINGS}")
