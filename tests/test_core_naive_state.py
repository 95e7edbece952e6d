"""Naive references entered with a carried state: against the parallel form
(outputs, final state, gradients with respect to the carried state as fla
checks dh0) and against themselves over the whole sequence (chaining).

Attention level: q, k, v, x are random leaves and RoPE (which runs before
attention) does not enter, except in the test through `Attention.forward`.
The pooling variants of core_helpers.VARIANTS differ only above attention
and are skipped. Pieces are entered at chunk boundaries, as the model does
(docs/architecture.md 1.4); a piece may end inside a chunk: with commit the
fast form then commits its partial last chunk, which the naive form must
reproduce too.
"""
from __future__ import annotations

import pytest
import torch

from bsbr_core.attention import MECHANISMS
from bsbr_core.attention.base import carried
from bsbr_core.state import AppendLog
from core_helpers import VARIANTS, randomize, small_config

ATTN_VARIANTS = [(i, o) for i, o in VARIANTS if "pooling" not in o]
AWKWARD = [  # as test_core_mechanisms.test_awkward_sizes
    ("bsbr-d12", dict(arch="bsbr", hidden_dim=24, num_heads=2)),
    ("bsbr-d15-f4-causal", dict(arch="bsbr", hidden_dim=30, num_heads=2, compression_factor=4, causal=True)),
    ("bsbr-B1-causal", dict(arch="bsbr", chunk_size=1, causal=True)),
    ("standard-B1-d15", dict(arch="standard", chunk_size=1, hidden_dim=30, num_heads=2)),
    ("linear-B1-d15", dict(arch="linear", chunk_size=1, hidden_dim=30, num_heads=2)),
    ("delta_net-B1-d15", dict(arch="delta_net", chunk_size=1, hidden_dim=30, num_heads=2)),
    ("sliding_window-B1-w3", dict(arch="sliding_window", chunk_size=1, window=3)),
    ("sliding_window-w20", dict(arch="sliding_window", window=20)),  # wider than two chunks
]
ALL = ATTN_VARIANTS + AWKWARD
IDS = [i for i, _ in ALL]
CFGS = [o for _, o in ALL]
TOL = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def _attention(overrides, dtype=torch.float64, seed=0):
    cfg = small_config(**overrides)
    return randomize(MECHANISMS[cfg.arch](cfg), seed).to(dtype), cfg


def _piece(attn, cfg, n, seed, dtype=torch.float64, b=2):
    """Random q, k, v (b, H, n, d) and x (b, n, D), as leaves."""
    g = torch.Generator().manual_seed(seed)
    H, d = attn.num_heads, attn.head_dim
    q, k, v = (torch.randn(b, H, n, d, generator=g, dtype=dtype) for _ in range(3))
    x = torch.randn(b, n, cfg.hidden_dim, generator=g, dtype=dtype)
    return q, k, v, x


def _padded(n, b=2):
    """Row 1 right-padded to n // 2 real tokens (all padding when n == 1)."""
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n // 2:] = False
    return mask


def _tensors(state):
    return {name: carried(value) for name, value in state.items()}


def _assert_states_close(fast, naive, tol):
    a, b = _tensors(fast), _tensors(naive)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")


def _sizes(B):
    """First pieces of whole chunks; second pieces of one token, whole chunks, or ending mid-chunk."""
    return [(n1, n2) for n1 in (B, 2 * B) for n2 in (1, B, B + 5, 2 * B + 3)]


def _first_state(attn, cfg, n1, dtype):
    q, k, v, x = _piece(attn, cfg, n1, seed=1, dtype=dtype)
    with torch.no_grad():
        _, state = attn.attend(q, k, v, x, 0, None, None, True)
    return state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("overrides", CFGS, ids=IDS)
def test_fast_matches_naive_entered_with_a_state(overrides, padded, dtype):
    attn, cfg = _attention(overrides, dtype)
    B, tol = attn.chunk_size, TOL[dtype]
    for n1, n2 in _sizes(B):
        state = _first_state(attn, cfg, n1, dtype)
        q, k, v, x = _piece(attn, cfg, n2, seed=2, dtype=dtype)
        mask = _padded(n2) if padded else None
        real = (mask if mask is not None else torch.ones(2, n2, dtype=torch.bool))[:, None, :, None]
        with torch.no_grad():
            o_naive, s_naive = attn.naive(q, k, v, x, mask, state, n1)
            for commit in (True, False):
                o_fast, s_fast = attn.attend(q, k, v, x, n1, mask, state, commit)
                torch.testing.assert_close(o_fast * real, o_naive * real, **tol)
                if commit:
                    _assert_states_close(s_fast, s_naive, tol)
                else:
                    assert s_fast is state  # nothing committed: the carried state unchanged
        assert o_naive.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("overrides", CFGS, ids=IDS)
def test_gradients_with_respect_to_the_carried_state(overrides):
    """fla's dh0 check, with the final state in the loss too (its dht)."""
    attn, cfg = _attention(overrides)
    B = attn.chunk_size
    # Two carried chunks at least, so that retrieval weights (and r_last) matter.
    for n1, n2 in [(2 * B, 1), (2 * B, B + 5)]:
        first = _first_state(attn, cfg, n1, torch.float64)
        leaves, state = {}, {}
        for name, value in first.items():
            leaves[name] = carried(value).detach().clone().requires_grad_(True)
            state[name] = AppendLog.from_tensor(leaves[name], value.dim) if isinstance(value, AppendLog) else leaves[name]
        piece = [t.requires_grad_(True) for t in _piece(attn, cfg, n2, seed=2)]
        mask = _padded(n2)
        g = torch.Generator().manual_seed(4)
        wrt = piece + list(leaves.values()) + list(attn.parameters())
        grads, weights = {}, {}
        for impl in ("fast", "naive"):
            if impl == "fast":
                o, final = attn.attend(*piece, n1, mask, state, True)
            else:
                o, final = attn.naive(*piece, mask, state, n1)
            final = _tensors(final)
            if not weights:
                weights["o"] = torch.randn(o.shape, generator=g, dtype=o.dtype) * mask[:, None, :, None]
                weights.update({n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in final.items()})
            loss = (o * weights["o"]).sum() + sum((t * weights[n]).sum() for n, t in final.items())
            grads[impl] = torch.autograd.grad(loss, wrt, allow_unused=True)
        names = ["q", "k", "v", "x"] + [f"state.{n}" for n in leaves] + [n for n, _ in attn.named_parameters()]
        for name, gf, gn in zip(names, grads["fast"], grads["naive"]):
            if gf is None or gn is None:
                assert gf is None and gn is None or (gf if gn is None else gn).abs().max() == 0, name
                continue
            torch.testing.assert_close(gf, gn, **TOL[torch.float64], msg=lambda m: f"d{name}: {m}")
        for name, gs in zip(names[4:4 + len(leaves)], grads["naive"][4:]):
            assert gs is not None and gs.abs().max() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("overrides", CFGS, ids=IDS)
def test_naive_chained_equals_naive_whole(overrides):
    """The reference is consistent with itself: the whole sequence at once equals
    a first piece of whole chunks, then the rest entered with its final state;
    and the fast form chained the same way agrees with both."""
    attn, cfg = _attention(overrides)
    B, tol = attn.chunk_size, TOL[torch.float64]
    for n1, n2 in _sizes(B):
        q, k, v, x = _piece(attn, cfg, n1 + n2, seed=5)
        mask = torch.cat([torch.ones(2, n1, dtype=torch.bool), _padded(n2)], 1)
        real = mask[:, None, :, None]
        first = [t[:, :, :n1] for t in (q, k, v)] + [x[:, :n1]]
        second = [t[:, :, n1:] for t in (q, k, v)] + [x[:, n1:]]
        with torch.no_grad():
            o_whole, s_whole = attn.naive(q, k, v, x, mask, None, 0)
            o1, s1 = attn.naive(*first, mask[:, :n1], None, 0)
            o2, s2 = attn.naive(*second, mask[:, n1:], s1, n1)
            f1, t1 = attn.attend(*first, 0, mask[:, :n1], None, True)
            f2, t2 = attn.attend(*second, n1, mask[:, n1:], t1, True)
        o_chain, f_chain = torch.cat([o1, o2], 2), torch.cat([f1, f2], 2)
        torch.testing.assert_close(o_chain * real, o_whole * real, **tol)
        torch.testing.assert_close(f_chain * real, o_whole * real, **tol)
        _assert_states_close(s2, s_whole, tol)
        _assert_states_close(t2, s_whole, tol)


@pytest.mark.parametrize("overrides", CFGS, ids=IDS)
def test_forward_streams_through_the_naive_form(overrides):
    """Attention.forward(impl="naive") takes a state and pos0: projections and
    RoPE at pos0 as the fast form, then the naive attention."""
    attn, cfg = _attention(overrides)
    B = attn.chunk_size
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 3 * B + 2, cfg.hidden_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = attn(x, 0, None, None, False, "fast")
        outs, state = [], None
        for s, e in [(0, B), (B, 3 * B), (3 * B, 3 * B + 2)]:
            y, state = attn(x[:, s:e], s, None, state, e % B == 0, "naive")
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), whole, **TOL[torch.float64])


@pytest.mark.parametrize("arch", ["bsbr", "standard", "sliding_window"])
def test_naive_refuses_a_state_that_cannot_precede_pos0(arch):
    """Where the math depends on absolute positions, the reference checks that
    the state is that of the pos0 tokens before the piece."""
    attn, cfg = _attention(dict(arch=arch))  # window 11: one chunk of 8 keys carried
    B = attn.chunk_size
    state = _first_state(attn, cfg, B, torch.float64)
    piece = _piece(attn, cfg, 3, seed=2)
    with pytest.raises(ValueError):
        attn.naive(*piece, None, None, B)  # a later position with no state
    with pytest.raises(ValueError):
        attn.naive(*piece, None, state, 2 * B)  # a state of one chunk at the third
