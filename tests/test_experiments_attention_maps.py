"""experiments/attention_maps.py: the effective-weight maps against brute force and against the layers' own output."""
from __future__ import annotations

import math

import pytest
import torch

from bsbr_core import ModelConfig, build_model
from core_helpers import randomize
from experiments.attention_maps import bsbr_maps, chunk_distribution, standard_maps, summarize
from experiments.sparsity import heads, standard_chunk_mass

B = 4


def tiny(arch="bsbr", causal=False, f=1, seed=0):
    cfg = ModelConfig(arch=arch, vocab_size=50, hidden_dim=16, num_layers=2, num_heads=2, ff_dim=16, chunk_size=B,
                      causal=causal if arch == "bsbr" else False, compression_factor=f, labels=["a", "b"])
    return randomize(build_model(cfg), seed).double().eval()


@torch.no_grad()
def brute_routing(attn, x):
    """(H, n, n) by the definitions, one entry at a time: the local softmax in t's
    chunk; a_{c,j} / |j| for s in an earlier chunk j, a from the meta projections of chunk means."""
    n, D = x.shape[1], x.shape[2]
    H, d = attn.num_heads, attn.head_dim
    q, k, _ = heads(attn, x)
    C = -(-n // B)
    means = [sum(x[0, t] for t in range(c * B, min(c * B + B, n))) / len(range(c * B, min(c * B + B, n)))
             for c in range(C)]
    hs = [attn.meta_key.weight @ m for m in means]
    rs = [attn.meta_query.weight @ m for m in means]
    W = torch.zeros(H, n, n, dtype=x.dtype)
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        for t in range(n):
            c = t // B
            own = [s for s in range(c * B, min(c * B + B, n)) if not attn.causal or s <= t]
            z = sum(math.exp(float(q[0, h, t] @ k[0, h, u]) / math.sqrt(d)) for u in own)
            for s in own:
                W[h, t, s] = math.exp(float(q[0, h, t] @ k[0, h, s]) / math.sqrt(d)) / z
            if c:
                r = rs[c - 1] if attn.causal else rs[c]
                e = [math.exp(float(r[sl] @ hs[j][sl]) / math.sqrt(d)) for j in range(c)]
                for s in range(c * B):
                    W[h, t, s] = e[s // B] / sum(e) / B  # earlier chunks are whole: |j| = B
    return W


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("f", [1, 4])
@pytest.mark.parametrize("n", [3, 8, 13])
def test_bsbr_routing_map_matches_brute_force(causal, f, n):
    model = tiny(causal=causal, f=f)
    attn = model.encoder.blocks[1].attn
    x = torch.randn(1, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    maps = bsbr_maps(attn, x)
    torch.testing.assert_close(maps["routing"][0], brute_routing(attn, x), rtol=1e-9, atol=1e-12)
    rows = maps["routing"][0].sum(-1)
    expect = torch.where(torch.arange(n) < B, 1.0, 2.0).to(rows.dtype).expand_as(rows)
    torch.testing.assert_close(rows, expect)
    assert (maps["exact"] is None) == (f > 1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 8, 14])
def test_exact_maps_reproduce_the_layers_output(causal, n):
    """o_t = sum_s W_{t,s} v_s, against attend itself: the maps are the layer's effective weights."""
    for arch in ("bsbr", "standard"):
        if arch == "standard" and causal:
            continue
        attn = tiny(arch, causal=causal).encoder.blocks[0].attn
        x = torch.randn(1, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        maps = (bsbr_maps if arch == "bsbr" else standard_maps)(attn, x)
        o, _ = attn.attend(maps["q"], maps["k"], maps["v"], x, 0, None, None, False)
        torch.testing.assert_close(maps["exact"] @ maps["v"], o, rtol=1e-9, atol=1e-11)


def test_standard_chunk_distribution_agrees_with_the_sparsity_measure():
    attn = tiny("standard").encoder.blocks[0].attn
    x = torch.randn(1, 14, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    maps = standard_maps(attn, x)
    D = chunk_distribution(maps, B)
    M = standard_chunk_mass(attn, maps["q"], maps["k"])
    for c in range(1, D.shape[1]):
        torch.testing.assert_close(D[:, c, :c], M[:, c, :c] / M[:, c, :c].sum(-1, keepdim=True))
    assert torch.all(D.triu() == 0)


def test_summary_numbers_against_loops():
    attn = tiny("bsbr").encoder.blocks[1].attn
    n = 11
    x = torch.randn(1, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    maps = bsbr_maps(attn, x)
    got = summarize(maps, B)
    W, v, a = maps["exact"][0], maps["v"][0], maps["a"][0]
    for h in range(2):
        own, dist, share = [], [], []
        for t in range(n):
            row = [abs(float(W[h, t, s])) for s in range(n)]
            own.append(sum(row[s] for s in range(n) if s // B == t // B) / sum(row))
            dist.append(sum(row[s] * abs(t - s) for s in range(n)) / sum(row))
            if t >= B:
                L = sum(W[h, t, s] * v[h, s] for s in range(n) if s // B == t // B).norm()
                R = sum(W[h, t, s] * v[h, s] for s in range(n) if s // B < t // B).norm()
                share.append(float(R / (L + R)))
        C = -(-n // B)
        assert got["own_chunk_share"][h] == pytest.approx(sum(own) / n)
        assert got["mean_distance"][h] == pytest.approx(sum(dist) / n)
        assert got["earlier_output_share"][h] == pytest.approx(sum(share) / len(share))
        assert got["previous_chunk_share"][h] == pytest.approx(sum(float(a[h, c, c - 1]) for c in range(1, C)) / (C - 1))
        cd = [sum(float(a[h, c, j]) * (c - j) for j in range(c)) for c in range(1, C)]
        assert got["earlier_chunk_distance"][h] == pytest.approx(sum(cd) / len(cd))
