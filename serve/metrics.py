"""The metrics of docs/architecture.md 4, defined once.

Recorded in the replicas with `ray.serve.metrics` (which adds the replica,
deployment and application tags) and exported by Ray's metrics agent on
every node, so Prometheus sees them as `ray_bsbr_...`. The engine records
through `EngineMetrics`; outside Ray (benchmarks, unit tests) it is a no-op.

Peak memory per request (bsbr_request_peak_memory_bytes):
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`
  at the start of each batched step; a request's value is the maximum over
  its steps.
- CPU: the replica process's peak resident set size (VmHWM in
  /proc/self/status), reset through /proc/self/clear_refs ("5") at the
  start of each batched step. It is a measurement of the whole process
  (model weights, Python, and every request batched with this one), not a
  per-tensor estimate; where /proc cannot be reset it is the process's
  lifetime peak (ru_maxrss).
"""
from __future__ import annotations

import resource
import sys

# Per-page latency of a small model on a CPU is a few ms; a 100k-token
# document on a standard transformer takes minutes.
LATENCY_BUCKETS_S = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
]
# Extracting one PDF page's text takes about a millisecond; a hostile page, until the deadline.
PDF_PAGE_BUCKETS_S = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
]
STATE_BYTES_BUCKETS = [float(1 << k) for k in range(10, 37, 2)]  # 1 KiB .. 64 GiB
MEMORY_BYTES_BUCKETS = [float(1 << k) for k in range(24, 38)]  # 16 MiB .. 128 GiB

METRIC_NAMES = (
    "bsbr_page_latency_seconds",
    "bsbr_request_latency_seconds",
    "bsbr_tokens_total",
    "bsbr_pages_total",
    "bsbr_state_bytes",
    "bsbr_request_peak_memory_bytes",
    "bsbr_sessions_active",
    "bsbr_session_resumes_total",
    "bsbr_errors_total",
)
# Counted only when their event happens (a Ray counter has no series before
# its first increment), so a healthy server may never export them.
#   bsbr_batch_fallbacks_total{model}: batches of several page steps whose
#   model.step_many raised, re-run one document at a time to find the one at
#   fault (each is also logged with the exception). A steady rate means a bug
#   in the batched path or a client sending unreadable pages.
#   bsbr_pdf_pages_total, bsbr_pdf_page_extract_seconds: PDF pages whose text
#   the ingress extracted (docs/architecture.md 3.6), and each page's
#   extraction time (load + text, in the worker process);
#   bsbr_pdf_failures_total{reason}: PDF bodies that could not be read, by
#   serve.pdf.FAILURE_REASONS (not_pdf, damaged, encrypted, too_many_pages,
#   timeout, memory, crashed). Recorded by the ingress, without a model label.
EVENT_METRIC_NAMES = (
    "bsbr_batch_fallbacks_total", "bsbr_pdf_pages_total", "bsbr_pdf_page_extract_seconds", "bsbr_pdf_failures_total",
)


def page_bucket(page_index: int) -> str:
    """The `page_index` label: the page's 1-based position in its document
    rounded down to a power of two (1, 2, 4, 8, ...), so latency against page
    index stays a handful of series per model."""
    return str(1 << (max(1, int(page_index)).bit_length() - 1))


class EngineMetrics:
    """No-op recorder; `RayServeMetrics` records for real."""

    def page(self, mode: str, seconds: float, page_index: int = 1) -> None: ...
    def request(self, route: str, seconds: float, model: str | None = None) -> None: ...
    def tokens(self, n: int) -> None: ...
    def pages(self, n: int) -> None: ...
    def state_bytes(self, n: int) -> None: ...
    def peak_memory(self, n: int) -> None: ...
    def sessions_active(self, n: int) -> None: ...
    def resume(self, source: str) -> None: ...
    def error(self, code: str, model: str | None = None) -> None: ...
    def batch_fallback(self) -> None: ...
    def pdf_pages(self, n: int) -> None: ...
    def pdf_page_latency(self, seconds: float) -> None: ...
    def pdf_failure(self, reason: str) -> None: ...


class RayServeMetrics(EngineMetrics):
    """ray.serve.metrics recorders with `model` as a default tag."""

    def __init__(self, model: str):
        from ray.serve import metrics as m

        self.model = model
        self._page = m.Histogram(
            "bsbr_page_latency_seconds", description="latency of one page step (queueing for its batch included)",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("model", "mode", "page_index"),
        )
        self._request = m.Histogram(
            "bsbr_request_latency_seconds", description="HTTP request latency in the ingress",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("model", "route"),
        )
        self._tokens = m.Counter("bsbr_tokens_total", description="tokens read", tag_keys=("model",))
        self._pages = m.Counter("bsbr_pages_total", description="pages read", tag_keys=("model",))
        self._state = m.Histogram(
            "bsbr_state_bytes", description="carried state after each page",
            boundaries=STATE_BYTES_BUCKETS, tag_keys=("model",),
        )
        self._peak = m.Histogram(
            "bsbr_request_peak_memory_bytes",
            description="per request: CUDA max_memory_allocated, CPU peak RSS of the replica process",
            boundaries=MEMORY_BYTES_BUCKETS, tag_keys=("model",),
        )
        self._active = m.Gauge("bsbr_sessions_active", description="sessions held hot on this replica", tag_keys=("model",))
        self._resumes = m.Counter(
            "bsbr_session_resumes_total", description="session pages served from the hot copy or the store",
            tag_keys=("model", "source"),
        )
        self._errors = m.Counter("bsbr_errors_total", description="error answers by code", tag_keys=("model", "code"))
        self._fallbacks = m.Counter(
            "bsbr_batch_fallbacks_total",
            description="batches whose step_many failed and were re-run one document at a time",
            tag_keys=("model",),
        )
        self._pdf_pages = m.Counter("bsbr_pdf_pages_total", description="PDF pages whose text was extracted")
        self._pdf_page = m.Histogram(
            "bsbr_pdf_page_extract_seconds", description="text extraction time of one PDF page (load + text)",
            boundaries=PDF_PAGE_BUCKETS_S,
        )
        self._pdf_failures = m.Counter(
            "bsbr_pdf_failures_total", description="PDF bodies that could not be read, by reason", tag_keys=("reason",),
        )

    def page(self, mode, seconds, page_index=1):
        self._page.observe(seconds, tags={"model": self.model, "mode": mode, "page_index": page_bucket(page_index)})

    def request(self, route, seconds, model=None):
        self._request.observe(seconds, tags={"model": model or self.model, "route": route})

    def tokens(self, n):
        if n:
            self._tokens.inc(n, tags={"model": self.model})

    def pages(self, n):
        if n:
            self._pages.inc(n, tags={"model": self.model})

    def state_bytes(self, n):
        self._state.observe(n, tags={"model": self.model})

    def peak_memory(self, n):
        self._peak.observe(n, tags={"model": self.model})

    def sessions_active(self, n):
        self._active.set(n, tags={"model": self.model})

    def resume(self, source):
        self._resumes.inc(tags={"model": self.model, "source": source})

    def error(self, code, model=None):
        self._errors.inc(tags={"model": model or self.model, "code": code})

    def batch_fallback(self):
        self._fallbacks.inc(tags={"model": self.model})

    def pdf_pages(self, n):
        if n:
            self._pdf_pages.inc(n)

    def pdf_page_latency(self, seconds):
        self._pdf_page.observe(seconds)

    def pdf_failure(self, reason):
        self._pdf_failures.inc(tags={"reason": reason})


def malloc_trim() -> bool:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim(0)).

    Freed tensors' memory stays in the process (the allocator keeps it for
    reuse); a replica whose large session states come and go then holds
    the peak of them for good. False where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)  # 1 if it gave memory back, 0 if there was none to give
    return True


class PeakMemory:
    """Peak memory over a step, measured as the module docstring says."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self._can_reset = sys.platform.startswith("linux") and self._try_reset()

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self._can_reset:
            self._try_reset()

    def peak(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        if self._can_reset:
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024
            except OSError:
                pass
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
