"""Trainings on a fixed budget, shared by the experiments that train many small models.

A training is named by what decides its outcome: the model config, the data
(a spec: which task or corpus, how much, how long), the budget (epochs, lr,
batch) and the seed. Its folder is ``<root>/<label>-<hash of those>``, so
two experiments that ask for the same training (chunk_size's B = 32 and
compression's f = 1) share it, a finished one is read back instead of
retrained, and an interrupted one resumes from its checkpoint
(bsbr_core.train resumes exactly).

Data specs (dicts, JSON-able):
- ``{"kind": "recall", "task": {...RecallTask fields}, "distances": [lo, hi],
  "train_count": N, "val_count": M, "test_distances": [...], "test_count": T}``:
  experiments.tasks' associative recall; the test sets are fresh sequences at
  each test distance.
- ``{"kind": "kernel_docs", "max_tokens": N}``: the kernel-docs corpus, each
  document cut to its first N tokens (train, validation and test alike),
  tokenized with models/bsbr's tokenizer. Build the corpus with
  ``python -m bsbr_core.cli data kernel-docs``.
- ``{"kind": "synthetic_docs", ...}``: a stand-in for kernel_docs in smoke
  profiles (random token documents whose class is a planted token), so the
  tests need no corpus.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_DOCS_TOKENIZER = REPO / "models" / "bsbr" / "tokenizer.json"


@dataclass(frozen=True)
class Budget:
    """What every variant of one comparison gets alike."""

    epochs: int = 6
    lr: float = 3e-3
    batch_tokens: int = 4096
    max_batch_docs: int = 32
    curriculum: tuple[int, ...] | None = None
    balance_power: float = 0.0


def training_key(model_cfg: dict, data_spec: dict, budget: Budget, seed: int) -> str:
    blob = {"model": model_cfg, "data": data_spec, "budget": dataclasses.asdict(budget), "seed": seed}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trainings_dir(ctx) -> Path:
    """One folder of trainings per profile, shared by the experiments of a run folder."""
    return ctx.work_dir.parent.parent / "_trainings" / ctx.profile


# -- data -------------------------------------------------------------------------


def _recall_task(spec: dict):
    from experiments.tasks import RecallTask

    return RecallTask(**spec["task"])


def _crop(split, n: int):
    from bsbr_core.evaluate import TokenizedSplit

    return TokenizedSplit([d[:n] for d in split.docs], split.labels, split.paths, split.label_names)


def _synthetic_docs(spec: dict, split: str):
    """Random-token documents; the class is a token planted once at a random place."""
    import random

    import torch

    from bsbr_core.evaluate import TokenizedSplit

    n = {"train": spec["train_count"], "validation": spec["val_count"], "test": spec["val_count"]}[split]
    rng = random.Random(f"{spec['seed']}-{split}")
    k, vocab = spec["num_labels"], spec["vocab_size"]
    docs, labels = [], []
    for _ in range(n):
        length = rng.randint(spec["max_tokens"] // 2, spec["max_tokens"])
        ids = [rng.randrange(k, vocab) for _ in range(length)]
        y = rng.randrange(k)
        ids[rng.randrange(length)] = y
        docs.append(torch.tensor(ids, dtype=torch.int64))
        labels.append(y)
    return TokenizedSplit(docs, labels, [f"{split}-{i}" for i in range(n)], [f"c{j}" for j in range(k)])


def _word_tokenizer(names: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token=names[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def build_data(spec: dict):
    """(TrainData, test sets) for a data spec; test sets: name -> TokenizedSplit."""
    from bsbr_core.evaluate import TokenizedSplit
    from bsbr_core.train import TrainData

    kind = spec["kind"]
    if kind == "recall":
        from experiments.tasks import log_uniform_distances

        task = _recall_task(spec)
        lo, hi = max(spec["distances"][0], task.min_distance), spec["distances"][1]
        seed = spec.get("seed", 0)

        def split(count, s, name):
            ds = log_uniform_distances(lo, hi, count, s)
            docs, ys = task.samples(ds, seed=1000 + s)
            return TokenizedSplit(docs, ys, [f"{name} d={d}" for d in ds], task.labels)

        train, val = split(spec["train_count"], seed, "train"), split(spec["val_count"], seed + 1, "val")
        tests = {}
        for D in spec["test_distances"]:
            docs, ys = task.samples([D] * spec["test_count"], seed=10_000 + D)
            tests[str(D)] = TokenizedSplit(docs, ys, [f"test d={D}"] * len(docs), task.labels)
        return TrainData(train, val, task.tokenizer(), task.labels), tests
    if kind == "kernel_docs":
        from bsbr_core.data import default_kernel_docs_dir
        from bsbr_core.evaluate import load_tokenized
        from bsbr_core.tokenizer import load_tokenizer

        tok = load_tokenizer(KERNEL_DOCS_TOKENIZER)
        d = default_kernel_docs_dir()
        n = spec["max_tokens"]
        train, val, test = (_crop(load_tokenized(d, s, tok), n) for s in ("train", "validation", "test"))
        return TrainData(train, val, tok, train.label_names), {"test": test}
    if kind == "synthetic_docs":
        tok = _word_tokenizer([f"t{i}" for i in range(spec["vocab_size"])])
        train, val, test = (_synthetic_docs(spec, s) for s in ("train", "validation", "test"))
        return TrainData(train, val, tok, train.label_names), {"test": test}
    raise ValueError(f"unknown data kind {kind!r}")


# -- training + scoring ---------------------------------------------------------------


def accuracy_interval(correct: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def train_and_score(root: str, label: str, model_cfg: dict, data_spec: dict, budget: Budget, seed: int,
                    device: str = "cpu", threads: int = 1) -> dict:
    """Train (or resume, or read back) one model; score it on the spec's test sets."""
    import torch

    from bsbr_core import load_model
    from bsbr_core.evaluate import predict_logits
    from bsbr_core.train import TrainConfig, train

    torch.set_num_threads(threads)
    key = training_key(model_cfg, data_spec, budget, seed)
    run_dir = Path(root) / f"{label}-{key}"
    done = run_dir / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    data, tests = build_data(data_spec)
    longest = max(len(d) for d in data.train.docs)
    tc = TrainConfig(out_dir=str(run_dir), epochs=budget.epochs, lr=budget.lr, batch_tokens=budget.batch_tokens,
                     max_batch_docs=budget.max_batch_docs, max_train_tokens=longest,
                     curriculum=None if budget.curriculum is None else list(budget.curriculum),
                     balance_power=budget.balance_power, seed=seed, device=device, checkpoint_every=100,
                     progress=False)
    record = train(model_cfg, tc, command=f"experiments.budget ({label}, seed {seed})", data=data).record
    model, _ = load_model(run_dir / "best", device=device)
    scores = {}
    for name, split in tests.items():
        pred = predict_logits(model, split.docs, batch_tokens=max(16384, max(split.lengths) + 1),
                              device=device).argmax(-1).tolist()
        correct = sum(int(p == y) for p, y in zip(pred, split.labels))
        scores[name] = {"accuracy": correct / len(pred), "accuracy_ci": accuracy_interval(correct, len(pred)),
                        "num_docs": len(pred)}
    row = {
        "label": label, "key": key, "seed": seed, "model_config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()), "test": scores,
        "history": record["history"], "best": record["best"], "steps": record["global_step"],
        "train_wall_s": round(record["elapsed_s"], 1), "run_dir": str(run_dir),
    }
    done.write_text(json.dumps(row, indent=1) + "\n")
    return row


def run_all(jobs: list[dict], root: Path, workers: int, device: str, log) -> list[dict]:
    """jobs: dicts of train_and_score's keyword arguments (label, model_cfg, data_spec, budget, seed).
    Runs them in `workers` processes (one torch thread each); results in job order."""
    root.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        out = []
        for j in jobs:
            out.append(train_and_score(str(root), device=device, **j))
            log(f"{j['label']} seed {j['seed']}: {_brief(out[-1])}")
        return out
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(train_and_score, str(root), device=device, **j) for j in jobs]
        out = []
        for j, f in zip(jobs, futures):
            out.append(f.result())
            log(f"{j['label']} seed {j['seed']}: {_brief(out[-1])}")
        return out


def _brief(row: dict) -> str:
    return ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in row["test"].items()) + f" ({row['train_wall_s']:.0f}s)"
