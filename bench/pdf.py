"""PDF documents: text extraction and classification throughput (issue 11's closing note).

On the PDF manuals Debian's documentation packages ship (gnuplot-doc,
glpk-doc, asymptote-doc: the files tests/test_serve_pdf.py checks, cached
under data/pdf-manuals/):

1. libraries: pages/s and failures of PDFium (pypdfium2: in this process,
   and through the server's worker pool, serve.pdf.PdfExtractor), pypdf and
   poppler's pdftotext, on the same files, best of --repeats;
2. hostile: what each library does with the test suite's error PDFs
   (random bytes, a truncated manual, a password, a PDF that parses for
   hours, one that needs gigabytes), each run in a child process under a
   deadline (--hostile-timeout) and a 1 GiB address-space limit;
3. classify: pages/s of extraction alone (the worker pool) and of
   extraction + classification (the serving engine in this process, a
   memory store, no HTTP) for bsbr and standard, on each manual's first
   --classify-pages pages (a PDF cut with PDFium).

Models: --models-dir (default models/), else random-init reference-size
models, labelled untrained. The JSON records the machine and its load
average before and after: figures from a loaded machine are not results.

    python bench/pdf.py                     # writes bench/results/pdf.json
    python bench/pdf.py --quick             # two manuals, few pages: a smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # pdf_helpers: the manuals and the hostile PDFs of the tests

LIBRARIES = ("pypdfium2", "pypdfium2-worker", "pypdf", "pdftotext")
HOSTILE_LIBRARIES = ("pypdfium2", "pypdf", "pdftotext")
HOSTILE_MEMORY = 1 << 30


# --- one document through one library --------------------------------------------------------


def read_pypdfium2(path: Path) -> tuple[list[str], int]:
    from serve.pdf import extract_pages

    return extract_pages(path.read_bytes(), 1 << 30).pages, 0


def read_pypdf(path: Path) -> tuple[list[str], int]:
    """pypdf's text per page; a page that raises counts as failed (text "")."""
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(path.read_bytes()))
    pages, failed = [], 0
    for page in reader.pages:
        try:
            pages.append(page.extract_text() or "")
        except Exception:  # noqa: BLE001 - counted: a library's failure is the measurement
            pages.append("")
            failed += 1
    return pages, failed


def read_pdftotext(path: Path) -> tuple[list[str], int]:
    """poppler's text: one form feed after every page."""
    proc = subprocess.run(["pdftotext", "-enc", "UTF-8", str(path), "-"], capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pdftotext exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}")
    parts = proc.stdout.decode("utf-8", errors="replace").split("\f")
    return (parts[:-1] if parts and parts[-1] == "" else parts), 0


READERS = {"pypdfium2": read_pypdfium2, "pypdf": read_pypdf, "pdftotext": read_pdftotext}


def pdfinfo_pages(path: Path) -> int | None:
    from pdf_helpers import pdfinfo_pages as count

    try:
        return count(path)
    except (subprocess.CalledProcessError, AssertionError, FileNotFoundError):
        return None


# --- 1. libraries ----------------------------------------------------------------------------


def bench_libraries(manuals: list[Path], repeats: int) -> dict:
    from serve.pdf import PdfExtractor, PdfLimits

    pool = PdfExtractor(PdfLimits(max_pages=1 << 20, timeout_s=600, workers=1))
    pool.extract_sync(manuals[0].read_bytes())  # start the worker
    out: dict = {}
    try:
        for lib in LIBRARIES:
            rows, total_pages, total_s, failed_docs, failed_pages, agree = [], 0, 0.0, 0, 0, 0
            for path in manuals:
                expected = pdfinfo_pages(path)
                best, pages, failed, error = None, [], 0, None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    try:
                        if lib == "pypdfium2-worker":
                            pages, failed = pool.extract_sync(path.read_bytes()).pages, 0
                        else:
                            pages, failed = READERS[lib](path)
                    except Exception as e:  # noqa: BLE001 - a document the library cannot read
                        error = f"{type(e).__name__}: {e}"[:200]
                        break
                    s = time.perf_counter() - t0
                    best = s if best is None else min(best, s)
                row = {"file": path.name, "pdfinfo_pages": expected}
                if error is not None:
                    failed_docs += 1
                    row["error"] = error
                else:
                    n = len(pages)
                    total_pages += n
                    total_s += best
                    failed_pages += failed
                    agree += n == expected
                    row.update({"pages": n, "seconds": best, "pages_per_s": n / best, "failed_pages": failed,
                                "empty_pages": sum(not p.strip() for p in pages),
                                "chars": sum(len(p) for p in pages)})
                rows.append(row)
            out[lib] = {"documents": len(manuals), "pages": total_pages, "seconds": total_s,
                        "pages_per_s": total_pages / total_s if total_s else None,
                        "failed_documents": failed_docs, "failed_pages": failed_pages,
                        "page_count_agrees_with_pdfinfo": agree, "files": rows}
            print(f"  {lib:<18} {out[lib]['pages_per_s'] or 0:8.1f} pages/s  failed docs {failed_docs}  "
                  f"failed pages {failed_pages}", flush=True)
    finally:
        pool.close()
    return out


# --- 2. hostile PDFs -----------------------------------------------------------------------------


def hostile_cases(manuals: list[Path], workdir: Path) -> dict[str, Path]:
    from pdf_helpers import encrypted_pdf, memory_bomb_pdf, slow_pdf

    biggest = max(manuals, key=lambda p: p.stat().st_size).read_bytes()
    cases = {
        "random_bytes": os.urandom(64 << 10),
        "truncated_manual": biggest[: len(biggest) // 2],
        "encrypted": encrypted_pdf(["a page behind a password"]),
        "slow_forms": slow_pdf(),
        "memory_bomb": memory_bomb_pdf(),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = workdir / f"{name}.pdf"
        paths[name].write_bytes(data)
    return paths


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (HOSTILE_MEMORY, HOSTILE_MEMORY))


def run_one_child(lib: str, path: Path, timeout_s: float) -> dict:
    """`lib` on `path` in a child process under the deadline and the memory limit."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", lib, str(path)], capture_output=True,
                              timeout=timeout_s, preexec_fn=_limit_memory, check=False)
    except subprocess.TimeoutExpired:
        return {"outcome": "deadline", "seconds": time.perf_counter() - t0}
    s = time.perf_counter() - t0
    if proc.returncode < 0:
        return {"outcome": "died", "signal": -proc.returncode, "seconds": s}
    try:
        got = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"outcome": "died", "exit": proc.returncode, "stderr": proc.stderr.decode(errors="replace")[-200:],
                "seconds": s}
    return {**got, "seconds": s}


def one(lib: str, path: str) -> int:
    """The child of run_one_child: one JSON line, the outcome."""
    try:
        pages, failed = READERS[lib](Path(path))
        print(json.dumps({"outcome": "read", "pages": len(pages), "failed_pages": failed,
                          "chars": sum(len(p) for p in pages)}))
    except MemoryError:
        print(json.dumps({"outcome": "memory_error"}))
    except Exception as e:  # noqa: BLE001 - reported
        print(json.dumps({"outcome": "error", "error": f"{type(e).__name__}: {e}"[:200]}))
    return 0


def bench_hostile(cases: dict[str, Path], timeout_s: float) -> dict:
    from serve.errors import ServeError
    from serve.pdf import PdfExtractor, PdfLimits

    out: dict = {}
    pool = PdfExtractor(PdfLimits(timeout_s=timeout_s, memory_bytes=HOSTILE_MEMORY, workers=1))
    try:
        for name, path in cases.items():
            row = {lib: run_one_child(lib, path, timeout_s) for lib in HOSTILE_LIBRARIES}
            t0 = time.perf_counter()
            try:
                got = pool.extract_sync(path.read_bytes())
                row["server"] = {"outcome": "read", "pages": len(got.pages)}
            except ServeError as e:
                row["server"] = {"outcome": e.code, "status": e.status, "reason": getattr(e, "reason", None),
                                 "message": e.message}
            row["server"]["seconds"] = time.perf_counter() - t0
            out[name] = row
            print(f"  {name:<18} " + "  ".join(f"{k}: {v['outcome']} ({v['seconds']:.1f} s)" for k, v in row.items()),
                  flush=True)
    finally:
        pool.close()
    return out


# --- 3. extraction + classification ----------------------------------------------------------------


def first_pages(path: Path, n: int) -> bytes:
    """The first n pages of a PDF, as a PDF (PDFium)."""
    import pypdfium2 as pdfium

    src = pdfium.PdfDocument(path.read_bytes())
    dst = pdfium.PdfDocument.new()
    try:
        dst.import_pages(src, list(range(min(n, len(src)))))
        buf = io.BytesIO()
        dst.save(buf)
        return buf.getvalue()
    finally:
        dst.close()
        src.close()


def model_root(models_dir: str | None) -> tuple[Path, bool]:
    from serve.config import discover_models, is_trained
    from serve.devmodels import write_random_models

    root = Path(models_dir) if models_dir else ROOT / "models"
    if {"bsbr", "standard"} <= {s.name for s in discover_models(root)}:
        return root, all(is_trained(root / n) for n in ("bsbr", "standard"))
    tmp = Path(tempfile.mkdtemp(prefix="bsbr-bench-models-"))
    print(f"no bsbr+standard under {root}: writing random-init reference models to {tmp}", flush=True)
    write_random_models(tmp, ("bsbr", "standard"), size="reference", vocab_size=16384)
    return tmp, False


def bench_classify(manuals: list[Path], pages: int, models: list[str], root: Path) -> dict:
    import torch

    from serve.config import ModelSpec, SessionConfig
    from serve.engine import load_engine
    from serve.pdf import PdfExtractor, PdfLimits
    from serve.store import MemorySessionStore

    torch.set_num_threads(os.cpu_count() or 2)
    docs = {p.name: first_pages(p, pages) for p in manuals}
    pool = PdfExtractor(PdfLimits(max_pages=1 << 20, timeout_s=600, workers=1))
    out: dict = {"pages_per_document": pages, "models": {}}
    try:
        extracted = {}
        for name, data in docs.items():
            pool.extract_sync(data)  # warm: the worker is started, the file is in cache
            t0 = time.perf_counter()
            got = pool.extract_sync(data)
            extracted[name] = (got.pages, time.perf_counter() - t0)
        n_pages = sum(len(p) for p, _ in extracted.values())
        extract_s = sum(s for _, s in extracted.values())
        out["extraction"] = {"pages": n_pages, "seconds": extract_s, "pages_per_s": n_pages / extract_s}
        for m in models:
            spec = ModelSpec(name=m, path=str(root / m), max_tokens=1 << 24, max_batch_size=16)
            eng = load_engine(m, spec, SessionConfig(), MemorySessionStore(max_store_bytes=1 << 34))
            out["models"][m] = asyncio.run(classify_all(eng, extracted))
            s = out["models"][m]
            print(f"  {m:<10} extraction + classification {s['pages_per_s'] or 0:8.1f} pages/s "
                  f"({s['tokens']} tokens, extraction {100 * (s['extraction_share'] or 0):.1f}% of it)", flush=True)
    finally:
        pool.close()
    return out


async def classify_all(eng, extracted: dict[str, tuple[list[str], float]]) -> dict:
    """Each document's pages through the engine (one event loop: the engine's
    batcher lives on it); its time added to the document's extraction time."""
    await eng.classify(pages=["warm up"])
    rows, total_s, tokens, skipped = [], 0.0, 0, []
    for name, (page_texts, ex_s) in extracted.items():
        if not any(t.strip() for t in page_texts):
            skipped.append(name)  # no text at all: empty_document, nothing to classify
            continue
        t0 = time.perf_counter()
        r = await eng.classify(pages=page_texts)
        cls_s = time.perf_counter() - t0
        total_s += ex_s + cls_s
        tokens += r["num_tokens"]
        rows.append({"file": name, "pages": r["num_pages"], "tokens": r["num_tokens"], "extract_s": ex_s,
                     "classify_s": cls_s, "pages_per_s": r["num_pages"] / (ex_s + cls_s), "label": r["label"]})
    n = sum(r["pages"] for r in rows)
    return {"pages": n, "tokens": tokens, "seconds": total_s, "pages_per_s": n / total_s if total_s else None,
            "extraction_share": sum(r["extract_s"] for r in rows) / total_s if total_s else None,
            "skipped_no_text": skipped, "files": rows}


# --- run ------------------------------------------------------------------------------------------


def versions() -> dict:
    import pypdf
    from pypdfium2 import version as pdfium_version

    poppler = subprocess.run(["pdftotext", "-v"], capture_output=True, text=True, check=False)
    return {"pypdfium2": str(pdfium_version.PYPDFIUM_INFO), "pdfium": str(pdfium_version.PDFIUM_INFO),
            "pypdf": pypdf.__version__,
            "poppler": (poppler.stderr or poppler.stdout).splitlines()[0] if poppler.returncode == 0 else None}


def table(r: dict) -> str:
    lines = [f"load average before {r['machine']['loadavg_before']}, after {r['machine']['loadavg_after']}",
             f"{'library':<18}{'pages/s':>10}{'pages':>8}{'failed docs':>13}{'failed pages':>14}{'= pdfinfo':>11}"]
    for lib, s in r["libraries"].items():
        lines.append(f"{lib:<18}{s['pages_per_s'] or 0:>10.1f}{s['pages']:>8}{s['failed_documents']:>13}"
                     f"{s['failed_pages']:>14}{s['page_count_agrees_with_pdfinfo']:>8}/{s['documents']}")
    if r.get("hostile"):
        libs = list(next(iter(r["hostile"].values())))
        lines.append("")
        lines.append(f"{'hostile PDF':<18}" + "".join(f"{lib:>24}" for lib in libs))
        for case, row in r["hostile"].items():
            cells = (f"{row[lib]['outcome']} {row[lib]['seconds']:.1f}s" for lib in libs)
            lines.append(f"{case:<18}" + "".join(f"{c:>24}" for c in cells))
    c = r.get("classify")
    if c:
        lines.append("")
        lines.append(f"extraction alone (worker pool): {c['extraction']['pages_per_s']:.1f} pages/s "
                     f"on the first {c['pages_per_document']} pages of each manual")
        for m, s in c["models"].items():
            lines.append(f"extraction + {m:<10} {s['pages_per_s'] or 0:8.1f} pages/s ({s['tokens']} tokens)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--models", default="bsbr,standard")
    p.add_argument("--repeats", type=int, default=3, help="runs per (library, file); the best counts")
    p.add_argument("--classify-pages", type=int, default=32, help="pages of each manual to classify")
    p.add_argument("--hostile-timeout", type=float, default=20.0, help="deadline per hostile PDF and library")
    p.add_argument("--skip-hostile", action="store_true")
    p.add_argument("--quick", action="store_true", help="two manuals, one repeat, 4 pages, 5 s deadlines")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "pdf.json"))
    p.add_argument("--one", nargs=2, metavar=("LIBRARY", "FILE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one(*a.one)
    from pdf_helpers import debian_manuals

    load_before = os.getloadavg()
    manuals = debian_manuals()
    if a.quick:
        manuals = [m for m in manuals if m.name in ("glpk.pdf", "cnfsat.pdf", "pixel.pdf")] or manuals[:2]
        a.repeats, a.classify_pages, a.hostile_timeout = 1, 4, 5.0
    print(f"{len(manuals)} PDF manuals: {', '.join(m.name for m in manuals)}", flush=True)
    r: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": a.quick,
               "settings": {"repeats": a.repeats, "classify_pages": a.classify_pages,
                            "hostile_timeout_s": a.hostile_timeout, "hostile_memory_bytes": HOSTILE_MEMORY},
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                           **versions(), "loadavg_before": load_before},
               "manuals": [{"file": m.name, "package_dir": m.relative_to(ROOT).parts[2], "bytes": m.stat().st_size}
                           for m in manuals]}
    print("[1] extraction by library", flush=True)
    r["libraries"] = bench_libraries(manuals, a.repeats)
    if not a.skip_hostile:
        print("[2] hostile PDFs", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            r["hostile"] = bench_hostile(hostile_cases(manuals, Path(tmp)), a.hostile_timeout)
    print("[3] extraction + classification", flush=True)
    root, trained = model_root(a.models_dir)
    r["models_dir"], r["trained"] = str(root), trained
    r["classify"] = bench_classify(manuals, a.classify_pages, [m for m in a.models.split(",") if m], root)
    r["machine"]["loadavg_after"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(table(r))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
