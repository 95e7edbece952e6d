"""Backends behind one interface (bsbr_core.backends): the registry by name, the
engine choosing from it, and the ONNX backend composing what it runs instead of
building a torch encoder, with the checkpoint's true parameter count.

Parity of the ONNX backend's logits and states with torch is tests/test_onnx.py's.
"""
from __future__ import annotations

import asyncio
import math
import shutil

import pytest
import torch
from conftest_serve import document
from safetensors import safe_open

from bsbr_core import State, load_config, load_model
from bsbr_core import backends as backends_module
from bsbr_core.backends import Backend, UnknownBackend, backend_names, load_backend, register_backend
from serve import errors
from serve.config import ModelSpec, SessionConfig
from serve.engine import load_engine
from serve.store import MemorySessionStore

pytest_plugins = ["conftest_serve"]

TOL = 1e-4


def run(coro):
    return asyncio.run(coro)


def engine_on(path, backend: str, name: str = "bsbr"):
    # model_copy skips ModelSpec's validation of the name, as a direct caller of load_engine may
    spec = ModelSpec(name=name, path=str(path), page_tokens=64).model_copy(update={"backend": backend})
    return load_engine(name, spec, SessionConfig(), MemorySessionStore())


def checkpoint_parameters(path) -> int:
    """Every tensor of model.safetensors, counted from the file itself."""
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open is not iterable


class CountingBackend:
    """A backend of the test's own: the torch model behind it, counting the steps it is
    asked for and the tokens they read."""

    def __init__(self, path, device="auto", threads=None):
        self.inner, _ = load_model(path, with_tokenizer=False)
        self.config, self.device = self.inner.config, self.inner.device
        self.steps = 0
        self.tokens = 0

    def __call__(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask)

    def init_state(self, batch_size=1):
        return self.inner.init_state(batch_size)

    def check_state(self, state):
        self.inner.check_state(state)

    def step(self, piece_ids, state):
        self.steps += 1
        self.tokens += piece_ids.shape[1]
        return self.inner.step(piece_ids, state)

    def step_many(self, pieces, states):
        self.steps += len(pieces)
        self.tokens += sum(p.shape[1] for p in pieces)
        return self.inner.step_many(pieces, states)

    def parameter_count(self):
        return 12345


# --- the registry -------------------------------------------------------------------------

def test_torch_and_onnx_are_registered():
    assert {"torch", "onnx"} <= set(backend_names())
    assert backend_names() == sorted(backend_names())


def test_an_unknown_backend_names_the_registered_ones(dev_models):
    with pytest.raises(UnknownBackend) as e:
        load_backend("tensorrt", dev_models / "bsbr")
    assert e.value.name == "tensorrt" and set(e.value.names) >= {"torch", "onnx"}
    assert "torch" in str(e.value) and "onnx" in str(e.value)
    with pytest.raises(errors.BackendUnsupported, match="unknown backend 'tensorrt'.*onnx.*torch") as served:
        engine_on(dev_models / "bsbr", "tensorrt")
    assert served.value.status == 501


def test_a_registered_backend_is_what_load_backend_and_the_engine_use(dev_models, monkeypatch):
    # setitem first so that monkeypatch removes the name again after the test
    monkeypatch.setitem(backends_module._LOADERS, "counting", None)
    register_backend("counting", CountingBackend)
    assert "counting" in backend_names()
    model = load_backend("counting", dev_models / "bsbr", device="cpu", threads=1)
    assert type(model) is CountingBackend and isinstance(model, Backend)

    eng = engine_on(dev_models / "bsbr", "counting")
    assert type(eng.model) is CountingBackend
    pages = document(3)
    out = run(eng.classify(pages=pages))
    # Every token of the document went through the registered backend's steps (a one-shot
    # classify steps segments of oneshot_segment_tokens, not pages).
    assert eng.model.steps >= 1 and eng.model.tokens == out["num_tokens"] > 0
    ref = run(engine_on(dev_models / "bsbr", "torch").classify(pages=pages))
    assert out["logits"] == pytest.approx(ref["logits"], abs=1e-6)
    info = eng.info()
    assert info["backend"] == "counting" and info["parameters"] == 12345


def test_the_torch_backend_is_the_torch_classifier(dev_models):
    model = load_backend("torch", dev_models / "bsbr", device="cpu")
    assert isinstance(model, Backend) and model.device == torch.device("cpu")
    assert model.parameter_count() == sum(p.numel() for p in model.parameters())
    assert model.parameter_count() == checkpoint_parameters(dev_models / "bsbr")


# --- the ONNX backend ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_checkpoint(dev_models, tmp_path_factory):
    """dev_models' bsbr copied (the export writes next to it) and exported once."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path_factory.mktemp("backends") / "bsbr"
    shutil.copytree(dev_models / "bsbr", path)
    load_backend("onnx", path, device="cpu", threads=1)
    return path


def test_the_onnx_backend_builds_no_torch_encoder(onnx_checkpoint, monkeypatch):
    import bsbr_core.model

    def no_encoder(*args, **kwargs):
        raise AssertionError("the ONNX backend built a torch Encoder")

    monkeypatch.setattr(bsbr_core.model.Encoder, "__init__", no_encoder)
    with pytest.raises(AssertionError, match="built a torch Encoder"):  # the patch has teeth
        bsbr_core.model.build_model(load_config(onnx_checkpoint))
    model = load_backend("onnx", onnx_checkpoint, device="cpu", threads=1)
    assert isinstance(model, Backend) and not isinstance(model, torch.nn.Module)
    logits, state = model.step(torch.tensor([[5, 6, 7]]), model.init_state(1))
    assert logits.shape == (1, model.config.num_labels) and isinstance(state, State)


def test_parameter_count_is_the_checkpoints_on_both_backends(onnx_checkpoint):
    on_torch = load_backend("torch", onnx_checkpoint, device="cpu")
    on_onnx = load_backend("onnx", onnx_checkpoint, device="cpu", threads=1)
    counted = checkpoint_parameters(onnx_checkpoint)
    head = sum(p.numel() for p in on_torch.head.parameters())
    assert on_onnx.parameter_count() == on_torch.parameter_count() == counted > 10 * head


def test_the_engine_reports_the_same_parameters_for_onnx(onnx_checkpoint):
    on_torch, on_onnx = engine_on(onnx_checkpoint, "torch"), engine_on(onnx_checkpoint, "onnx")
    a, b = on_onnx.info(), on_torch.info()
    assert a["backend"] == "onnx" and b["backend"] == "torch"
    assert a["parameters"] == b["parameters"] == checkpoint_parameters(onnx_checkpoint)
    assert a["device"] == "cpu"


def test_a_state_moves_between_the_registrys_backends(onnx_checkpoint):
    on_torch = load_backend("torch", onnx_checkpoint, device="cpu")
    on_onnx = load_backend("onnx", onnx_checkpoint, device="cpu", threads=1)
    B = on_torch.config.block_size
    ids = torch.randint(0, on_torch.config.vocab_size, (1, 3 * B + 5), generator=torch.Generator().manual_seed(0))
    _, state = on_torch.step(ids[:, : B + 3], on_torch.init_state(1))
    logits, state = on_onnx.step(ids[:, B + 3 : 2 * B + 1], State.from_bytes(state.to_bytes()))
    logits, _ = on_torch.step(ids[:, 2 * B + 1 :], state)
    with torch.no_grad():
        assert float((logits - on_torch(ids)).abs().max()) <= TOL


def test_the_onnx_device_picks_the_providers():
    pytest.importorskip("onnxruntime")
    from bsbr_core.onnx import default_providers, providers_for

    assert providers_for("cpu") == ["CPUExecutionProvider"]
    assert providers_for("auto") == providers_for(None) == default_providers()
    cuda = providers_for("cuda")
    assert cuda[0][0] == "CUDAExecutionProvider" and cuda[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        providers_for("tpu")
