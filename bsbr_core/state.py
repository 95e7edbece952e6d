"""Streaming state carried between pieces of a document.

A State holds, for a batch of documents read in step:
- the tokens of the unfinished chunk (`pending_ids`): only whole chunks are
  committed, so a piece may end anywhere (docs/architecture.md 1.4);
- the running pooling sum over committed tokens (the count is `committed`);
- per layer, the mechanism's carried tensors (BSBR: chunk states F_j and meta
  keys h_j; standard: the KV cache; linear / delta_net: the d x d state;
  sliding_window: the last `window` keys and values).

Per-chunk logs (BSBR's F_j, the standard KV cache) grow with the document.
They are `AppendLog`s: amortised O(1) appends into a buffer with spare
capacity, shared copy-on-write between a state and the state that step()
derived from it, so step() can return a new State without copying history
and the old State stays valid.

`to_bytes()` writes a versioned, checksummed blob (magic, version, sha256,
safetensors payload with a JSON header); `from_bytes()` rejects anything
corrupt or foreign with a StateError.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load

from bsbr_core.errors import StateError

MAGIC = b"BSBRSTATE"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">9sH32s")  # magic, version, sha256(payload)

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list:
    """The safetensors serialisation of `tensors` as pieces to join: the header's
    length (8 bytes, little-endian), the header (JSON, padded with spaces to a
    multiple of 8 bytes), then each tensor's bytes in order. What
    `safetensors.torch.save` writes (any order of the tensors is valid; `load`
    reads them by their offsets), without its per-tensor numpy detours: a page's
    checkpoint delta (6 tensors, 136 KB) took 0.20 ms here against 0.30 ms there
    (bench/checkpoint_bytes.py)
    (tests/test_core_state.py checks both read back the same)."""
    header: dict = {"__metadata__": metadata}
    parts: list = []
    offset = 0
    for name, t in tensors.items():
        dtype = _ST_DTYPES.get(t.dtype)
        if dtype is None:
            raise StateError(f"cannot checkpoint {name} of dtype {t.dtype}")
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        if n:
            parts.append(t.reshape(-1).view(torch.uint8).numpy())
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)), head, *parts]


class _Storage:
    """Backing buffer of an AppendLog: `data` has capacity >= `length` along dim."""

    __slots__ = ("data", "length")

    def __init__(self, data: torch.Tensor, length: int):
        self.data = data
        self.length = length


class AppendLog:
    """An append-only tensor along `dim`, as seen by one State (its first `length` entries)."""

    __slots__ = ("_storage", "length", "dim")

    def __init__(self, storage: _Storage | None, length: int, dim: int):
        self._storage = storage
        self.length = length
        self.dim = dim

    @classmethod
    def empty(cls, dim: int) -> "AppendLog":
        return cls(None, 0, dim)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, dim: int) -> "AppendLog":
        return cls(_Storage(t, t.shape[dim]), t.shape[dim], dim)

    @property
    def view(self) -> torch.Tensor | None:
        if self._storage is None:
            return None
        return self._storage.data.narrow(self.dim, 0, self.length)

    def extend(self, new: torch.Tensor, commit: bool) -> tuple[torch.Tensor, "AppendLog"]:
        """Return (history + new, the log that holds it if commit else self).

        In place when this log is the newest holder of its storage (no other
        state appended after it); otherwise copies, so no other state's
        history is ever overwritten. Without commit the new entries are only
        scratch: visible in the returned tensor, not part of any log.
        """
        m = new.shape[self.dim]
        st = self._storage
        if st is None or self.length == 0:
            if commit:
                return new, AppendLog(_Storage(new, m), m, self.dim)
            return new, self
        old = st.data.narrow(self.dim, 0, self.length)
        in_place = (
            st.length == self.length
            and not (torch.is_grad_enabled() and (new.requires_grad or old.requires_grad))
            and new.dtype == st.data.dtype
            and new.device == st.data.device
        )
        if not in_place:
            both = torch.cat([old, new], dim=self.dim)
            if commit:
                return both, AppendLog(_Storage(both, both.shape[self.dim]), both.shape[self.dim], self.dim)
            return both, self
        need = self.length + m
        if st.data.shape[self.dim] < need:
            cap = max(need, 2 * st.data.shape[self.dim])
            shape = list(st.data.shape)
            shape[self.dim] = cap
            grown = st.data.new_empty(shape)
            grown.narrow(self.dim, 0, self.length).copy_(old)
            st.data = grown
        st.data.narrow(self.dim, self.length, m).copy_(new)
        both = st.data.narrow(self.dim, 0, need)
        if commit:
            st.length = need
            return both, AppendLog(st, need, self.dim)
        return both, self


LayerState = dict  # name -> torch.Tensor | AppendLog


@dataclass
class State:
    """Carried state of a batch of documents read piece by piece.

    num_tokens: tokens received so far (including the pending ones and, for a
        max_length model, those beyond the window it reads).
    committed: tokens committed into the layer states (a multiple of the
        block size), which is also the count behind `pool_sum`.
    pending_ids: (batch, p) tokens of the unfinished chunk, p < block size.
    pool_sum: (batch, hidden) running sum of final hidden states of committed tokens.
    layers: per layer, the mechanism's tensors (see module docstring).
    """

    arch: str
    fingerprint: str
    num_tokens: int
    committed: int
    pending_ids: torch.Tensor
    pool_sum: torch.Tensor
    layers: list[LayerState] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.pending_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every carried tensor by a stable name (AppendLogs as their views)."""
        out = {"pending_ids": self.pending_ids, "pool_sum": self.pool_sum}
        for i, layer in enumerate(self.layers):
            for name, value in layer.items():
                t = value.view if isinstance(value, AppendLog) else value
                if t is not None:
                    out[f"layers.{i}.{name}"] = t
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of carried tensors (logical sizes, not spare buffer capacity)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> "State":
        def move(v):
            if isinstance(v, AppendLog):
                t = v.view
                return AppendLog.empty(v.dim) if t is None else AppendLog.from_tensor(t.to(device), v.dim)
            return v.to(device)

        return State(
            self.arch, self.fingerprint, self.num_tokens, self.committed,
            self.pending_ids.to(device), self.pool_sum.to(device),
            [{k: move(v) for k, v in layer.items()} for layer in self.layers],
        )

    # --- serialisation -------------------------------------------------------

    def _log_lengths(self) -> dict[str, int]:
        return {f"layers.{i}.{name}": v.length for i, layer in enumerate(self.layers)
                for name, v in layer.items() if isinstance(v, AppendLog)}

    def to_bytes(self, base: "State | None" = None) -> bytes:
        """A self-contained blob; or, with `base` (an earlier state of the same
        document that this one was stepped from), a delta blob holding only
        what changed: the append logs' new entries and the small tensors.
        A delta is restored with `State.from_bytes(delta, base=that_state)`,
        so a checkpoint store can append O(page) bytes per page instead of
        rewriting the O(document) history."""
        kinds = [
            {name: ({"log": v.dim} if isinstance(v, AppendLog) else "tensor") for name, v in layer.items()}
            for layer in self.layers
        ]
        header = {
            "arch": self.arch,
            "fingerprint": self.fingerprint,
            "num_tokens": self.num_tokens,
            "committed": self.committed,
            "layers": kinds,
        }
        tensors = self.tensors()
        if base is not None:
            if (base.arch, base.fingerprint) != (self.arch, self.fingerprint) or base.committed > self.committed \
                    or base.num_tokens > self.num_tokens:
                raise StateError("delta base is not an earlier state of this document")
            base_logs = base._log_lengths()
            header["base"] = {"num_tokens": base.num_tokens, "committed": base.committed, "logs": base_logs}
            for i, layer in enumerate(self.layers):
                for name, v in layer.items():
                    key = f"layers.{i}.{name}"
                    if isinstance(v, AppendLog) and key in tensors:
                        start = base_logs.get(key, 0)
                        if start > v.length:
                            raise StateError(f"delta base has a longer {key} than this state")
                        tensors[key] = tensors[key].narrow(v.dim, start, v.length - start)
        parts = _safetensors_parts(tensors, {"bsbr_state": json.dumps(header)})
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        return b"".join([_HEADER.pack(MAGIC, FORMAT_VERSION, digest.digest()), *parts])

    @classmethod
    def from_bytes(cls, blob: bytes, base: "State | None" = None) -> "State":
        """Restore a blob of to_bytes(); a delta blob needs the `base` it was made against."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise StateError(f"state blob must be bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) < _HEADER.size:
            raise StateError(f"state blob too short ({len(blob)} bytes)")
        magic, version, digest = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise StateError("not a bsbr state blob (bad magic)")
        if version != FORMAT_VERSION:
            raise StateError(f"state format version {version} is not supported (expected {FORMAT_VERSION})")
        payload = blob[_HEADER.size :]
        if hashlib.sha256(payload).digest() != digest:
            raise StateError("state blob checksum mismatch (corrupt or truncated)")
        try:
            tensors = st_load(payload)
            header = json.loads(_safetensors_metadata(payload)["bsbr_state"])
            delta_of = header.get("base")
        except Exception as e:  # a well-formed checksum over a malformed payload: foreign writer
            raise StateError(f"malformed state payload: {e}") from e
        if delta_of is not None:
            if base is None:
                raise StateError("this is a delta state blob: restore it with the state it was made against")
            if (base.arch, base.fingerprint) != (header["arch"], header["fingerprint"]) or \
                    base.num_tokens != delta_of["num_tokens"] or base.committed != delta_of["committed"] or \
                    base._log_lengths() != delta_of["logs"]:
                raise StateError("delta state blob does not follow the given base state")
        elif base is not None:
            raise StateError("a full state blob takes no base")
        try:
            layers: list[LayerState] = []
            for i, kinds in enumerate(header["layers"]):
                layer: LayerState = {}
                for name, kind in kinds.items():
                    t = tensors.get(f"layers.{i}.{name}")
                    if isinstance(kind, dict):
                        log = AppendLog.empty(kind["log"])
                        if delta_of is not None and i < len(base.layers) and name in base.layers[i]:
                            log = base.layers[i][name]
                        if t is not None and t.shape[kind["log"]]:
                            _, log = log.extend(t.to(log.view.device) if log.view is not None else t, commit=True)
                        layer[name] = log
                    else:
                        layer[name] = t
                layers.append(layer)
            return cls(
                arch=header["arch"], fingerprint=header["fingerprint"],
                num_tokens=int(header["num_tokens"]), committed=int(header["committed"]),
                pending_ids=tensors["pending_ids"], pool_sum=tensors["pool_sum"], layers=layers,
            )
        except StateError:
            raise
        except Exception as e:
            raise StateError(f"malformed state payload: {e}") from e


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    (n,) = struct.unpack_from("<Q", payload)
    return json.loads(payload[8 : 8 + n]).get("__metadata__", {})
