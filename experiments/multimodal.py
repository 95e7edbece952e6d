"""Multi-modal: text, image and joint (text + image in one sequence) accuracy, BSBR against standard.

    python -m experiments run multimodal --profile cpu

Small and synthetic: exactly what it is.

- **image**: scikit-learn's bundled 8x8 digits (``load_digits``: 1797
  images, intensities 0..16), upscaled to ``image_side`` x ``image_side``
  (bilinear, torch ``interpolate``, align_corners False), each pixel
  quantised to ``levels`` intensity tokens (level = min(levels - 1,
  floor(v * levels / 16))) and read row by row: one token per pixel, as the
  Long Range Arena reads images. Ten classes. The images are split per class
  (seeded) into train / validation / test, disjoint.
- **text**: kernel-docs documents of ``text_classes`` (the corpus's own
  train / validation / test splits), label-naming path mentions masked
  (experiments.kernel_docs), tokenised with models/bsbr's tokenizer and cut
  to their first ``text_tokens`` tokens. The ``text_vocab`` most frequent
  tokenizer ids of the training texts keep an id of their own; the rest
  share UNK. The smoke profile has no corpus: its text is a stand-in,
  sentences drawn from two fixed word lists (``synthetic_text``).
- **joint**: text tokens, SEP, then an image's pixel tokens, in one
  sequence. The label is the pair (text class t, digit class j) of
  ``joint_digits``: t * len(joint_digits) + j. Each document is paired with
  ``joint_pairs_per_doc`` images of its own split; within each text class
  the digit classes take turns, and the image is drawn independently of the
  document, so neither part says anything about the other part's class. The
  single-modality ceilings (an oracle that knows the true class of one part
  and the test set's label counts, and nothing of the other part) are
  computed from the test pairs (:func:`single_modality_ceilings`).

One vocabulary serves all three tasks (pixel levels, SEP, UNK, text tokens),
so one ModelConfig (hidden 64, 2 layers) serves every training. Each
(task, arch) trains through bsbr_core.train with in-memory splits and the
same budget for both archs, resumes from its checkpoint, and caches its
test predictions in the work folder. Accuracy has a 95% percentile-bootstrap
interval; joint test pairs that share a document are resampled together.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import torch

ARCHS = ("bsbr", "standard")
TASKS = ("text", "image", "joint")

# The research page's multi-modal table (accuracy).
CLAIMS = {
    "accuracy": {
        "bsbr": {"text": 0.92, "image": 0.88, "joint": 0.85},
        "standard": {"text": 0.89, "image": 0.85, "joint": 0.82},
    },
}

SEP, UNK = "SEP", "UNK"
DIGIT_MAX = 16  # load_digits intensities are integers 0..16

# The smoke profile's stand-in for kernel-docs: class c's sentences draw each
# word from CLASS_WORDS[c] with probability 1/2, else from SHARED_WORDS.
SHARED_WORDS = ("the", "a", "of", "and", "to", "in", "is", "it", "on", "with")
CLASS_WORDS = (
    ("river", "stone", "cloud", "leaf", "hill", "rain", "moss", "wind"),
    ("wire", "clock", "gear", "valve", "pump", "relay", "fuse", "lever"),
)


@dataclass
class MultimodalSettings:
    # Text: "kernel_docs" (the corpus) or "synthetic" (the smoke stand-in).
    text_source: str = "kernel_docs"
    text_classes: tuple[str, ...] = ("admin-guide", "userspace-api")
    text_tokens: int = 128
    text_vocab: int = 2048
    synthetic_docs: tuple[int, int, int] = (64, 16, 32)  # train, validation, test (synthetic text only)
    # Image.
    image_side: int = 16
    levels: int = 16
    image_val_frac: float = 0.1
    image_test_frac: float = 0.25
    image_limit: int | None = None  # use only this many digits (smoke)
    # Joint.
    joint_digits: tuple[int, ...] = (0, 1, 2, 3, 4)
    joint_pairs_per_doc: tuple[int, int, int] = (2, 2, 3)  # train, validation, test
    # Model and budget: the same for every (task, arch).
    model: dict = field(default_factory=lambda: dict(
        hidden_dim=64, num_layers=2, num_heads=2, ff_dim=128, chunk_size=32, window=64,
        pooling="attention", dropout=0.1))
    archs: tuple[str, ...] = ARCHS
    tasks: tuple[str, ...] = TASKS
    epochs: dict = field(default_factory=lambda: {"text": 12, "image": 20, "joint": 14})
    lr: float = 2e-3
    batch_tokens: int = 4096
    max_batch_docs: int = 32
    seed: int = 0
    workers: int = 1
    threads_per_worker: int = 1
    bootstrap: int = 1000


PROFILES = {
    "smoke": MultimodalSettings(
        text_source="synthetic", text_classes=("nature", "machine"), text_tokens=24, text_vocab=64,
        synthetic_docs=(40, 8, 16), image_side=8, image_limit=240, joint_digits=(0, 1), joint_pairs_per_doc=(1, 1, 1),
        model=dict(hidden_dim=16, num_layers=1, num_heads=2, ff_dim=16, chunk_size=16, window=16,
                   pooling="attention", dropout=0.0),
        epochs={"text": 1, "image": 1, "joint": 1}, batch_tokens=1024, bootstrap=100,
    ),
    "cpu": MultimodalSettings(),
    "gpu": MultimodalSettings(
        text_tokens=1024, text_vocab=4096, image_side=32, joint_pairs_per_doc=(6, 1, 3),
        model=dict(hidden_dim=128, num_layers=4, num_heads=4, ff_dim=256, chunk_size=64, window=128,
                   pooling="attention", dropout=0.1),
        epochs={"text": 20, "image": 30, "joint": 20}, batch_tokens=16384, max_batch_docs=64, threads_per_worker=8,
    ),
}

# Settings that do not change what is trained or scored.
_NOT_IN_KEY = ("workers", "threads_per_worker", "bootstrap", "archs", "tasks")


def settings_key(s: MultimodalSettings) -> str:
    d = {k: v for k, v in dataclasses.asdict(s).items() if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- images -> pixel tokens ---------------------------------------------------------


def pixel_tokens(images: torch.Tensor, side: int, levels: int) -> torch.Tensor:
    """(N, 8, 8) intensities in [0, 16] -> (N, side * side) int64 levels in [0, levels).

    Bilinear upscaling (align_corners False; side 8 keeps the image as it is),
    then level = min(levels - 1, floor(v * levels / 16)), read row by row."""
    x = images.to(torch.float64)[:, None]
    if side != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    # Rounded first, so that a value on a level boundary is not put below it by rounding error.
    q = torch.floor(torch.round(x[:, 0] * levels / DIGIT_MAX, decimals=6)).clamp(0, levels - 1).to(torch.int64)
    return q.reshape(len(images), side * side)


@functools.lru_cache(maxsize=1)
def _bundled_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, tuple(int(t) for t in d.target)


def load_digit_images(limit: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """scikit-learn's bundled digits (no download): (N, 8, 8) float64 in [0, 16], labels 0..9."""
    images, target = _bundled_digits()
    images, target = torch.tensor(images), list(target)
    if limit is not None:
        images, target = images[:limit], target[:limit]
    return images, target


def digit_splits(target: Sequence[int], val_frac: float, test_frac: float, seed: int) -> dict[str, list[int]]:
    """Image indices per split, stratified by digit (each class shuffled by the seed), disjoint."""
    out = {"train": [], "validation": [], "test": []}
    for digit in sorted(set(target)):
        idx = [i for i, t in enumerate(target) if t == digit]
        random.Random(f"multimodal/digits/{seed}/{digit}").shuffle(idx)
        n_test, n_val = round(test_frac * len(idx)), round(val_frac * len(idx))
        out["test"] += idx[:n_test]
        out["validation"] += idx[n_test : n_test + n_val]
        out["train"] += idx[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


# -- text -------------------------------------------------------------------------


@dataclass
class TextSplit:
    """Documents as lists of token names (before the shared vocabulary)."""

    docs: list[list[str]]
    labels: list[int]
    paths: list[str]


def kernel_docs_text(s: MultimodalSettings) -> dict[str, TextSplit]:
    """The corpus's splits of text_classes, each document's first text_tokens tokenizer pieces."""
    from bsbr_core import data as data_lib
    from bsbr_core.tokenizer import encode_many, load_tokenizer
    from experiments.kernel_docs import leak_pattern, mask_leaks
    from experiments.runner import ROOT

    tok = load_tokenizer(ROOT.parent / "models" / "bsbr" / "tokenizer.json")
    data_dir = data_lib.default_kernel_docs_dir()
    pattern = leak_pattern(data_lib.load_meta(data_dir)["labels"])
    out = {}
    for split in ("train", "validation", "test"):
        docs = [d for d in data_lib.load_split(data_dir, split) if d.label in s.text_classes]
        texts = [mask_leaks(d.text, pattern)[0] for d in docs]
        # Encoding only a head of each text is enough for text_tokens pieces (a piece spans >= 1 character)...
        heads = encode_many(tok, [t[: 16 * s.text_tokens] for t in texts])
        # ...unless its pieces are unusually long; then the whole text.
        short = [i for i, h in enumerate(heads) if len(h) < s.text_tokens < len(texts[i])]
        for i, ids in zip(short, encode_many(tok, [texts[i] for i in short])):
            heads[i] = ids
        out[split] = TextSplit([[f"bpe:{tok.id_to_token(t)}" for t in h[: s.text_tokens]] for h in heads],
                               [s.text_classes.index(d.label) for d in docs], [d.path for d in docs])
    return out


def synthetic_text(s: MultimodalSettings) -> dict[str, TextSplit]:
    """Stand-in text (no corpus): class c's documents of text_tokens words, each
    word from CLASS_WORDS[c] or SHARED_WORDS with probability 1/2 each."""
    if len(s.text_classes) != len(CLASS_WORDS):
        raise ValueError(f"synthetic text has {len(CLASS_WORDS)} classes, settings name {len(s.text_classes)}")
    out = {}
    for split, count in zip(("train", "validation", "test"), s.synthetic_docs):
        rng = random.Random(f"multimodal/synthetic-text/{s.seed}/{split}")
        docs, labels, paths = [], [], []
        for i in range(count):
            c = i % len(CLASS_WORDS)
            words = [rng.choice(CLASS_WORDS[c] if rng.random() < 0.5 else SHARED_WORDS) for _ in range(s.text_tokens)]
            docs.append([f"w:{w}" for w in words])
            labels.append(c)
            paths.append(f"synthetic/{split}/{i}")
        out[split] = TextSplit(docs, labels, paths)
    return out


def build_vocabulary(train_docs: Sequence[Sequence[str]], text_vocab: int, levels: int) -> list[str]:
    """Token names, id = index: px0..px{levels-1}, SEP, UNK, then the text_vocab
    most frequent names of the training texts (ties by name)."""
    counts: dict[str, int] = {}
    for doc in train_docs:
        for name in doc:
            counts[name] = counts.get(name, 0) + 1
    text = sorted(counts, key=lambda n: (-counts[n], n))[:text_vocab]
    return [f"px{i}" for i in range(levels)] + [SEP, UNK] + text


# -- the three tasks ----------------------------------------------------------------


def joint_pairs(text_labels: Sequence[int], images_by_digit: dict[int, list[int]], per_doc: int,
                rng: random.Random) -> list[tuple[int, int, int]]:
    """(document, image, digit class index) triples, per_doc for each document.

    Within each text class the slots are shuffled and the digit classes take
    turns, so their counts differ by at most one; each slot's image is the
    next of its digit's images, shuffled (reused only when they run out)."""
    k = len(images_by_digit)
    pools = {j: [] for j in range(k)}
    digits = sorted(images_by_digit)

    def next_image(j: int) -> int:
        if not pools[j]:
            pools[j] = list(images_by_digit[digits[j]])
            rng.shuffle(pools[j])
        return pools[j].pop()

    out = []
    for t in sorted(set(text_labels)):
        slots = [(doc, r) for doc, lab in enumerate(text_labels) if lab == t for r in range(per_doc)]
        rng.shuffle(slots)
        out += [(doc, next_image(i % k), i % k) for i, (doc, _) in enumerate(slots)]
    return sorted(out)


def joint_label(text_class: int, digit_index: int, num_digits: int) -> int:
    return text_class * num_digits + digit_index


def single_modality_ceilings(text_classes: Sequence[int], digit_indices: Sequence[int],
                             labels: Sequence[int]) -> dict[str, float]:
    """Best accuracy of a predictor that knows only one part's class: for each
    value of that class, the most frequent joint label among the pairs."""
    def ceiling(part):
        table: dict[int, dict[int, int]] = {}
        for v, y in zip(part, labels):
            table.setdefault(v, {}).setdefault(y, 0)
            table[v][y] += 1
        return sum(max(c.values()) for c in table.values()) / len(labels)

    return {"text_only": ceiling(text_classes), "image_only": ceiling(digit_indices)}


@dataclass
class TaskData:
    """One task's splits (bsbr_core.evaluate.TokenizedSplit), its class names and,
    for the test split, the group of each item (items of a group are resampled together)."""

    splits: dict
    labels: list[str]
    test_groups: list[str]
    # joint only: the text class and digit index of each test pair.
    test_parts: tuple[list[int], list[int]] | None = None


def build_tasks(s: MultimodalSettings) -> tuple[list[str], dict[str, TaskData]]:
    """(vocabulary, {task: TaskData}) for the three tasks; a pure function of s."""
    from bsbr_core.evaluate import TokenizedSplit

    text = synthetic_text(s) if s.text_source == "synthetic" else kernel_docs_text(s)
    vocab = build_vocabulary(text["train"].docs, s.text_vocab, s.levels)
    index = {n: i for i, n in enumerate(vocab)}
    sep, unk = index[SEP], index[UNK]
    text_ids = {sp: [torch.tensor([index.get(n, unk) for n in d], dtype=torch.int64) for d in ts.docs]
                for sp, ts in text.items()}
    images, target = load_digit_images(s.image_limit)
    pixels = pixel_tokens(images, s.image_side, s.levels)  # ids 0..levels-1 are the pixel levels
    image_idx = digit_splits(target, s.image_val_frac, s.image_test_frac, s.seed)

    digit_labels = [str(d) for d in range(10)]
    t_names = list(s.text_classes)
    joint_names = [f"{t}|{d}" for t in t_names for d in s.joint_digits]
    k = len(s.joint_digits)
    tasks = {name: {} for name in TASKS}
    test_groups, test_parts = {}, None
    for sp, per_doc in zip(("train", "validation", "test"), s.joint_pairs_per_doc):
        ts = text[sp]
        tasks["text"][sp] = TokenizedSplit(text_ids[sp], list(ts.labels), list(ts.paths), t_names)
        idx = image_idx[sp]
        tasks["image"][sp] = TokenizedSplit([pixels[i].clone() for i in idx], [target[i] for i in idx],
                                            [f"digits/{i}" for i in idx], digit_labels)
        by_digit = {d: [i for i in idx if target[i] == d] for d in s.joint_digits}
        rng = random.Random(f"multimodal/joint/{s.seed}/{sp}")
        pairs = joint_pairs(ts.labels, by_digit, per_doc, rng)
        docs = [torch.cat([text_ids[sp][doc], torch.tensor([sep]), pixels[img]]) for doc, img, _ in pairs]
        labels = [joint_label(ts.labels[doc], j, k) for doc, _, j in pairs]
        tasks["joint"][sp] = TokenizedSplit(docs, labels, [f"{ts.paths[doc]}+digits/{img}" for doc, img, _ in pairs],
                                            joint_names)
        if sp == "test":
            test_groups = {"text": list(ts.paths), "image": [f"digits/{i}" for i in idx],
                           "joint": [ts.paths[doc] for doc, _, _ in pairs]}
            test_parts = ([ts.labels[doc] for doc, _, _ in pairs], [j for _, _, j in pairs])
    names = {"text": t_names, "image": digit_labels, "joint": joint_names}
    return vocab, {t: TaskData(tasks[t], names[t], test_groups[t], test_parts if t == "joint" else None)
                   for t in TASKS}


def vocabulary_tokenizer(vocab: Sequence[str]):
    """A WordLevel tokenizer naming every id (saved with the checkpoints, so load_model loads them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


# -- scores ------------------------------------------------------------------------


def grouped_bootstrap_ci(values: Sequence[float], groups: Sequence[str], n_boot: int, seed: int,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item values (correct:
    the accuracy; correct_a - correct_b: a paired difference), resampling
    groups (all items of a group together); one item a group: the plain bootstrap."""
    by_group: dict[str, list[float]] = {}
    for c, g in zip(values, groups):
        by_group.setdefault(g, []).append(float(c))
    sums = [(sum(v), len(v)) for v in by_group.values()]
    rng = random.Random(seed)
    vals = []
    for _ in range(n_boot):
        draw = [sums[rng.randrange(len(sums))] for _ in sums]
        vals.append(sum(a for a, _ in draw) / sum(n for _, n in draw))
    vals.sort()
    return vals[math.floor((1 - level) / 2 * (n_boot - 1))], vals[math.ceil((1 + level) / 2 * (n_boot - 1))]


def _train_and_score(task: str, arch: str, s: MultimodalSettings, work_dir: str, device: str) -> dict:
    """Train one (task, arch) (resuming), score it on the test split; returns its row."""
    from bsbr_core import load_model
    from bsbr_core.evaluate import predict_logits
    from bsbr_core.train import TrainConfig, TrainData, train

    torch.set_num_threads(s.threads_per_worker)
    key = settings_key(s)
    run_dir = Path(work_dir) / key / f"{task}-{arch}"
    scores_file = run_dir / "scores.json"
    if scores_file.is_file():
        return json.loads(scores_file.read_text())
    vocab, tasks = build_tasks(s)
    td = tasks[task]
    data = TrainData(td.splits["train"], td.splits["validation"], vocabulary_tokenizer(vocab), td.labels)
    longest = max(d.numel() for sp in td.splits.values() for d in sp.docs)
    tc = TrainConfig(out_dir=str(run_dir), epochs=s.epochs[task], lr=s.lr, batch_tokens=max(s.batch_tokens, longest),
                     max_batch_docs=s.max_batch_docs, max_train_tokens=longest, crop="head", balance_power=0.0,
                     seed=s.seed, device=device, checkpoint_every=100, progress=False)
    load_before, cpu0 = [round(x, 2) for x in os.getloadavg()], time.process_time()
    record = train({**s.model, "arch": arch}, tc, command=f"experiments.multimodal ({task}, {arch})", data=data).record
    # CPU seconds of this call only: a resumed training counts the part done here.
    cpu_s, load_after = time.process_time() - cpu0, [round(x, 2) for x in os.getloadavg()]
    model, _ = load_model(run_dir / "best", device=device)
    test = td.splits["test"]
    pred = predict_logits(model, test.docs, batch_tokens=max(s.batch_tokens, longest), device=device).argmax(-1).tolist()
    row = {
        "task": task, "arch": arch, "settings_key": key, "model_config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_items": len(td.splits["train"]), "validation_items": len(td.splits["validation"]),
        "test_items": len(test), "test_groups": len(set(td.test_groups)),
        "tokens_per_item": {sp: [min(x.lengths), max(x.lengths)] for sp, x in td.splits.items()},
        "test_labels": test.labels, "test_predictions": pred,
        "history": record["history"], "best": record["best"], "steps": record["global_step"],
        "train_wall_s": round(record["elapsed_s"], 1), "train_cpu_s_this_run": round(cpu_s, 1),
        "resumes": record["resumes"], "load_average_before": load_before, "load_average_after": load_after,
    }
    scores_file.write_text(json.dumps(row, indent=1) + "\n")
    return row


def _score(row: dict, td: TaskData, s: MultimodalSettings) -> dict:
    y, p = row["test_labels"], row["test_predictions"]
    correct = [a == b for a, b in zip(y, p)]
    out = {"accuracy": sum(correct) / len(correct),
           "accuracy_ci": list(grouped_bootstrap_ci(correct, td.test_groups, s.bootstrap, s.seed))}
    if td.test_parts is not None:
        # Which part of the joint label the model got right.
        k = len(s.joint_digits)
        t_true, j_true = td.test_parts
        out["text_part_accuracy"] = sum(pp // k == t for pp, t in zip(p, t_true)) / len(p)
        out["digit_part_accuracy"] = sum(pp % k == j for pp, j in zip(p, j_true)) / len(p)
    return out


def run(s: MultimodalSettings, ctx) -> dict:
    vocab, tasks = build_tasks(s)
    jobs = [(t, a) for t in s.tasks for a in s.archs]
    ctx.log(f"{len(jobs)} trainings (vocabulary {len(vocab)}; text from {s.text_source})")
    rows = {}
    if s.workers > 1:
        with ProcessPoolExecutor(s.workers, mp_context=get_context("spawn")) as pool:
            futures = {j: pool.submit(_train_and_score, *j, s, str(ctx.work_dir), ctx.device) for j in jobs}
            for j, f in futures.items():
                rows[j] = f.result()
                ctx.log(f"{j}: trained in {rows[j]['train_wall_s']:.0f}s")
    else:
        for j in jobs:
            rows[j] = _train_and_score(*j, s, str(ctx.work_dir), ctx.device)
            ctx.log(f"{j}: trained in {rows[j]['train_wall_s']:.0f}s")
    results = {t: {} for t in s.tasks}
    for (t, a), row in rows.items():
        results[t][a] = {**_score(row, tasks[t], s),
                         **{k: row[k] for k in ("parameters", "steps", "train_wall_s", "best", "history",
                                                "train_items", "validation_items", "test_items", "test_groups",
                                                "tokens_per_item", "train_cpu_s_this_run", "resumes",
                                                "load_average_before", "load_average_after")}}
    for t in s.tasks:
        if "bsbr" in results[t] and "standard" in results[t]:
            # Both archs score the same test items: the difference's interval resamples them once for both.
            rb, rs = rows[(t, "bsbr")], rows[(t, "standard")]
            diff = [int(p == y) - int(q == y) for y, p, q in zip(rb["test_labels"], rb["test_predictions"],
                                                                  rs["test_predictions"])]
            results[t]["bsbr_minus_standard"] = {
                "accuracy": sum(diff) / len(diff),
                "accuracy_ci": list(grouped_bootstrap_ci(diff, tasks[t].test_groups, s.bootstrap, s.seed))}
    joint = tasks["joint"]
    t_parts, j_parts = joint.test_parts
    ceilings = single_modality_ceilings(t_parts, j_parts, joint.splits["test"].labels)
    chance = {t: _majority_rate(tasks[t].splits["test"].labels) for t in TASKS}
    out = {
        "vocab_size": len(vocab), "text_source": s.text_source, "tasks": results,
        "image_count": sum(len(tasks["image"].splits[sp]) for sp in ("train", "validation", "test")),
        "joint_ceilings": ceilings, "majority_rate": chance,
        "text_unk_rate": {sp: _unk_rate(tasks["text"].splits[sp].docs, vocab.index(UNK))
                          for sp in ("train", "validation", "test")},
        "test_counts": {t: len(tasks[t].splits["test"]) for t in TASKS},
    }
    _plot_accuracy(out, ctx.out_dir / "multimodal.png")
    _plot_example(s, vocab, tasks, ctx.out_dir / "multimodal_example.png")
    return out


def _unk_rate(docs: Sequence[torch.Tensor], unk: int) -> float:
    return sum(int((d == unk).sum()) for d in docs) / max(1, sum(d.numel() for d in docs))


def _majority_rate(labels: Sequence[int]) -> float:
    return max(labels.count(c) for c in set(labels)) / len(labels)


# -- figures -------------------------------------------------------------------------


def _plot_accuracy(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(out["tasks"])
    archs = [a for a in ARCHS if any(a in out["tasks"][t] for t in tasks)]
    fig, ax = plt.subplots(figsize=(7, 5.2))
    width = 0.8 / max(1, len(archs))
    for i, a in enumerate(archs):
        xs = [j + (i - (len(archs) - 1) / 2) * width for j in range(len(tasks))]
        acc = [out["tasks"][t][a]["accuracy"] for t in tasks]
        err = [[v - out["tasks"][t][a]["accuracy_ci"][0] for v, t in zip(acc, tasks)],
               [out["tasks"][t][a]["accuracy_ci"][1] - v for v, t in zip(acc, tasks)]]
        bars = ax.bar(xs, acc, width, yerr=err, capsize=3, label=f"{a} (measured, 95% interval)")
        claim = CLAIMS["accuracy"].get(a, {})
        ax.scatter([x for x, t in zip(xs, tasks) if t in claim], [claim[t] for t in tasks if t in claim],
                   marker="D", s=36, color=bars[0].get_facecolor(), edgecolors="k", zorder=5)
        for x, v in zip(xs, acc):
            ax.text(x, 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=7, color="white")
    ax.scatter([], [], marker="D", s=36, color="white", edgecolors="k", label="the page's claim (arch's colour)")
    for j, t in enumerate(tasks):
        ax.hlines(out["majority_rate"][t], j - 0.45, j + 0.45, colors="gray", linestyles="-.", lw=1,
                  label="majority class of the test set" if j == 0 else None)
    if "joint" in tasks:
        j = tasks.index("joint")
        for name, ls in (("text_only", ":"), ("image_only", "--")):
            ax.hlines(out["joint_ceilings"][name], j - 0.45, j + 0.45, colors="k", linestyles=ls,
                      label=f"joint: {name.replace('_', ' ')} ceiling ({out['joint_ceilings'][name]:.2f})")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({out['test_counts'][t]} test items)" for t in tasks])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    source = out["text_source"].replace("_", "-")
    ax.set_title(f"multimodal ({source} text, digits as pixel tokens), small and synthetic", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_example(s: MultimodalSettings, vocab: list[str], tasks: dict, path: Path) -> None:
    """The first joint test pair: its digit (8x8 original, upscaled pixel tokens) and the whole sequence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, target = load_digit_images(s.image_limit)
    joint = tasks["joint"].splits["test"]
    seq, doc_path = joint.docs[0], joint.paths[0].split("+")[0]
    i = int(joint.paths[0].split("+")[1].split("/")[1])
    side, sep = s.image_side, vocab.index(SEP)
    cut = int((seq == sep).nonzero()[0])
    fig = plt.figure(figsize=(10, 4.6))
    grid = fig.add_gridspec(2, 3, height_ratios=[3, 1], width_ratios=[1, 1, 2.2])
    ax0, ax1 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax0.imshow(images[i].numpy(), cmap="gray_r", vmin=0, vmax=DIGIT_MAX)
    ax0.set_title(f"digit {target[i]}: the 8x8 original (0..16)", fontsize=8)
    ax1.imshow(seq[cut + 1 :].reshape(side, side).numpy(), cmap="gray_r", vmin=0, vmax=s.levels - 1)
    ax1.set_title(("not upscaled" if side == 8 else f"{side}x{side} bilinear") + f", {s.levels} levels:\n"
                  f"{side * side} pixel tokens, row by row", fontsize=8)
    for ax in (ax0, ax1):
        ax.set_xticks([])
        ax.set_yticks([])
    ax2 = fig.add_subplot(grid[0, 2])
    ax2.axis("off")
    # Byte-level pieces shown as text (a leading space is stored as G-dot, a newline as C-dot).
    pieces = ["<UNK>" if t == vocab.index(UNK) else vocab[t].split(":", 1)[-1].replace("\u0120", " ")
              .replace("\u010a", "\n") for t in seq[:cut].tolist()]
    lines = [w for line in "".join(pieces).split("\n") if line.strip() for w in textwrap.wrap(line, 72)]
    ax2.text(0, 1, f"text: {doc_path}, its first {cut} tokens\n(<UNK>: outside the shared vocabulary)\n\n"
             + "\n".join(lines[:14]) + ("\n..." if len(lines) > 14 else ""),
             va="top", fontsize=6.5, family="monospace", transform=ax2.transAxes)
    # The sequence as one strip: text tokens blue, SEP red, pixel tokens by intensity.
    rgb = torch.ones(len(seq), 3)
    rgb[:cut] = torch.tensor([0.55, 0.7, 0.9])
    rgb[cut] = torch.tensor([0.85, 0.1, 0.1])
    rgb[cut + 1 :] = (1 - seq[cut + 1 :].float() / (s.levels - 1))[:, None]
    ax3 = fig.add_subplot(grid[1, :])
    ax3.imshow(rgb[None].numpy(), aspect="auto", interpolation="nearest")
    ax3.set_yticks([])
    ax3.set_xlabel("token position")
    ax3.set_title(f"the joint sequence: {cut} text tokens (blue), SEP (red), {side * side} pixel tokens; "
                  f"label {tasks['joint'].labels[joint.labels[0]]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- report ---------------------------------------------------------------------------


def report(record: dict) -> str:
    r, s = record["results"], record["settings"]
    m = s["model"]
    k = len(s["joint_digits"])
    tasks = list(r["tasks"])
    archs = [a for a in ARCHS if any(a in r["tasks"][t] for t in tasks)]
    text_what = (f"kernel-docs documents of {' and '.join(f'`{c}`' for c in s['text_classes'])} (the corpus's "
                 f"train / validation / test splits), label-naming `Documentation/<class>/` mentions masked, tokenised "
                 f"with models/bsbr's tokenizer and cut to their first {s['text_tokens']} tokens; the "
                 f"{s['text_vocab']} most frequent tokens of the training texts keep their own id, the rest share UNK "
                 f"({r['text_unk_rate']['test']:.0%} of the test texts' tokens)"
                 if r["text_source"] == "kernel_docs" else
                 "a synthetic stand-in (no corpus): sentences of two classes, each word drawn from the class's fixed "
                 f"word list or a shared list, {s['text_tokens']} words each")
    counts = r["test_counts"]
    lines = [
        "Small and synthetic: exactly what it is.",
        "",
        "**What was run.** Three classification tasks, each trained from scratch for BSBR and for standard "
        f"(hidden {m['hidden_dim']}, {m['num_layers']} layer{'s' if m['num_layers'] != 1 else ''}, "
        f"{m['num_heads']} heads, chunk {m['chunk_size']}, "
        f"pooling `{m['pooling']}`, one vocabulary of {r['vocab_size']} tokens for all three) through "
        f"bsbr_core.train with the same budget for both (epochs text / image / joint: "
        + " / ".join(str(s["epochs"][t]) for t in TASKS) + f", lr {s['lr']}):",
        "- *image*: scikit-learn's bundled 8x8 digits (10 classes), "
        + (f"upscaled bilinearly to {s['image_side']}x{s['image_side']}, " if s["image_side"] != 8 else "not upscaled, ")
        + f"each pixel quantised to {s['levels']} intensity tokens and read row by row ({s['image_side'] ** 2} "
        f"tokens, one per pixel, as the Long Range Arena reads images); {r['image_count']} images split per class "
        f"into train / validation / test ({counts['image']} test images);",
        f"- *text*: {text_what} ({counts['text']} test documents);",
        (f"- *joint*: the text's tokens, a SEP token, then the pixel tokens of a digit in "
        f"{tuple(s['joint_digits'])} in one sequence (up to {s['text_tokens'] + 1 + s['image_side'] ** 2} tokens); "
        f"the label is the pair (text class, digit), {len(s['text_classes']) * k} classes. Each document is paired "
        f"with {s['joint_pairs_per_doc'][0]} / {s['joint_pairs_per_doc'][1]} / {s['joint_pairs_per_doc'][2]} images "
        "of its own split (train / validation / test), the digit classes taking turns within each text class and "
        f"the image drawn independently of the document ({counts['joint']} test pairs). Ceilings on the test "
        "pairs, for an oracle that knows one part's class and nothing of the other: text only "
        f"{r['joint_ceilings']['text_only']:.3f}, image only {r['joint_ceilings']['image_only']:.3f}."),
        "",
        ("Accuracy on held-out test items with a 95% percentile-bootstrap interval (joint pairs that share a "
         "document are resampled together)."),
        "",
        "**The page's claim** (text / image / joint accuracy): BSBR 0.92 / 0.88 / 0.85, standard 0.89 / 0.85 / 0.82.",
        "",
        "**Measured:**",
        "",
        "| arch | " + " | ".join(f"{t} (claim)" for t in tasks) + " | training, wall / CPU min (all tasks) |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for a in archs:
        cells = []
        for t in tasks:
            x = r["tasks"][t].get(a)
            claim = CLAIMS["accuracy"].get(a, {}).get(t)
            cells.append("-" if x is None else f"{x['accuracy']:.3f} [{x['accuracy_ci'][0]:.2f}, "
                         f"{x['accuracy_ci'][1]:.2f}] ({claim})")
        wall = sum(r["tasks"][t][a]["train_wall_s"] for t in tasks if a in r["tasks"][t])
        cpu = sum(r["tasks"][t][a].get("train_cpu_s_this_run", 0) for t in tasks if a in r["tasks"][t])
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {wall / 60:.1f} / {cpu / 60:.1f} |")
    diffs = [r["tasks"][t].get("bsbr_minus_standard") for t in tasks]
    if all(diffs):
        lines.append("| BSBR - standard (paired) | " + " | ".join(
            f"{d['accuracy']:+.3f} [{d['accuracy_ci'][0]:+.2f}, {d['accuracy_ci'][1]:+.2f}]" for d in diffs) + " | |")
    if "joint" in r["tasks"]:
        lines += ["", "Joint predictions taken apart (fraction of test pairs whose predicted text class / digit is "
                  "right): " + "; ".join(f"{a} {x['text_part_accuracy']:.3f} / {x['digit_part_accuracy']:.3f}"
                                          for a, x in r["tasks"]["joint"].items() if a in ARCHS) + "."]
    loads = [x[k][0] for t in tasks for a, x in r["tasks"][t].items() if a in ARCHS
             for k in ("load_average_before", "load_average_after") if k in x]
    if loads:
        cpus = record["machine"]["cpus"]
        lines += ["", (f"Trainings ran on one torch thread each while the machine's 1-minute load average was "
                       f"{min(loads):.1f} to {max(loads):.1f} ({cpus} CPUs): the wall times are those of a "
                       + ("loaded" if max(loads) > 0.75 * cpus else "quiet") + " machine; the CPU times count the "
                       "training process only (as recorded when each training ran; a resumed one counts the part "
                       "after resuming). The wall time above is the run that wrote this record, which reuses "
                       "finished trainings.")]
    lines += ["", "Majority-class rate of each test set: "
              + ", ".join(f"{t} {v:.3f}" for t, v in r["majority_rate"].items()) + ".", "",
              "![accuracy by task and arch](../experiments/results/multimodal.png)",
              "![an image as pixel tokens and a joint sequence](../experiments/results/multimodal_example.png)", "",
              "**Does the claim hold here?** " + verdict(r)]
    return "\n".join(lines) + "\n"


def verdict(r: dict) -> str:
    """Sentences on the page's claim, written from the measured values only."""
    tasks = r["tasks"]
    out = []
    for t, rows in tasks.items():
        if "bsbr" not in rows or "standard" not in rows:
            continue
        b, st, d = rows["bsbr"], rows["standard"], rows["bsbr_minus_standard"]
        lo, hi = d["accuracy_ci"]
        out.append(f"{t}: BSBR {b['accuracy']:.3f} vs standard {st['accuracy']:.3f} (claimed "
                   f"{CLAIMS['accuracy']['bsbr'][t]} vs {CLAIMS['accuracy']['standard'][t]}); "
                   + ("BSBR ahead" if d["accuracy"] > 0 else "standard ahead" if d["accuracy"] < 0 else "a tie")
                   + f" by {abs(d['accuracy']):.3f} (paired 95% interval of BSBR - standard [{lo:+.3f}, {hi:+.3f}]: "
                   + ("significant" if lo > 0 or hi < 0 else "not significant") + ").")
    if "joint" in tasks:
        ceiling = max(r["joint_ceilings"].values())
        archs = [a for a in tasks["joint"] if a in ARCHS]
        above = [a for a in archs if tasks["joint"][a]["accuracy_ci"][0] > ceiling]
        out.append(f"On the joint task {' and '.join(above) if above else 'no arch'} "
                   + ("beats" if len(above) == 1 else "beat") + " the best single-modality ceiling "
                   f"({ceiling:.3f}) with the whole interval, so "
                   + ("the model reads both parts of the sequence." if len(above) == 1 else
                      "both read both parts of the sequence." if above else "reading both parts is not shown."))
    ahead = [t for t, rows in tasks.items() if "bsbr" in rows and "standard" in rows
             and rows["bsbr"]["accuracy"] > rows["standard"]["accuracy"]]
    meets = [f"{a} {t}" for t, rows in tasks.items() for a, x in rows.items() if a in ARCHS
             if a in CLAIMS["accuracy"] and x["accuracy"] >= CLAIMS["accuracy"][a][t]]
    out.append(f"The page's ordering (BSBR ahead on every task) holds here on {len(ahead)} of {len(tasks)} tasks"
               + (f" ({', '.join(ahead)})" if ahead else "") + "; the page's levels are reached by "
               + (", ".join(meets) if meets else "none") + ".")
    return " ".join(out)
