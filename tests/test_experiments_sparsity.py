"""experiments/sparsity.py: the retrieval weights, the pairs a layer scores, and the concentration statistics,
each against a naive computation."""
from __future__ import annotations

import math

import pytest
import torch

from bsbr_core import ModelConfig, build_model
from core_helpers import randomize


def tiny(arch="bsbr", causal=False, chunk=4, f=1, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=50, hidden_dim=16, num_layers=2, num_heads=2, ff_dim=16,
                      chunk_size=chunk, causal=causal if arch == "bsbr" else False, compression_factor=f,
                      labels=["a", "b"])
    return randomize(build_model(cfg), seed).double().eval()  # weights large enough that softmaxes are not flat


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


def brute_scored(arch, causal, n, B):
    """Which (t, s) a token-level softmax sees, by the mechanisms' definitions."""
    out = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        for s in range(n):
            if arch == "bsbr":
                out[t, s] = s // B == t // B and (not causal or s <= t)
            else:  # standard: block-causal
                out[t, s] = s // B <= t // B
    return out


@pytest.mark.parametrize("arch,causal", [("bsbr", False), ("bsbr", True), ("standard", False)])
@pytest.mark.parametrize("n", [1, 7, 12, 13])
def test_scored_pairs_read_from_the_layers_softmax_calls(arch, causal, n):
    from experiments.sparsity import expected_overall, pair_fractions, scored_pairs

    model = tiny(arch, causal=causal).float()
    attn = model.encoder.blocks[0].attn
    seen = scored_pairs(attn, n)
    assert torch.equal(seen, brute_scored(arch, causal, n, 4))
    assert "sdpa" not in vars(attn)  # the recorder is gone again
    fr = pair_fractions(seen, 4)
    causal_pairs = [(t, s) for t in range(n) for s in range(t + 1)]
    between = [(t, s) for t, s in causal_pairs if s // 4 < t // 4]
    assert fr["causal_pairs"] == len(causal_pairs) and fr["between_pairs"] == len(between)
    assert fr["within"] == 0.0
    if arch == "bsbr":
        assert fr["between"] == (1.0 if between else None)
        assert fr["overall"] == pytest.approx(len(between) / len(causal_pairs))
        assert fr["overall"] == pytest.approx(expected_overall(n, 4))
        assert fr["scored_noncausal_pairs"] == (0 if causal else sum(
            1 for t in range(n) for s in range(t + 1, n) if s // 4 == t // 4))
    else:
        assert fr["overall"] == 0.0 and fr["between"] in (0.0, None)


def test_pair_fractions_count_what_is_given():
    """Not only the two structures above: an arbitrary scored set is counted as a loop counts it."""
    from experiments.sparsity import pair_fractions

    g = torch.Generator().manual_seed(0)
    n, B = 11, 3
    seen = torch.rand(n, n, generator=g) < 0.5
    cz = lambda cond: [(t, s) for t in range(n) for s in range(t + 1) if cond(t, s)]
    within, between = cz(lambda t, s: s // B == t // B), cz(lambda t, s: s // B < t // B)
    fr = pair_fractions(seen, B)
    assert fr["within"] == pytest.approx(1 - sum(bool(seen[t, s]) for t, s in within) / len(within))
    assert fr["between"] == pytest.approx(1 - sum(bool(seen[t, s]) for t, s in between) / len(between))
    assert fr["overall"] == pytest.approx(1 - sum(bool(seen[t, s]) for t, s in within + between)
                                          / len(within + between))


@pytest.mark.parametrize("n", [5, 12, 14])
def test_standard_probs_reproduce_the_layers_output_and_chunk_masses_sum_them(n):
    from experiments.sparsity import heads, standard_chunk_mass, standard_probs

    model = tiny("standard")
    attn = model.encoder.blocks[1].attn
    torch.manual_seed(2)
    x = torch.randn(1, n, 16, dtype=torch.float64)
    q, k, v = heads(attn, x)
    P = standard_probs(attn, q, k)  # (1, H, n, n)
    o, _ = attn.attend(q, k, v, x, 0, None, None, False)
    torch.testing.assert_close(P @ v, o, rtol=1e-10, atol=1e-12)
    M = standard_chunk_mass(attn, q, k)
    C = -(-n // 4)
    for c in range(C):
        rows = P[0, :, c * 4 : min(c * 4 + 4, n)]
        for j in range(C):
            expect = rows[..., j * 4 : j * 4 + 4].sum(-1).mean(-1)
            torch.testing.assert_close(M[:, c, j], expect, rtol=1e-10, atol=1e-12)


def test_row_stats_and_the_accumulator_against_hand_values():
    from experiments.sparsity import StatsAccumulator, row_stats, uniform_stats

    p = torch.tensor([[0.5, 0.25, 0.25, 0.0, 0.0], [0.2] * 5], dtype=torch.float64)
    st = row_stats(p)
    H0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    torch.testing.assert_close(st["entropy"], torch.tensor([H0, math.log(5)], dtype=torch.float64))
    torch.testing.assert_close(st["norm_entropy"], torch.tensor([H0 / math.log(5), 1.0], dtype=torch.float64))
    torch.testing.assert_close(st["top1"], torch.tensor([0.5, 0.2], dtype=torch.float64))
    torch.testing.assert_close(st["top4"], torch.tensor([1.0, 0.8], dtype=torch.float64))
    assert uniform_stats(5) == pytest.approx({"entropy": math.log(5), "norm_entropy": 1.0, "top1": 0.2, "top4": 0.8})
    # Rows c >= 2 of a (H, C, C) distribution are averaged; row c has c candidates.
    acc = StatsAccumulator(layers=1, heads=1)
    d = torch.zeros(1, 4, 4, dtype=torch.float64)
    d[0, 1, 0] = 1.0
    d[0, 2, :2] = torch.tensor([1.0, 0.0])
    d[0, 3, :3] = torch.tensor([0.5, 0.25, 0.25])
    acc.add(0, d)
    res = acc.result()
    assert res["query_chunks"] == 2
    assert res["mean"]["top1"] == pytest.approx((1.0 + 0.5) / 2)
    assert res["mean"]["norm_entropy"] == pytest.approx((0.0 + H0 / math.log(3)) / 2)
    assert res["uniform"]["top1"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_layer_inputs_are_what_the_blocks_attend_over():
    """The captured inputs, fed through each block's attention, rebuild the encoder's output."""
    from experiments.sparsity import layer_inputs

    model = tiny("bsbr")
    ids = torch.randint(0, 50, (13,), generator=torch.Generator().manual_seed(3))
    xs = layer_inputs(model, ids)
    assert len(xs) == 2 and xs[0].shape == (1, 13, 16)
    h = model.encoder.embed(ids[None])
    for block, x in zip(model.encoder.blocks, xs):
        torch.testing.assert_close(block.norm_attn(h), x)
        h, _ = block(h, 0, None, None, False)


def test_pick_spreads_evenly_and_keeps_all_when_few():
    from experiments.sparsity import pick

    assert pick(list(range(10)), 3) == [0, 4, 9]
    assert pick([1, 2], 5) == [1, 2]
    assert pick(list(range(9)), 1) == [0]
