"""Small random-init models for development and tests (`bsbr-serve init-models --random`).

They load and serve exactly like trained checkpoints, but their predictions
mean nothing: `metrics.json` says `"trained": false`, which /v1/models
reports, and the model card says so in words.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DEV_LABELS = ["admin-guide", "driver-api", "filesystems", "networking", "process"]

_WORDS = ["kernel", "driver", "memory", "page", "block", "device", "file", "system", "network", "socket", "packet", "process", "thread", "scheduler", "lock", "mutex", "interrupt", "queue", "buffer", "cache", "disk", "inode", "mount", "user", "admin", "guide", "api", "configure", "module", "parameter", "register", "read", "write", "open", "close", "map", "virtual", "physical", "address", "the", "a", "of", "to", "and", "in", "is", "for", "with", "on", "that", "by", "this", "be", "are", "as", "it", "from", "at", "or", "an", "can", "will"]


def sample_text(rng: random.Random, n_words: int) -> str:
    """Sentences of random words (newlines between sentences)."""
    out, line = [], []
    for i in range(n_words):
        line.append(rng.choice(_WORDS))
        if len(line) >= rng.randint(6, 14) or i == n_words - 1:
            out.append(" ".join(line).capitalize() + ".")
            line = []
    return "\n".join(out)


def train_dev_tokenizer(vocab_size: int = 300, seed: int = 0):
    """A byte-level BPE (no special tokens) trained on generated sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    texts = [sample_text(rng, 200) for _ in range(50)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


# Sizes: "tiny" for tests (milliseconds per page), "small" for local development.
SIZES = {
    "tiny": {"hidden_dim": 32, "num_layers": 2, "num_heads": 2, "ff_dim": 64, "chunk_size": 16},
    "small": {"hidden_dim": 128, "num_layers": 2, "num_heads": 4, "ff_dim": 512, "chunk_size": 64},
    "reference": {"hidden_dim": 256, "num_layers": 4, "num_heads": 4, "ff_dim": 1024, "chunk_size": 128},
}


def scale_weights(model, weight_scale: float, seed: int = 0):
    """Re-draw every parameter of `model` in place: each matrix N(0, (weight_scale /
    sqrt(fan_in))^2), each vector (biases, norm gains) N(0, (0.3 weight_scale)^2),
    as the core tests' models are (scale 1 there); returns the model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = weight_scale / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.3 * weight_scale
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    model.refresh_fingerprint()
    return model


def write_random_models(
    root: str | Path,
    names: tuple[str, ...] = ("bsbr", "standard"),
    size: str = "small",
    vocab_size: int = 300,
    labels: list[str] | None = None,
    seed: int = 0,
    force: bool = False,
    weight_scale: float | None = None,
) -> list[Path]:
    """Write untrained models `root/<name>` (arch = name; `standard-512` is the
    standard arch reading the first 512 tokens). Refuses to overwrite unless force.

    weight_scale None keeps the training initialisation (std 0.02), whose
    logits are about 0.02 and nearly equal for every document. A number
    re-draws the weights larger (`scale_weights`), so that documents' logits
    differ, and a lost or doubled page moves them, by far more than float
    rounding: the serve tests' equivalence checks use 3."""
    import torch

    from bsbr_core import ModelConfig, build_model, save_model

    root = Path(root)
    tok = train_dev_tokenizer(vocab_size, seed)
    written = []
    for i, name in enumerate(names):
        out = root / name
        if (out / "config.json").exists() and not force:
            raise FileExistsError(f"{out} already holds a model; pass --force to overwrite it")
        arch, max_length = name, None
        if name.startswith("standard-"):
            arch, max_length = "standard", int(name.split("-", 1)[1])
        torch.manual_seed(seed + i)
        cfg = ModelConfig(
            arch=arch, vocab_size=max(vocab_size, tok.get_vocab_size()), labels=list(labels or DEV_LABELS),
            max_length=max_length, **SIZES[size],
        )
        model = build_model(cfg).eval()
        if weight_scale is not None:
            scale_weights(model, weight_scale, seed + i)
        save_model(model, tok, out)
        record = {"trained": False, "note": "random initialisation for development; predictions are meaningless",
                  "size": size, "seed": seed + i}
        if weight_scale is not None:
            record["weight_scale"] = weight_scale
        (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "README.md").write_text(
            f"# {name} (UNTRAINED)\n\nRandom-init `{arch}` classifier written by "
            "`bsbr-serve init-models --random` for development and tests. Its predictions "
            "are meaningless; train a real model before relying on it.\n"
        )
        written.append(out)
    return written
