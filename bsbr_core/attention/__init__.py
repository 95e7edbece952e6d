"""Attention mechanisms: one module per mechanism, each with attend (parallel,
state-carrying) and naive (reference) forms."""
from bsbr_core.attention.base import Attention
from bsbr_core.attention.bsbr import BSBRAttentionCore
from bsbr_core.attention.delta_net import DeltaNetAttention
from bsbr_core.attention.linear import LinearAttention
from bsbr_core.attention.sliding_window import SlidingWindowAttention
from bsbr_core.attention.standard import StandardAttention

MECHANISMS: dict[str, type[Attention]] = {
    "bsbr": BSBRAttentionCore,
    "standard": StandardAttention,
    "linear": LinearAttention,
    "sliding_window": SlidingWindowAttention,
    "delta_net": DeltaNetAttention,
}

__all__ = ["MECHANISMS", "Attention"] + [c.__name__ for c in MECHANISMS.values()]
