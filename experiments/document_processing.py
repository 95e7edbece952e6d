"""Document processing through the server: seconds per page, peak memory, accuracy.

    python -m experiments run document_processing --profile cpu

The cpu and gpu profiles start the server as a user does
(`bsbr-serve up --models-dir models` on 127.0.0.1, a free port), send every
kernel-docs test document to each model with POST /v1/classify (the code of
`bsbr-serve compare`: serve.compare.run_compare), and stop the server. Each
answer carries the per-page latencies (the model step of every page, as the
engine times it), the peak memory of the replica's steps (serve.metrics.PeakMemory:
peak RSS over the step on CPU, torch's allocator peak on CUDA) and the
prediction. The smoke profile runs the same engine code in-process on small
random models (serve.devmodels) and generated documents, without Ray, so it
runs in seconds; its accuracies mean nothing.
Reported for all documents and for those over `long_tokens` tokens.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.budget import REPO, accuracy_interval

CLAIMS = {
    "bsbr": {"seconds_per_page": 0.5, "peak_memory_gb": 2.5, "accuracy": 0.92},
    "standard": {"seconds_per_page": 2.0, "peak_memory_gb": 16, "accuracy": 0.89},
}


@dataclass
class DocumentSettings:
    mode: str = "server"            # server: bsbr-serve up; engine: in-process (smoke)
    models: tuple[str, ...] = ("bsbr", "standard")
    models_dir: str = "models"
    split: str = "test"
    limit: int | None = None
    long_tokens: int = 8192
    startup_timeout_s: float = 300.0
    smoke_docs: dict = field(default_factory=lambda: {"count": 6, "words": (50, 400)})


PROFILES = {
    "smoke": DocumentSettings(mode="engine", long_tokens=200),
    "cpu": DocumentSettings(),
    "gpu": DocumentSettings(),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kernel_docs(split: str, limit: int | None) -> list[dict]:
    from bsbr_core.data import default_kernel_docs_dir
    from serve.compare import load_documents

    d = default_kernel_docs_dir()
    if not (d / f"{split}.jsonl").is_file():
        raise FileNotFoundError(f"{d / (split + '.jsonl')} not found; build the corpus: "
                                "python -m bsbr_core.cli data kernel-docs")
    return load_documents(d, split, limit)


def _via_server(s: DocumentSettings, docs: list[dict], ctx) -> dict:
    from serve.client import Client
    from serve.compare import run_compare

    port = _free_port()
    exe = Path(sys.executable).parent / "bsbr-serve"
    cmd = [str(exe), "up", "--host", "127.0.0.1", "--port", str(port), "--models-dir", str(REPO / s.models_dir),
           "--metrics-port", "0"]
    log = (ctx.work_dir / "server.log").open("w")
    ctx.log(f"starting {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + s.startup_timeout_s
        with Client(url, timeout=5) as c:
            while not c.ready():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not become ready; see {ctx.work_dir / 'server.log'}")
                time.sleep(2)
        ctx.log(f"server ready at {url}; {len(docs)} documents x {len(s.models)} models")
        return run_compare(url, docs, list(s.models))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _smoke_docs(s: DocumentSettings) -> list[dict]:
    import random

    from serve.devmodels import DEV_LABELS, sample_text

    rng = random.Random(0)
    lo, hi = s.smoke_docs["words"]
    return [{"id": f"doc{i}", "text": sample_text(rng, rng.randint(lo, hi)), "label": rng.choice(DEV_LABELS)}
            for i in range(s.smoke_docs["count"])]


def _via_engine(s: DocumentSettings, docs: list[dict], ctx) -> dict:
    """The engine's classify in-process on random dev models (what a replica runs, without Ray)."""
    from serve.compare import summarize
    from serve.config import ModelSpec, SessionConfig
    from serve.devmodels import write_random_models
    from serve.engine import load_engine
    from serve.store import MemorySessionStore

    root = ctx.work_dir / "dev-models"
    if not all((root / m / "config.json").is_file() for m in s.models):
        write_random_models(root, tuple(s.models), force=True)
    per_model = {}

    async def go(engine):
        rows = []
        for d in docs:
            r = await engine.classify(text=d["text"])
            rows.append({"id": d["id"], "label": d["label"], "pred": r["label"], "num_tokens": r["num_tokens"],
                         "num_pages": r["num_pages"], "per_page_ms": r["timing"]["per_page_ms"],
                         "total_ms": r["timing"]["total_ms"], "state_bytes": r["state_bytes"],
                         "peak_memory_bytes": r["peak_memory_bytes"]})
        return rows

    for m in s.models:
        engine = load_engine(m, ModelSpec(name=m, path=str(root / m), page_tokens=64), SessionConfig(),
                             MemorySessionStore())
        per_model[m] = asyncio.run(go(engine))
    return {"models": list(s.models), "documents": len(docs), "results": per_model,
            "summary": {m: summarize(rows) for m, rows in per_model.items()}}


def _summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    pages = [ms / 1000 for r in ok for ms in r["per_page_ms"]]
    labelled = [r for r in ok if r["label"] is not None]
    correct = sum(r["pred"] == r["label"] for r in labelled)
    pages_sorted = sorted(pages)

    def q(p):
        return pages_sorted[min(len(pages_sorted) - 1, int(p * len(pages_sorted)))] if pages_sorted else None

    return {
        "documents": len(ok), "errors": {str(e): sum(r.get("error") == e for r in rows)
                                         for e in sorted({r["error"] for r in rows if "error" in r}, key=str)},
        "pages": len(pages),
        "seconds_per_page_mean": sum(pages) / len(pages) if pages else None,
        "seconds_per_page_p50": q(0.5), "seconds_per_page_p95": q(0.95),
        "seconds_per_document_mean": sum(r["total_ms"] for r in ok) / 1000 / len(ok) if ok else None,
        "peak_memory_bytes_max": max((r["peak_memory_bytes"] for r in ok), default=0),
        "state_bytes_max": max((r["state_bytes"] for r in ok), default=0),
        "accuracy": correct / len(labelled) if labelled else None,
        "accuracy_ci": accuracy_interval(correct, len(labelled)) if labelled else None,
    }


def run(s: DocumentSettings, ctx) -> dict:
    if s.mode == "server":
        docs = _kernel_docs(s.split, s.limit)
        report = _via_server(s, docs, ctx)
    elif s.mode == "engine":
        docs = _smoke_docs(s)
        report = _via_engine(s, docs, ctx)
    else:
        raise ValueError(f"mode must be server or engine, got {s.mode!r}")
    (ctx.work_dir / "answers.json").write_text(json.dumps(report["results"], indent=1) + "\n")
    out = {"mode": s.mode, "documents": len(docs), "models": {}}
    for m, rows in report["results"].items():
        long_rows = [r for r in rows if r.get("num_tokens", 0) > s.long_tokens]
        out["models"][m] = {"all": _summary(rows), f">{s.long_tokens}": _summary(long_rows)}
        by_index = {}
        for r in rows:
            for i, ms in enumerate(r.get("per_page_ms", [])):
                by_index.setdefault(i, []).append(ms / 1000)
        out["models"][m]["median_seconds_by_page_index"] = [sorted(v)[len(v) // 2] for _, v in sorted(by_index.items())]
    _plot(out, ctx.out_dir / "document_processing.png")
    return out


def _plot(out: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for m, res in out["models"].items():
        ys = res["median_seconds_by_page_index"]
        ax1.plot(range(1, len(ys) + 1), [y * 1000 for y in ys], label=m)
    ax1.set_xlabel("page index")
    ax1.set_ylabel("median model step per page (ms)")
    ax1.legend()
    names = list(out["models"])
    groups = list(next(iter(out["models"].values())).keys())[:2]
    for i, g in enumerate(groups):
        accs = [out["models"][m][g]["accuracy"] or 0 for m in names]
        ax2.bar([j + 0.4 * i for j in range(len(names))], accs, 0.4, label=g)
    ax2.set_xticks([j + 0.2 for j in range(len(names))])
    ax2.set_xticklabels(names)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _n(v, fmt):
    return "-" if v is None else format(v, fmt)


def report(record: dict) -> str:
    r, s = record["results"], record["settings"]
    groups = list(next(iter(r["models"].values())).keys())[:2]
    how = ("through `bsbr-serve up --models-dir models` on 127.0.0.1 (POST /v1/classify, serve.compare)"
           if r["mode"] == "server" else "in-process through the engine on random dev models (smoke)")
    lines = [
        f"**What was run.** {r['documents']} kernel-docs `{s['split']}` documents, each classified once per model "
        f"{how}. Seconds per page are the engine's per-page step times from the answers; peak memory is the "
        "replica's peak over its steps (RSS on CPU) as the answer reports it.",
        "",
        "**The page's claim:** BSBR 0.5 s/page, 2.5 GB, accuracy 0.92; standard 2.0 s/page, 16 GB, 0.89.",
        "",
        "| model | documents | pages | s/page mean | s/page p95 | s/document | peak memory (GiB) | accuracy [95%] | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m, res in r["models"].items():
        for g in groups:
            x = res[g]
            ci = x["accuracy_ci"]
            lines.append(f"| {m} ({g}) | {x['documents']} | {x['pages']} | {_n(x['seconds_per_page_mean'], '.4f')} | "
                         f"{_n(x['seconds_per_page_p95'], '.4f')} | {_n(x['seconds_per_document_mean'], '.3f')} | "
                         f"{x['peak_memory_bytes_max'] / 2**30:.2f} | {_n(x['accuracy'], '.3f')}"
                         + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" | {x['errors'] or 'none'} |")
    lines += ["", "![document processing](../experiments/results/document_processing.png)", "",
              "**Does the claim hold here?** " + verdict(r)]
    return "\n".join(lines) + "\n"


def verdict(r: dict) -> str:
    ms = r["models"]
    if "bsbr" not in ms or "standard" not in ms:
        return "Not enough models to compare."
    b, st = ms["bsbr"]["all"], ms["standard"]["all"]
    out = []
    if b["seconds_per_page_mean"] and st["seconds_per_page_mean"]:
        ratio = st["seconds_per_page_mean"] / b["seconds_per_page_mean"]
        out.append(f"Standard takes {ratio:.2f}x BSBR's time per page (page's claim: 4x)"
                   + (", so BSBR is faster per page here." if ratio > 1 else ", so BSBR is not faster per page here."))
    if b["peak_memory_bytes_max"] and st["peak_memory_bytes_max"]:
        out.append(f"Peak memory: standard {st['peak_memory_bytes_max'] / b['peak_memory_bytes_max']:.2f}x BSBR's "
                   "(page: 6.4x).")
    if b["accuracy"] is not None and st["accuracy"] is not None:
        out.append(f"Accuracy {b['accuracy']:.3f} vs {st['accuracy']:.3f}: BSBR "
                   + ("ahead" if b["accuracy"] > st["accuracy"] else "not ahead")
                   + " (the intervals above say whether the gap is beyond noise).")
    return " ".join(out)
