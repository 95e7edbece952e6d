"""DeltaNet's chunkwise form where it differs from the small test configs: the
matmul inverse of (I + A) and an algorithm chunk (`sub_chunk`) that is not the
model's chunk_size (64 at the reference chunk_size 128), against the naive
token-by-token delta rule, entered with a carried state, with gradients."""
from __future__ import annotations

import pytest
import torch

from bsbr_core.attention.delta_net import DeltaNetAttention, inv_unit_lower
from core_helpers import randomize, small_config


@pytest.mark.parametrize("s", [1, 2, 8, 64])
def test_inv_unit_lower_is_the_inverse_and_reads_only_the_strict_lower_triangle(s):
    g = torch.Generator().manual_seed(s)
    A = 0.3 * torch.randn(3, 2, s, s, generator=g, dtype=torch.float64)  # |entries| like b k.k
    want = torch.linalg.inv(torch.eye(s, dtype=torch.float64) + A.tril(-1))
    got = inv_unit_lower(A)  # diagonal and upper triangle hold junk: they must not be read
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-8)
    assert torch.equal(got, inv_unit_lower(A.tril(-1)))


def test_inv_unit_lower_is_stable_where_powers_of_a_are_huge():
    # All keys equal, beta 1: A is all ones below the diagonal, and (I + A)^-1 = I - (subdiagonal).
    # Powers of A have binomial entries (~1e18 at 64): a product of (I + A^(2^j)) gives garbage here.
    s = 64
    A = torch.ones(s, s).tril(-1)
    want = torch.eye(s) - torch.eye(s).roll(1, 0).tril(-1)
    assert torch.allclose(inv_unit_lower(A), want, atol=1e-5)


def test_inv_unit_lower_refuses_a_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        inv_unit_lower(torch.zeros(3, 3))


@pytest.mark.parametrize("chunk, sub", [(1, 1), (8, 8), (12, 8), (100, 64), (128, 64), (256, 64)])
def test_sub_chunk_is_the_largest_power_of_two_up_to_64(chunk, sub):
    assert DeltaNetAttention(small_config(arch="delta_net", chunk_size=chunk)).sub_chunk == sub


def _attention(chunk, dtype):
    cfg = small_config(arch="delta_net", chunk_size=chunk, hidden_dim=32, num_heads=2)
    return randomize(DeltaNetAttention(cfg)).to(dtype), cfg


@pytest.mark.parametrize("chunk, n", [(128, 300), (12, 41)])  # sub_chunk 64 and 8: several per chunk, padded
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunkwise_matches_naive_with_a_carried_state_and_its_gradients(chunk, n, dtype):
    attn, cfg = _attention(chunk, dtype)
    H, d = attn.num_heads, attn.head_dim
    g = torch.Generator().manual_seed(n)
    leaves = [torch.randn(2, H, n, d, generator=g, dtype=dtype) for _ in range(3)]
    leaves.append(torch.randn(2, n, cfg.hidden_dim, generator=g, dtype=dtype))
    leaves.append(0.3 * torch.randn(2, H, d, d, generator=g, dtype=dtype))  # carried S
    for t in leaves:
        t.requires_grad_(True)
    q, k, v, x, S0 = leaves
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, n // 2:] = False
    wo = torch.randn(2, H, n, d, generator=g, dtype=dtype) * mask[:, None, :, None]
    ws = torch.randn(2, H, d, d, generator=g, dtype=dtype)
    results = {}
    for impl in ("fast", "naive"):
        if impl == "fast":
            o, st = attn.attend(q, k, v, x, 0, mask, {"S": S0}, True)
        else:
            o, st = attn.naive(q, k, v, x, mask, {"S": S0})
        grads = torch.autograd.grad((o * wo).sum() + (st["S"] * ws).sum(), leaves)
        results[impl] = (o * mask[:, None, :, None], st["S"], grads)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=3e-5, rtol=1e-4)
    (of, sf, gf), (on, sn, gn) = results["fast"], results["naive"]
    assert torch.allclose(of, on, **tol)
    assert torch.allclose(sf, sn, **tol)
    for a, b in zip(gf, gn):
        assert torch.allclose(a, b, **tol)
    assert of.abs().max() > 1e-2 and all(a.abs().max() > 1e-3 for a in gf)


def test_chunkwise_is_stable_with_equal_keys_and_beta_near_one():
    # The case that breaks closed forms of (I + A)^-1 at chunk 128: float32 fast vs float64 naive.
    attn, cfg = _attention(128, torch.float32)
    with torch.no_grad():
        attn.beta_proj.weight.zero_()
        attn.beta_proj.bias.fill_(8.0)  # beta = sigmoid(8) ~ 0.9997
    n, H, d = 256, attn.num_heads, attn.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, n, d, generator=g)
    k = torch.randn(1, H, 1, d, generator=g).expand(1, H, n, d).contiguous()
    v = torch.randn(1, H, n, d, generator=g)
    x = torch.randn(1, n, cfg.hidden_dim, generator=g)
    with torch.no_grad():
        fast, st = attn.attend(q, k, v, x, 0, None, None, True)
        attn64 = attn.double()
        naive, st64 = attn64.naive(q.double(), k.double(), v.double(), x.double(), None)
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast.double(), naive, atol=1e-4, rtol=1e-4)
    assert torch.allclose(st["S"].double(), st64["S"], atol=1e-4, rtol=1e-4)


def test_streaming_pieces_equal_one_shot_and_naive():
    # Pieces at chunk boundaries (chunk 12, sub_chunk 8: pieces end inside a sub-chunk).
    attn, cfg = _attention(12, torch.float64)
    H, d, n = attn.num_heads, attn.head_dim, 12 * 5 + 7
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    x = torch.randn(1, n, cfg.hidden_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        whole, st_whole = attn.attend(q, k, v, x, 0, None, None, True)
        naive, st_naive = attn.naive(q, k, v, x, None)
        state, outs = None, []
        for s, e in [(0, 12), (12, 48), (48, n)]:
            o, state = attn.attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], x[:, s:e], s, None, state, True)
            outs.append(o)
    pieces = torch.cat(outs, 2)
    for got in (whole, pieces):
        assert torch.allclose(got, naive, atol=1e-10, rtol=1e-8)
    for st in (st_whole, state):
        assert torch.allclose(st["S"], st_naive["S"], atol=1e-10, rtol=1e-8)
