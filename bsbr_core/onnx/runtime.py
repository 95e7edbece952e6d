"""Run exported graphs with ONNX Runtime behind the DocumentClassifier interface.

`OrtClassifier` is a DocumentClassifier whose encoder is `OrtEncoder`: the
same call and return as `bsbr_core.model.Encoder`, computed by encoder.onnx.
So `step`, `step_many`, `init_state`, `check_state` and the segment-by-segment
one-shot path of long inputs are bsbr_core's own code, unchanged, and states
are bsbr_core `State`s: a state made by the torch backend continues on this
one and back. One-shot inputs up to `segment_tokens` run forward.onnx in one
call. Tensors in and out are torch tensors on the CPU; the head (a D x labels
linear layer) runs in torch.
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

from bsbr_core.config import ModelConfig
from bsbr_core.errors import InputError
from bsbr_core.io import load_config
from bsbr_core.model import DocumentClassifier, _check_right_padded, build_model, model_fingerprint
from bsbr_core.onnx.export import (
    ENCODER_FILE, FORWARD_FILE, StaleGraphError, check_manifest, default_opset, export_onnx, weights_digest,
)
from bsbr_core.onnx.graphs import state_layout
from bsbr_core.state import AppendLog

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


def _session(path: Path, providers, threads: int | None) -> "ort.InferenceSession":
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


# --- the encoder on ONNX Runtime --------------------------------------------------------

class OrtEncoder(nn.Module):
    """`Encoder.forward(ids, pos0, mask, layer_states, commit, impl)` computed by encoder.onnx.

    Pads the piece to whole chunks (masked), feeds the carried state as flat
    tensors and folds the graph's new state parts back into the layer dicts
    with bsbr_core's AppendLog, exactly as the torch attention modules do.
    """

    def __init__(self, session: "ort.InferenceSession", cfg: ModelConfig):
        super().__init__()
        self.session = session
        self.cfg = cfg
        self.layout = state_layout(cfg)

    def _feed(self, layer: dict | None, name: str, kind: str, shape: tuple, b: int) -> np.ndarray:
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

    def forward(self, ids, pos0=0, mask=None, layer_states=None, commit=True, impl="fast"):
        if impl != "fast":
            raise ValueError("the ONNX backend runs the fast form only")
        cfg = self.cfg
        b, n = ids.shape
        L = cfg.num_layers
        if n == 0:  # DocumentClassifier never asks; keep the Encoder contract anyway
            return torch.zeros(b, 0, cfg.hidden_dim), (layer_states if layer_states is not None else [None] * L)
        B = cfg.block_size
        pad = (-n) % B
        real = torch.ones(b, n, dtype=torch.int64) if mask is None else mask.to("cpu", torch.int64)
        feeds = {
            "input_ids": _np(F.pad(ids.to("cpu", torch.int64), (0, pad))),
            "attention_mask": _np(F.pad(real, (0, pad))),
            "position": np.array(pos0, np.int64),
        }
        carried = 0
        if cfg.arch == "sliding_window":
            if layer_states:
                carried = layer_states[0]["K"].shape[2]
            feeds["window_count"] = np.array(carried, np.int64)
            feeds["piece_length"] = np.array(n, np.int64)
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
            for name, kind, _shape in self.layout:
                part = torch.from_numpy(outs[k])
                k += 1
                if kind == "log":
                    # BSBR logs one entry per chunk, the KV cache one per token.
                    entries = part if cfg.arch == "bsbr" else part[:, :, :n]
                    history = old[name] if old else AppendLog.empty(2)
                    _, layer[name] = history.extend(entries, True)
                elif kind == "window":
                    keep = min(cfg.window, carried + n)
                    layer[name] = part[:, :, cfg.window - keep :]
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
            h, st = self.forward(ids[:, s:e], pos0, None, layers, commit)
            hidden.append(h)
            new_states.append(st)
        return torch.cat(hidden, dim=1), new_states


# --- the classifier -----------------------------------------------------------------------

class OrtClassifier(DocumentClassifier):
    """DocumentClassifier on ONNX Runtime: same config, fingerprint, call, step,
    step_many and State as the torch model whose graphs are in onnx_dir.

    head_state: the checkpoint's "head.weight" and "head.bias".
    weights_sha256: the checkpoint's weights digest, checked against onnx.json
        (None skips that check, e.g. right after exporting).
    opset: if given, the graphs must have been exported for it.
    Raises StaleGraphError if the graphs do not belong to this checkpoint.
    """

    def __init__(self, cfg: ModelConfig, onnx_dir: str | Path, head_state: dict[str, torch.Tensor],
                 weights_sha256: str | None, providers=None, threads: int | None = None, opset: int | None = None):
        super().__init__(cfg)
        # The fingerprint of the checkpoint's weights, not of the placeholder torch encoder.
        self._fingerprint = model_fingerprint(cfg, weights_sha256 or weights_digest(head_state))
        self.onnx_dir = Path(onnx_dir)
        self.manifest = check_manifest(self.onnx_dir, cfg, self.fingerprint, weights_sha256, opset)
        providers = default_providers() if providers is None else providers
        self.encoder = OrtEncoder(_session(self.onnx_dir / ENCODER_FILE, providers, threads), cfg)
        self._forward_session = _session(self.onnx_dir / FORWARD_FILE, providers, threads)
        self.providers = self._forward_session.get_providers()
        self.head.load_state_dict({"weight": head_state["head.weight"], "bias": head_state["head.bias"]})
        self.eval()

    @classmethod
    def from_model(cls, model: DocumentClassifier, onnx_dir: str | Path, providers=None,
                   threads: int | None = None, opset: int | None = None) -> "OrtClassifier":
        """Export `model` into onnx_dir (opset: see export_onnx) and run it there."""
        digest = weights_digest(model.state_dict())
        export_onnx(model, onnx_dir, digest, opset)
        return cls(model.config, onnx_dir, model.state_dict(), digest, providers, threads)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, impl: str = "fast"):
        """input_ids (b, n), attention_mask (b, n) right-padded -> logits (b, num_labels).

        Up to segment_tokens: one call of forward.onnx. Longer: segment by
        segment through the encoder graph and the carried state, as torch does,
        so memory stays bounded.
        """
        if impl != "fast":
            raise ValueError("the ONNX backend runs the fast form only")
        cfg = self.config
        input_ids = torch.as_tensor(input_ids, dtype=torch.long).to("cpu")
        if cfg.max_length is not None:
            input_ids = input_ids[:, : cfg.max_length]
            attention_mask = None if attention_mask is None else attention_mask[:, : cfg.max_length]
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise InputError(f"token ids must lie in [0, {cfg.vocab_size})")
        b, n = input_ids.shape
        if attention_mask is None:
            mask = torch.ones(b, n, dtype=torch.int64)
        else:
            mask = torch.as_tensor(attention_mask).to("cpu")
            _check_right_padded(mask.to(torch.bool))
            mask = mask.to(torch.int64)
        if n > self._segment:
            return super().forward(input_ids, mask)
        (logits,) = self._forward_session.run(None, {"input_ids": _np(input_ids), "attention_mask": _np(mask)})
        return torch.from_numpy(logits)


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

