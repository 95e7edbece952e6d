"""Kernel-docs test scores with their uncertainty: accuracy and macro-F1 by
length bucket with 95% bootstrap intervals, McNemar's exact test between two
models on the same documents, and the score with label-leaking path
mentions masked out.

Models read whole test documents (bsbr_core.evaluate.predict_logits, which
runs long inputs segment by segment). Predictions are cached per model
(keyed by its weights digest and the variant), so a report re-run is cheap.
"""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Sequence

from bsbr_core.evaluate import LENGTH_BUCKETS as BUCKETS
from bsbr_core.evaluate import bucket_of


def leak_pattern(labels: Sequence[str]) -> re.Pattern:
    """`Documentation/<label>/` for every class label: a path mention that names a class."""
    return re.compile(r"Documentation/(?:" + "|".join(re.escape(lb) for lb in sorted(labels, key=len, reverse=True))
                      + r")/")


def mask_leaks(text: str, pattern: re.Pattern) -> tuple[str, int]:
    """Replace each class-naming path prefix with `Documentation/`; returns (text, mentions masked)."""
    return pattern.subn("Documentation/", text)


def accuracy(y: Sequence[int], p: Sequence[int]) -> float | None:
    return sum(int(a == b) for a, b in zip(y, p)) / len(y) if len(y) else None


def macro_f1(y: Sequence[int], p: Sequence[int]) -> float | None:
    """Mean F1 over the classes present in y or p (as bsbr_core.evaluate)."""
    if not len(y):
        return None
    classes = set(y) | set(p)
    f1s = []
    for c in classes:
        tp = sum(1 for a, b in zip(y, p) if a == c and b == c)
        pred = sum(1 for b in p if b == c)
        sup = sum(1 for a in y if a == c)
        prec = tp / pred if pred else 0.0
        rec = tp / sup if sup else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s)


def bootstrap_ci(y: Sequence[int], p: Sequence[int], metric, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of metric(y, p) over documents."""
    n = len(y)
    if n == 0:
        return None
    rng = random.Random(seed)
    vals = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        vals.append(metric([y[i] for i in idx], [p[i] for i in idx]))
    vals.sort()
    lo = vals[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = vals[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return lo, hi


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """McNemar's exact test on paired outcomes: b = only A right, c = only B right;
    two-sided p = P(X <= min(b, c)) * 2 under Binomial(b + c, 1/2), capped at 1."""
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = b + c
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return {"a_only": b, "b_only": c, "p_value": min(1.0, 2 * tail)}


def bucket_table(y: Sequence[int], p: Sequence[int], lengths: Sequence[int], n_boot: int, seed: int) -> dict:
    """{bucket: {num_docs, accuracy, accuracy_ci, macro_f1, macro_f1_ci}} plus 'all' and '>2048'."""
    groups = {"all": list(range(len(y)))}
    for name, _, _ in BUCKETS:
        groups[name] = [i for i, n in enumerate(lengths) if bucket_of(n) == name]
    groups[">2048"] = [i for i, n in enumerate(lengths) if n > 2048]
    out = {}
    for name, idx in groups.items():
        yy, pp = [y[i] for i in idx], [p[i] for i in idx]
        out[name] = {
            "num_docs": len(idx), "accuracy": accuracy(yy, pp), "accuracy_ci": bootstrap_ci(yy, pp, accuracy, n_boot, seed),
            "macro_f1": macro_f1(yy, pp), "macro_f1_ci": bootstrap_ci(yy, pp, macro_f1, n_boot, seed),
        }
    return out


def shown_path(path: Path | str) -> str:
    """A model's folder as the record shows it: relative to the checkout when
    inside it, so a record does not name the machine it was made on."""
    repo = Path(__file__).resolve().parents[1]
    p = Path(path).absolute()
    try:
        return str(p.relative_to(repo))
    except ValueError:
        try:
            return str(p.relative_to(Path.cwd().absolute()))
        except ValueError:
            return str(path)


def _training_info(model_dir: Path, model) -> dict:
    """What the report says of how a model was trained (read fresh each time:
    a run still training has a longer history on the next report)."""
    info = {"path": shown_path(model_dir), "arch": model.config.arch, "max_length": model.config.max_length,
            "parameters": sum(p.numel() for p in model.parameters())}
    training = model_dir / "training.json"
    if not training.is_file() and (model_dir.parent / "checkpoint" / "trainer.json").is_file():
        training = model_dir.parent / "checkpoint" / "trainer.json"
    if training.is_file():
        t = json.loads(training.read_text())
        tc = t.get("train_config", {})
        info.update(command=t.get("command"), history=t.get("history"),
                    wall_time_s=t.get("wall_time_s", t.get("elapsed_s")), best=t.get("best"),
                    max_train_tokens=tc.get("max_train_tokens"), epochs_planned=tc.get("epochs"))
    return info


def _predict(model_dir: Path, texts: list[str], cache: Path, variant: str, device: str) -> tuple[list[int], list[int], dict]:
    """(predicted label indices, token lengths, model info) of whole documents;
    predictions are cached by the weights' digest."""
    import torch

    from bsbr_core import load_model
    from bsbr_core.evaluate import predict_logits
    from bsbr_core.model import weights_digest
    from bsbr_core.tokenizer import encode_many

    model, tok = load_model(model_dir, device=device)
    digest = weights_digest(model.state_dict())[:16]
    info = {**_training_info(model_dir, model), "weights": digest}
    f = cache / f"{model_dir.name}-{model.config.arch}-{digest}-{variant}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        return d["pred"], d["lengths"], info
    ids = [torch.tensor(e, dtype=torch.int64) for e in encode_many(tok, texts)]
    pred = predict_logits(model, ids, device=device).argmax(-1).tolist()
    lengths = [len(x) for x in ids]
    cache.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"pred": pred, "lengths": lengths}))
    return pred, lengths, info


def score_models(models: dict[str, str], data_dir: str | Path, cache: Path, device: str = "cpu",
                 n_boot: int = 1000, seed: int = 0, pairs: Sequence[tuple[str, str]] = (), log=print) -> dict:
    """Score each model folder on the test split, plain and leak-masked, and
    compare the named pairs with McNemar's test on documents over 2048 tokens."""
    from bsbr_core.data import load_meta, load_split

    data_dir = Path(data_dir)
    labels = load_meta(data_dir)["labels"]
    docs = load_split(data_dir, "test")
    y = [labels.index(d.label) for d in docs]
    pattern = leak_pattern(labels)
    masked, mentions = [], 0
    for d in docs:
        t, k = mask_leaks(d.text, pattern)
        masked.append(t)
        mentions += k
    own = sum(1 for d in docs if f"Documentation/{d.label}/" in d.text)
    out = {"test_docs": len(docs), "masked_mentions": mentions, "docs_mentioning_own_label": own, "models": {}}
    correct_long = {}
    for name, path in models.items():
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            log(f"kernel-docs: {name}: no model at {path}, skipped")
            out["models"][name] = {"missing": shown_path(path)}
            continue
        log(f"kernel-docs: scoring {name} ({path})")
        pred, lengths, info = _predict(path, [d.text for d in docs], cache, "plain", device)
        pred_m, lengths_m, _ = _predict(path, masked, cache, "masked", device)
        out["models"][name] = {
            "info": info,
            "buckets": bucket_table(y, pred, lengths, n_boot, seed),
            "masked": bucket_table(y, pred_m, lengths_m, n_boot, seed)["all"],
            "masked_over_2048": bucket_table(y, pred_m, lengths_m, n_boot, seed)[">2048"],
        }
        correct_long[name] = {i: pred[i] == y[i] for i, n in enumerate(lengths) if n > 2048}
    tests = {}
    for a, b in pairs:
        if a in correct_long and b in correct_long:
            idx = sorted(correct_long[a])
            tests[f"{a} vs {b}"] = mcnemar_exact([correct_long[a][i] for i in idx], [correct_long[b][i] for i in idx])
    out["mcnemar_over_2048"] = tests
    return out
