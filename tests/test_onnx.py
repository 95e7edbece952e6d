"""ONNX Runtime backend against the torch model: one-shot and streaming logits
(max abs error <= 1e-4), states that move between the backends, and graphs
that no longer match their checkpoint.

Small random models with weights far larger than the training init, so that a
wrong mask, a dropped term or a misplaced state shows in the logits. Each
variant is exported once per module (tracing takes tens of seconds).
"""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from bsbr_core import InputError, ModelConfig, State, build_model, save_model  # noqa: E402
from bsbr_core.onnx import OrtClassifier, StaleGraphError, load_onnx_model  # noqa: E402
from bsbr_core.onnx.export import default_opset  # noqa: E402

TOL = 1e-4
B = 8
# Every mechanism; BSBR with compression and causal; the max_length baseline.
VARIANTS = {
    "bsbr": dict(arch="bsbr"),
    "bsbr-f4-causal": dict(arch="bsbr", compression_factor=4, causal=True),
    "standard": dict(arch="standard"),
    "standard-max_length": dict(arch="standard", max_length=21),
    "linear": dict(arch="linear"),
    "sliding_window": dict(arch="sliding_window", window=11),
    "delta_net": dict(arch="delta_net"),
}


def small_config(**overrides) -> ModelConfig:
    # segment_tokens = 4 chunks, so inputs longer than 32 tokens take the
    # segment-by-segment one-shot path and shorter ones forward.onnx.
    base = dict(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=2, ff_dim=48, chunk_size=B,
                labels=["a", "b", "c"], segment_tokens=4 * B)
    base.update(overrides)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0):
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(torch model, OrtClassifier of its exported graphs)."""
    cfg = small_config(**VARIANTS[request.param])
    model = random_model(cfg)
    ort_model = OrtClassifier.from_model(model, tmp_path_factory.mktemp(request.param) / "onnx",
                                         providers=["CPUExecutionProvider"])
    return model, ort_model


def max_err(a, b) -> float:
    return float((a - b).abs().max())


def padded_batch(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), n), generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return ids * mask, mask.to(torch.int64)


def random_pieces(n: int, rng: random.Random) -> list[int]:
    """Piece sizes summing to n: empty pieces, single tokens, ends inside chunks, multi-chunk runs."""
    sizes, left = [], n
    while left:
        m = min(left, rng.choice([0, 1, 1, 2, B - 1, B, B + 3, 3 * B + 5, rng.randrange(0, 5 * B)]))
        sizes.append(m)
        left -= m
    sizes.insert(rng.randrange(len(sizes) + 1), 0)
    return sizes


# --- one-shot ----------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [[1], [B - 1, 3], [B, B], [2 * B + 3, 5, 1], [4 * B], [45, 45, 17], [70, 9]],
                         ids=lambda ls: "x".join(map(str, ls)))
def test_oneshot_matches_torch(pair, lengths):
    model, ort_model = pair
    ids, mask = padded_batch(lengths, model.config.vocab_size, seed=sum(lengths))
    with torch.no_grad():
        ref = model(ids, mask)
    out = ort_model(ids, mask)
    assert out.shape == ref.shape == (len(lengths), model.config.num_labels)
    assert max_err(out, ref) <= TOL
    if len(lengths) > 1:  # the documents get different logits: the check has teeth
        assert float(ref.std(0).max()) > 10 * TOL


def test_oneshot_without_mask_and_empty(pair):
    model, ort_model = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        assert max_err(ort_model(ids), model(ids)) <= TOL
        empty = torch.zeros(1, 0, dtype=torch.long)
        assert max_err(ort_model(empty), model(empty)) <= TOL


def test_oneshot_rejects_bad_input(pair):
    _, ort_model = pair
    with pytest.raises(InputError):
        ort_model(torch.tensor([[1, 2, 500]]))
    with pytest.raises(InputError):
        ort_model(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 1]]))


# --- streaming ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_matches_torch_step_and_oneshot(pair, seed):
    model, ort_model = pair
    rng = random.Random(seed)
    n = rng.choice([5 * B + 3, 9 * B, 11 * B + 1])
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    st_torch, st_ort = model.init_state(1), ort_model.init_state(1)
    pos = 0
    for m in random_pieces(n, rng):
        piece = ids[:, pos : pos + m]
        pos += m
        ref, st_torch = model.step(piece, st_torch)
        out, st_ort = ort_model.step(piece, st_ort)
        assert max_err(out, ref) <= TOL, f"after {pos} tokens"
        assert (st_ort.num_tokens, st_ort.committed) == (st_torch.num_tokens, st_torch.committed)
        assert st_ort.nbytes == st_torch.nbytes
    with torch.no_grad():
        assert max_err(out, model(ids)) <= TOL


def test_batched_step(pair):
    model, ort_model = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * B + 2))
    st_torch, st_ort = model.init_state(2), ort_model.init_state(2)
    for s, e in ((0, 5), (5, 2 * B + 1), (2 * B + 1, 3 * B + 2)):
        ref, st_torch = model.step(ids[:, s:e], st_torch)
        out, st_ort = ort_model.step(ids[:, s:e], st_ort)
        assert max_err(out, ref) <= TOL


def test_state_moves_between_backends(pair):
    """torch -> ORT -> torch (through the byte format too) reads like torch alone."""
    model, ort_model = pair
    n = 7 * B + 5
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(7))
    cuts = [0, B + 3, 3 * B, 4 * B + 1, 6 * B + 2, n]
    backends = [model, ort_model, model, ort_model, model]
    st_ref, st = model.init_state(1), ort_model.init_state(1)
    for (s, e), backend in zip(zip(cuts, cuts[1:]), backends):
        ref, st_ref = model.step(ids[:, s:e], st_ref)
        out, st = backend.step(ids[:, s:e], State.from_bytes(st.to_bytes()) if backend is model else st)
        assert max_err(out, ref) <= TOL
    # and ORT continues a state that torch left in the middle of a chunk
    _, st_torch = model.step(ids[:, : 2 * B + 3], model.init_state(1))
    out, _ = ort_model.step(ids[:, 2 * B + 3 :], st_torch)
    with torch.no_grad():
        assert max_err(out, model(ids)) <= TOL


def test_step_many(pair):
    model, ort_model = pair
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in (B + 2, B + 2, 3 * B, 5)]
    states = [ort_model.init_state(1) for _ in docs]
    first = ort_model.step_many([d[:, :B] for d in docs], states)
    second = ort_model.step_many([d[:, B:] for d in docs], [st for _, st in first])
    for d, (logits, st) in zip(docs, second):
        with torch.no_grad():
            assert max_err(logits, model(d)) <= TOL
        assert st.num_tokens == d.shape[1]


def test_foreign_state_rejected(pair):
    _, ort_model = pair
    other = build_model(small_config(arch="linear", hidden_dim=16))
    with pytest.raises(InputError):
        ort_model.step(torch.tensor([[1, 2]]), other.init_state(1))


def test_delta_net_solve_is_stable_at_long_chunks(tmp_path):
    """The graph's triangular solve at a realistic chunk size (closed forms of
    (I + A)^-1 lose everything to cancellation well before B = 128)."""
    cfg = small_config(arch="delta_net", chunk_size=64, hidden_dim=64, num_heads=2, num_layers=1, segment_tokens=128)
    model = random_model(cfg, seed=5)
    ort_model = OrtClassifier.from_model(model, tmp_path / "onnx", providers=["CPUExecutionProvider"])
    ids = torch.randint(0, cfg.vocab_size, (2, 300), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids)
    assert max_err(ort_model(ids), ref) <= TOL
    st = ort_model.init_state(2)
    for s, e in ((0, 100), (100, 101), (101, 300)):
        out, st = ort_model.step(ids[:, s:e], st)
    assert max_err(out, ref) <= TOL


@pytest.mark.parametrize("arch", ["bsbr", "standard"])
def test_opset18_graphs_match_torch(arch, tmp_path):
    """Opset 18 (SDPA as MatMul/Softmax/MatMul), for ONNX Runtime builds without
    Attention kernels: the same parity."""
    model = random_model(small_config(arch=arch, causal=arch == "bsbr"), seed=2)
    ort_model = OrtClassifier.from_model(model, tmp_path / "onnx", providers=["CPUExecutionProvider"], opset=18)
    assert ort_model.manifest["opset"] == 18
    ids, mask = padded_batch([45, 20], model.config.vocab_size, seed=2)
    with torch.no_grad():
        assert max_err(ort_model(ids, mask), model(ids, mask)) <= TOL
    out, _ = ort_model.step(ids[:1, :13], ort_model.init_state(1))
    ref, _ = model.step(ids[:1, :13], model.init_state(1))
    assert max_err(out, ref) <= TOL


# --- graphs that no longer match ---------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved bsbr checkpoint with its graphs exported by load_onnx_model."""
    path = tmp_path_factory.mktemp("ckpt") / "bsbr"
    model = random_model(small_config(arch="bsbr"), seed=11)
    save_model(model, None, path)
    ort_model = load_onnx_model(path, providers=["CPUExecutionProvider"])
    return path, model, ort_model


def test_loader_exports_once_and_records_the_checkpoint(checkpoint):
    path, model, ort_model = checkpoint
    manifest = json.loads((path / "onnx" / "onnx.json").read_text())
    assert manifest["fingerprint"] == model.fingerprint == ort_model.fingerprint
    assert manifest["graphs"]["forward"]["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["opset"] == default_opset()
    mtime = (path / "onnx" / "onnx.json").stat().st_mtime_ns
    again = load_onnx_model(path, providers=["CPUExecutionProvider"], export_if_missing=False)
    assert (path / "onnx" / "onnx.json").stat().st_mtime_ns == mtime
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert max_err(again(ids), model(ids)) <= TOL
    assert again.providers[0] == "CPUExecutionProvider"


def test_graphs_for_another_opset_are_stale(checkpoint):
    path, model, _ = checkpoint
    other = 18 if default_opset() == 23 else 23
    with pytest.raises(StaleGraphError, match="opset"):
        OrtClassifier(model.config, path / "onnx", model.state_dict(), None, ["CPUExecutionProvider"], opset=other)


def test_changed_graph_file_is_stale(checkpoint, tmp_path):
    path, _, _ = checkpoint
    copy = tmp_path / "bsbr"
    shutil.copytree(path, copy)
    with open(copy / "onnx" / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(StaleGraphError, match="sha256"):
        load_onnx_model(copy, providers=["CPUExecutionProvider"], export_if_missing=False)


def test_graphs_of_another_config_are_stale(checkpoint, tmp_path):
    path, _, _ = checkpoint
    other = tmp_path / "other"
    save_model(random_model(small_config(arch="bsbr", labels=["x", "y"])), None, other)
    with pytest.raises(StaleGraphError, match="not found"):
        load_onnx_model(other, providers=["CPUExecutionProvider"], export_if_missing=False)
    with pytest.raises(StaleGraphError, match="config"):
        load_onnx_model(other, providers=["CPUExecutionProvider"], export_if_missing=False, cache_dir=path / "onnx")


def test_retrained_checkpoint_is_stale_and_reexported(checkpoint, tmp_path):
    path, _, _ = checkpoint
    copy = tmp_path / "bsbr"
    shutil.copytree(path, copy)
    retrained = random_model(small_config(arch="bsbr"), seed=12)  # same config, other weights
    save_model(retrained, None, copy)
    with pytest.raises(StaleGraphError, match="weights"):
        load_onnx_model(copy, providers=["CPUExecutionProvider"], export_if_missing=False)
    ort_model = load_onnx_model(copy, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert max_err(ort_model(ids), retrained(ids)) <= TOL
