"""Training of a document classifier on a corpus split (any ModelConfig).

    python -m bsbr_core.cli train --arch bsbr --out runs/bsbr --export models/bsbr

- AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient
  clipping by global norm.
- Class imbalance: the cross-entropy is weighted per class by
  ``(n_max / n_c) ** balance_power`` (0: none, 0.5: sqrt, 1: inverse
  frequency), normalised so the mean weight over training documents is 1.
- Length-bucketed batches: documents sorted by (jittered) length and cut into
  batches whose padded size ``docs x longest`` stays within ``batch_tokens``;
  the batch order is shuffled every epoch.
- Training reads at most ``max_train_tokens`` tokens of a document: a window
  starting at a random chunk boundary (``crop="random"``; every epoch sees
  another part of a long document and the chunk grid matches the one the
  model uses on the whole document) or the first tokens (``crop="head"``,
  forced for ``max_length`` models, which only ever read the head).
  Validation and :mod:`bsbr_core.evaluate` read whole documents.
- Seedable and exactly resumable: the batches and windows of epoch e are a
  pure function of (seed, e); a checkpoint (model, AdamW state, position in
  the epoch, torch RNG state) is written every ``checkpoint_every`` steps and
  at the end of each epoch into ``<out>/checkpoint/``, and running the same
  command again continues from it. Interrupted and uninterrupted runs give
  the same weights (same device and thread count). Nothing is pickled:
  tensors go to safetensors, scalars and RNG states to JSON.
- ``<out>/history.json`` and ``<out>/curve.png``: per-epoch train loss and
  validation accuracy / macro-F1. ``<out>/best/`` holds the model of the epoch
  with the best validation accuracy; ``--export DIR`` writes it (with
  ``training.json``: command, configs, history, wall time, hardware) as a
  shippable model folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bsbr_core.config import ARCHS, ModelConfig
from bsbr_core.evaluate import (
    EVAL_BATCH_TOKENS, TokenizedSplit, classification_metrics, load_tokenized, pad_batch, predict_logits,
)

TRAINER_FORMAT = 1
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
# TrainConfig fields that may change between a run and its resumption.
RESUMABLE_CHANGES = {"device", "checkpoint_every", "stop_at_step", "export", "progress"}


@dataclass
class TrainConfig:
    """How to train; the model itself is described by a ModelConfig.

    data_dir: corpus folder (train/validation.jsonl + meta.json); default kernel-docs.
    tokenizer: tokenizer.json; default <data_dir>/tokenizer.json.
    batch_tokens: padded tokens per batch (docs x longest window).
    max_train_tokens: tokens of a document read per training step.
    val_max_tokens: cap on validation documents (None: whole documents).
    stop_at_step: checkpoint and return once this many optimizer steps are
        done (to split a run; the same command resumes).
    init_from: a saved model folder (same ModelConfig) to start from instead
        of a random init; optimizer and schedule start afresh (a warm restart).
    curriculum: per epoch, the longest document (tokens) it trains on; longer
        ones sit that epoch out (the last entry holds for later epochs). One
        schedule over all steps, so a curriculum is not a chain of restarts.
    """

    out_dir: str = "runs/bsbr"
    data_dir: str | None = None
    tokenizer: str | None = None
    token_cache: str | None = None
    epochs: int = 4
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_tokens: int = 8192
    max_batch_docs: int = 64
    max_train_tokens: int = 1024
    crop: str = "random"
    balance_power: float = 0.5
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    val_max_tokens: int | None = None
    eval_batch_tokens: int = EVAL_BATCH_TOKENS
    stop_at_step: int | None = None
    export: str | None = None
    progress: bool = True
    init_from: str | None = None
    curriculum: list[int] | None = None

    def __post_init__(self) -> None:
        if self.crop not in ("random", "head"):
            raise ValueError(f"crop must be 'random' or 'head', got {self.crop!r}")
        if self.epochs < 1 or self.batch_tokens < 1 or self.max_train_tokens < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, batch_tokens, max_train_tokens and checkpoint_every must be >= 1")
        if self.curriculum is not None:
            self.curriculum = [int(n) for n in self.curriculum]
            if not self.curriculum or min(self.curriculum) < 1:
                raise ValueError("curriculum must list positive document lengths")


# -- data plan -------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def class_weights(labels: list[int], num_labels: int, power: float) -> torch.Tensor:
    """(num_labels,) loss weights (n_max / n_c) ** power, mean 1 over documents."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_labels).double()
    w = torch.where(counts > 0, (counts.max() / counts.clamp(min=1)) ** power, torch.zeros_like(counts))
    mean = (w[torch.tensor(labels, dtype=torch.long)]).mean() if labels else torch.tensor(1.0)
    return (w / mean).float()


def epoch_plan(lengths: list[int], cap: int, chunk: int, crop: str, tc: TrainConfig, epoch: int) -> list[list[tuple[int, int, int]]]:
    """Batches of (doc index, window start, window length) for one epoch: a
    pure function of (lengths, cap, chunk, crop, seed, epoch)."""
    rng = random.Random(f"bsbr-train/{tc.seed}/{epoch}")
    longest_doc = None if tc.curriculum is None else tc.curriculum[min(epoch, len(tc.curriculum) - 1)]
    windows = []
    for i, n in enumerate(lengths):
        if longest_doc is not None and n > longest_doc:
            continue
        if n > cap and crop == "random":
            start = rng.randrange(0, (n - cap) // chunk + 1) * chunk
        else:
            start = 0
        windows.append((i, start, max(1, min(cap, n - start))))
    # Sort by length with +-10% jitter: batches of similar length that differ every epoch.
    jitter = [w[2] * rng.uniform(0.9, 1.1) for w in windows]
    order = sorted(range(len(windows)), key=lambda j: (jitter[j], j))
    batches, cur, longest = [], [], 0
    for j in order:
        n = windows[j][2]
        if cur and (max(longest, n) * (len(cur) + 1) > tc.batch_tokens or len(cur) >= tc.max_batch_docs):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(windows[j])
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine to min_lr_ratio * lr."""
    warmup = max(1, int(round(tc.warmup_frac * total)))
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = tc.lr * tc.min_lr_ratio
    return floor + (tc.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- checkpoints (safetensors + JSON, never pickle) --------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """AdamW state: tensors to <path>.safetensors, param_groups to <path>.json."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().to("cpu").contiguous()
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({"param_groups": sd["param_groups"]}, indent=1))


def load_optimizer(opt: torch.optim.Optimizer, path: Path, device: torch.device) -> None:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    groups = json.loads(path.with_suffix(".json").read_text())["param_groups"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        # AdamW keeps `step` on the CPU unless capturable/fused; other state lives with the params.
        state.setdefault(int(idx), {})[name] = t if name == "step" else t.to(device)
    opt.load_state_dict({"state": state, "param_groups": groups})


def _write_checkpoint(out: Path, model, tokenizer, opt, trainer: dict) -> None:
    from bsbr_core.io import save_model

    tmp = out / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    save_optimizer(opt, tmp / "optimizer")
    (tmp / "trainer.json").write_text(json.dumps({**trainer, "rng": _rng_state()}) + "\n")
    final, old = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        if (out / name / "trainer.json").is_file():
            return out / name
    return None


# -- curves ------------------------------------------------------------------------


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6.4, 4.0))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:red", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss (weighted cross-entropy)", color="tab:red")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h["val_accuracy"] for h in history], "s-", color="tab:blue", label="validation accuracy")
    ax2.plot(epochs, [h["val_macro_f1"] for h in history], "^--", color="tab:cyan", label="validation macro-F1")
    ax2.set_ylabel("validation", color="tab:blue")
    ax2.set_ylim(0, 1)
    lines = ax1.get_lines() + ax2.get_lines()
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    ax1.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"CPU {platform.machine()} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__})")


# -- training ----------------------------------------------------------------------


def _validate(model, split: TokenizedSplit, tc: TrainConfig, device) -> dict:
    logits = predict_logits(model, split.docs, tc.eval_batch_tokens, tc.val_max_tokens, device)
    m = classification_metrics(split.labels, logits.argmax(-1).tolist(), len(split.label_names))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


@dataclass
class TrainData:
    """Splits to train on instead of a corpus folder (e.g. a synthetic task):
    token ids already made, a tokenizer whose vocabulary covers them (saved
    with the checkpoints), and the class names the labels index."""

    train: TokenizedSplit
    validation: TokenizedSplit
    tokenizer: Any
    labels: list[str]


@dataclass
class TrainResult:
    """record: what <out>/checkpoint/trainer.json holds (history, best epoch,
    steps, wall time, ...); model: the model after the last step done."""

    record: dict
    model: torch.nn.Module

    @property
    def stopped(self) -> bool:
        return bool(self.record.get("stopped"))


def train(model_cfg: ModelConfig | dict, tc: TrainConfig, command: str | None = None,
          data: TrainData | None = None) -> TrainResult:
    """Train (or resume) per tc.

    model_cfg: a ModelConfig, or a dict of ModelConfig fields; vocab_size and
    labels are always taken from the tokenizer and the corpus.
    data: in-memory splits to use instead of tc.data_dir's corpus.
    """
    from tqdm import tqdm

    from bsbr_core import data as data_lib
    from bsbr_core.model import build_model
    from bsbr_core.tokenizer import load_tokenizer

    out = Path(tc.out_dir)
    if data is None:
        data_dir = Path(tc.data_dir) if tc.data_dir is not None else data_lib.default_kernel_docs_dir()
        tok_path = Path(tc.tokenizer) if tc.tokenizer is not None else data_dir / "tokenizer.json"
        tokenizer = load_tokenizer(tok_path)
        labels = data_lib.load_meta(data_dir)["labels"]
    else:
        tokenizer, labels = data.tokenizer, list(data.labels)
    fields = model_cfg.to_dict() if isinstance(model_cfg, ModelConfig) else dict(model_cfg)
    fields.update(vocab_size=tokenizer.get_vocab_size(), labels=labels)
    cfg = ModelConfig.from_dict(fields)
    device = resolve_device(tc.device)

    ckpt = _find_checkpoint(out)
    if ckpt is not None:
        trainer = json.loads((ckpt / "trainer.json").read_text())
        _check_resumable(trainer, cfg, tc, ckpt)
    t_setup = time.perf_counter()
    if data is None:
        train_split = load_tokenized(data_dir, "train", tokenizer, tc.token_cache)
        val_split = load_tokenized(data_dir, "validation", tokenizer, tc.token_cache)
    else:
        train_split, val_split = data.train, data.validation

    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.98))
    if ckpt is not None:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        load_optimizer(opt, ckpt / "optimizer", device)
        _set_rng_state(trainer["rng"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        init_record = None
        if tc.init_from is not None:
            init_record = _init_from(model, cfg, Path(tc.init_from))
        trainer = {
            "format": TRAINER_FORMAT, "model_config": cfg.to_dict(), "train_config": dataclasses.asdict(tc),
            "command": command, "epoch": 0, "batch_in_epoch": 0, "global_step": 0, "epoch_loss_sum": 0.0,
            "epoch_docs": 0, "epoch_tokens": 0, "history": [], "best": None, "elapsed_s": 0.0,
            "hardware": hardware_description(device), "resumes": 0, "init_from": init_record,
        }

    # Windows: max_length models only ever read their first max_length tokens.
    cap = tc.max_train_tokens if cfg.max_length is None else min(tc.max_train_tokens, cfg.max_length)
    crop = tc.crop if cfg.max_length is None else "head"
    lengths = train_split.lengths
    plans = [epoch_plan(lengths, cap, cfg.chunk_size, crop, tc, e) for e in range(tc.epochs)]
    total_steps = sum(len(p) for p in plans)
    weights = class_weights(train_split.labels, cfg.num_labels, tc.balance_power).to(device)
    trainer.update(total_steps=total_steps, class_weights=weights.tolist())
    if ckpt is not None:
        trainer["resumes"] += 1
    setup_s = time.perf_counter() - t_setup

    def checkpoint():
        trainer["elapsed_s"] += time.perf_counter() - t_mark[0]
        t_mark[0] = time.perf_counter()
        _write_checkpoint(out, model, tokenizer, opt, trainer)

    t_mark = [time.perf_counter()]
    bar = tqdm(total=total_steps, initial=trainer["global_step"], desc=f"train {out.name}", unit="step",
               disable=not tc.progress, mininterval=5.0, dynamic_ncols=True)
    if tc.progress and ckpt is None:
        tqdm.write(f"{cfg.arch}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}; "
                   f"{len(train_split)} train / {len(val_split)} validation documents; {total_steps} steps "
                   f"({tc.epochs} epochs); setup {setup_s:.1f}s")
    elif tc.progress:
        tqdm.write(f"resuming {ckpt} at epoch {trainer['epoch'] + 1}, step {trainer['global_step']}")
    model.train()
    tok_t0, tok_n = time.perf_counter(), 0
    stopped = False
    while trainer["epoch"] < tc.epochs:
        e = trainer["epoch"]
        plan = plans[e]
        for bi in range(trainer["batch_in_epoch"], len(plan)):
            if tc.stop_at_step is not None and trainer["global_step"] >= tc.stop_at_step:
                stopped = True
                break
            batch = plan[bi]
            ids, mask = pad_batch([train_split.docs[i][s : s + n] for i, s, n in batch])
            y = torch.tensor([train_split.labels[i] for i, _, _ in batch], device=device)
            lr = lr_at(trainer["global_step"], total_steps, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(ids.to(device), mask.to(device))
            loss = F.cross_entropy(logits.float(), y, weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            ntok = sum(n for _, _, n in batch)
            loss_value = loss.item()
            trainer["epoch_loss_sum"] += loss_value * len(batch)
            trainer["epoch_docs"] += len(batch)
            trainer["epoch_tokens"] += ntok
            trainer["global_step"] += 1
            trainer["batch_in_epoch"] = bi + 1
            tok_n += ntok
            bar.update(1)
            bar.set_postfix(epoch=e + 1, loss=f"{loss_value:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tok_n / (time.perf_counter() - tok_t0):.0f}", refresh=False)
            if trainer["global_step"] % tc.checkpoint_every == 0 and bi + 1 < len(plan):
                checkpoint()
        if stopped:
            break
        val = _validate(model, val_split, tc, device)
        model.train()
        trainer["elapsed_s"] += time.perf_counter() - t_mark[0]
        t_mark[0] = time.perf_counter()
        record = {
            "epoch": e + 1, "step": trainer["global_step"],
            "train_loss": trainer["epoch_loss_sum"] / max(1, trainer["epoch_docs"]),
            "train_tokens": trainer["epoch_tokens"], "lr": lr_at(trainer["global_step"] - 1, total_steps, tc),
            "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
            "elapsed_s": round(trainer["elapsed_s"], 1),
        }
        trainer["history"].append(record)
        best = trainer["best"]
        if best is None or (val["accuracy"], val["macro_f1"]) > (best["val_accuracy"], best["val_macro_f1"]):
            from bsbr_core.io import save_model

            trainer["best"] = {k: record[k] for k in ("epoch", "step", "val_accuracy", "val_macro_f1")}
            save_model(model, tokenizer, out / BEST_DIR)
        trainer.update(epoch=e + 1, batch_in_epoch=0, epoch_loss_sum=0.0, epoch_docs=0, epoch_tokens=0)
        (out / "history.json").write_text(json.dumps(trainer["history"], indent=2) + "\n")
        plot_curves(trainer["history"], out / "curve.png", f"{cfg.arch} ({out.name})")
        if tc.progress:
            tqdm.write(f"epoch {e + 1}/{tc.epochs}: train loss {record['train_loss']:.4f}, validation accuracy "
                       f"{val['accuracy']:.4f}, macro-F1 {val['macro_f1']:.4f} ({record['elapsed_s']:.0f}s)")
        checkpoint()
    bar.close()
    if stopped:
        checkpoint()
        trainer["stopped"] = True
        return TrainResult(trainer, model.eval())
    if tc.export:
        export_model(out, tc.export)
    return TrainResult(trainer, model.eval())


def _init_from(model, cfg: ModelConfig, src: Path) -> dict:
    """Load src's weights into model; returns what the model card says about it."""
    from bsbr_core.io import load_config

    if load_config(src).to_dict() != cfg.to_dict():
        raise ValueError(f"--init-from {src} holds another model config than the one requested")
    model.load_state_dict(load_file(str(src / "model.safetensors")))
    prior = src / "training.json"
    return {"path": str(src), "training": json.loads(prior.read_text()) if prior.is_file() else None}


def _check_resumable(trainer: dict, cfg: ModelConfig, tc: TrainConfig, ckpt: Path) -> None:
    if trainer.get("format") != TRAINER_FORMAT:
        raise ValueError(f"{ckpt}/trainer.json has format {trainer.get('format')}, expected {TRAINER_FORMAT}")
    if trainer["model_config"] != cfg.to_dict():
        raise ValueError(f"{ckpt} holds a run of another model config; use another --out or delete it")
    old = trainer["train_config"]
    changed = sorted(k for k, v in dataclasses.asdict(tc).items() if k not in RESUMABLE_CHANGES and old.get(k) != v)
    if changed:
        raise ValueError(f"{ckpt} was trained with other settings ({', '.join(changed)}); "
                         f"use the same settings to resume, or another --out")


def export_model(run_dir: str | os.PathLike, dest: str | os.PathLike, which: str = BEST_DIR) -> Path:
    """Copy a run's best (or other) model into a shippable folder with
    training.json (configs, command, history, wall time, hardware)."""
    run_dir, dest = Path(run_dir), Path(dest)
    src = run_dir / which
    ckpt = _find_checkpoint(run_dir)
    if not (src / "model.safetensors").is_file() or ckpt is None:
        raise FileNotFoundError(f"{src} holds no model; train first")
    trainer = json.loads((ckpt / "trainer.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copyfile(src / name, dest / name)
    summary = {k: trainer[k] for k in ("command", "model_config", "train_config", "history", "best", "hardware",
                                       "total_steps", "class_weights", "resumes")}
    summary["init_from"] = trainer.get("init_from")
    summary["exported"] = which
    summary["epochs_run"] = trainer["epoch"]
    summary["wall_time_s"] = round(trainer["elapsed_s"], 1)
    for k in ("out_dir", "export", "progress", "stop_at_step"):
        summary["train_config"].pop(k, None)
    (dest / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if (run_dir / "curve.png").is_file():
        shutil.copyfile(run_dir / "curve.png", dest / "curve.png")
    return dest


# -- command line --------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command to ``subparsers``; it sets ``func``."""
    d = TrainConfig()
    m = ModelConfig()
    p = subparsers.add_parser(
        "train", help="train a classifier on a corpus (resumes from --out if it holds a checkpoint)",
        description="Train a document classifier on the kernel-docs corpus. Running the same command again "
        "resumes from <out>/checkpoint. Writes history.json and curve.png into --out; --export copies the "
        "best-validation model into a shippable folder.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default="bsbr")
    g.add_argument("--hidden-dim", type=int, default=128)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--ff-dim", type=int, default=512)
    g.add_argument("--chunk-size", type=int, default=m.chunk_size)
    g.add_argument("--compression-factor", type=int, default=m.compression_factor)
    g.add_argument("--window", type=int, default=m.window)
    g.add_argument("--causal", action="store_true")
    g.add_argument("--max-length", type=int, default=None, help="standard only: read the first N tokens")
    g.add_argument("--dropout", type=float, default=0.1)
    t = p.add_argument_group("training")
    t.add_argument("--out", type=Path, default=None, help="run folder (default runs/<arch>[-<max_length>])")
    t.add_argument("--data", type=Path, default=None, help="corpus folder (default: the kernel-docs folder)")
    t.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default DATA/tokenizer.json)")
    t.add_argument("--token-cache", type=Path, default=None, help="token-id cache (default runs/token-cache)")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    t.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--grad-clip", type=float, default=d.grad_clip)
    t.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="padded tokens per batch")
    t.add_argument("--max-batch-docs", type=int, default=d.max_batch_docs)
    t.add_argument("--max-train-tokens", type=int, default=d.max_train_tokens, help="tokens per document per step")
    t.add_argument("--crop", choices=("random", "head"), default=d.crop)
    t.add_argument("--balance-power", type=float, default=d.balance_power,
                   help="class weight (n_max/n_c)**p: 0 none, 0.5 sqrt, 1 inverse frequency")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    t.add_argument("--val-max-tokens", type=int, default=None, help="cap validation documents (default whole)")
    t.add_argument("--stop-at-step", type=int, default=None, help="checkpoint and exit after this many steps")
    t.add_argument("--export", type=Path, default=None, help="write the best model here when training ends")
    t.add_argument("--init-from", type=Path, default=None,
                   help="start from this saved model's weights (same config); fresh optimizer and schedule")
    t.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from bsbr_core.data import DataError

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / (args.arch + (f"-{args.max_length}" if args.max_length else ""))
    model_fields = dict(
        arch=args.arch, hidden_dim=args.hidden_dim, num_layers=args.num_layers, num_heads=args.num_heads,
        ff_dim=args.ff_dim, chunk_size=args.chunk_size, compression_factor=args.compression_factor,
        window=args.window, causal=args.causal, max_length=args.max_length, dropout=args.dropout,
    )
    try:
        tc = TrainConfig(
            out_dir=str(out), data_dir=None if args.data is None else str(args.data),
            tokenizer=None if args.tokenizer is None else str(args.tokenizer),
            token_cache=None if args.token_cache is None else str(args.token_cache),
            epochs=args.epochs, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_frac=args.warmup_frac,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, batch_tokens=args.batch_tokens,
            max_batch_docs=args.max_batch_docs, max_train_tokens=args.max_train_tokens, crop=args.crop,
            balance_power=args.balance_power, seed=args.seed, device=args.device,
            checkpoint_every=args.checkpoint_every, val_max_tokens=args.val_max_tokens,
            stop_at_step=args.stop_at_step, export=None if args.export is None else str(args.export),
            progress=not args.no_progress, init_from=None if args.init_from is None else str(args.init_from),
        )
        # No vocab/labels yet: train() takes them from the tokenizer and the corpus.
        argv = sys.argv[1:] if sys.argv[1:2] == ["train"] else ["train", *sys.argv[1:]]
        trainer = train(model_fields, tc, command=" ".join(["python -m bsbr_core.cli", *argv])).record
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.get("stopped"):
        print(f"stopped at step {trainer['global_step']}; run the same command to resume")
    else:
        best = trainer["best"]
        print(f"done: {trainer['epoch']} epochs, {trainer['elapsed_s']:.0f}s; best validation accuracy "
              f"{best['val_accuracy']:.4f} (epoch {best['epoch']})" + (f"; exported to {tc.export}" if tc.export else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsbr_core.train")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
