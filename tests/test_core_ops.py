"""The single definitions in bsbr_core.ops: the form the ONNX graph runs
(`attend_chunks`: whole chunks, flat tensors, the export strategies, run
here eagerly in torch) against the naive reference entered with a carried
state, every strategy of delta_net's and standard's chunkwise against
naive, and the registry's declarations against the states the layers make."""
from __future__ import annotations

import pytest
import torch
from core_helpers import VARIANTS, randomize, small_config

from bsbr_core.attention import MECHANISMS, mechanism, state_layout
from bsbr_core.ops import delta_net, standard
from bsbr_core.ops.common import carried

# The shared list of mechanisms and options (the pooling variants change nothing in a layer).
ARCH_CFGS = {name: overrides for name, overrides in VARIANTS if "pooling" not in overrides}


def _layer(overrides, seed=0):
    cfg = small_config(**overrides)
    return randomize(mechanism(cfg.arch)(cfg).double(), seed), cfg


def _piece(attn, n, pos0, seed, pad_tail=0):
    g = torch.Generator().manual_seed(seed)
    D = attn.cfg.hidden_dim
    x = torch.randn(2, n, D, generator=g, dtype=torch.float64)
    q, k, v = attn._heads(attn.qkv(x), pos0)
    mask = torch.ones(2, n, dtype=torch.bool)
    if pad_tail:
        mask[1, n - pad_tail:] = False
    return q, k, v, x, mask


def _flat(attn, cfg, state, b):
    """A torch-layout state as the flat parts of `state_layout` (what the ONNX runtime feeds)."""
    parts = []
    for name, kind, shape in state_layout(cfg):
        value = carried(state[name]) if state is not None else None
        if kind == "window":
            H, w, d = shape
            value = value if value is not None else torch.zeros(b, H, 0, d, dtype=torch.float64)
            value = torch.cat([value.new_zeros(b, H, w - value.shape[2], d), value], dim=2)
        elif value is None:
            value = torch.zeros(b, *[0 if s == -1 else s for s in shape], dtype=torch.float64)
        parts.append(value)
    return parts


@pytest.mark.parametrize("name", list(ARCH_CFGS))
@pytest.mark.parametrize("history_chunks", [0, 2])
def test_exported_form_matches_naive_entered_with_a_carried_state(name, history_chunks):
    attn, cfg = _layer(ARCH_CFGS[name])
    B = cfg.block_size
    pos0 = history_chunks * B
    state = None
    with torch.no_grad():
        if pos0:
            q0, k0, v0, x0, _ = _piece(attn, pos0, 0, seed=1)
            _, state = attn.naive(q0, k0, v0, x0, None, None, 0)
        n = 3 * B
        q, k, v, x, mask = _piece(attn, n, pos0, seed=2, pad_tail=5)
        want, want_state = attn.naive(q, k, v, x, mask, state, pos0)
        parts = _flat(attn, cfg, state, 2)
        extras = [torch.tensor(e) for e in attn.export_values(state, n)]
        got, new_parts = attn.attend_chunks(q, k, v, x, mask, parts, extras)
    real = mask[:, None, :, None].expand_as(want)
    assert torch.allclose(got[real], want[real], atol=1e-9, rtol=1e-7)
    assert len(new_parts) == len(state_layout(cfg))
    for (ename, kind, shape), part, old in zip(state_layout(cfg), new_parts, parts):
        final = carried(want_state[ename])
        if kind == "log":  # the piece's new entries follow the history
            assert torch.allclose(torch.cat([old, part], dim=2), final, atol=1e-9, rtol=1e-7)
        elif kind == "window":  # the w slots ending at the piece's end; the valid ones are the naive window
            keep = final.shape[2]
            assert torch.allclose(part[:, :, shape[1] - keep:], final, atol=1e-9, rtol=1e-7)
        else:
            assert torch.allclose(part, final, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("solve", delta_net.SOLVES)
@pytest.mark.parametrize("loop", delta_net.LOOPS)
@pytest.mark.parametrize("chunk", [8, 4])
def test_delta_net_chunkwise_strategies_match_naive_with_a_carried_state_and_gradients(solve, loop, chunk):
    g = torch.Generator().manual_seed(3)
    b, H, n, d = 2, 2, 24, 8
    q, k, v = (torch.randn(b, H, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    beta = torch.rand(b, H, n, generator=g, dtype=torch.float64)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, -3:] = False
    S0 = (0.3 * torch.randn(b, H, d, d, generator=g, dtype=torch.float64)).requires_grad_()
    qn, kn, bn = delta_net.prepare(q, k, beta, mask)
    want, want_state = delta_net.naive(qn, kn, v, bn, {"S": S0})
    got, S = delta_net.chunkwise(qn, kn, v, bn, chunk, S0, solve=solve, loop=loop)
    assert torch.allclose(got, want, atol=1e-9) and torch.allclose(S, want_state["S"], atol=1e-9)
    (dS_want,) = torch.autograd.grad((want.sum() + want_state["S"].sum()), S0)
    (dS_got,) = torch.autograd.grad((got.sum() + S.sum()), S0)
    assert torch.allclose(dS_got, dS_want, atol=1e-8)


def test_delta_net_forward_substitution_reads_only_the_strict_lower_triangle():
    g = torch.Generator().manual_seed(4)
    A = 0.3 * torch.randn(3, 12, 12, generator=g, dtype=torch.float64)  # B = 12: not a power of two
    rhs = torch.randn(3, 12, 5, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(torch.eye(12, dtype=torch.float64) + A.tril(-1), rhs)
    assert torch.allclose(delta_net.solve_unit_lower(A, rhs, "substitution"), want, atol=1e-10)
    with pytest.raises(ValueError, match="unknown solve"):
        delta_net.solve_unit_lower(A, rhs, "lu")


def test_standard_scan_loop_equals_python_loop():
    g = torch.Generator().manual_seed(5)
    b, H, T0, n, d, B = 2, 2, 13, 24, 8, 8
    q = torch.randn(b, H, n, d, generator=g, dtype=torch.float64)
    K, V = (torch.randn(b, H, T0 + n, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, -4:] = False
    key_ok = standard.keys_ok(mask, b, T0, q.device)
    py = standard.chunkwise(q, K, V, key_ok, T0, B, loop="python")
    sc = standard.chunkwise(q, K, V, key_ok, T0, B, loop="scan")
    assert torch.allclose(py, sc, atol=1e-12)
    with pytest.raises(ValueError, match="unknown loop"):
        standard.chunkwise(q, K, V, key_ok, T0, B, loop="while")


@pytest.mark.parametrize("name", list(ARCH_CFGS))
def test_the_declared_layout_is_the_state_the_layer_commits(name):
    attn, cfg = _layer(ARCH_CFGS[name])
    n = 2 * cfg.block_size + 3
    q, k, v, x, _ = _piece(attn, n, 0, seed=6)
    with torch.no_grad():
        _, state = attn.attend(q, k, v, x, 0, None, None, True)
    layout = state_layout(cfg)
    assert sorted(state) == sorted(e.name for e in layout)
    for ename, kind, shape in layout:
        assert kind in ("log", "tensor", "window")
        t = carried(state[ename])
        assert t.shape[0] == 2 and len(t.shape) == len(shape) + 1
        for got, want in zip(t.shape[1:], shape):
            if want != -1 and not (kind == "window" and want == cfg.window):
                assert got == want
        if kind == "window":
            assert t.shape[2] == min(cfg.window, n)


def test_every_registered_mechanism_declares_what_the_export_needs():
    for arch, cls in MECHANISMS.items():
        cfg = small_config(arch=arch)
        assert cls.ops is not None and cls.state_layout(cfg)
        assert len(cls.export_examples(cfg, 24)) == len(cls.export_inputs)
        assert len(cls.export_values(None, 24)) == len(cls.export_inputs)
        if any(kind == "log" for _, kind, _ in cls.state_layout(cfg)):
            assert cls.export_history(cfg) > 0
    with pytest.raises(ValueError, match="unknown arch"):
        mechanism("rwkv")


def test_the_config_accepts_exactly_the_registered_mechanisms():
    # ModelConfig validates arch against config.ARCHS (config cannot import the
    # layers: they import it), so the two lists must name the same mechanisms.
    from bsbr_core.config import ARCHS

    assert ARCHS == tuple(MECHANISMS)
