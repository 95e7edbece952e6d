"""Encoder classifier over any mechanism (docs/architecture.md 1.3) and its streaming step.

    ids -> embedding -> L x [x + Attn(LN(x)); x + FFN(LN(x))] -> LN -> pooling -> linear -> logits

Pooling is the masked mean (default) or a softmax-weighted mean with a
learned score (bsbr_core.pooling); both stream exactly.

Every mechanism is block-causal across chunks (a token never depends on a
later chunk), so reading a document in pieces that commit whole chunks, and
treating the unfinished chunk as the document's end for the running
prediction, gives exactly the one-shot logits (docs/architecture.md 1.4).
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbr_core.attention import MECHANISMS
from bsbr_core.config import ModelConfig
from bsbr_core.errors import InputError
from bsbr_core.pooling import build_pooling
from bsbr_core.state import AppendLog, State, StateError


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes (independent of the file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(cfg: ModelConfig, digest: str) -> str:
    """What a State carries to name the model that made it: the config and
    the weights (a retrained checkpoint with the same config is another model)."""
    return hashlib.sha256((cfg.to_json() + "\n" + digest).encode()).hexdigest()[:16]


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_dim, cfg.ff_dim)
        self.down = nn.Linear(cfg.ff_dim, cfg.hidden_dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block around one attention mechanism."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.hidden_dim)
        self.attn = MECHANISMS[cfg.arch](cfg)
        self.norm_ff = nn.LayerNorm(cfg.hidden_dim)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos0=0, mask=None, state=None, commit=True, impl="fast"):
        a, state = self.attn(self.norm_attn(x), pos0, mask, state, commit, impl)
        x = x + self.drop(a)
        x = x + self.drop(self.ff(self.norm_ff(x)))
        return x, state

    def forward_ragged(self, x, spans, states, commit):
        a, states = self.attn.forward_ragged(self.norm_attn(x), spans, states, commit)
        x = x + a
        return x + self.ff(self.norm_ff(x)), states


class Encoder(nn.Module):
    """Token ids (b, n) -> final-normalised hidden states (b, n, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids, pos0=0, mask=None, layer_states=None, commit=True, impl="fast"):
        x = self.drop(self.embed(ids))
        new_states = []
        for i, block in enumerate(self.blocks):
            x, st = block(x, pos0, mask, None if layer_states is None else layer_states[i], commit, impl)
            new_states.append(st)
        return self.norm(x), new_states

    def forward_ragged(self, ids, spans, doc_states, commit):
        """ids (1, N): several documents' pieces packed in one row (see
        Attention.forward_ragged); doc_states[i] is document i's list of layer
        states (or None). Returns (hidden (1, N, D), new doc_states)."""
        x = self.embed(ids)
        per_layer = [[None if ds is None else ds[li] for ds in doc_states] for li in range(len(self.blocks))]
        for li, block in enumerate(self.blocks):
            x, per_layer[li] = block.forward_ragged(x, spans, per_layer[li], commit)
        return self.norm(x), [[per_layer[li][i] for li in range(len(self.blocks))] for i in range(len(spans))]


def check_right_padded(mask: torch.Tensor) -> None:
    """InputError unless mask (b, n) bool is 1s for real tokens, then 0s."""
    lengths = mask.sum(1, keepdim=True)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths
    if not torch.equal(mask, expected):
        raise InputError("attention_mask must be right-padded: 1s for real tokens, then 0s")


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """InputError unless every id lies in [0, vocab_size)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InputError(f"token ids must lie in [0, {vocab_size})")


def _part(name: str) -> property:
    return property(lambda reader: getattr(reader.parts, name))


class DocumentReader:
    """Reads documents whole or in pieces with a carried State (docs/architecture.md 1.4)
    through any encoder with `Encoder`'s call and return.

    The streaming algorithm every backend shares: the torch classifier reads
    with its own modules, the ONNX Runtime backend with an encoder that runs
    graphs. Because the commit/pending logic, the pooling and the State are
    this one code, a State made by one backend continues on another.

    parts: the backend, read attribute by attribute when needed (so a later
    `.to(device)` or weight change is seen):
        config       ModelConfig
        encoder      encoder(ids, pos0, mask, layer_states, commit, impl) -> (hidden (b, n, D), layer_states)
                     and encoder.forward_ragged(ids, spans, doc_states, commit) (Encoder's)
        pooling      a bsbr_core.pooling module
        head         hidden (b, D) -> logits (b, num_labels)
        fingerprint  names config and weights; States carry it
        device       where ids and states go before the encoder sees them
    """

    def __init__(self, parts):
        self.parts = parts

    config = _part("config")
    encoder = _part("encoder")
    pooling = _part("pooling")
    head = _part("head")
    fingerprint = _part("fingerprint")
    device = _part("device")

    @property
    def segment(self) -> int:
        """Tokens per encoder call on long inputs: segment_tokens in whole blocks."""
        B = self.config.block_size
        return max(B, self.config.segment_tokens // B * B)

    # --- one-shot ----------------------------------------------------------

    def one_shot_inputs(self, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids cut to max_length, mask (b, n) bool) of a one-shot call; InputError
        for a mask that is not right-padded."""
        cfg = self.config
        if cfg.max_length is not None:
            input_ids = input_ids[:, : cfg.max_length]
            attention_mask = None if attention_mask is None else attention_mask[:, : cfg.max_length]
        b, n = input_ids.shape
        if attention_mask is None:
            return input_ids, torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
        mask = attention_mask.to(torch.bool)
        check_right_padded(mask)
        return input_ids, mask

    def classify(self, input_ids, attention_mask=None, impl: str = "fast"):
        """input_ids (b, n) long, attention_mask (b, n) right-padded -> logits (b, num_labels).

        Without autograd, long inputs run segment by segment through the
        streaming state, so activation memory stays bounded by the segment.
        """
        input_ids, mask = self.one_shot_inputs(input_ids, attention_mask)
        b, n = input_ids.shape
        seg = self.segment
        pool = self.pooling
        if impl == "naive" or torch.is_grad_enabled() or n <= seg:
            h, _ = self.encoder(input_ids, 0, None if bool(mask.all()) else mask, None, False, impl)
            acc = pool.summarize(h, mask)
        else:
            layers, acc = None, pool.empty(b, input_ids.device)
            for s in range(0, n, seg):
                m = mask[:, s : s + seg]
                h, layers = self.encoder(input_ids[:, s : s + seg], s, None if bool(m.all()) else m, layers, True)
                acc = pool.combine(acc, pool.summarize(h, m))
        return self.head(pool.readout(acc, mask.sum(1, keepdim=True)))

    # --- streaming ---------------------------------------------------------

    def init_state(self, batch_size: int = 1) -> State:
        return State(
            arch=self.config.arch, fingerprint=self.fingerprint, num_tokens=0, committed=0,
            pending_ids=torch.zeros(batch_size, 0, dtype=torch.long, device=self.device),
            pool_sum=self.pooling.empty(batch_size, self.device),
            layers=[],
        )

    def check_state(self, state: State) -> None:
        if not isinstance(state, State):
            raise StateError(f"expected a State, got {type(state).__name__}")
        if state.arch != self.config.arch or state.fingerprint != self.fingerprint:
            raise StateError(
                f"state was made by another model (arch {state.arch}, fingerprint {state.fingerprint}); "
                f"this model is {self.config.arch} {self.fingerprint}"
            )

    def _next_tokens(self, piece_ids, state: State) -> tuple[State, torch.Tensor, int]:
        """Validate a piece against its state; return (state on this device,
        pending + piece ids to read (a max_length model drops what lies past
        its window), the document's token count after the piece)."""
        self.check_state(state)
        cfg = self.config
        piece_ids = torch.as_tensor(piece_ids, dtype=torch.long)
        if piece_ids.dim() == 1:
            piece_ids = piece_ids[None]
        if piece_ids.shape[0] != state.batch_size:
            raise InputError(f"piece batch {piece_ids.shape[0]} != state batch {state.batch_size}")
        check_token_ids(piece_ids, cfg.vocab_size)
        if state.pending_ids.device != self.device:
            state = state.to(self.device)
        piece_ids = piece_ids.to(self.device)
        num_tokens = state.num_tokens + piece_ids.shape[1]
        if cfg.max_length is not None:
            piece_ids = piece_ids[:, : max(0, cfg.max_length - state.committed - state.pending_ids.shape[1])]
        return state, torch.cat([state.pending_ids, piece_ids], dim=1), num_tokens

    @torch.no_grad()
    def step(self, piece_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Read the next piece (b, m >= 0) of each document; return the running
        logits (b, num_labels) and a new State (the given one stays valid)."""
        cfg = self.config
        state, ids, num_tokens = self._next_tokens(piece_ids, state)
        n_commit = ids.shape[1] // cfg.block_size * cfg.block_size
        layers = state.layers or None
        pool, pool_sum = self.pooling, state.pool_sum
        seg = self.segment
        for s in range(0, n_commit, seg):
            e = min(s + seg, n_commit)
            h, layers = self.encoder(ids[:, s:e], state.committed + s, None, layers, True)
            pool_sum = pool.combine(pool_sum, pool.summarize(h))
        committed = state.committed + n_commit
        tail = ids[:, n_commit:]
        total, count = pool_sum, committed
        if tail.shape[1]:
            h, _ = self.encoder(tail, committed, None, layers, False)
            total, count = pool.combine(total, pool.summarize(h)), count + tail.shape[1]
        logits = self.head(pool.readout(total, count))
        new_state = State(cfg.arch, self.fingerprint, num_tokens, committed, tail, pool_sum, layers or [])
        return logits, new_state

    @torch.no_grad()
    def step_many(self, pieces: list[torch.Tensor], states: list[State]) -> list[tuple[torch.Tensor, State]]:
        """step() for several independent single-document states at once.

        The documents' pieces are packed into one row: embeddings, projections
        and feed-forward layers run once over all their tokens, and only the
        attention proper runs per document (each at its own position, with its
        own carried state). Results equal step() on each, in order. A piece
        longer than one segment falls back to step() for that document.
        """
        if len(pieces) != len(states):
            raise InputError("pieces and states differ in number")
        cfg, Bk = self.config, self.config.block_size
        out: list = [None] * len(pieces)
        docs = []  # (index, ids, n_commit, state)
        for i, (p, s) in enumerate(zip(pieces, states)):
            if isinstance(s, State) and s.batch_size != 1:
                raise InputError("step_many takes single-document states")
            s, ids, num_tokens = self._next_tokens(torch.as_tensor(p, dtype=torch.long).reshape(1, -1), s)
            n_commit = ids.shape[1] // Bk * Bk
            if n_commit > self.segment:
                out[i] = self.step(pieces[i], states[i])
                continue
            docs.append((i, ids, n_commit, s, num_tokens))
        if not docs:
            return out

        def packed_pass(parts, positions, layer_states, commit):
            """Run the non-empty parts through the encoder in one packed row."""
            live = [j for j, part in enumerate(parts) if part.shape[1]]
            sums = [None] * len(parts)
            new_states = list(layer_states)
            if live:
                spans, at = [], 0
                for j in live:
                    n = parts[j].shape[1]
                    spans.append((at, at + n, positions[j]))
                    at += n
                h, st = self.encoder.forward_ragged(
                    torch.cat([parts[j] for j in live], dim=1), spans, [layer_states[j] for j in live], commit)
                for (s_, e_, _), j, st_j in zip(spans, live, st):
                    sums[j] = pool.summarize(h[:, s_:e_])
                    if commit:
                        new_states[j] = st_j
            return sums, new_states

        pool = self.pooling
        committed_parts = [ids[:, :nc] for _, ids, nc, _, _ in docs]
        layer_states = [s.layers or None for _, _, _, s, _ in docs]
        sums, layer_states = packed_pass(committed_parts, [s.committed for _, _, _, s, _ in docs], layer_states, True)
        pool_sums = [s.pool_sum if add is None else pool.combine(s.pool_sum, add) for (_, _, _, s, _), add in zip(docs, sums)]
        tails = [ids[:, nc:] for _, ids, nc, _, _ in docs]
        tail_sums, _ = packed_pass(tails, [s.committed + nc for _, _, nc, s, _ in docs], layer_states, False)
        pooled = []
        for (_, _, nc, s, _), ps, ts, tail in zip(docs, pool_sums, tail_sums, tails):
            count = s.committed + nc + tail.shape[1]
            pooled.append(pool.readout(ps if ts is None else pool.combine(ps, ts), count))
        logits = self.head(torch.cat(pooled))
        for row, ((i, _, nc, s, num_tokens), ps, tail, ls) in enumerate(zip(docs, pool_sums, tails, layer_states)):
            out[i] = (logits[row : row + 1], State(cfg.arch, self.fingerprint, num_tokens, s.committed + nc,
                                                  tail, ps, ls or []))
        return out


class DocumentClassifier(nn.Module):
    """Encoder + pooling + linear head; readable whole or in pieces (the torch backend).

    Reading is `DocumentReader`'s, over this module's encoder, pooling and head.
    `fingerprint` names the config and the weights; it is computed on first
    use (a State records it) and again after load_state_dict. Code that
    changes weights in place after stepping calls refresh_fingerprint().
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.pooling = build_pooling(cfg.pooling, cfg.hidden_dim)
        self.head = nn.Linear(cfg.hidden_dim, cfg.num_labels)
        self.apply(self._init_weights)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.config, weights_digest(self.state_dict()))
        return self._fingerprint

    def refresh_fingerprint(self) -> str:
        self._fingerprint = None
        return self.fingerprint

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._fingerprint = None
        return result

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def reader(self) -> DocumentReader:
        return DocumentReader(self)

    def forward(self, input_ids, attention_mask=None, impl: str = "fast"):
        """input_ids (b, n) long, attention_mask (b, n) right-padded -> logits (b, num_labels)."""
        return self.reader.classify(input_ids, attention_mask, impl)

    def init_state(self, batch_size: int = 1) -> State:
        return self.reader.init_state(batch_size)

    def check_state(self, state: State) -> None:
        self.reader.check_state(state)

    def step(self, piece_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Read the next piece (b, m >= 0) of each document; return the running
        logits (b, num_labels) and a new State (the given one stays valid)."""
        return self.reader.step(piece_ids, state)

    def step_many(self, pieces: list[torch.Tensor], states: list[State]) -> list[tuple[torch.Tensor, State]]:
        """step() for several single-document states at once (see DocumentReader.step_many)."""
        return self.reader.step_many(pieces, states)


def build_model(cfg: ModelConfig) -> DocumentClassifier:
    return DocumentClassifier(cfg)
