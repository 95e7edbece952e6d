"""experiments/sparsity.py: the retrieval weights, the pairs a layer scores, and the concentration statistics,
each against a naive computation."""
from __future__ import annotations

import math

import pytest
import torch

from bsbr_core import ModelConfig, build_model


def tiny(arch="bsbr", causal=False, chunk=4, f=1, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=50, hidden_dim=16, num_layers=2, num_heads=2, ff_dim=16,
                      chunk_size=chunk, causal=causal if arch == "bsbr" else False, compression_factor=f,
                      labels=["a", "b"])
    return build_model(cfg).double().eval()


def naive_retrieval(attn, x, mask):
    """a_{c,j} by the docstring's formulas, chunk by chunk, one softmax per row."""
    b, n, D = x.shape
    B, H, d = attn.chunk_size, attn.num_heads, attn.head_dim
    C = -(-n // B)
    out = torch.zeros(b, H, C, C, dtype=x.dtype)
    for bi in range(b):
        hs, rs = [], []
        for c in range(C):
            idx = [t for t in range(c * B, min(c * B + B, n)) if mask is None or mask[bi, t]]
            xbar = x[bi, idx].mean(0) if idx else x.new_zeros(D)
            hs.append(attn.meta_key.weight @ xbar)
            rs.append(attn.meta_query.weight @ xbar)
        for c in range(1, C):
            r = rs[c - 1] if attn.causal else rs[c]
            for h in range(H):
                sl = slice(h * d, (h + 1) * d)
                s = torch.stack([r[sl] @ hs[j][sl] for j in range(c)]) / math.sqrt(d)
                out[bi, h, c, :c] = torch.softmax(s, 0)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 4, 13, 16])
def test_retrieval_weights_match_a_naive_loop(causal, n):
    model = tiny(causal=causal)
    attn = model.encoder.blocks[0].attn
    torch.manual_seed(1)
    x = torch.randn(2, n, 16, dtype=torch.float64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, max(1, n - 6):] = False  # the second row is right-padded
    for m in (None, mask):
        a = attn.retrieval_weights(x, m)
        assert a.shape == (2, 2, -(-n // 4), -(-n // 4))
        torch.testing.assert_close(a, naive_retrieval(attn, x, m), rtol=1e-10, atol=1e-12)
        C = a.shape[2]
        rows = a.sum(-1)
        assert torch.all(rows[..., 0] == 0)
        torch.testing.assert_close(rows[..., 1:], torch.ones_like(rows[..., 1:]))
        assert torch.all(a.triu() == 0) or C == 1  # only strictly earlier chunks
