"""Attention layers: one module per mechanism (its math in bsbr_core.ops.<mech>),
each with attend (parallel, state-carrying), attend_chunks (the exported
form) and naive (reference) forms, and `MECHANISMS`, the one registry that
the model, the export, the ONNX runtime and the state checks read."""
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



def mechanism(arch: str) -> type[Attention]:
    """The registered layer class of `arch`."""
    try:
        return MECHANISMS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; expected one of {tuple(MECHANISMS)}") from None


def state_layout(cfg) -> list:
    """Per layer: the StateEntry (name, kind, shape after batch) of each tensor cfg's mechanism carries."""
    return mechanism(cfg.arch).state_layout(cfg)


__all__ = ["MECHANISMS", "Attention", "mechanism", "state_layout"] + [c.__name__ for c in MECHANISMS.values()]
