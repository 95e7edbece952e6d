"""`bsbr-serve compare DIR`: the same documents through several models, side by side.

Documents: `DIR/*.jsonl` lines `{"text", "label"?}` (e.g. a kernel-docs
split), or the text files and PDFs under DIR (`DIR/<label>/<file>` gives the
label; a PDF is sent as it is, one page per PDF page). Each document is
classified once per model (POST /v1/classify); the answer carries per-page
latencies, peak memory and state bytes.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from serve.client import ApiError, Client, read_input

TEXT_SUFFIXES = {".txt", ".text", ".rst", ".md", ""}
PDF_SUFFIXES = {".pdf"}


def load_documents(root: str | Path, split: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    root = Path(root)
    docs: list[dict[str, Any]] = []
    if root.is_file():
        files = [root]
    else:
        jsonl = sorted(root.glob(f"{split}.jsonl" if split else "*.jsonl"))
        files = jsonl or sorted(p for p in root.rglob("*")
                                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | PDF_SUFFIXES)
    for f in files:
        if f.suffix == ".jsonl":
            with f.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        d = json.loads(line)
                        docs.append({"id": d.get("path", f"{f.name}:{i}"), "text": d["text"], "label": d.get("label")})
        else:
            rel = f.relative_to(root) if root.is_dir() else Path(f.name)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            doc = read_input(f)
            key = "pdf" if isinstance(doc, bytes) else "text"
            docs.append({"id": str(rel), key: doc, "label": label})
        if limit and len(docs) >= limit:
            break
    docs = [d for d in docs if "pdf" in d or d["text"].strip()]
    return docs[:limit] if limit else docs


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_compare(url: str, docs: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    per_model: dict[str, Any] = {}
    with Client(url) as c:
        for m in models:
            rows = []
            for d in docs:
                try:
                    r = c.classify_pdf(m, d["pdf"]) if "pdf" in d else c.classify(m, text=d["text"])
                    rows.append({"id": d["id"], "label": d["label"], "pred": r["label"], "num_tokens": r["num_tokens"],
                                 "num_pages": r["num_pages"], "per_page_ms": r["timing"]["per_page_ms"],
                                 "total_ms": r["timing"]["total_ms"], "state_bytes": r["state_bytes"],
                                 "peak_memory_bytes": r["peak_memory_bytes"]})
                except ApiError as e:
                    rows.append({"id": d["id"], "label": d["label"], "error": e.code})
            per_model[m] = rows
    return {"url": url, "models": models, "documents": len(docs), "results": per_model,
            "summary": {m: summarize(rows) for m, rows in per_model.items()}, "time": time.time()}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    pages = [ms for r in ok for ms in r["per_page_ms"]]
    labelled = [r for r in ok if r["label"] is not None]
    by_index: dict[int, list[float]] = {}
    for r in ok:
        for i, ms in enumerate(r["per_page_ms"]):
            by_index.setdefault(i, []).append(ms)
    return {
        "documents": len(ok), "errors": len(rows) - len(ok),
        "page_ms_p50": quantile(pages, 0.5), "page_ms_p95": quantile(pages, 0.95),
        "peak_memory_bytes_max": max((r["peak_memory_bytes"] for r in ok), default=0),
        "state_bytes_mean": sum(r["state_bytes"] for r in ok) / len(ok) if ok else 0,
        "state_bytes_max": max((r["state_bytes"] for r in ok), default=0),
        "accuracy": (sum(r["pred"] == r["label"] for r in labelled) / len(labelled)) if labelled else None,
        "labelled": len(labelled),
        "page_ms_median_by_index": [quantile(by_index[i], 0.5) for i in sorted(by_index)],
    }


def table(report: dict[str, Any]) -> str:
    head = f"{'model':<14}{'docs':>6}{'page p50 ms':>13}{'page p95 ms':>13}{'peak MiB':>10}{'state KiB':>11}{'accuracy':>10}"
    lines = [head, "-" * len(head)]
    for m, s in report["summary"].items():
        acc = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
        lines.append(
            f"{m:<14}{s['documents']:>6}{s['page_ms_p50']:>13.2f}{s['page_ms_p95']:>13.2f}"
            f"{s['peak_memory_bytes_max'] / 2**20:>10.1f}{s['state_bytes_mean'] / 1024:>11.1f}{acc:>10}"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, s in report["summary"].items():
        ys = s["page_ms_median_by_index"]
        ax.plot(range(1, len(ys) + 1), ys, label=m, marker="." if len(ys) < 60 else None)
    ax.set_xlabel("page index")
    ax.set_ylabel("per-page latency, median over documents (ms)")
    ax.set_title(f"per-page latency by page index ({report['documents']} documents)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(url: str, root: str | Path, models: list[str], out: str | Path, split: str | None = None,
            limit: int | None = None) -> dict[str, Any]:
    docs = load_documents(root, split, limit)
    if not docs:
        raise FileNotFoundError(f"no documents under {root} (*.jsonl, or text files and PDFs)")
    report = run_compare(url, docs, models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "compare.png")
    return report
