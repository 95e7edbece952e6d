"""Held-out evaluation of a document classifier: accuracy and macro-F1,
overall and by document length, plus a confusion matrix.

    python -m bsbr_core.cli evaluate --model models/bsbr [--data data/kernel-docs] [--split test]

Writes ``metrics.json`` and ``confusion.png`` into the model folder (or
``--out``). Models always read whole documents: without autograd the
classifier runs long inputs segment by segment, so memory stays bounded
even for documents of tens of thousands of tokens (the ``max_length``
baseline truncates inside the model, as it does when served).

metrics.json holds no timings or dates, so evaluating the same checkpoint
on the same split twice writes the same file.

Length buckets count the document's tokens under the model's own tokenizer
(the whole document, also for the truncating baseline).

Token ids of each split are cached (safetensors, keyed by the sha256 of the
split file and of the tokenizer) because encoding the corpus takes longer
than evaluating a small model on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

# (name, lo, hi): a document of n tokens falls in the bucket with lo <= n <= hi.
LENGTH_BUCKETS = (
    ("<=512", 0, 512),
    ("513-1024", 513, 1024),
    ("1025-2048", 1025, 2048),
    ("2049-8192", 2049, 8192),
    (">8192", 8193, None),
)
METRICS_FORMAT = 1
# Padded tokens per inference batch; a longer document runs alone.
EVAL_BATCH_TOKENS = 16384


# -- tokenized splits ------------------------------------------------------------


@dataclass
class TokenizedSplit:
    """One split as token ids: ``docs[i]`` (int64 1-D tensor), ``labels[i]``
    (index into ``label_names``), ``paths[i]``."""

    docs: list[torch.Tensor]
    labels: list[int]
    paths: list[str]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def lengths(self) -> list[int]:
        return [int(d.numel()) for d in self.docs]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def load_tokenized(
    data_dir: str | os.PathLike,
    split: str,
    tokenizer,
    cache_dir: str | os.PathLike | None = None,
) -> TokenizedSplit:
    """Token ids of a corpus split (see :mod:`bsbr_core.data`), cached in
    ``cache_dir`` (default ``<data_dir>/../../runs/token-cache``, i.e.
    ``runs/token-cache`` of the checkout for the default data folder)."""
    from bsbr_core import data as data_lib
    from bsbr_core.tokenizer import encode_many

    data_dir = Path(data_dir)
    labels = data_lib.load_meta(data_dir)["labels"]
    split_file = data_dir / f"{split}.jsonl"
    if not split_file.is_file():
        raise data_lib.DataError(f"{split_file} not found; build the corpus first: bsbr-serve data kernel-docs")
    cache = Path(cache_dir) if cache_dir is not None else data_dir.resolve().parent.parent / "runs" / "token-cache"
    key = f"{split}-{sha256_file(split_file)[:16]}-{tokenizer_sha256(tokenizer)[:16]}"
    cache_file = cache / f"{key}.safetensors"
    if cache_file.is_file():
        t = load_file(str(cache_file))
        index = json.loads((cache / f"{key}.json").read_text())
        offsets = t["offsets"].tolist()
        ids = t["ids"].to(torch.int64)
        docs = [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        return TokenizedSplit(docs, index["labels"], index["paths"], index["label_names"])

    documents = data_lib.load_split(data_dir, split)
    encoded = encode_many(tokenizer, [d.text for d in documents])
    docs = [torch.tensor(e, dtype=torch.int64) for e in encoded]
    label_idx = [labels.index(d.label) for d in documents]
    paths = [d.path for d in documents]
    cache.mkdir(parents=True, exist_ok=True)
    offsets = torch.tensor([0] + [len(e) for e in encoded], dtype=torch.int64).cumsum(0)
    flat = torch.cat(docs).to(torch.int32) if docs else torch.zeros(0, dtype=torch.int32)
    tmp = cache / f"{key}.tmp"
    save_file({"ids": flat, "offsets": offsets}, str(tmp))
    (cache / f"{key}.json").write_text(json.dumps({"labels": label_idx, "paths": paths, "label_names": labels}))
    os.replace(tmp, cache_file)
    return TokenizedSplit(docs, label_idx, paths, labels)


# -- inference -------------------------------------------------------------------


def length_batches(lengths: Sequence[int], batch_tokens: int, max_docs: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size
    (docs x longest) stays within batch_tokens; a longer document runs alone.
    Deterministic: sorted by (length, index)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur, longest = [], [], 0
    for i in order:
        n = max(1, lengths[i])
        full = max_docs is not None and len(cur) >= max_docs
        if cur and (max(longest, n) * (len(cur) + 1) > batch_tokens or full):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def pad_batch(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors -> (ids (b, n) long, mask (b, n) bool)."""
    n = max(1, max(int(s.numel()) for s in seqs))
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, : s.numel()] = s
        mask[r, : s.numel()] = True
    if any(s.numel() == 0 for s in seqs):
        # An empty document still needs one position; its logits come from the bias.
        mask[:, 0] = True
    return ids, mask


@torch.no_grad()
def predict_logits(
    model,
    docs: Sequence[torch.Tensor],
    batch_tokens: int = EVAL_BATCH_TOKENS,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Logits (len(docs), num_labels) of whole documents (or their first
    max_tokens tokens), in the model's eval mode."""
    from tqdm import tqdm

    device = torch.device(device) if device is not None else model.device
    was_training = model.training
    model.eval()
    seqs = [d[:max_tokens] if max_tokens else d for d in docs]
    lengths = [int(s.numel()) for s in seqs]
    out = torch.zeros(len(seqs), model.config.num_labels)
    batches = length_batches(lengths, batch_tokens)
    bar = tqdm(total=sum(lengths), desc="evaluating", unit="tok", unit_scale=True, disable=not progress,
               mininterval=2.0)
    for idx in batches:
        ids, mask = pad_batch([seqs[i] for i in idx])
        logits = model(ids.to(device), mask.to(device))
        out[idx] = logits.float().cpu()
        bar.update(sum(lengths[i] for i in idx))
    bar.close()
    model.train(was_training)
    return out


# -- metrics ---------------------------------------------------------------------


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1 of integer labels.

    Macro-F1 averages over the classes that occur in y_true or y_pred (as
    scikit-learn does without an explicit label list), so a bucket is not
    penalised for classes it has no documents of and nobody predicted.
    """
    n = len(y_true)
    cm = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    f1s, per_class = [], []
    for c in range(num_labels):
        tp = cm[c][c]
        support = sum(cm[c])
        predicted = sum(cm[r][c] for r in range(num_labels))
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class.append({"support": support, "predicted": predicted, "precision": prec, "recall": rec, "f1": f1})
        if support or predicted:
            f1s.append(f1)
    correct = sum(cm[c][c] for c in range(num_labels))
    majority = max(Counter(y_true).values()) if n else 0
    return {
        "num_docs": n,
        "accuracy": correct / n if n else None,
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "majority_rate": majority / n if n else None,
        "confusion": cm,
        "per_class": per_class,
    }


def bucket_of(num_tokens: int) -> str:
    for name, lo, hi in LENGTH_BUCKETS:
        if num_tokens >= lo and (hi is None or num_tokens <= hi):
            return name
    raise AssertionError(num_tokens)


def round_floats(x, digits: int = 6):
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: round_floats(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [round_floats(v, digits) for v in x]
    return x


def evaluate_split(model, split: TokenizedSplit, batch_tokens: int = EVAL_BATCH_TOKENS, progress: bool = False,
                   device=None) -> dict:
    """Metrics of model on split: overall, per length bucket, per class."""
    if list(model.config.labels) != list(split.label_names):
        raise ValueError(f"model labels {model.config.labels} differ from the corpus labels {split.label_names}")
    logits = predict_logits(model, split.docs, batch_tokens, device=device, progress=progress)
    preds = logits.argmax(-1).tolist()
    K = model.config.num_labels
    lengths = split.lengths
    overall = classification_metrics(split.labels, preds, K)
    buckets = {}
    for name, _, _ in LENGTH_BUCKETS:
        idx = [i for i, n in enumerate(lengths) if bucket_of(n) == name]
        m = classification_metrics([split.labels[i] for i in idx], [preds[i] for i in idx], K)
        buckets[name] = {k: m[k] for k in ("num_docs", "accuracy", "macro_f1", "majority_rate")}
    per_class = {split.label_names[c]: overall["per_class"][c] for c in range(K)}
    return {
        "overall": {k: overall[k] for k in ("num_docs", "accuracy", "macro_f1", "majority_rate")},
        "buckets": buckets,
        "per_class": per_class,
        "confusion": overall["confusion"],
        "predictions": [{"path": p, "label": split.label_names[t], "pred": split.label_names[q], "tokens": n}
                        for p, t, q, n in zip(split.paths, split.labels, preds, lengths)],
    }


def plot_confusion(confusion: list[list[int]], labels: list[str], path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(labels)
    rows = [max(1, sum(r)) for r in confusion]
    norm = [[v / rows[i] for v in r] for i, r in enumerate(confusion)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * K, 0.8 + 0.45 * K))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(K):
        for j in range(K):
            if confusion[i][j]:
                ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i][j] > 0.5 else "black")
    ax.set_xticks(range(K), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(K), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_model(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_tokens: int = EVAL_BATCH_TOKENS,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a saved model on a corpus split; write metrics.json and
    confusion.png to out_dir (default: model_dir). Returns the metrics."""
    from bsbr_core import data as data_lib
    from bsbr_core.io import load_model

    model_dir = Path(model_dir)
    data_dir = Path(data_dir) if data_dir is not None else data_lib.default_kernel_docs_dir()
    out = Path(out_dir) if out_dir is not None else model_dir
    model, tokenizer = load_model(model_dir, device=device)
    meta = data_lib.load_meta(data_dir)
    tokens = load_tokenized(data_dir, split, tokenizer, cache_dir)
    result = evaluate_split(model, tokens, batch_tokens, progress=progress, device=device)
    cfg = model.config
    metrics = {
        "format": METRICS_FORMAT,
        "model": {"arch": cfg.arch, "max_length": cfg.max_length, "hidden_dim": cfg.hidden_dim,
                  "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "ff_dim": cfg.ff_dim,
                  "chunk_size": cfg.chunk_size,
                  "num_parameters": sum(p.numel() for p in model.parameters()),
                  "weights_sha256": sha256_file(model_dir / "model.safetensors")},
        "data": {"dataset": meta.get("dataset"), "package": meta.get("package"), "version": meta.get("version"),
                 "split": split, "split_sha256": sha256_file(data_dir / f"{split}.jsonl"),
                 "tokenizer_sha256": tokenizer_sha256(tokenizer)},
        "reads": "whole documents" if cfg.max_length is None else f"first {cfg.max_length} tokens of each document",
        "length_buckets_tokens": {name: [lo, hi] for name, lo, hi in LENGTH_BUCKETS},
        "labels": list(cfg.labels),
        **result,
    }
    metrics = round_floats(metrics)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out / "metrics.json")
    acc = metrics["overall"]["accuracy"]
    plot_confusion(metrics["confusion"], list(cfg.labels), out / "confusion.png",
                   f"{model_dir.name} on {split} ({metrics['overall']['num_docs']} docs, accuracy {acc:.3f})")
    return metrics


def format_table(metrics: dict) -> str:
    """One header line and one row per bucket: docs, accuracy, macro-F1, majority rate."""
    rows = [("overall", metrics["overall"])] + list(metrics["buckets"].items())
    lines = [f"{'tokens':<12}{'docs':>6}{'accuracy':>10}{'macro-F1':>10}{'majority':>10}"]
    for name, m in rows:
        def fmt(v):
            return f"{v:>10.3f}" if v is not None else f"{'-':>10}"
        lines.append(f"{name:<12}{m['num_docs']:>6}{fmt(m['accuracy'])}{fmt(m['macro_f1'])}{fmt(m['majority_rate'])}")
    return "\n".join(lines)


def _epochs_done(training: dict) -> str:
    done, planned = training["epochs_run"], training["train_config"]["epochs"]
    if done >= planned:
        return f"{done} epochs"
    return f"stopped after {done} of {planned} planned epochs, so its learning rate never decayed to the floor"


CARD_HISTORY = "card_history.json"


def archive_model_version(model_dir: str | os.PathLike, note: str) -> dict:
    """Before a model folder is overwritten by a new checkpoint: append the
    current version's test figures and training summary to card_history.json,
    which the model card lists under "Earlier versions"."""
    model_dir = Path(model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    training_file = model_dir / "training.json"
    tr = json.loads(training_file.read_text()) if training_file.is_file() else {}
    stages = [tr] if tr else []
    while stages and (stages[0].get("init_from") or {}).get("training"):
        stages.insert(0, stages[0]["init_from"]["training"])
    entry = {
        "note": note,
        "weights_sha256": metrics["model"]["weights_sha256"],
        "commands": [st.get("command") for st in stages],
        "max_train_tokens": [st.get("train_config", {}).get("max_train_tokens") for st in stages],
        "epochs": sum(st.get("epochs_run", 0) for st in stages),
        "overall": metrics["overall"],
        "buckets": metrics["buckets"],
    }
    path = model_dir / CARD_HISTORY
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append(entry)
    path.write_text(json.dumps(history, indent=2) + "\n")
    return entry


def write_model_card(model_dir: str | os.PathLike, eval_command: str | None = None,
                     eval_seconds: float | None = None) -> Path:
    """README.md of a model folder from its metrics.json and (when present)
    training.json (written by ``train --export``)."""
    model_dir = Path(model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    training_file = model_dir / "training.json"
    tr = json.loads(training_file.read_text()) if training_file.is_file() else None
    mc, data = metrics["model"], metrics["data"]
    name = model_dir.name
    reads = metrics["reads"]
    lines = [
        f"# {name}: {mc['arch']} document classifier for the Linux kernel documentation",
        "",
        f"Predicts the top-level folder of a document under the kernel's `Documentation/` "
        f"({len(metrics['labels'])} classes: {', '.join(metrics['labels'])}) from its text. "
        f"Reads {reads}.",
        "",
        "## Model",
        "",
        f"- arch `{mc['arch']}`, hidden {mc['hidden_dim']}, {mc['num_layers']} layers, {mc['num_heads']} heads, "
        f"ff {mc['ff_dim']}, chunk {mc['chunk_size']}" + (f", max_length {mc['max_length']}" if mc["max_length"] else "")
        + f"; {mc['num_parameters']:,} parameters (float32); see `config.json`.",
        "- Files: `config.json`, `model.safetensors`, `tokenizer.json` (byte-level BPE), `metrics.json` "
        "(test-split evaluation), `confusion.png`, `training.json` and `curve.png` (training record).",
        "- Load: `model, tokenizer = bsbr_core.load_model(\"models/" + name + "\")`.",
        "",
        "## Data",
        "",
        f"Debian `{data['package']}` {data['version']}: the `.rst`/`.txt` documents of `Documentation/`, labelled "
        "by top-level folder (folders with at least 40 documents, without translations/, devicetree/, "
        "features/), split 80/10/10 by a hash of the path. Built with `python -m bsbr_core.cli data kernel-docs`; "
        "tokenizer trained on the training split only with `python -m bsbr_core.cli tokenizer train`.",
        "",
    ]
    if tr is not None:
        # A run started with --init-from continues an earlier one: list every stage, oldest first.
        stages = [tr]
        while (stages[0].get("init_from") or {}).get("training"):
            stages.insert(0, stages[0]["init_from"]["training"])
        tc = tr["train_config"]
        total_s = sum(st["wall_time_s"] for st in stages)
        lines += [
            "## Training",
            "",
            f"- Hardware: {tr['hardware']}",
            f"- Wall time: {total_s / 60:.1f} min in all for {sum(st['epochs_run'] for st in stages)} epochs "
            "(including per-epoch validation; the CPU was shared with other jobs).",
        ]
        for k, st in enumerate(stages, 1):
            stc = st["train_config"]
            lines.append(
                (f"- Stage {k}" + (" (warm restart from stage " + str(k - 1) + "'s weights)" if k > 1 else "") + ": "
                 if len(stages) > 1 else "- Command: ")
                + f"`{st['command']}` ({_epochs_done(st)}, {st['history'][-1]['step'] if st['history'] else 0} "
                f"optimizer steps, peak lr {stc['lr']}, {st['wall_time_s'] / 60:.1f} min)")
        lines += [
            f"- AdamW (weight decay {tc['weight_decay']}, betas 0.9/0.98), "
            f"{tc['warmup_frac']:.0%} linear warmup then cosine to {tc['min_lr_ratio']} x lr, gradient clipping "
            f"{tc['grad_clip']}, batches of at most {tc['batch_tokens']} padded tokens (length-bucketed), class-weighted "
            f"cross-entropy (weight (n_max/n_c)^{tc['balance_power']}), dropout {tr['model_config']['dropout']}, "
            f"seed {tc['seed']}.",
            f"- Each training step reads a window of at most "
            f"{min(tc['max_train_tokens'], tr['model_config']['max_length'] or tc['max_train_tokens'])} tokens of a document "
            + ("(its first tokens)." if tr["model_config"]["max_length"] or tc["crop"] == "head"
               else "starting at a random chunk boundary (another window every epoch)."),
            f"- Shipped weights: the end of epoch {tr['best']['epoch']} of the last stage, its best validation accuracy"
            + (f" (validation documents read up to {tc['val_max_tokens']} tokens)." if tc.get("val_max_tokens")
               else " (whole validation documents)."),
            "",
            "| stage | epoch | train loss | validation accuracy | validation macro-F1 |",
            "|---:|---:|---:|---:|---:|",
        ]
        for k, st in enumerate(stages, 1):
            lines += [f"| {k} | {h['epoch']} | {h['train_loss']:.4f} | {h['val_accuracy']:.4f} | "
                      f"{h['val_macro_f1']:.4f} |" for h in st["history"]]
        lines += ["", "![convergence](curve.png)", ""]
    lines += [
        "## Test accuracy",
        "",
        f"{metrics['overall']['num_docs']} held-out test documents, whole documents, by length in tokens of this "
        "tokenizer. Majority = share of the most common class in that bucket (what always answering it scores).",
        "",
        "| tokens | docs | accuracy | macro-F1 | majority |",
        "|---|---:|---:|---:|---:|",
    ]
    for bucket, m in [("all", metrics["overall"]), *metrics["buckets"].items()]:
        def f(v):
            return "-" if v is None else f"{v:.3f}"
        lines.append(f"| {bucket} | {m['num_docs']} | {f(m['accuracy'])} | {f(m['macro_f1'])} | {f(m['majority_rate'])} |")
    cmd = eval_command or f"python -m bsbr_core.cli evaluate --model models/{name}"
    lines += [
        "",
        "![confusion matrix](confusion.png)",
        "",
        "Reproduce the numbers (writes the same `metrics.json`): `" + cmd + "`"
        + (f" ({eval_seconds:.0f} s on the training hardware)." if eval_seconds is not None else "."),
        "",
    ]
    history_file = model_dir / CARD_HISTORY
    if history_file.is_file():
        lines += ["## Earlier versions", "",
                  "Test figures of the checkpoints this folder shipped before (newest last), same test split:", "",
                  "| version | how it was trained | all | " + " | ".join(metrics["buckets"]) + " |",
                  "|---|---|---|" + "---|" * len(metrics["buckets"])]

        def acc_f1(m):
            return "-" if m.get("accuracy") is None else f"{m['accuracy']:.3f} / {m['macro_f1']:.3f}"
        for k, old in enumerate(json.loads(history_file.read_text()), 1):
            lines.append(f"| {k} | {old['note']} ({old['epochs']} epochs, windows of {old['max_train_tokens']} "
                         f"tokens) | {acc_f1(old['overall'])} | "
                         + " | ".join(acc_f1(old["buckets"].get(b, {})) for b in metrics["buckets"]) + " |")
        lines += ["", "(accuracy / macro-F1)", ""]
    lines += [
        "## Limits",
        "",
        "- Small model trained for minutes on two shared CPU cores; the test split is small "
        f"({metrics['overall']['num_docs']} documents, {metrics['buckets']['>8192']['num_docs']} over 8192 tokens), "
        "so bucket accuracies carry wide error bars.",
        "- The label is a folder name; some documents could fit several folders.",
        "",
    ]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


# -- command line ------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command to ``subparsers``; it sets ``func``."""
    p = subparsers.add_parser(
        "evaluate", help="accuracy and macro-F1 of a saved model on a corpus split, by length",
        description="Evaluate a saved model (whole documents) on a split of the kernel-docs corpus; write "
        "metrics.json and confusion.png into the model folder (or --out).",
    )
    p.add_argument("--model", type=Path, required=True, help="saved model folder (config.json, model.safetensors, ...)")
    p.add_argument("--data", type=Path, default=None, help="corpus folder (default: the kernel-docs folder)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--out", type=Path, default=None, help="where to write metrics.json (default: --model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--batch-tokens", type=int, default=EVAL_BATCH_TOKENS)
    p.add_argument("--cache-dir", type=Path, default=None, help="token-id cache (default runs/token-cache)")
    p.add_argument("--card", action="store_true",
                   help="also write the model card README.md (from metrics.json and training.json)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from bsbr_core.data import DataError

    t0 = time.perf_counter()
    try:
        metrics = evaluate_model(args.model, args.data, args.split, args.out, args.device, args.batch_tokens,
                                 args.cache_dir)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.model
    seconds = time.perf_counter() - t0
    print(format_table(metrics))
    print(f"wrote {out / 'metrics.json'} and {out / 'confusion.png'} ({seconds:.1f}s)")
    if args.card:
        argv = [a for a in sys.argv[1:] if a != "--card"]
        argv = argv if argv[:1] == ["evaluate"] else ["evaluate", *argv]
        print(f"wrote {write_model_card(out, ' '.join(['python -m bsbr_core.cli', *argv]), seconds)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsbr_core.evaluate")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
