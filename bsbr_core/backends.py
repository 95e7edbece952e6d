"""Backends: what a checkpoint is read on, behind one small interface (docs/architecture.md 2.5).

    from bsbr_core.backends import load_backend
    model = load_backend("onnx", "models/bsbr", device="cpu", threads=1)
    logits, state = model.step(piece_ids, model.init_state(1))

A backend is any object with `Backend`'s members; a loader
`(path, device="auto", threads=None) -> Backend` is registered under a name
with `register_backend`, and `load_backend(name, path, ...)` loads a
checkpoint directory with it. States are bsbr_core `State`s whatever the
backend, so a document read on one continues on another with the same
checkpoint.

    torch  bsbr_core.model.DocumentClassifier (load_model)
    onnx   bsbr_core.onnx.OrtClassifier: ONNX Runtime graphs exported next to the checkpoint
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from bsbr_core.config import ModelConfig
from bsbr_core.state import State


@runtime_checkable
class Backend(Protocol):
    """A loaded checkpoint, read whole or in pieces (docs/architecture.md 1.4).

    config: its ModelConfig. device: where ids, logits and states live.
    """

    config: ModelConfig

    @property
    def device(self) -> torch.device: ...

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One-shot: input_ids (b, n), right-padded attention_mask -> logits (b, num_labels)."""

    def init_state(self, batch_size: int = 1) -> State:
        """The state of batch_size documents that have no tokens yet."""

    def check_state(self, state: State) -> None:
        """StateError unless this checkpoint made state (any backend of it)."""

    def step(self, piece_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The next piece (b, m >= 0) of each document -> (running logits (b, num_labels), new State)."""

    def step_many(self, pieces: list[torch.Tensor], states: list[State]) -> list[tuple[torch.Tensor, State]]:
        """step() for several single-document states at once, in order."""

    def parameter_count(self) -> int:
        """The checkpoint's parameters, all of them, wherever they run."""


Loader = Callable[..., Backend]  # loader(path, device="auto", threads=None) -> Backend

_LOADERS: dict[str, Loader] = {}


class UnknownBackend(LookupError):
    """No backend is registered under this name."""

    def __init__(self, name: str):
        self.name, self.names = name, backend_names()
        super().__init__(f"unknown backend {name!r}; registered: {', '.join(self.names)}")


def register_backend(name: str, loader: Loader) -> None:
    """Make `load_backend(name, ...)` call loader(path, device=..., threads=...).
    A later registration under the same name replaces the earlier one."""
    _LOADERS[name] = loader


def backend_names() -> list[str]:
    return sorted(_LOADERS)


def load_backend(name: str, path: str | Path, device: str | torch.device = "auto",
                 threads: int | None = None) -> Backend:
    """The checkpoint directory `path` (config.json, model.safetensors) on backend `name`.

    device: "auto" (CUDA when there is one), "cpu" or "cuda". threads: the
    backend's intra-op threads (None: its default). Raises UnknownBackend for
    a name nobody registered, ImportError when the backend's dependencies are
    missing here.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise UnknownBackend(name)
    return loader(path, device=device, threads=threads)


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> CUDA when torch sees a GPU, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_torch(path, device="auto", threads=None):
    from bsbr_core.io import load_model

    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model(path, device=resolve_device(device), with_tokenizer=False)
    return model


def _load_onnx(path, device="auto", threads=None):
    from bsbr_core.onnx.runtime import load_onnx_backend  # ImportError here without onnxruntime

    return load_onnx_backend(path, device, threads)


register_backend("torch", _load_torch)
register_backend("onnx", _load_onnx)
