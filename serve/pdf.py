"""PDF documents in: every PDF page is one page (docs/architecture.md 3.6).

Text comes out of PDFium (pypdfium2). PDFium is C++ that parses whatever
bytes a client sends, so it never runs in the server's own process: each
`PdfExtractor` owns a few worker processes (`python -c ...worker_main()`)
and gives each document to one of them over a pipe, with

- a deadline per document (`timeout_s`): past it the worker is killed and
  the document is 422 invalid_pdf "passed its deadline";
- a memory limit per worker (`memory_bytes`, RLIMIT_AS set in the worker
  after its imports): a document that needs more kills only the worker
  (PDFium aborts on a failed allocation), answered 422 invalid_pdf;
- a CPU-time limit (RLIMIT_CPU, re-armed per document) so that a worker
  whose parent vanished cannot spin on a hostile document for ever;
- a page limit (`max_pages`) checked on the page count before any page is
  parsed (413 too_many_pages).

A worker that died, timed out or read `recycle_after` documents is replaced
by a fresh one; the caller's event loop only ever awaits a thread that
waits on the pipe. `extract_pages` is the extraction itself (the worker runs
it; the benchmark runs it in-process too).

Page text: PDFium's text in reading order, with its line-end hyphenation
marks (U+FFFE before a line break) joined, CRLF as LF, and control
characters (fonts without a Unicode map yield C0/C1 codes) as spaces. A page
without text is "" (a page of 0 tokens).
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serve.errors import InvalidPdf, Overloaded, TooManyPdfPages

PDF_MEDIA_TYPE = "application/pdf"

# Values of the `reason` label of bsbr_pdf_failures_total (a closed set).
FAILURE_REASONS = ("not_pdf", "damaged", "encrypted", "too_many_pages", "timeout", "memory", "crashed")

# The PDF header may follow up to 1 KiB of junk (ISO 32000-1, 7.5.2; readers allow it).
_HEADER_WINDOW = 1024
# After the reply of a document has been read the worker must be ready at
# once; starting one (Python + pypdfium2) takes well under this on a loaded CPU.
_START_TIMEOUT_S = 60.0
# How often the waiting thread samples the worker's virtual size (to tell an
# out-of-memory death from another crash).
_MEMORY_POLL_S = 0.05

_REQUEST = struct.Struct("<IQ")  # header length, PDF length
_REPLY = struct.Struct("<Q")  # reply length


@dataclass(frozen=True)
class PdfLimits:
    """Per-document bounds (the `http.*pdf*` settings)."""

    max_pages: int = 5000
    timeout_s: float = 60.0
    memory_bytes: int = 1 << 30
    workers: int = 2
    max_queued: int = 16  # documents waiting for a worker beyond `workers`; then 429
    recycle_after: int = 500  # documents per worker process before a fresh one


@dataclass
class PdfText:
    """One extracted document."""

    pages: list[str]  # one per PDF page, "" for a page without text
    page_seconds: list[float]  # extraction time of each page (load + text)
    open_seconds: float  # opening the document (cross-reference, page tree)
    seconds: float = 0.0  # the whole request to the worker, transfers included


class PdfFailure(Exception):
    """Why a document could not be read; `reason` is one of FAILURE_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def to_error(self):
        """The ServeError the client gets."""
        if self.reason == "too_many_pages":
            return TooManyPdfPages(self.message)
        return InvalidPdf(self.message, reason=self.reason)


# --- the extraction itself (runs in a worker process) ----------------------------------------

_CONTROLS = str.maketrans({c: " " for c in (*range(9), 11, 12, *range(14, 32), 127, *range(0x80, 0xA0))})


def clean_page_text(raw: str) -> str:
    """PDFium's page text as the model reads it (module docstring)."""
    text = raw.replace("\ufffe\r\n", "").replace("\ufffe\n", "").replace("\ufffe", "-")
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROLS)


def looks_like_pdf(data: bytes) -> bool:
    """A PDF by its header, whatever the file is called."""
    return b"%PDF-" in data[:_HEADER_WINDOW]


def split_pages(pdf: bytes) -> list[bytes] | None:
    """Each page of a PDF as a PDF of its own (the fonts and images it uses
    copied along), for a client that sends a document page by page. Runs
    PDFium in this process: for the client's own files, never the server's
    input. None when PDFium cannot open it (the server then says why)."""
    import io

    import pypdfium2 as pdfium

    try:
        src = pdfium.PdfDocument(pdf)
    except pdfium.PdfiumError:
        return None
    try:
        out = []
        for i in range(len(src)):
            page = pdfium.PdfDocument.new()
            try:
                page.import_pages(src, [i])
                buf = io.BytesIO()
                page.save(buf)
            except pdfium.PdfiumError:
                return None
            finally:
                page.close()
            out.append(buf.getvalue())
        return out
    finally:
        src.close()


def extract_pages(data: bytes, max_pages: int) -> PdfText:
    """Text of every page of the PDF in `data`; raises PdfFailure."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    if not looks_like_pdf(data):
        raise PdfFailure("not_pdf", "the body is not a PDF (no %PDF- header in its first 1024 bytes)")
    t0 = time.perf_counter()
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        code = getattr(e, "err_code", None)
        if code == pdfium_c.FPDF_ERR_PASSWORD:
            raise PdfFailure("encrypted", "the PDF is encrypted with a password; send it decrypted "
                                          "(e.g. qpdf --decrypt --password=... in.pdf out.pdf)") from None
        if code == pdfium_c.FPDF_ERR_SECURITY:
            raise PdfFailure("encrypted", "the PDF uses an unsupported security handler; send it decrypted") from None
        raise PdfFailure("damaged", "the PDF is damaged, truncated or not a PDF: PDFium cannot open it "
                                    f"({e})") from None
    try:
        n = len(pdf)
        if n > max_pages:
            raise PdfFailure("too_many_pages", f"the PDF has {n} pages; this server reads at most {max_pages}")
        open_s = time.perf_counter() - t0
        pages, seconds = [], []
        for i in range(n):
            t = time.perf_counter()
            try:
                page = pdf[i]
                textpage = page.get_textpage()
                raw = textpage.get_text_range()
            except pdfium.PdfiumError as e:
                raise PdfFailure("damaged", f"page {i + 1} of {n} cannot be read: {e}") from None
            textpage.close()
            page.close()
            pages.append(clean_page_text(raw))
            seconds.append(time.perf_counter() - t)
        return PdfText(pages, seconds, open_s)
    finally:
        pdf.close()


# --- the worker process ------------------------------------------------------------------------


def _read_exact(f, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def worker_main() -> None:
    """The worker's loop: a request frame in on stdin, a reply frame out.

    The protocol writes to a duplicate of stdout; fd 1 itself is pointed at
    stderr, so a library that prints cannot corrupt a frame."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    import pypdfium2  # noqa: F401 - loaded before the memory limit, so the limit bounds documents only

    memory = int(os.environ.get("BSBR_PDF_MEMORY_BYTES", "0"))
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    def reply(obj: dict[str, Any]) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        out.write(_REPLY.pack(len(body)) + body)
        out.flush()

    reply({"ready": True, "pid": os.getpid()})
    while True:
        head = _read_exact(inp, _REQUEST.size)
        if head is None:
            return  # the parent closed the pipe (or died)
        hlen, dlen = _REQUEST.unpack(head)
        header = json.loads(_read_exact(inp, hlen) or b"{}")
        data = _read_exact(inp, dlen)
        if data is None:
            return
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = int(used.ru_utime + used.ru_stime) + int(header.get("cpu_s", 600)) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, resource.RLIM_INFINITY))
        try:
            got = extract_pages(data, int(header["max_pages"]))
            reply({"ok": True, "pages": got.pages, "page_seconds": got.page_seconds, "open_seconds": got.open_seconds})
        except PdfFailure as e:
            reply({"ok": False, "reason": e.reason, "message": e.message})
        except MemoryError:
            reply({"ok": False, "reason": "memory", "message": "PDF text extraction ran out of its memory limit"})
        except Exception as e:  # noqa: BLE001 - PDFium (or its binding) failed on this input
            import traceback

            traceback.print_exc()
            reply({"ok": False, "reason": "damaged",
                   "message": f"the PDF cannot be read: the parser failed on it ({type(e).__name__})"})
        data = None


@dataclass
class _Worker:
    """One worker process, used by one thread at a time."""

    limits: PdfLimits
    proc: subprocess.Popen | None = None
    documents: int = 0
    peak_vm: int = field(default=0)

    def start(self) -> None:
        env = dict(os.environ)
        # The child imports serve.pdf from wherever this process found it.
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
        env["BSBR_PDF_MEMORY_BYTES"] = str(self.limits.memory_bytes)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from serve.pdf import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        self.documents = 0
        try:
            ready = self._read_reply(time.monotonic() + _START_TIMEOUT_S)
        except PdfFailure:
            ready = {}
        if not ready.get("ready"):  # the server's fault, not the document's: a 500
            rc = self.stop()
            raise RuntimeError(f"the PDF worker process did not start (exit {rc}; is pypdfium2 installed?)")

    def stop(self) -> int | None:
        """Kill the process (if alive) and reap it; its return code."""
        p, self.proc = self.proc, None
        if p is None:
            return None
        if p.poll() is None:
            p.kill()
        rc = p.wait()
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
        return rc

    def _virtual_size(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmSize:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, AttributeError):
            pass
        return 0

    def _read_reply(self, deadline: float) -> dict[str, Any]:
        """One reply frame, or PdfFailure for a deadline passed or a dead worker."""
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        need = _REPLY.size
        have_len = False
        while True:
            if len(buf) >= need:
                if have_len:
                    return json.loads(bytes(buf[_REPLY.size:need]))
                need = _REPLY.size + _REPLY.unpack(bytes(buf[:_REPLY.size]))[0]
                have_len = True
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise PdfFailure("timeout", "")
            ready, _, _ = select.select([fd], [], [], min(left, _MEMORY_POLL_S))
            if not ready:
                self.peak_vm = max(self.peak_vm, self._virtual_size())
                continue
            chunk = os.read(fd, max(need - len(buf), 1 << 16))
            if not chunk:
                raise PdfFailure("crashed", "")
            buf += chunk

    def run(self, data: bytes, max_pages: int) -> PdfText:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.start()
        lim = self.limits
        header = json.dumps({"max_pages": max_pages, "cpu_s": int(lim.timeout_s * 2) + 1}).encode()
        self.peak_vm = 0
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write(_REQUEST.pack(len(header), len(data)) + header)
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            reply = self._read_reply(time.monotonic() + lim.timeout_s)
        except (BrokenPipeError, PdfFailure) as e:
            rc = self.stop()
            if getattr(e, "reason", None) == "timeout":
                raise PdfFailure("timeout", f"PDF text extraction passed its deadline of {lim.timeout_s:g} s; "
                                            "the document is too slow to parse") from None
            raise self._death(rc) from None
        self.documents += 1
        if self.documents >= lim.recycle_after:
            self.stop()
        if not reply.get("ok"):
            raise PdfFailure(reply.get("reason", "damaged"), reply.get("message", "the PDF cannot be read"))
        return PdfText(reply["pages"], reply["page_seconds"], reply["open_seconds"], time.perf_counter() - t0)

    def _death(self, rc: int | None) -> PdfFailure:
        mib = self.limits.memory_bytes / 2**20
        if self.peak_vm >= 0.8 * self.limits.memory_bytes:
            return PdfFailure("memory", f"PDF text extraction needed more than its memory limit of {mib:.0f} MiB")
        how = f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit code {rc}"
        return PdfFailure("crashed", f"PDF text extraction crashed on this document ({how}); it may need more "
                                     f"than the memory limit of {mib:.0f} MiB, or be built to crash readers")


class PdfExtractor:
    """A pool of `limits.workers` worker processes (module docstring).

    `extract` is for an event loop: it waits on a worker in a thread and
    refuses (429) once `workers + max_queued` documents are in hand.
    `extract_sync` blocks the calling thread. Both record, through
    `metrics`, the pages extracted, each page's extraction time and each
    failure by reason. Workers start on first use."""

    def __init__(self, limits: PdfLimits | None = None, metrics=None):
        self.limits = limits or PdfLimits()
        self.metrics = metrics
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for _ in range(self.limits.workers):
            self._idle.put(_Worker(self.limits))
        self._threads = ThreadPoolExecutor(max_workers=self.limits.workers, thread_name_prefix="pdf")
        self._in_hand = 0
        self._lock = threading.Lock()

    def extract_sync(self, data: bytes) -> PdfText:
        """The pages of a PDF; raises InvalidPdf (422) or TooManyPdfPages (413)."""
        worker = self._idle.get()
        try:
            got = worker.run(data, self.limits.max_pages)
        except PdfFailure as e:
            self._record_failure(e.reason)
            raise e.to_error() from None
        finally:
            self._idle.put(worker)
        self._record(got)
        return got

    async def extract(self, data: bytes) -> PdfText:
        with self._lock:
            if self._in_hand >= self.limits.workers + self.limits.max_queued:
                raise Overloaded(f"{self._in_hand} PDF documents are being read here; retry shortly",
                                 retry_after_s=max(1.0, self.limits.timeout_s / 10))
            self._in_hand += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, self.extract_sync, data)
        finally:
            with self._lock:
                self._in_hand -= 1

    def close(self) -> None:
        """Stop the idle worker processes (a later document starts one again)."""
        idle = []
        while True:
            try:
                idle.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for w in idle:
            w.stop()
            self._idle.put(w)

    def _record(self, got: PdfText) -> None:
        if self.metrics is None:
            return
        self.metrics.pdf_pages(len(got.pages))
        for s in got.page_seconds:
            self.metrics.pdf_page_latency(s)

    def _record_failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.pdf_failure(reason)
