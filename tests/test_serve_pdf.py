"""PDF text extraction (serve/pdf.py) without Ray: pages and their text, on
PDFs built here and on the PDF manuals Debian ships, and every way a PDF can
fail, each one a typed error while the worker pool keeps serving."""
from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import sys
import threading
import time

import pytest
from pdf_helpers import (
    encrypted_pdf,
    memory_bomb_pdf,
    pdfinfo_pages,
    pdftotext_pages,
    slow_pdf,
    text_pdf,
)

from serve.errors import InvalidPdf, Overloaded, TooManyPdfPages
from serve.pdf import (
    FAILURE_REASONS,
    PdfExtractor,
    PdfLimits,
    clean_page_text,
    extract_pages,
    split_pages,
)

pytest_plugins = ["conftest_pdf"]

DEADLINE_S = 2.0
MEMORY = 384 << 20


class Recorder:
    """The metrics an extractor records (EngineMetrics' pdf_* methods)."""

    def __init__(self):
        self.pages = 0
        self.page_latencies: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()

    def pdf_pages(self, n):
        self.pages += n

    def pdf_page_latency(self, seconds):
        self.page_latencies.append(seconds)

    def pdf_failure(self, reason):
        assert reason in FAILURE_REASONS
        self.failures[reason] += 1


@pytest.fixture(scope="module")
def pool():
    recorder = Recorder()
    ex = PdfExtractor(PdfLimits(max_pages=50, timeout_s=DEADLINE_S, memory_bytes=MEMORY, workers=1,
                                max_queued=0, recycle_after=3), metrics=recorder)
    ex.recorder = recorder
    yield ex
    ex.close()


# --- pages and their text --------------------------------------------------------------------


def test_every_pdf_page_is_a_page_and_a_blank_one_is_empty(pool):
    pages = ["First page.\nIt has two lines.", "", "Third (with parentheses) and a back\\slash."]
    got = pool.extract_sync(text_pdf(pages))
    assert got.pages == pages
    assert len(got.page_seconds) == 3 and all(s >= 0 for s in got.page_seconds)


def test_page_text_joins_line_end_hyphens_and_drops_control_codes():
    assert clean_page_text("hyphen\ufffe\r\nation\r\nnext") == "hyphenation\nnext"
    assert clean_page_text("a\ufffeb") == "a-b"
    assert clean_page_text("x\x0fy\x88z\x00\tend\fpage") == "x y z \tend page"


def test_workers_are_recycled_and_restart_after_close(pool):
    before = pool.recorder.pages
    for i in range(4):  # recycle_after=3: a fresh process on the fourth
        assert pool.extract_sync(text_pdf([f"document {i}"])).pages == [f"document {i}"]
    pool.close()
    assert pool.extract_sync(text_pdf(["after close"])).pages == ["after close"]
    assert pool.recorder.pages == before + 5


def test_a_worker_that_cannot_start_is_the_servers_fault_not_the_documents(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    ex = PdfExtractor(PdfLimits(workers=1))
    with pytest.raises(RuntimeError, match="did not start"):  # the ingress answers 500, not invalid_pdf
        ex.extract_sync(text_pdf(["x"]))


def test_split_pages_gives_each_page_with_the_same_text():
    pages = ["one", "", "three"]
    parts = split_pages(text_pdf(pages))
    assert parts is not None and len(parts) == 3
    assert [extract_pages(p, 10).pages for p in parts] == [[t] for t in pages]
    assert split_pages(b"not a pdf") is None


# --- failures: each typed, the pool still serving after it ----------------------------------------


def failure(pool, data: bytes) -> InvalidPdf | TooManyPdfPages:
    """The error `data` gets; it was counted by reason, and the pool reads the next PDF."""
    before = collections.Counter(pool.recorder.failures)
    with pytest.raises((InvalidPdf, TooManyPdfPages)) as e:
        pool.extract_sync(data)
    reason = getattr(e.value, "reason", "too_many_pages")
    assert pool.recorder.failures - before == collections.Counter({reason: 1})
    assert pool.extract_sync(text_pdf(["still serving"])).pages == ["still serving"]
    return e.value


@pytest.mark.parametrize("body", [b"", b"random \x00\xff bytes" * 50, os.urandom(4096), b'{"model": "bsbr"}'])
def test_bodies_that_are_not_pdfs(pool, body):
    e = failure(pool, body)
    assert (e.status, e.code, e.reason) == (422, "invalid_pdf", "not_pdf") and "not a PDF" in e.message


def test_truncated_and_damaged_pdfs(pool):
    whole = text_pdf([f"page {i} of a document" for i in range(10)])
    for cut in (0.3, 0.6, 0.95):
        e = failure(pool, whole[: int(len(whole) * cut)])
        assert (e.code, e.reason) == ("invalid_pdf", "damaged") and "damaged" in e.message
    zeroed = whole[:20] + bytes(len(whole) - 20)  # a header, then nothing
    assert failure(pool, zeroed).reason == "damaged"


def test_a_password_protected_pdf_is_refused_and_owner_restrictions_are_not(pool):
    e = failure(pool, encrypted_pdf(["secret"]))
    assert (e.status, e.code, e.reason) == (422, "invalid_pdf", "encrypted") and "encrypted" in e.message
    # An empty user password: anyone may open it (only the owner's permissions are set).
    assert pool.extract_sync(encrypted_pdf(["readable"], user_password="")).pages == ["readable"]


def test_more_pages_than_max_pages_is_413_before_any_page_is_read(pool):
    e = failure(pool, text_pdf([""] * 51))
    assert (e.status, e.code) == (413, "too_many_pages") and "51 pages" in e.message
    assert len(pool.extract_sync(text_pdf([""] * 50)).pages) == 50


def test_a_pdf_that_parses_for_hours_is_stopped_at_the_deadline(pool):
    e = failure(pool, slow_pdf())
    assert (e.status, e.code, e.reason) == (422, "invalid_pdf", "timeout")
    assert "deadline" in e.message and f"{DEADLINE_S:g} s" in e.message


def test_a_pdf_that_needs_gigabytes_stops_at_the_memory_limit():
    recorder = Recorder()
    ex = PdfExtractor(PdfLimits(timeout_s=300, memory_bytes=MEMORY, workers=1), metrics=recorder)
    ex.recorder = recorder
    try:
        e = failure(ex, memory_bomb_pdf())
    finally:
        ex.close()
    assert (e.status, e.code) == (422, "invalid_pdf") and e.reason in ("memory", "crashed")
    assert "memory limit of 384 MiB" in e.message


def worker_pids() -> list[int]:
    """This process's PDF worker processes (children running worker_main)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"worker_main" in cmdline:
            pids.append(int(entry))
    return pids


def test_a_worker_that_crashes_mid_document_is_one_failed_document(pool):
    def crash_the_worker():  # the pool has one worker: once the document is in, it is busy with it
        time.sleep(0.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGSEGV)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=crash_the_worker)
    killer.start()
    e = failure(pool, slow_pdf())
    killer.join()
    assert (e.code, e.reason) == ("invalid_pdf", "crashed") and "SIGSEGV" in e.message


def test_async_extract_refuses_beyond_the_queue_with_429(pool):
    async def two_at_once():
        first = asyncio.ensure_future(pool.extract(slow_pdf()))
        await asyncio.sleep(0.2)
        with pytest.raises(Overloaded) as e:
            await pool.extract(text_pdf(["second"]))
        assert e.value.status == 429 and e.value.retry_after_s
        with pytest.raises(InvalidPdf):
            await first
        return await pool.extract(text_pdf(["then served"]))

    assert asyncio.run(two_at_once()).pages == ["then served"]


# --- PDFs no one here wrote: Debian's manuals -----------------------------------------------------

WORD = re.compile(r"[^\W\d_]{3,}")


def test_debian_manuals_page_by_page_against_poppler(manuals):
    """Page counts as pdfinfo counts them, and every page's text: a page with
    words for pdftotext has text here, and nearly all of pdftotext's words of
    each manual are here too (figures drawn with symbol fonts differ most)."""
    ex = PdfExtractor(PdfLimits(max_pages=10_000, timeout_s=300, workers=1))
    try:
        text_free = []
        for path in manuals.values():
            got = ex.extract_sync(path.read_bytes())
            assert len(got.pages) == pdfinfo_pages(path), path.name
            poppler = pdftotext_pages(path)
            assert len(poppler) == len(got.pages), path.name
            ours_all, theirs_all = collections.Counter(), collections.Counter()
            for i, (ours, theirs) in enumerate(zip(got.pages, poppler)):
                ours_words = collections.Counter(WORD.findall(ours))
                theirs_words = collections.Counter(WORD.findall(theirs.replace("-\n", "")))
                if theirs_words:
                    assert ours_words, f"{path.name} page {i + 1}: pdftotext has text, PDFium none"
                ours_all += ours_words
                theirs_all += theirs_words
            if not theirs_all:
                text_free.append(path.name)
                assert not any(p.strip() for p in got.pages)
                continue
            recall = sum((ours_all & theirs_all).values()) / sum(theirs_all.values())
            assert recall >= 0.97, (path.name, recall)
        assert text_free == ["pixel.pdf"]  # Ghostscript's image-only example: no text at all
    finally:
        ex.close()
