"""Each mechanism's parallel form against its naive reference: outputs and gradients."""
from __future__ import annotations

import pytest
import torch

from bsbr_core.attention import MECHANISMS
from bsbr_core.rope import apply_rope, rope_cos_sin
from core_helpers import VARIANT_CFGS, VARIANT_IDS, randomize, small_config


def _attention(seed=0, **overrides):
    cfg = small_config(**overrides)
    return randomize(MECHANISMS[cfg.arch](cfg), seed), cfg


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
@pytest.mark.parametrize("n", [1, 8, 21, 40])
def test_parallel_matches_naive_outputs_and_gradients(overrides, n):
    attn, cfg = _attention(**overrides)
    torch.manual_seed(n)
    x = torch.randn(2, n, cfg.hidden_dim, requires_grad=True)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, max(1, n - 5):] = False  # second row right-padded
    g = torch.randn(2, n, cfg.hidden_dim)

    grads = {}
    outs = {}
    for impl in ("fast", "naive"):
        attn.zero_grad()
        x.grad = None
        y, _ = attn(x, 0, mask, None, False, impl)
        (y * g * mask[..., None]).sum().backward()
        outs[impl] = y.detach()
        grads[impl] = [x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                          for p in attn.parameters()]
    real = mask[..., None]
    assert torch.allclose(outs["fast"] * real, outs["naive"] * real, atol=1e-5, rtol=1e-4)
    for gf, gn in zip(grads["fast"], grads["naive"]):
        assert torch.allclose(gf, gn, atol=1e-4, rtol=1e-3)
    assert outs["fast"].abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("overrides", VARIANT_CFGS, ids=VARIANT_IDS)
def test_empty_sequence(overrides):
    attn, cfg = _attention(**overrides)
    y, _ = attn(torch.zeros(1, 0, cfg.hidden_dim), 0, None, None, True, "fast")
    assert y.shape == (1, 0, cfg.hidden_dim)


@pytest.mark.parametrize("overrides", [
    dict(arch="bsbr", hidden_dim=24, num_heads=2),          # head_dim 12: not a power of two
    dict(arch="bsbr", hidden_dim=30, num_heads=2, compression_factor=4),  # head_dim 15: odd
    dict(arch="bsbr", chunk_size=1),
    dict(arch="standard", chunk_size=1),
    dict(arch="linear", chunk_size=1, hidden_dim=24, num_heads=2),
    dict(arch="delta_net", chunk_size=1, hidden_dim=24, num_heads=2),
    dict(arch="sliding_window", chunk_size=1, window=3),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_awkward_sizes(overrides):
    attn, cfg = _attention(**overrides)
    x = torch.randn(1, 13, cfg.hidden_dim)
    with torch.no_grad():
        fast, _ = attn(x, 0, None, None, False, "fast")
        naive, _ = attn(x, 0, None, None, False, "naive")
    assert torch.allclose(fast, naive, atol=1e-5, rtol=1e-4)


def test_rope_is_exact_at_large_positions():
    # Positions near 10^7: angles computed in float64 keep relative rotations exact.
    d = 16
    x = torch.randn(1, 1, 3, d, dtype=torch.float32)
    cos, sin = rope_cos_sin(10_000_000, 3, d, 10000.0)
    got = apply_rope(x, cos, sin)
    half = d // 2
    inv = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = (10_000_000 + torch.arange(3, dtype=torch.float64))[:, None] * inv
    x64 = x.double()
    want = torch.cat([x64[..., :half] * ang.cos() - x64[..., half:] * ang.sin(),
                      x64[..., half:] * ang.cos() + x64[..., :half] * ang.sin()], -1)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # Rotation preserves the norm.
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
