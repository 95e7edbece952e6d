"""Byte-level BPE tokenizer for the classifiers (Hugging Face ``tokenizers``).

Design:
- Byte-level: every string maps to ids (the 256 byte symbols are always in
  the vocabulary), so there is no ``[UNK]``, and ``decode(encode(t)) == t``.
- No special tokens: the classifier mean-pools over real tokens (no CLS), and
  batches are padded with any id (0) under an ``attention_mask`` that keeps
  padding out of attention and pooling, so no ``[PAD]`` token is needed.
  Every id in ``[0, get_vocab_size())`` is a real piece of text.
- No normaliser and no prefix space: the text is encoded exactly as given,
  which is what makes :func:`encode` of a long text in pieces exact.
- Trained on the training split only, deterministically: the same texts and
  vocab_size give a byte-identical ``tokenizer.json``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Long texts are encoded as pieces of about this many characters with
# encode_batch, which runs them on all cores (one encode() call uses one).
PIECE_CHARS = 8192


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 16384,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; ``get_vocab_size() <= vocab_size``
    (smaller only when the texts hold too few mergeable pairs)."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp), pretty=True)
    os.replace(tmp, path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` (plain JSON, never pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; train one with: bsbr-serve tokenizer train --data DIR --out {path}"
        )
    return Tokenizer.from_file(str(path))


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``; identical to ``tokenizer.encode(text).ids`` but
    parallel over pieces for long texts."""
    return encode_many(tokenizer, [text])[0]


def encode_many(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, all pieces of all texts in one encode_batch."""
    pieces: list[str] = []
    bounds = [0]
    for text in texts:
        pieces.extend(split_pieces(text))
        bounds.append(len(pieces))
    encodings = encode_batch(tokenizer, pieces)
    return [
        [i for enc in encodings[bounds[k] : bounds[k + 1]] for i in enc.ids]
        for k in range(len(texts))
    ]


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list:
    """``tokenizer.encode_batch(texts, add_special_tokens=False)``: the same ids,
    through ``encode_batch_fast`` where tokenizers has it (0.20 on), which
    skips the character offsets nobody here reads (a 512-token page: about
    0.42 ms against 0.54 ms for ``encode``, on this project's 2-core machine)."""
    fast = getattr(tokenizer, "encode_batch_fast", None)
    if fast is not None:
        return fast(list(texts), add_special_tokens=False)
    return tokenizer.encode_batch(list(texts), add_special_tokens=False)


def split_pieces(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at least ``piece_chars`` characters (the
    last may be shorter) whose encodings concatenate to the encoding of
    ``text``.

    Cuts go only before a newline that follows a printable ASCII character
    (not a space). The byte-level pre-tokenizer's regex never joins such a
    character with the newline, and its one lookahead (whitespace not
    followed by non-space) never reaches past it, so the pre-tokens on each
    side of the cut are the same as in the whole text, and BPE never merges
    across pre-tokens.
    """
    pieces = []
    start = 0
    while len(text) - start > piece_chars:
        cut = text.find("\n", start + piece_chars)
        while cut != -1 and not ("!" <= text[cut - 1] <= "~"):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
