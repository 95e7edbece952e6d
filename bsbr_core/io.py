"""Checkpoints: config.json + model.safetensors + tokenizer.json. Never pickle."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bsbr_core.config import ModelConfig
from bsbr_core.model import DocumentClassifier, build_model

CHECKPOINT_FORMAT = 1


def save_model(model: DocumentClassifier, tokenizer, path: str | Path) -> Path:
    """Write config.json, model.safetensors and (if given) tokenizer.json into path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": CHECKPOINT_FORMAT, **model.config.to_dict()}
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"arch": model.config.arch})
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
    return path


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: is {path} a saved model directory?")
    d = json.loads(cfg_file.read_text())
    fmt = d.pop("format", CHECKPOINT_FORMAT)
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"{cfg_file}: checkpoint format {fmt} is not supported (expected {CHECKPOINT_FORMAT})")
    return ModelConfig.from_dict(d)


def load_model(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """Load (model in eval mode, float32, on device; tokenizer or None)."""
    path = Path(path)
    cfg = load_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    model = build_model(cfg)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model = model.to(device=device, dtype=torch.float32).eval()
    tokenizer = None
    if with_tokenizer:
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_file))
    return model, tokenizer
