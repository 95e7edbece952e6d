"""The ONNX Runtime backend: exported graphs behind the backend interface (bsbr_core.backends).

`OrtClassifier` composes what reading a checkpoint on ONNX Runtime takes:
the two ORT sessions (encoder.onnx for pieces with a carried state,
forward.onnx for one-shot inputs up to `segment_tokens`), the config, and
the only weights that run in torch, the pooling and the linear head. No
torch encoder is built. Reading in pieces is bsbr_core's own
`DocumentReader` over `OrtEncoder` (the same call and return as
`bsbr_core.model.Encoder`, computed by encoder.onnx), so `step`,
`step_many`, `init_state`, `check_state` and the segment-by-segment one-shot
path of long inputs are the torch backend's code, and states are bsbr_core
`State`s: a state made by the torch backend continues on this one and back.
Tensors in and out are torch tensors on the CPU.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbr_core.attention import mechanism
from bsbr_core.config import ModelConfig
from bsbr_core.io import load_config
from bsbr_core.model import DocumentReader, build_model, check_token_ids, model_fingerprint
from bsbr_core.onnx.export import (
    ENCODER_FILE, FORWARD_FILE, StaleGraphError, check_manifest, default_opset, export_onnx, weights_digest,
)
from bsbr_core.pooling import build_pooling
from bsbr_core.state import AppendLog, State

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - depends on the installed extra
    raise ImportError(
        "the ONNX backend needs ONNX Runtime: install the project with the `cpu` extra "
        "(onnxruntime) or, on a CUDA machine, the `gpu` extra (onnxruntime-gpu); not both"
    ) from e

log = logging.getLogger(__name__)


# --- execution providers -------------------------------------------------------------

def _gpu_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return torch.cuda.is_available() or os.path.exists("/dev/nvidiactl")


def default_providers() -> list:
    """CUDA (then CPU for what CUDA lacks) with onnxruntime-gpu on a GPU machine, else CPU.

    TF32 is off so results match torch's float32 to the parity tolerance.
    """
    if "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_present():
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: Path, providers, threads: int | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT warns about every Scan body it cannot fuse
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception:
        if providers == ["CPUExecutionProvider"]:
            raise
        log.warning("ONNX Runtime could not start %s; falling back to the CPU provider", providers, exc_info=True)
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().numpy()


def providers_for(device: str | torch.device | None) -> list:
    """ONNX Runtime providers for a backend device: "cpu" the CPU only, "cuda"
    CUDA (TF32 off) then CPU, "auto" or None `default_providers()`."""
    device = None if device is None else str(device)
    if device in (None, "auto"):
        return default_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    raise ValueError(f"the ONNX backend runs on cpu, cuda or auto, not {device!r}")


# --- the encoder on ONNX Runtime --------------------------------------------------------

class OrtEncoder:
    """`Encoder(ids, pos0, mask, layer_states, commit, impl)` and
    `Encoder.forward_ragged` computed by encoder.onnx.

    Pads the piece to whole chunks (masked), feeds the carried state as flat
    tensors (`layout`: the mechanism's state_layout) and folds the graph's new state
    parts back into the layer dicts with bsbr_core's AppendLog, exactly as the
    torch attention modules do. Nothing here depends on the mechanism beyond
    what it declares in the registry: its layout and its scalar inputs.
    """

    def __init__(self, session: ort.InferenceSession, cfg: ModelConfig):
        self.session = session
        spec = mechanism(cfg.arch)
        self.layout = spec.state_layout(cfg)
        # The mechanism's scalar inputs (e.g. sliding_window's window_count and
        # piece_length), with the values it gives them for a piece.
        self.export_inputs, self.export_values = spec.export_inputs, spec.export_values
        self.num_layers, self.hidden_dim, self.block_size = cfg.num_layers, cfg.hidden_dim, cfg.block_size

    @staticmethod
    def _feed(layer: dict | None, name: str, kind: str, shape: tuple, b: int) -> np.ndarray:
        value = None if layer is None else layer.get(name)
        if isinstance(value, AppendLog):
            value = value.view
        if kind == "window":
            H, w, d = shape
            carried = torch.zeros(b, H, 0, d) if value is None else value
            return _np(torch.cat([carried.new_zeros(b, H, w - carried.shape[2], d), carried], dim=2))
        if value is None:
            return np.zeros((b, *[0 if s == -1 else s for s in shape]), np.float32)
        return _np(value)

    def __call__(self, ids, pos0=0, mask=None, layer_states=None, commit=True, impl="fast"):
        if impl != "fast":
            raise ValueError("the ONNX backend runs the fast form only")
        b, n = ids.shape
        L = self.num_layers
        if n == 0:  # DocumentReader never asks; keep the Encoder contract anyway
            return torch.zeros(b, 0, self.hidden_dim), (layer_states if layer_states is not None else [None] * L)
        pad = (-n) % self.block_size
        real = torch.ones(b, n, dtype=torch.int64) if mask is None else mask.to("cpu", torch.int64)
        feeds = {
            "input_ids": _np(F.pad(ids.to("cpu", torch.int64), (0, pad))),
            "attention_mask": _np(F.pad(real, (0, pad))),
            "position": np.array(pos0, np.int64),
        }
        first = layer_states[0] if layer_states else None
        for name, value in zip(self.export_inputs, self.export_values(first, n)):
            feeds[name] = np.array(value, np.int64)
        for i in range(L):
            layer = layer_states[i] if layer_states else None
            for name, kind, shape in self.layout:
                feeds[f"layers.{i}.{name}"] = self._feed(layer, name, kind, shape, b)
        outs = self.session.run(None, feeds)
        hidden = torch.from_numpy(outs[0])[:, :n]
        if not commit:
            return hidden, (layer_states if layer_states is not None else [None] * L)
        new_layers, k = [], 1
        for i in range(L):
            old = layer_states[i] if layer_states else None
            layer = dict(old) if old else {}
            for name, kind, shape in self.layout:
                part = torch.from_numpy(outs[k])
                k += 1
                if kind == "log":
                    # The graph logs the whole padded piece, one entry per chunk (BSBR's F
                    # and h) or per token (a KV cache); keep those of the real tokens.
                    tokens_per_entry = (n + pad) // part.shape[2]
                    entries = -(-n // tokens_per_entry)
                    history = old[name] if old else AppendLog.empty(2)
                    _, layer[name] = history.extend(part[:, :, :entries], True)
                elif kind == "window":
                    # The graph returns the w slots that end at the piece's last
                    # token; the valid ones are the carried and the new, up to w.
                    w = shape[1]
                    keep = min(w, (old[name].shape[2] if old else 0) + n)
                    layer[name] = part[:, :, w - keep :]
                else:
                    layer[name] = part
            new_layers.append(layer)
        return hidden, new_layers

    def forward_ragged(self, ids, spans, doc_states, commit):
        """`Encoder.forward_ragged`: several documents' pieces packed in one row
        (1, N), spans (start, end, pos0). The graph takes one position and one
        history length per call, so each document runs as its own call."""
        hidden, new_states = [], []
        for (s, e, pos0), layers in zip(spans, doc_states):
            h, st = self(ids[:, s:e], pos0, None, layers, commit)
            hidden.append(h)
            new_states.append(st)
        return torch.cat(hidden, dim=1), new_states


# --- the backend --------------------------------------------------------------------------

def _module_from(module: nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """module with the checkpoint's `prefix.*` tensors loaded (all of them, strictly), for inference."""
    module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    return module.requires_grad_(False).eval()


class OrtClassifier:
    """A checkpoint on ONNX Runtime (a bsbr_core.backends.Backend): the same
    config, fingerprint, one-shot call, step, step_many and State as the torch
    model whose graphs are in onnx_dir.

    weights: the checkpoint's tensors (its state_dict); the pooling's and the
        head's are kept, the rest are in the graphs and only counted.
    weights_sha256: the checkpoint's weights digest, checked against onnx.json
        (None skips that check, e.g. right after exporting).
    opset: if given, the graphs must have been exported for it.
    Raises StaleGraphError if the graphs do not belong to this checkpoint.
    """

    device = torch.device("cpu")  # where ids, logits and states live; ORT may compute on CUDA

    def __init__(self, cfg: ModelConfig, onnx_dir: str | Path, weights: dict[str, torch.Tensor],
                 weights_sha256: str | None, providers=None, threads: int | None = None, opset: int | None = None):
        self.config = cfg
        self.fingerprint = model_fingerprint(cfg, weights_sha256 or weights_digest(weights))
        self.onnx_dir = Path(onnx_dir)
        self.manifest = check_manifest(self.onnx_dir, cfg, self.fingerprint, weights_sha256, opset)
        providers = default_providers() if providers is None else providers
        self.encoder = OrtEncoder(_session(self.onnx_dir / ENCODER_FILE, providers, threads), cfg)
        self._forward_session = _session(self.onnx_dir / FORWARD_FILE, providers, threads)
        self.providers = self._forward_session.get_providers()
        self.pooling = _module_from(build_pooling(cfg.pooling, cfg.hidden_dim), weights, "pooling.")
        self.head = _module_from(nn.Linear(cfg.hidden_dim, cfg.num_labels), weights, "head.")
        self._parameter_count = sum(t.numel() for t in weights.values())
        self.reader = DocumentReader(self)

    @classmethod
    def from_model(cls, model, onnx_dir: str | Path, providers=None,
                   threads: int | None = None, opset: int | None = None) -> OrtClassifier:
        """Export `model` (a DocumentClassifier) into onnx_dir (opset: see export_onnx) and run it there."""
        weights = model.state_dict()
        digest = weights_digest(weights)
        export_onnx(model, onnx_dir, digest, opset)
        return cls(model.config, onnx_dir, weights, digest, providers, threads)

    def parameter_count(self) -> int:
        """The checkpoint's parameters, all of them (most run inside the graphs)."""
        return self._parameter_count

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None, impl: str = "fast") -> torch.Tensor:
        """input_ids (b, n), attention_mask (b, n) right-padded -> logits (b, num_labels).

        Up to segment_tokens: one call of forward.onnx. Longer: segment by
        segment through the encoder graph and the carried state, as torch does,
        so memory stays bounded.
        """
        if impl != "fast":
            raise ValueError("the ONNX backend runs the fast form only")
        input_ids = torch.as_tensor(input_ids, dtype=torch.long).to("cpu")
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).to("cpu")
        input_ids, mask = self.reader.one_shot_inputs(input_ids, mask)
        check_token_ids(input_ids, self.config.vocab_size)  # the graph's Gather would not
        if input_ids.shape[1] > self.reader.segment:
            return self.reader.classify(input_ids, mask)
        (logits,) = self._forward_session.run(None, {"input_ids": _np(input_ids), "attention_mask": _np(mask.long())})
        return torch.from_numpy(logits)

    def init_state(self, batch_size: int = 1) -> State:
        return self.reader.init_state(batch_size)

    def check_state(self, state: State) -> None:
        self.reader.check_state(state)

    def step(self, piece_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.reader.step(piece_ids, state)

    def step_many(self, pieces: list[torch.Tensor], states: list[State]) -> list[tuple[torch.Tensor, State]]:
        return self.reader.step_many(pieces, states)


# --- loading a checkpoint ------------------------------------------------------------------

def _writable(path: Path) -> bool:
    probe = path if path.exists() else path.parent
    return os.access(probe, os.W_OK)


def _cache_dir(model_dir: Path, cfg: ModelConfig, digest: str) -> Path:
    """<model_dir>/onnx if writable (or already filled), else a per-checkpoint user cache."""
    key = hashlib.sha256((cfg.to_json() + digest).encode()).hexdigest()[:16]
    if os.environ.get("BSBR_ONNX_CACHE"):
        return Path(os.environ["BSBR_ONNX_CACHE"]) / key
    local = model_dir / "onnx"
    if (local / "onnx.json").is_file() or _writable(local):
        return local
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "bsbr-serve" / "onnx" / key


@contextmanager
def _export_lock(onnx_dir: Path):
    """One exporter at a time per cache dir (replicas starting together)."""
    onnx_dir.mkdir(parents=True, exist_ok=True)
    with open(onnx_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_onnx_model(model_dir: str | Path, providers=None, export_if_missing: bool = True,
                    cache_dir: str | Path | None = None, threads: int | None = None) -> OrtClassifier:
    """An OrtClassifier for the checkpoint in model_dir (config.json + model.safetensors).

    The graphs live in cache_dir (default: <model_dir>/onnx, or a user cache
    if the model dir is read-only; $BSBR_ONNX_CACHE overrides). If they are
    missing or stale (another checkpoint, config, export format or opset, or
    a file changed), they are exported from the checkpoint when
    export_if_missing, else StaleGraphError is raised.
    providers: ONNX Runtime providers; None picks CUDA when onnxruntime-gpu
        and a GPU are present, else CPU.
    threads: ONNX Runtime intra-op threads (None: its default, one per core).
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    tensors = load_file(str(weights))
    digest = weights_digest(tensors)
    onnx_dir = Path(cache_dir) if cache_dir is not None else _cache_dir(model_dir, cfg, digest)
    opset = default_opset()
    try:
        return OrtClassifier(cfg, onnx_dir, tensors, digest, providers, threads, opset)
    except StaleGraphError as stale:
        if not export_if_missing:
            raise
        with _export_lock(onnx_dir):
            try:  # another process may have exported while we waited
                return OrtClassifier(cfg, onnx_dir, tensors, digest, providers, threads, opset)
            except StaleGraphError:
                pass
            log.info("exporting ONNX graphs for %s into %s (%s)", model_dir, onnx_dir, stale)
            model = build_model(cfg)
            model.load_state_dict(tensors, strict=True)
            export_onnx(model.eval(), onnx_dir, digest, opset)
        return OrtClassifier(cfg, onnx_dir, tensors, digest, providers, threads, opset)



def load_onnx_backend(path: str | Path, device: str | torch.device = "auto", threads: int | None = None) -> OrtClassifier:
    """The `onnx` loader of bsbr_core.backends: load_onnx_model on the providers
    of `device` (providers_for). threads: ONNX Runtime's intra-op threads and
    torch's, which run the pooling, the head and the state bookkeeping."""
    if threads:
        torch.set_num_threads(threads)
    return load_onnx_model(path, providers=providers_for(device), threads=threads)
