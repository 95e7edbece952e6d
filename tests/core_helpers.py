"""Shared helpers of the bsbr_core tests: small configs of every mechanism."""
from __future__ import annotations

import torch

from bsbr_core import ModelConfig, build_model

# (id, ModelConfig overrides) covering every mechanism and BSBR option.
VARIANTS = [
    ("bsbr", dict(arch="bsbr")),
    ("bsbr-causal", dict(arch="bsbr", causal=True)),
    ("bsbr-f2", dict(arch="bsbr", compression_factor=2)),
    ("bsbr-f4", dict(arch="bsbr", compression_factor=4)),
    ("bsbr-f16-causal", dict(arch="bsbr", compression_factor=16, causal=True)),
    ("standard", dict(arch="standard")),
    ("standard-max", dict(arch="standard", max_length=21)),
    ("linear", dict(arch="linear")),
    ("sliding_window", dict(arch="sliding_window", window=11)),
    ("delta_net", dict(arch="delta_net")),
    ("bsbr-attnpool", dict(arch="bsbr", pooling="attention")),
    ("standard-attnpool", dict(arch="standard", pooling="attention")),
    ("linear-attnpool", dict(arch="linear", pooling="attention")),
    ("bsbr-lastpool", dict(arch="bsbr", pooling="last")),
    ("delta_net-lastpool", dict(arch="delta_net", pooling="last")),
]
VARIANT_IDS = [v[0] for v in VARIANTS]
VARIANT_CFGS = [v[1] for v in VARIANTS]


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=2, ff_dim=48, chunk_size=8,
                labels=["a", "b", "c"], window=11)
    base.update(overrides)
    return ModelConfig(**base)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that a wrong mask or a missing term shows in the logits
    (the training init, std 0.02, makes every document's logits nearly equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def small_model(seed: int = 0, **overrides):
    return randomize(build_model(small_config(**overrides)).eval(), seed)
