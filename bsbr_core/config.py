"""Model configuration: one dataclass, serialised as JSON next to the weights."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("bsbr", "standard", "linear", "sliding_window", "delta_net")
COMPRESSION_FACTORS = (1, 2, 4, 8, 16)
POOLINGS = ("mean", "attention", "last")


@dataclass
class ModelConfig:
    """Hyper-parameters of an encoder classifier (docs/architecture.md 1.3).

    arch: bsbr | standard | linear | sliding_window | delta_net
    chunk_size: B, the block size of BSBR and the commit granularity of the
        streaming state for every mechanism.
    compression_factor: BSBR only; the chunk state holds d*d/f numbers per head.
    causal: BSBR only; causal local attention and meta query from chunk c-1.
    window: sliding_window only; each token sees the previous `window` tokens.
    max_length: standard only; read only the first `max_length` tokens with
        full bidirectional attention (the BERT-512 baseline).
    pooling: mean (masked mean of the final hidden states), attention
        (softmax-weighted mean with a learned score) or last (the last real
        token's hidden state); see bsbr_core.pooling.
    """

    arch: str = "bsbr"
    vocab_size: int = 16384
    hidden_dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    ff_dim: int = 1024
    chunk_size: int = 128
    compression_factor: int = 1
    labels: list[str] = field(default_factory=lambda: ["negative", "positive"])
    causal: bool = False
    window: int = 256
    max_length: int | None = None
    dropout: float = 0.0
    pooling: str = "mean"
    rope_base: float = 10000.0
    # Tokens per segment when one-shot inference of a long input runs
    # segment by segment (bounded activation memory); a multiple of chunk_size.
    segment_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if self.compression_factor not in COMPRESSION_FACTORS:
            raise ValueError(f"compression_factor must be one of {COMPRESSION_FACTORS}, got {self.compression_factor}")
        if self.chunk_size < 1 or self.window < 1 or self.vocab_size < 1:
            raise ValueError("chunk_size, window and vocab_size must be >= 1")
        if not self.labels:
            raise ValueError("labels must name at least one class")
        if self.max_length is not None:
            if self.arch != "standard":
                raise ValueError("max_length applies to the standard arch only")
            if self.max_length < 1:
                raise ValueError("max_length must be >= 1")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")
        if self.segment_tokens < 1:
            raise ValueError("segment_tokens must be >= 1")
        self.labels = list(self.labels)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def block_size(self) -> int:
        """Commit granularity of the streaming state: the chunk size, or the
        whole truncated window for the max_length baseline (one block)."""
        return self.max_length if self.max_length is not None else self.chunk_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))
